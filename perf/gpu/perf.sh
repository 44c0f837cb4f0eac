#!/usr/bin/env bash
# `bash perf/gpu/run.sh perf` ends here, after run.sh has set up tritonserver, perf_analyzer and the numpy-1.26 venv:
# the benchmark harness (python -m perf.bench --profile gpu) within the device tool's 10 minutes, its results folder
# tarred into $OUT/perf-results.tar.gz (the tool brings back at most 8 files). Then, on the dev machine:
#   make perf-import TARBALL=<files_at>/perf-results.tar.gz     (plots, summary.md, perf/results/summary.json, README)
# Needs from `make perf-gpu-bundle` in .gpu/: perf-site.tar.xz (tritonclient's Python package and the cp312 files of
# grpcio, protobuf and python-rapidjson: the load generator speaks gRPC; perf/gpu/client_site.sh unpacks it).
set -euo pipefail
G=.gpu
OUT=${OUT:-/tmp/out}
source perf/gpu/client_site.sh  # sets PERFSITE
FOLDER="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | grep -o 'h[12]00\|a100\|l40s' | head -1 || echo gpu)-$(date -u +%F)"
RESULTS=/tmp/perf-results/$FOLDER
# The harness runs under the numpy-1.26 venv: tritonserver's backend stub uses the Python the harness runs with.
# transformers does not import there, so the Hugging Face baseline runs in a subprocess of the main environment's
# python3 (--hf-python). perf.bench keeps to its own budget (530 s); `timeout` guards the tool's 10 minutes so the
# tarball is always made.
BUDGET=${PERF_BUDGET_S:-530}  # a shorter call: PERF_BUDGET_S=400 bash perf/gpu/run.sh perf
PYTHONPATH=$PERFSITE timeout $((BUDGET + 30)) /tmp/np1env/bin/python3 -m perf.bench --profile gpu --bundle $G \
  --out "$RESULTS" --no-plots --budget-s "$BUDGET" \
  --hf-python "$(command -v python3)" "$@" \
  2>&1 | tee "$OUT/bench.log" || echo "perf.bench exited with $?" | tee -a "$OUT/bench.log"
PYTHONPATH=$PERFSITE /tmp/np1env/bin/python3 -m perf.report "$RESULTS" || true
tar -C /tmp/perf-results --exclude=repos -czf "$OUT/perf-results.tar.gz" "$FOLDER"
cp "$RESULTS/summary.md" "$OUT/" 2>/dev/null || true
ls -la "$OUT"
