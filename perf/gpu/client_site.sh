# Sourced by perf/gpu/perf.sh and run.sh's `overhead` mode (after run.sh's setup): tritonclient's Python package and
# its gRPC dependencies (grpcio, protobuf, python-rapidjson for Python 3.12) from .gpu/perf-site.tar.xz (`make
# perf-gpu-bundle`) into $PERFSITE, for the load generator and perf/overhead.py.
PERFSITE=/tmp/perf-site
mkdir -p "$PERFSITE"
[ -e $G/perf-site.tar.xz ] \
  || { echo "missing $G/perf-site.tar.xz: run \`make perf-gpu-bundle\` on the dev machine and carry .gpu" >&2; exit 2; }
tar -C "$PERFSITE" -xJf $G/perf-site.tar.xz
