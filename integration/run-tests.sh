#!/usr/bin/env bash
# The README's test command: installs what the tests need from Debian's packages (Python 3 and
# Node.js for the example workers, util-linux's unshare/nsenter and systemd for the booted-systemd
# tests, iproute2 for a test that runs the master in a network namespace of its own, HAProxy and
# nginx for their recipes), then runs every test of the workspace. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v node >/dev/null || missing+=(nodejs)
{ command -v unshare >/dev/null && command -v nsenter >/dev/null; } || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
{ command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; } || missing+=(haproxy)
{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || missing+=(nginx-light)
[ -x /lib/systemd/systemd ] || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the tests need: ${missing[*]} (apt-get install them as root, or run this as root)" >&2
    exit 1
  fi
  echo "installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

exec cargo test --workspace --locked "$@"
