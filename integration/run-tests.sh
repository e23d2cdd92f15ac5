#!/usr/bin/env bash
# The README's test command: installs what the tests need from Debian's packages (Python 3 and
# Node.js for the example workers, util-linux's unshare/nsenter and systemd for the booted-systemd
# tests, iproute2 for a test that runs the master in a network namespace of its own, HAProxy,
# nginx and Go for their recipes, strace to make system calls fail in the running master, podman
# and runc to build and run the container image) and
# uvicorn, gunicorn and kubernetes-validate (Kubernetes' schemas, offline) from PyPI into a
# virtual environment (target/recipes-venv), then runs every test of the workspace. Exits
# non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v node >/dev/null || missing+=(nodejs)
{ command -v unshare >/dev/null && command -v nsenter >/dev/null; } || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
{ command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; } || missing+=(haproxy)
{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || missing+=(nginx-light)
command -v go >/dev/null || missing+=(golang-go)
[ -x /usr/bin/strace ] || missing+=(strace)
command -v podman >/dev/null || missing+=(podman)
[ -x /usr/sbin/runc ] || missing+=(runc)
[ -x /lib/systemd/systemd ] || missing+=(systemd)
# Debian's Python makes virtual environments only with python3-venv (ensurepip).
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip' 2>/dev/null; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the tests need: ${missing[*]} (apt-get install them as root, or run this as root)" >&2
    exit 1
  fi
  echo "installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

venv=target/recipes-venv
if ! "$venv/bin/python" -c 'import uvicorn, gunicorn, kubernetes_validate' 2>/dev/null; then
  echo "installing uvicorn, gunicorn and kubernetes-validate into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    -r examples/uvicorn/requirements.txt -r examples/gunicorn/requirements.txt \
    -r packaging/container/requirements-test.txt
fi

exec cargo test --workspace --locked "$@"
