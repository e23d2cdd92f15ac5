#!/usr/bin/env bash
# Builds target/debian/baton_<version>_<arch>.deb: the release binary, the systemd unit, the
# example configuration (a conffile), the man page and shell completions generated from the
# binary's own command definitions. Needs cargo-deb (cargo install cargo-deb).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p baton
mkdir -p target/package
baton=target/release/baton
"$baton" man > target/package/baton.1
"$baton" completions bash > target/package/baton.bash
"$baton" completions zsh > target/package/_baton
"$baton" completions fish > target/package/baton.fish
cargo deb -p baton --no-build --locked
