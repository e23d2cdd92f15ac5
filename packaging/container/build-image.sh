#!/usr/bin/env bash
# Builds the container image offline with podman: FROM scratch, holding baton and the example
# worker (release builds), exactly the shared libraries they load (from ldd), the container's
# configuration and an /etc/passwd with `nobody`. No base image from a registry.
#   packaging/container/build-image.sh [TAG]        (default: baton:latest)
# podman's options (the storage driver, the cgroup manager) come from PODMAN_OPTS.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-baton:latest}
read -r -a podman_opts <<<"${PODMAN_OPTS:-}"
cargo build --release --locked --quiet -p baton -p baton-example-worker
root=$(mktemp -d)
chmod 755 "$root" # mktemp makes it 0700: the image's / must let workers (nobody) in
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/etc/baton" "$root/run/baton" "$root/tmp"
chmod 1777 "$root/tmp"
cp target/release/baton target/release/hello-worker "$root/usr/bin/"
# Each library at the path the dynamic loader looks for it (symlinks resolved).
for lib in $(ldd target/release/baton target/release/hello-worker |
             awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp packaging/container/baton.yaml "$root/etc/baton/baton.yaml"
printf 'root:x:0:0:root:/root:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n' \
  >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
tar -C "$root" -c . | podman "${podman_opts[@]}" import \
  --change 'ENTRYPOINT ["/usr/bin/baton", "run", "-c", "/etc/baton/baton.yaml"]' \
  --change 'STOPSIGNAL SIGTERM' \
  --change 'EXPOSE 8080' \
  --change 'EXPOSE 9273' \
  - "$tag" >/dev/null
echo "$tag: $(podman "${podman_opts[@]}" image inspect --format '{{.Size}}' "$tag") bytes"
