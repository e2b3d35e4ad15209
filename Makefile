# wmproxy-tw — one file, one process.  `make run`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SRC := $(shell find wmproxy_tw twisted -name '*.py' 2>/dev/null) setup.cfg pyproject.toml
ARGS ?=
TEST_DEBS := curl nginx-light websockify

.PHONY: install run test test-deps lint bench clean

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

lint: $(VENV)/.test-deps
	@$(PY) -m pip install -q '.[lint]'
	$(VENV)/bin/ruff check wmproxy_tw tests
	$(VENV)/bin/mypy wmproxy_tw

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
