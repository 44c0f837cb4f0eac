#!/usr/bin/env bash
# `bash perf/gpu/run.sh minilm` ends here, after run.sh has set up tritonserver, perf_analyzer and the numpy-1.26 venv
# (or found them set up by an earlier call on the same warm machine): issue 4, the real all-MiniLM-L6-v2 movie task
# (perf/minilm.py). Carry `.minilm/` (`make minilm-bundle`: the weights in fp16, the corpora, the trained task).
#   1. prepare (python3: numpy 2, transformers): train the teacher on the GPU as `chorus build-repository` does
#      (MINILM_TEACHER=carried: the carried task files instead), distill K=4 students with the full schedule
#   2. serve (/tmp/np1env/bin/python3, which the backend stub runs): tritonserver on cuda:0 fp16, saturation,
#      low-load teacher vs students over the Rotten Tomatoes test split, bursts with and without pruning
# Results: $OUT/results.json, $OUT/summary.md and $OUT/minilm-results.tar.gz (the folder `minilm/`: unpack it into
# perf/results/<gpu>-<date>/). Everything ends within MINILM_BUDGET_S (default 510 s) of this script's start.
# Arguments go to both steps (`python -m perf.minilm --help`), e.g. `--low-rate 100`; MINILM_PYTHON / NP1_PYTHON
# replace the two interpreters (a CPU dry run of this script: `--smoke` with both set to .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/../.."
M=$(pwd)/.minilm
G=.gpu
OUT=${OUT:-/tmp/out}
PERFSITE=/tmp/perf-site
PY=${MINILM_PYTHON:-python3}
NP1=${NP1_PYTHON:-/tmp/np1env/bin/python3}
BUDGET=${MINILM_BUDGET_S:-510}
SERVE_S=${MINILM_SERVE_S:-210}  # kept for the serve step (latency table, server load, ~80 s of measurements)
T0=$(date +%s)
mkdir -p "$OUT"
[ -f "$M/MINILM_BUNDLE.json" ] || { echo "missing $M: run \`make minilm-bundle\` here and carry .minilm" >&2; exit 2; }
if ! PYTHONPATH=$PERFSITE $NP1 -c 'import tritonclient.grpc, rapidjson' 2>/dev/null; then
  source perf/gpu/client_site.sh  # what perf/gpu/perf.sh installs (the load generator's gRPC client): not left here yet
fi
export CHORUS_DATA_DIR=$M/data  # the vaderSentiment sdist (distillation's extra texts)
export CHORUS_MINILM_COMMAND="bash perf/gpu/run.sh minilm${*:+ $*}"
WORK=/tmp/chorus-minilm
RESULTS=/tmp/minilm-results/minilm
rm -rf "$WORK" "$RESULTS"
mkdir -p "$RESULTS/raw"
PREP_DEADLINE=$((T0 + BUDGET - SERVE_S))
SERVE_DEADLINE=$((T0 + BUDGET - 8))
echo "minilm: prepare until $(date -u -d @$PREP_DEADLINE +%T), serve until $(date -u -d @$SERVE_DEADLINE +%T) UTC"
PYTHONPATH=$M timeout $((PREP_DEADLINE - $(date +%s) + 20)) $PY -m perf.minilm prepare --work "$WORK" \
  --out "$RESULTS" --deadline "$PREP_DEADLINE" --teacher "${MINILM_TEACHER:-train}" "$@" 2>&1 | tee "$RESULTS/raw/prepare.log" \
  || echo "minilm prepare exited with $?"
PYTHONPATH=$M:$PERFSITE timeout $((SERVE_DEADLINE - $(date +%s) + 5)) $NP1 -m perf.minilm serve \
  --work "$WORK" --out "$RESULTS" --deadline "$SERVE_DEADLINE" "$@" 2>&1 | tee "$RESULTS/raw/serve.log" \
  || echo "minilm serve exited with $?"
PYTHONPATH=$M timeout 30 $PY -m perf.minilm report --out "$RESULTS" > /dev/null || echo "minilm report failed"
tar -C "$(dirname "$RESULTS")" -czf "$OUT/minilm-results.tar.gz" "$(basename "$RESULTS")"
cp "$RESULTS/results.json" "$RESULTS/summary.md" "$OUT/" 2>/dev/null
cat "$RESULTS/summary.md" 2>/dev/null
echo "minilm: $(( $(date +%s) - T0 )) s"
ls -la "$OUT"
