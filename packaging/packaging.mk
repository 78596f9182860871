# Packaging targets; the main Makefile includes this file (`include packaging/packaging.mk`).
# Outputs go to dist/; the work happens in build/packaging/. See packaging/build.sh.
#
#   make deb              Debian package  (dist/aigis_<version>-1_all.deb)
#   make rpm              RPM             (dist/aigis-<version>-1.noarch.rpm)
#   make lintian          lintian on the .deb (fails on errors)
#   make man              regenerate packaging/man/*.1 from the command lines
#   make packaging-deps   apt-get install what the targets above need (root, Debian)

PACKAGING_SH := $(dir $(lastword $(MAKEFILE_LIST)))build.sh

.PHONY: deb rpm lintian man packaging-deps

deb:
	$(PACKAGING_SH) deb

rpm:
	$(PACKAGING_SH) rpm

lintian: deb
	$(PACKAGING_SH) lint

man:
	PYTHON=$(abspath $(PY)) $(PACKAGING_SH) man

packaging-deps:
	$(PACKAGING_SH) deps
