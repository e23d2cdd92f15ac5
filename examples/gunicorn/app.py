"""A small WSGI app for the gunicorn recipe (docs/recipes.md), run unmodified by
`gunicorn -c gunicorn.conf.py app:app` under baton (`baton run -c examples/gunicorn/baton.yaml`).
It answers every request with a line naming its process and baton's generation."""

import os

GENERATION = os.environ.get("BATON_GENERATION", "0")
BODY = f"hello from gunicorn, pid {os.getpid()}, generation {GENERATION}\n".encode()


def app(environ, start_response):
    start_response(
        "200 OK",
        [
            ("content-type", "text/plain"),
            ("content-length", str(len(BODY))),
            ("x-baton-generation", GENERATION),
        ],
    )
    return [BODY]
