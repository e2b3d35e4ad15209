# wmproxy-tw — one file, one process.  `make run`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SRC := $(shell find wmproxy_tw twisted -name '*.py' 2>/dev/null) setup.cfg pyproject.toml
ARGS ?=
TEST_DEBS := curl nginx-light websockify redis-server

.PHONY: install run test test-deps lint fuzz bench profile clean dashboard-shot

install: $(VENV)/.installed

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "installing python3-venv (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null; \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	@$(PY) -m pip install -q --upgrade pip

# A regular (non-editable) install: an editable one hides the twistd plugin.
$(VENV)/.installed: $(VENV)/bin/python $(SRC)
	@$(PY) -m pip install -q .
	@$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $@

run: install
	$(VENV)/bin/twistd -n --pidfile= wmproxy $(ARGS)

$(VENV)/.test-deps: $(VENV)/.installed setup.cfg
	@$(PY) -m pip install -q '.[test]'
	@touch $@

test-deps: $(VENV)/.test-deps
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

test: test-deps
	$(PY) -m pytest tests

# Every hypothesis property/fuzz test with many more examples (FUZZ_EXAMPLES, default 20000).
fuzz: test-deps
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-20000} $(PY) -m pytest tests/unit -q -p no:randomly --timeout=3600

# The dashboard in headless Chromium, as build/dashboard.png (installs Debian's chromium: large, so not in `test`).
dashboard-shot: test-deps
	@command -v chromium >/dev/null || { echo "installing chromium (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(PY) -m tests.dashboard_shot build/dashboard.png

lint: $(VENV)/.test-deps
	@$(PY) -m pip install -q '.[lint]'
	$(VENV)/bin/ruff check wmproxy_tw tests
	$(VENV)/bin/mypy wmproxy_tw

# Benchmarks (SPEC §11): never part of `make test`.  Installs the peers it needs.
#   make bench [SCENARIO=name[,name]] [QUICK=1] [WORKERS=1|auto] [BENCH_FLAGS=--peers]
#   make profile SCENARIO=name      (ours only, under py-spy or cProfile: top functions)
BENCH_ARGS = $(if $(SCENARIO),--scenario $(SCENARIO)) $(if $(filter-out 0,$(QUICK)),--quick) \
	$(if $(WORKERS),--workers $(WORKERS)) $(BENCH_FLAGS)

bench: install
	VENV_DIR=$(VENV) $(PY) -m bench $(BENCH_ARGS)

profile: install
	@test -n "$(SCENARIO)" || { echo "usage: make profile SCENARIO=name (make bench BENCH_FLAGS=--list)"; exit 2; }
	VENV_DIR=$(VENV) $(PY) -m bench --profile $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
