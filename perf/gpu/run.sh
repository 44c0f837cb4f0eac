#!/usr/bin/env bash
# One call on the GPU machine (see perf/README.md): set up tritonserver + perf_analyzer from carried files, install
# chorus, run perf/gpu_check.py (or, with the argument `test`, the tests marked gpu, which need nothing carried; with
# `kernels`, perf/fused_kernels.py; with `overhead`, perf/overhead.py; with `perf`, the benchmark harness
# perf/gpu/perf.sh, which also needs `make perf-gpu-bundle`; with `minilm`, perf/gpu/minilm.sh: the real
# all-MiniLM-L6-v2 task, carrying `.minilm/` from `make minilm-bundle`), leave results under $OUT. The setup below is
# done once per machine: a second call on the same warm machine finds it done and may carry only `.minilm`.
# Carried folder `.gpu/` (built by `make gpu-bundle`):
#   triton.tar.xz (tritonserver 2.51 binary, Python backend, 3.12 stub, libs from the nvidia-pytriton wheel),
#   perf_analyzer.xz (from the tritonclient 2.51 wheel), numpy-1.26.4-cp312.tar.xz (the wheel's files),
#   tokenizer.json, rt_texts.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
G=.gpu
SITE=/tmp/triton-site
OUT=${OUT:-/tmp/out}
mkdir -p "$SITE" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { echo "pip install -e . failed" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${1:-}" = test ]; then  # the GPU tests (`make test-gpu` elsewhere): they need torch and Triton, no bundle
  shift
  # only the modules that hold gpu tests: others import tritonclient, which this machine's Python lacks
  exec python3 -m pytest -m gpu -p no:cacheprovider $(grep -l "pytest.mark.gpu" tests/unit/test_*.py) "$@"
fi
if [ ! -e "$SITE/.extracted" ] && [ ! -e $G/triton.tar.xz ]; then
  echo "no $G/triton.tar.xz and no earlier setup on this machine: carry .gpu (a fresh machine), or run \`minilm\`" \
    "right after a call that did (within the machine's warm period)" >&2
  exit 2
fi
if [ ! -e "$SITE/.extracted" ]; then  # once per machine (stamped only when complete)
  tar -C "$SITE" -xJf $G/triton.tar.xz && touch "$SITE/.extracted"
fi
LIBS=$SITE/nvidia_pytriton.libs
ln -sf "$(ls $LIBS/libb64-*.so.0d)" $LIBS/libb64.so.0d
ln -sf "$(ls $LIBS/libcudart-*.so.12*)" $LIBS/libcudart.so.12
if [ ! -x /tmp/perf_analyzer ]; then
  xz -dc $G/perf_analyzer.xz > /tmp/perf_analyzer.tmp && chmod +x /tmp/perf_analyzer.tmp && mv /tmp/perf_analyzer.tmp /tmp/perf_analyzer
fi
# A second environment with numpy 1.26: the backend stub was built against numpy 1.x, and with numpy 2 it hands
# BYTES inputs over corrupted (see perf/README.md). The venv sees the system's torch and chorus.
if ! /tmp/np1env/bin/python3 -c 'import numpy; assert numpy.__version__ == "1.26.4"' 2>/dev/null; then
  python3 -m venv /tmp/np1env
  # the numpy 1.26.4 cp312 wheel's files, unpacked into the venv (make gpu-bundle xz-compresses them: half the wheel)
  tar -C "$(/tmp/np1env/bin/python3 -c 'import site; print(site.getsitepackages()[0])')" -xJf $G/numpy-1.26.4-cp312.tar.xz
fi
# everything else (torch, chorus, ...) from the main environment, after the venv's own numpy
python3 -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" > "$(/tmp/np1env/bin/python3 -c \
  'import site; print(site.getsitepackages()[0])')/main-env.pth"
export TRITONSERVER=$SITE/pytriton/tritonserver/bin/tritonserver
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:$LIBS:${LD_LIBRARY_PATH:-}
export PERF_ANALYZER=/tmp/perf_analyzer PYTHONUNBUFFERED=1
python3 -c "import torch, numpy, tokenizers, safetensors; print('torch', torch.__version__, 'numpy', numpy.__version__)"
/tmp/np1env/bin/python3 -c "import numpy, torch; print('np1env: numpy', numpy.__version__, 'torch', torch.__version__)"
if [ "${1:-}" = minilm ]; then  # issue 4: the real MiniLM task (perf/gpu/minilm.sh), results in $OUT/minilm-results.tar.gz
  shift
  exec bash perf/gpu/minilm.sh "$@"
fi
if [ "${1:-}" = perf ]; then  # the benchmark harness (issue 6): perf/gpu/perf.sh, results in $OUT/perf-results.tar.gz
  shift
  exec bash perf/gpu/perf.sh "$@"
fi
if [ "${1:-}" = kernels ]; then  # perf/fused_kernels.py: each fused PET kernel's device time per call (issue 3)
  exec python3 -m perf.fused_kernels --bundle $G --out "$OUT"
fi
if [ "${1:-}" = overhead ]; then  # perf/overhead.py (tiny model, this host's cores): the serving path alone
  shift
  source perf/gpu/client_site.sh  # sets PERFSITE
  PYTHONPATH=$PERFSITE exec /tmp/np1env/bin/python3 -m perf.overhead "$@"
fi
python3 perf/gpu_check.py --bundle $G --out "$OUT" --label "numpy $(python3 -c 'import numpy; print(numpy.__version__)')" "$@" \
  || /tmp/np1env/bin/python3 perf/gpu_check.py --bundle $G --out "$OUT" --label "numpy 1.26" --skip-in-process "$@"
