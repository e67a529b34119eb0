# The two commands a user needs: `make demo` (the main job) and `make test` (the whole suite).
# Both build .venv/ on first use from the locked environment (requirements/*.lock, exact versions
# with hashes): PyTorch first (the CPU build, or the CUDA build where `nvidia-smi` exists or
# TORCH=cuda), then every other dependency, then this project itself, then any Debian package the
# tests need. `make lock` refreshes the lock and the pins derived from it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
# Where pip finds the CPU build when no local wheel folder has it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SOURCE_cpu := --extra-index-url $(TORCH_CPU_INDEX) --retries 1
LOCKS := requirements/main.lock requirements/torch-$(TORCH).lock
UV_PIN := uv==0.13.9
# Debian packages the suite uses: a Java runtime for pycocoevalcap (METEOR, SPICE tokenizer),
# Chromium for the MLflow UI screenshot test.
APT_PACKAGES := default-jre-headless chromium
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(TORCH)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast coverage lint clean apt lock

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Exact versions and hashes only (--no-deps: the lock lists every package); `pip check` then
# proves the set is consistent. The project itself is installed editable, without fetching a
# build backend (setuptools comes from the lock).
$(STAMP): pyproject.toml Makefile $(LOCKS) | $(BIN)/python
	$(PIP) install -q --no-deps --require-hashes $(TORCH_SOURCE_$(TORCH)) -r requirements/torch-$(TORCH).lock
	$(PIP) install -q --no-deps --require-hashes -r requirements/main.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@# decord 0.6.0's wheel file is py3-none-manylinux2010 but its WHEEL metadata says cp36, which
	@# pip >= 24.1 reports as 'not supported'; it imports and decodes here (tests/data). Anything else fails.
	@out="$$($(PIP) check 2>&1)"; rest="$$(echo "$$out" | grep -v -e '^decord 0\.6\.0 is not supported on this platform$$' -e '^No broken requirements found')"; \
	  if [ -n "$$rest" ]; then echo "$$rest"; exit 1; fi; echo "pip check: consistent"
	@$(MAKE) --no-print-directory apt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Re-resolve every dependency from pyproject.toml (new upstream releases come in here, and only
# here), then rewrite the pins derived from the lock (cluster/runtime_env.yaml). Run `make test`
# afterwards and commit requirements/ and cluster/ together.
lock: | $(BIN)/python
	$(PIP) install -q $(UV_PIN)
	$(BIN)/python requirements/lock.py

# Debian packages: installed as root when missing; otherwise say what to install.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt-get install$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/tmp/mplug2-apt.log 2>&1 \
	      || { echo "apt-get failed, see /tmp/mplug2-apt.log"; tail -20 /tmp/mplug2-apt.log; exit 1; }; \
	  else echo "WARNING: not root; please install Debian packages:$$missing"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m orchestrator demo

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# ruff, with the rules in pyproject.toml ([tool.ruff]); it comes from the lock (the `test` extra).
lint: $(STAMP)
	$(BIN)/python -m ruff check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Line coverage of model/, workloads/ and orchestrator/ over the whole suite, in every Python process
# it starts (Ray workers and actors included: tests/coverage_flush.py, loaded through a .pth line
# that exists only while this runs, copies each process's lines every few seconds, since Ray ends
# its workers without running atexit).  `make coverage PYTEST_ARGS="-m 'not slow'"` for a part.
COV_PTH = $(shell $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null)/a2_mplug2_coverage_flush.pth
coverage: $(STAMP)
	rm -rf .coverage && mkdir -p .coverage
	echo "import os; p = os.environ.get('MPLUG2_COVERAGE_FLUSH'); p and exec(open(p).read(), {'__name__': 'mplug2_coverage_flush'})" > $(COV_PTH)
	MPLUG2_COVERAGE_DIR=$(CURDIR)/.coverage MPLUG2_COVERAGE_FLUSH=$(CURDIR)/tests/coverage_flush.py \
	  $(BIN)/python -m pytest --cov --cov-report=term --durations=0 $(PYTEST_ARGS); rc=$$?; rm -f $(COV_PTH); exit $$rc

clean:
	rm -rf $(VENV) demo_output .pytest_cache .coverage
