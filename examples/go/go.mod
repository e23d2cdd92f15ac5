module baton.example/go-recipe

go 1.19
