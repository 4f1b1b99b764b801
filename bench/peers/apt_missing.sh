# Sourced by the peer build scripts (bench/peers, tests/peers): apt_missing
# PKG... installs those of the Debian packages that are not installed yet,
# with sudo unless we are root. The caller defines say().
apt_missing() {
	missing=""
	for p in "$@"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
	done
	[ -n "$missing" ] || return 0
	say "installing build dependencies:$missing"
	SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing </dev/null
}
