#!/usr/bin/env bash
# Checks the built .deb: its control fields and that every file an operator needs is inside,
# by extracting it (nothing is installed on this machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=$(ls -t target/debian/baton_*.deb | head -1)
echo "checking $deb"
fail() { echo "FAIL: $*" >&2; exit 1; }
info=$(dpkg-deb --info "$deb")
grep -q "Package: baton" <<<"$info" || fail "package name"
grep -q "Section: net" <<<"$info" || fail "section"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
dpkg-deb -e "$deb" "$root/DEBIAN"
for f in usr/bin/baton lib/systemd/system/baton.service etc/baton/baton.yaml \
         usr/share/man/man1/baton.1.gz usr/share/bash-completion/completions/baton \
         usr/share/zsh/vendor-completions/_baton usr/share/fish/vendor_completions.d/baton.fish \
         usr/share/doc/baton/README.md usr/share/doc/baton/operations.md \
         usr/share/doc/baton/examples/baton.socket usr/share/doc/baton/examples/baton-strict.conf; do
    [ -e "$root/$f" ] || fail "missing /$f"
done
grep -qx /etc/baton/baton.yaml "$root/DEBIAN/conffiles" || fail "/etc/baton/baton.yaml is not a conffile"
grep -q "/usr/bin/baton upgrade" "$root/DEBIAN/postinst" || fail "a package upgrade must upgrade the running master in place"
grep -q "^Type=notify" "$root/lib/systemd/system/baton.service" || fail "unit type"
"$root/usr/bin/baton" --version | grep -q "^baton " || fail "the packaged binary runs"
zcat "$root/usr/share/man/man1/baton.1.gz" | grep -q '^.TH baton 1' || fail "man page"
echo "ok: $(dpkg-deb --field "$deb" Package Version Architecture | tr '\n' ' ')"
