# nydusfs developer entry points. `make test` is what CI runs (.ci/run); `make demo` is the
# main job. `deps` makes a fresh Debian bookworm machine (as root) ready for both.

SHELL := /bin/bash
PYTHON ?= python3
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Kernel peers and tools the tests drive (erofs-utils, squashfuse, ...), the servers the
# backend tests run on loopback (nginx, docker-registry), and what pyfuse3 needs to build.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc erofs-utils squashfuse squashfs-tools \
	attr acl gdisk util-linux kmod nginx-light docker-registry curl \
	libnbd-bin qemu-utils qemu-system-x86 busybox-static cpio libc6-dev skopeo umoci \
	debootstrap fuse-overlayfs
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -qq -o Dpkg::Use-Pty=0

.PHONY: deps test lint demo bench

# Idempotent: apt runs only when a package is missing (so repeated runs need no network for
# it); pip re-installs the editable package, which is quick and picks up pyproject changes.
deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' \
			|| missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		$(APT) update && $(APT) install -y --no-install-recommends $$missing >/dev/null; \
	fi
	@echo "deps: pip install -e '.[test,fuse]'"
	@$(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore \
		-e '.[test,fuse]'
	@$(PYTHON) -m tests.nbd.guest  # the QEMU guests' kernel (Linux 6.12, cached, not installed)

test: deps
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

demo: deps
	$(PYTHON) -m nydusfs.demo

bench:
	$(PYTHON) bench/build.py $(BENCH_ARGS)
