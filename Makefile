# touchstream: the two commands are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test lint bench screenshots venv redis-server browser-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

venv: $(STAMP)

## Run the engine on its embedded default: demo traffic, in-memory state, live view.
run: $(STAMP)
	$(BIN)/touchstream run $(ARGS)

## Install redis-server from Debian packages if it is missing (tests start their own).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

## Install Chromium and its WebDriver from Debian packages if missing (browser tests).
.PHONY: browser-deps
browser-deps:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

## Set up everything and run the whole suite.
test: $(STAMP) redis-server browser-deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## Refresh the screenshots README shows (the browser test, saving into the repo).
screenshots: $(STAMP) browser-deps redis-server
	TOUCHSTREAM_SCREENSHOTS=tests/browser/screenshots $(BIN)/python -m pytest -q tests/browser

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
