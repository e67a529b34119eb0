# The two commands a user needs: `make demo` (the main job) and `make test` (the whole suite).
# Both build .venv/ on first use: PyTorch first, pinned (CPU build here, CUDA build on GPU
# machines), then this project with its test extras, then any Debian package the tests need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Debian packages the suite uses: a Java runtime for pycocoevalcap (METEOR, SPICE tokenizer),
# Chromium for the MLflow UI screenshot test.
APT_PACKAGES := default-jre-headless chromium
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean apt

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	@$(MAKE) --no-print-directory apt
	touch $(STAMP)

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

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
