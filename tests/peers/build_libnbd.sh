#!/bin/sh
# Build a libnbd new enough to speak NBD_OPT_EXTENDED_HEADERS (1.18 or
# later; bookworm has 1.14) from Debian's upstream tarball, into a cache
# directory, once per machine. Nothing is installed system-wide: the
# library, nbdinfo/nbdcopy/nbdsh and the Python module stay under $DEST.
#
#   tests/peers/build_libnbd.sh     # prints the prefix, for EXPORTD_NEW_LIBNBD
#   EXPORTD_NEW_LIBNBD=$(tests/peers/build_libnbd.sh) make test
#
# Not part of `make test` (the build takes about a minute on 2 cores, and the
# suite's budget is 15 minutes): tests/nbd/test_extended.py runs the
# extension from its spec on a raw socket always, and with this libnbd when
# EXPORTD_NEW_LIBNBD names the prefix. Needs gcc, make, pkg-config,
# libgnutls28-dev, libxml2-dev and python3-dev (apt-get installs them).
set -eu

CACHE=${EXPORTD_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/exportd-tests}
DEST=$CACHE/libnbd
# Versions to try, newest first: the mirror may not keep every one.
VERSIONS=${EXPORTD_LIBNBD_VERSIONS:-"1.24.4 1.22.2"}
MIRROR=${EXPORTD_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "build_libnbd: $*" >&2; }

if [ -f "$DEST/built" ] && [ -x "$DEST/bin/nbdinfo" ]; then
	echo "$DEST"
	exit 0
fi

. "$(dirname "$0")/../../bench/peers/apt_missing.sh"
apt_missing gcc make pkg-config libgnutls28-dev libxml2-dev python3-dev curl

WORK=$CACHE/libnbd-src
rm -rf "$WORK" "$DEST"
mkdir -p "$WORK"
for v in $VERSIONS; do
	url=$MIRROR/pool/main/libn/libnbd/libnbd_$v.orig.tar.gz
	if curl -fsS -o "$WORK/libnbd.tar.gz" "$url" 2>/dev/null; then
		VERSION=$v
		break
	fi
done
if [ -z "${VERSION:-}" ]; then
	say "no libnbd tarball of $VERSIONS at $MIRROR"
	exit 1
fi
say "building libnbd $VERSION into $DEST (about a minute)"
tar -xzf "$WORK/libnbd.tar.gz" -C "$WORK"
cd "$WORK/libnbd-$VERSION"
# /usr/bin/python3 is the interpreter the tests run python3-libnbd under
./configure --prefix="$DEST" --disable-ocaml --disable-golang --disable-rust --disable-fuse \
	--enable-python PYTHON=/usr/bin/python3 --with-python-installdir="$DEST/python" \
	>"$WORK/configure.log" 2>&1 || { tail -n 30 "$WORK/configure.log" >&2; exit 1; }
make -j"$(nproc)" >"$WORK/make.log" 2>&1 || { tail -n 30 "$WORK/make.log" >&2; exit 1; }
make install >"$WORK/install.log" 2>&1 || { tail -n 30 "$WORK/install.log" >&2; exit 1; }
echo "$VERSION" >"$DEST/built"
rm -rf "$WORK"
echo "$DEST"
