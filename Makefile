# exportd: every target installs what it needs, idempotently.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := fuse3 qemu-utils qemu-system-common fio util-linux libnbd-bin nbdkit python3-libnbd
BENCH_APT_PACKAGES := libfuse3-dev pkg-config
PYTEST_ARGS ?=

.PHONY: setup setup-system setup-venv test demo lint bench clean docs

setup: setup-system setup-venv

# Debian packages: installed only when one is missing; /dev/fuse opened to
# non-root users (Debian's udev default 0666, needed by fusermount3).
setup-system:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing </dev/null; \
	fi
	@if [ -c /dev/fuse ] && [ "$$(stat -c %a /dev/fuse)" != 666 ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; $$SUDO chmod 0666 /dev/fuse; fi
	@grep -q '^user_allow_other' /etc/fuse.conf 2>/dev/null || \
	  { [ "$$(id -u)" = 0 ] && echo user_allow_other >> /etc/fuse.conf || true; }

$(VENV)/.stamp: pyproject.toml
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,lint,zstd,docs]'
	@touch $@

setup-venv: $(VENV)/.stamp

test: setup
	$(VPY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check server clients tests bench

# man pages and shell completion, generated from the argument parsers into
# share/ (committed: the wheel installs them; a test checks they are current)
docs: setup
	$(VENV)/bin/argparse-manpage --module exportd.cli --function build_parser --project-name exportd \
	  --manual-section 8 --manual-title "System Administration" --output share/man/exportd.8 \
	  --description "storage daemon: disk images as files through FUSE and NBD, controlled over QMP"
	$(VENV)/bin/argparse-manpage --module exportctl.cli --function build_parser --project-name exportd \
	  --manual-section 1 --manual-title "User Commands" --output share/man/exportctl.1 \
	  --description "control an exportd daemon over QMP"
	$(VPY) -m exportctl.completion bash > share/completion/exportctl.bash
	$(VPY) -m exportctl.completion zsh > share/completion/_exportctl

demo: setup
	$(VPY) -m exportd.demo

# libfuse's passthrough_hp is built once per machine into ~/.cache/exportd-bench
# (a failed build only makes its peers unavailable); FUSE over io_uring is
# switched on in the kernel when we may (root). ALLOW_LOAD=1 measures even when
# the 1-minute load average is above 0.5 (the table is then marked).
bench: setup
	@for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_APT_PACKAGES) </dev/null; break; }; done
	$(VPY) -m pip install -q -e '.[bench]'
	@bench/peers/build_passthrough_hp.sh >/dev/null || echo "passthrough_hp not built: its peers will be reported unavailable"
	@u=/sys/module/fuse/parameters/enable_uring; if [ -w $$u ] && [ "$$(cat $$u)" != Y ]; then echo Y > $$u; fi
	$(VPY) bench/run.py $(if $(QUICK),--quick,) $(if $(ALLOW_LOAD),--allow-load,) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info clients/*.egg-info .pytest_cache
