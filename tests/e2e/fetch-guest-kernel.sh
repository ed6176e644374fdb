#!/bin/bash
# Fetch the guest kernel for the virtio-fs tests: Debian bookworm-backports' 6.12 kernel image
# (virtio_pci and virtiofs built in), extracted from its .deb without installing it. A private
# apt state directory keeps the system's apt configuration untouched. Idempotent.
set -euo pipefail
DEST=${1:-/var/cache/nydusfs/guest}
if compgen -G "$DEST/vmlinuz-*" >/dev/null; then exit 0; fi
mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial"
echo 'deb http://deb.debian.org/debian bookworm-backports main' > "$WORK/sources.list"
O=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o Dir::Etc::SourceParts=/dev/null
   -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache" -o APT::Architectures=amd64
   -o APT::Sandbox::User=root)
apt-get "${O[@]}" -qq update
PKG=$(apt-cache "${O[@]}" depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
[ -n "$PKG" ] || { echo "fetch-guest-kernel: cannot resolve linux-image-amd64" >&2; exit 1; }
(cd "$WORK" && apt-get "${O[@]}" -qq download "$PKG")
K=${PKG#linux-image-}
dpkg-deb --fsys-tarfile "$WORK"/"$PKG"_*.deb | tar -x -C "$WORK" "./boot/vmlinuz-$K"
mv "$WORK/boot/vmlinuz-$K" "$DEST/vmlinuz-$K"
echo "fetch-guest-kernel: $DEST/vmlinuz-$K"
