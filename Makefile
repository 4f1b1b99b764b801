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
# non-root users (Debian's udev default 0666, needed by fusermount3); FUSE
# over io_uring allowed by the kernel (module parameter, root only; off by
# default until the next boot: exports then serve through /dev/fuse).
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
	@p=/sys/module/fuse/parameters/enable_uring; if [ -f $$p ] && [ "$$(cat $$p)" != Y ]; then \
	  { [ "$$(id -u)" = 0 ] && echo Y > $$p; } || echo "note: FUSE over io_uring stays off (as root: echo Y > $$p)"; fi

$(VENV)/.stamp: pyproject.toml
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,lint,zstd,docs]'
	@touch $@

# Bytecode compiled ahead: where PYTHONDONTWRITEBYTECODE is set (as on this
# machine) every daemon a test starts would otherwise compile each module
# again (0.57 s -> 0.30 s of CPU to import the daemon); up-to-date files are
# skipped, so this is quick after the first time.
setup-venv: $(VENV)/.stamp
	@$(VPY) -m compileall -q server clients bench

# The export tiers' data-path tests run a second time with every FUSE export
# on io_uring (raw exports on ring threads, qcow2 ones on the loop-driven
# ring; skipped, with the reason, where the kernel does not allow it;
# URING_PASS=0 skips it). The control-path tests (QMP replies compared with
# qemu-storage-daemon, allow-other, passthrough, reopen...) send the same
# requests and stay out, and so do qcow2_export's read, write, fallocate and
# seek files (70 s: the same transport as iotest308's qcow2 half, which
# stays), which keeps `make test` under 15 minutes; every file passes with
# `EXPORTD_FUSE_IO_URING=on pytest tests/export tests/qcow2_export`.
URING_TESTS ?= $(addprefix tests/export/test_,iotest308.py semantics.py interrupt.py \
  lifecycle.py load.py backend_errors.py crash.py handlers.py replace_node.py splice.py \
  virtual_size.py) $(addprefix tests/qcow2_export/test_,concurrency.py kill9.py)
URING_PASS ?= 1

test: setup
	$(VPY) -m pytest -q $(PYTEST_ARGS)
	@reason=$$($(VPY) -c 'from exportd.fuse.uring import unavailable_reason; print(unavailable_reason())'); \
	if [ "$(URING_PASS)" = 0 ]; then :; elif [ -z "$$reason" ]; then \
	  echo "== the export tiers' data-path tests again, FUSE exports on io_uring (EXPORTD_FUSE_IO_URING=on)"; \
	  EXPORTD_FUSE_IO_URING=on $(VPY) -m pytest -q $(URING_TESTS); \
	else echo "== no io_uring pass of the export tiers: $$reason"; fi

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
