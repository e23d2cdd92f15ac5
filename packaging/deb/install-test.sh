#!/usr/bin/env bash
# Installs the built .deb for real with dpkg, safely: into a throwaway copy-on-write view of this
# machine's root (an overlay in a private mount namespace, entered with chroot), so the host's
# dpkg database and /usr are untouched. Checks install, the installed binary and config,
# an upgrade that keeps an edited conffile, remove (conffile stays) and purge (conffile goes).
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=$(ls -t target/debian/baton_*.deb | head -1)
[ "$(id -u)" = 0 ] || { echo "install-test: needs root (for the mount namespace)" >&2; exit 77; }
echo "installing $deb into a throwaway overlay of /"
exec unshare --mount --propagation private bash -s "$deb" <<'INNER'
set -euo pipefail
deb=$1
fail() { echo "FAIL: $*" >&2; exit 1; }
scratch=$(mktemp -d)
mount -t tmpfs tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
cp "$deb" "$root/tmp/baton.deb"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }

in_root dpkg -i /tmp/baton.deb >/dev/null || fail "dpkg -i"
in_root dpkg-query -W -f='${Status}\n' baton | grep -qx "install ok installed" || fail "not installed"
in_root /usr/bin/baton --version | grep -q "^baton " || fail "installed binary does not run"
# The example config is complete except for the server it names, a placeholder to replace.
check=$(in_root /usr/bin/baton check -c /etc/baton/baton.yaml 2>&1 || true)
grep -Eq "baton.yaml:[0-9]+: worker.command: /usr/local/bin/my-server does not exist" <<<"$check" \
    && grep -q ": 1 problem(s)" <<<"$check" || fail "the installed example config: $check"
for f in /lib/systemd/system/baton.service /usr/share/man/man1/baton.1.gz \
         /usr/share/bash-completion/completions/baton; do
    in_root test -s "$f" || fail "missing $f after install"
done

# Upgrade (reinstall): the operator's edit of the conffile survives.
echo "# edited by the operator" >>"$root/etc/baton/baton.yaml"
in_root dpkg -i --force-confold /tmp/baton.deb >/dev/null || fail "dpkg -i (upgrade)"
grep -q "edited by the operator" "$root/etc/baton/baton.yaml" || fail "upgrade replaced the edited conffile"

in_root dpkg -r baton >/dev/null || fail "dpkg -r"
in_root test ! -e /usr/bin/baton || fail "/usr/bin/baton left after remove"
in_root test -e /etc/baton/baton.yaml || fail "remove must keep the conffile"
in_root dpkg -P baton >/dev/null || fail "dpkg -P"
in_root test ! -e /etc/baton/baton.yaml || fail "purge must delete the conffile"
echo "ok: dpkg -i, upgrade keeping an edited conffile, remove, purge"
INNER
