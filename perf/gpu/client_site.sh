# Sourced by perf/gpu/perf.sh and run.sh's `overhead` mode (after run.sh's setup): tritonclient's Python package and
# its gRPC dependencies from .gpu/ (`make perf-gpu-bundle`) into $PERFSITE, for the load generator and perf/overhead.py.
PERFSITE=/tmp/perf-site
mkdir -p "$PERFSITE"
for f in $G/grpcio-*.whl $G/protobuf-*.whl $G/python_rapidjson-*.whl $G/tritonclient.tar.xz; do
  [ -e "$f" ] || { echo "missing $f: run \`make perf-gpu-bundle\` on the dev machine and carry .gpu" >&2; exit 2; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --target "$PERFSITE" $G/grpcio-*.whl $G/protobuf-*.whl \
  $G/python_rapidjson-*.whl
tar -C "$PERFSITE" -xJf $G/tritonclient.tar.xz
