#!/bin/sh
# Build libfuse's passthrough_hp example from Debian's newest fuse3 source
# package (unstable), once per machine, into a cache directory. The system's
# fuse3 packages are left alone: the example runs from the build tree, with
# LD_LIBRARY_PATH pointing at the libfuse3.so built next to it.
#
#   bench/peers/build_passthrough_hp.sh        # prints the binary's path
#
# Idempotent: a finished build leaves $DEST/built (the package version) and
# later calls only print the path. EXPORTD_BENCH_CACHE overrides the cache
# directory (default ~/.cache/exportd-bench). Needs root for apt-get (the
# build dependencies, from the machine's own suite) unless they are present.
set -eu

CACHE=${EXPORTD_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/exportd-bench}
DEST=$CACHE/libfuse
BINARY=$DEST/build/example/passthrough_hp
SUITE=${EXPORTD_BENCH_FUSE_SUITE:-unstable}
# io_uring support (-o io_uring) came with libfuse 3.18.
MIN_VERSION=3.18

say() { echo "build_passthrough_hp: $*" >&2; }

if [ -x "$BINARY" ] && [ -f "$DEST/built" ]; then
	echo "$BINARY"
	exit 0
fi

# The Debian mirror this machine already uses (deb822 .sources or one-line
# sources.list), so that the deb-src entry reaches the same place.
debian_uri() {
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f"
	done | head -n 1
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\// && $i ~ /\/debian\/?$/) { print $i; exit } }' "$f"
	done | head -n 1
}
URI=$(debian_uri | head -n 1)
if [ -z "$URI" ]; then
	say "no Debian mirror in /etc/apt/sources.list*: cannot fetch the fuse3 source package"
	exit 1
fi

# Build dependencies, from the machine's own suite (never a newer fuse3).
. "$(dirname "$0")/apt_missing.sh"
apt_missing meson ninja-build pkg-config g++ liburing-dev libnuma-dev dpkg-dev

# A private apt configuration with one deb-src entry for the newest suite: the
# system's sources and package lists are not touched.
APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$APT/sources.list" <<EOF
deb-src [signed-by=$KEYRING] $URI $SUITE main
EOF
apt_private() {
	apt-get -q -o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
		-o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" \
		-o APT::Sandbox::User=root "$@"
}
say "fetching the fuse3 source package from $URI $SUITE"
apt_private update >/dev/null
WORK=$CACHE/src
rm -rf "$WORK"
mkdir -p "$WORK"
(cd "$WORK" && apt_private source --download-only fuse3 >/dev/null)
DSC=$(ls "$WORK"/fuse3_*.dsc | head -n 1)
VERSION=$(sed -n 's/^Version: //p' "$DSC")
UPSTREAM=${VERSION#*:}
UPSTREAM=${UPSTREAM%%-*}
if ! dpkg --compare-versions "$UPSTREAM" ge "$MIN_VERSION"; then
	say "fuse3 $VERSION in $SUITE is older than $MIN_VERSION (no io_uring)"
	exit 1
fi
rm -rf "$DEST"
dpkg-source -x "$DSC" "$DEST" >/dev/null
# dpkg-source leaves a link to the upstream tarball beside the tree.
rm -f "$CACHE"/fuse3_*.orig.tar.*

say "building libfuse $VERSION (examples only needed; takes about a minute)"
# -Dexamples=true: passthrough_hp; no utils install, no udev rules: nothing
# leaves the build tree.
(cd "$DEST" && meson setup build --buildtype=release -Dexamples=true -Dutils=false \
	-Dtests=false >"$DEST/meson-setup.log" 2>&1) || { tail -n 30 "$DEST/meson-setup.log" >&2; exit 1; }
grep -i 'uring' "$DEST/meson-setup.log" >&2 || true
ninja -C "$DEST/build" >"$DEST/ninja.log" 2>&1 || { tail -n 30 "$DEST/ninja.log" >&2; exit 1; }
[ -x "$BINARY" ] || { say "no $BINARY after the build"; exit 1; }
echo "$VERSION" >"$DEST/built"
# The sources and the suite's package lists served only this build.
rm -rf "$WORK" "$APT"
echo "$BINARY"
