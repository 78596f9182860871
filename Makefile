# The README's two commands are `make demo` and `make test`; every other target is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := git libsystemd-dev pkg-config gcc python3-dev python3-venv iproute2 util-linux \
	openssh-server openssh-client chromium chromium-driver tmux zsh

.PHONY: demo test venv dev-venv system-packages lint format bench fuzz check clean

# Run AIGIS with the example plugins on the embedded supervisor (Ctrl-C stops it).
demo: venv
	$(VENV)/bin/aigisctl check -c examples/aigis.toml
	$(VENV)/bin/aigis -c examples/aigis.toml

# Install everything from nothing (system packages when root), then run the whole suite.
test: system-packages dev-venv
	$(VENV)/bin/ruff check aigis tests packaging $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check aigis tests packaging $(wildcard benchmarks)
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && \
			$(PYTHON) -m venv $(VENV); \
		else echo "make: $(PYTHON) cannot create a venv: run 'sudo apt install python3-venv'" >&2; \
			exit 1; fi; }
	$(PY) -m pip install -q --upgrade pip

venv: $(VENV)/bin/python
	$(PY) -m pip install -q -e .

dev-venv: $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev,systemd]'

# apt packages the test suite needs (systemd-python builds against libsystemd-dev; the package
# tests build a .deb and an .rpm).
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES) && \
		packaging/build.sh deps; \
	else echo "not root or no apt-get: assuming $(APT_PACKAGES) and packaging tools are installed"; fi

lint: dev-venv
	$(VENV)/bin/ruff check aigis tests packaging $(wildcard benchmarks)

format: dev-venv
	$(VENV)/bin/ruff format aigis tests packaging $(wildcard benchmarks)

# The fuzz targets of the suite (config, manifest, wire) with many more generated inputs.
fuzz: dev-venv
	AIGIS_FUZZ_EXAMPLES=$${AIGIS_FUZZ_EXAMPLES:-5000} $(VENV)/bin/pytest -q -k fuzz tests

# AIGIS vs supervisord and circus (installed in benchmarks/.venv-peers), then the proxy benchmark.
# Options: make bench BENCH_ARGS="--n 10,100 --rounds 3 --systemd"
bench: dev-venv
	$(PY) -m benchmarks.run $(BENCH_ARGS)

check: venv
	$(VENV)/bin/aigisctl check -c examples/aigis.toml

clean:
	rm -rf $(VENV) build dist *.egg-info examples/.state

include packaging/packaging.mk
