#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), on the stable toolchain
# (`--sanitizer none`: only the sanitizers need nightly), from a copy of the committed seed
# corpus; prints each target's executions and coverage, and exits non-zero if one crashed
# (libFuzzer leaves the input as fuzz/artifacts/<target>/crash-*: replay with
# `cargo fuzz run -s none <target> <file>`). docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2 --quiet
cargo fuzz build -s none -O
status=0
for target in $(cargo fuzz list); do
  work=$(mktemp -d)
  cp -r "corpus/$target/." "$work/"
  if cargo fuzz run -s none -O "$target" "$work" -- -max_total_time="$seconds" \
      -print_final_stats=1 2>"$work.log"; then
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$work.log" | grep -oE '[0-9]+$' || echo '?')
    cov=$(grep -oE 'cov: [0-9]+' "$work.log" | tail -1 | grep -oE '[0-9]+' || echo '?')
    echo "$target: ${seconds} s, ${runs} executions, coverage ${cov} edges, no crash"
  else
    echo "$target: CRASHED; see fuzz/artifacts/$target" >&2
    tail -40 "$work.log" >&2
    status=1
  fi
  rm -rf "$work" "$work.log"
done
exit "$status"
