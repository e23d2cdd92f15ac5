#!/usr/bin/env bash
# Every benchmark in one command: baton alone (reload-bench), then baton side by side with
# nginx, HAProxy and a naive restart (peer-bench), then HTTP/3 across reloads against Caddy
# (h3-bench), then WebSockets across reloads with and without connection handoff beside nginx and
# HAProxy (ws-bench). Installs nginx-light, haproxy and caddy from Debian's packages when missing.
# Loopback only; every phase is bounded in time (about 45 minutes in all).
#
#   bash integration/bench.sh [OUTDIR]      # default: target/bench
#
# Writes OUTDIR/reload-bench.md, OUTDIR/peer-bench.md, OUTDIR/peers.svg and
# OUTDIR/peers-reloads.svg, and exits non-zero if baton lost a request in any scenario where it
# must lose none (or if a benchmark failed). peer-bench kills every nginx and haproxy process
# between runs: use a machine that does not serve with them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench}
mkdir -p "$out"

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v caddy >/dev/null || missing+=(caddy)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo build --release --locked -p baton -p baton-example-worker -p baton-example-h3 -p baton-example-ws -p baton-integration --bins
{
    echo "Run $(date -u +%Y-%m-%dT%H:%MZ); $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB,"
    echo "Linux $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME"), baton $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "$(nginx -v 2>&1), $(haproxy -v | head -1)."
    echo
} | tee "$out/machine.md" >&2

status=0
./target/release/reload-bench >"$out/reload-bench.md" || status=1
./target/release/peer-bench --seconds 20 --svg "$out/peers.svg" >"$out/peer-bench.md" || status=1
./target/release/h3-bench >"$out/h3-bench.md" || status=1
# WebSockets: every server at 2 000 clients (about 4 minutes), then at the issue's 10 000
# (about 13: opening 10 000 through a proxy takes 4).
./target/release/ws-bench --clients 2000 --seconds 30 >"$out/ws-bench.md" || status=1
./target/release/ws-bench --clients 10000 --seconds 60 >>"$out/ws-bench.md" || status=1
cat "$out/machine.md" "$out/reload-bench.md" "$out/peer-bench.md" "$out/h3-bench.md" "$out/ws-bench.md"
if ((status)); then
    echo "FAILED: see above" >&2
fi
exit "$status"
