"""chorus.server: finding tritonserver and perf_analyzer, their environments, and real servers on a throwaway
model repository (tests marked `functional` start a real tritonserver on free ports and stop it)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import chorus.server as server_mod
from chorus.errors import ServerError
from chorus.server import (TritonServer, find_tritonserver, perf_analyzer_env, perf_analyzer_path,
                           python_backend_dir, register, server_env)

KEY = "test-admin-key"
GRPC_KEY_HEADER = "triton-grpc-protocol-admin-key"  # tritonserver 2.51 prefixes gRPC restricted-protocol headers
assert server_mod.GRPC_ADMIN_HEADER == GRPC_KEY_HEADER

TOY_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""

TOY_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {init}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x + 1)]))
        return responses
"""


def write_toy(root: Path, name: str = "toy", init: str = "pass") -> Path:
    """A repository with one Python-backend model that adds 1 to a float vector."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(TOY_CONFIG.format(name=name))
    (root / name / "1" / "model.py").write_text(TOY_MODEL.format(init=init))
    return root


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text.encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for: {what}"
        time.sleep(0.1)


def infer_http(url: str, model: str, values: list[float]) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("INPUT0", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return client.infer(model, [tensor]).as_numpy("OUTPUT0")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


# ------------------------------------------------------------------------------------------ no server needed
def test_find_tritonserver_defaults_to_the_pip_binary(monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    path = find_tritonserver()
    assert path.parts[-4:] == ("pytriton", "tritonserver", "bin", "tritonserver")
    assert os.access(path, os.X_OK)


def test_find_tritonserver_honours_env(monkeypatch, tmp_path):
    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TRITONSERVER", str(fake))
    assert find_tritonserver() == fake
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(ServerError, match="TRITONSERVER=.*missing is not an executable"):
        find_tritonserver()


def test_find_tritonserver_error_lists_places_and_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setattr(server_mod, "_pip_tritonserver", lambda: None)
    monkeypatch.setattr(server_mod, "NGC_TRITONSERVER", tmp_path / "opt" / "tritonserver")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError) as info:
        find_tritonserver()
    message = str(info.value)
    for expected in ("nvidia-pytriton", "on PATH", str(tmp_path / "opt" / "tritonserver"), "make venv",
                     "TRITONSERVER="):
        assert expected in message


def test_python_backend_dir_links_backend_and_stub_for_this_python(tmp_path):
    dest = python_backend_dir(dest=tmp_path / "backends")
    assert dest == tmp_path / "backends"
    files = {p.name: p for p in (dest / "python").iterdir()}
    assert set(files) == {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert all(p.resolve().is_file() for p in files.values())
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python_backend_stubs/{version}/" in os.readlink(files["triton_python_backend_stub"])
    # idempotent, and a stale link (e.g. a venv that moved) is repaired
    stale = dest / "python" / "libtriton_python.so"
    stale.unlink()
    stale.symlink_to(tmp_path / "gone.so")
    assert python_backend_dir(dest=dest) == dest
    assert stale.resolve().is_file() and stale.resolve() != tmp_path / "gone.so"


def test_python_backend_dir_is_none_for_a_non_pip_server(tmp_path):
    ngc_like = tmp_path / "opt" / "tritonserver" / "bin" / "tritonserver"
    ngc_like.parent.mkdir(parents=True)
    ngc_like.write_text("#!/bin/sh\n")
    ngc_like.chmod(0o755)
    assert python_backend_dir(ngc_like, dest=tmp_path / "unused") is None
    assert not (tmp_path / "unused").exists()


def test_server_env_puts_stub_libraries_and_venv_python_first():
    env = server_env(base={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/already/there"})
    lib_dirs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert lib_dirs[0].endswith("nvidia_pytriton.libs")
    assert list(Path(lib_dirs[0]).glob("libcudart-*.so.12*")), "the stub's libcudart must be on LD_LIBRARY_PATH"
    assert lib_dirs[-1] == "/already/there"
    path_dirs = env["PATH"].split(os.pathsep)
    assert path_dirs[0] == sysconfig.get_path("scripts") and path_dirs[1:] == ["/usr/bin", "/bin"]
    assert (Path(path_dirs[0]) / "python3").exists()
    assert env["PYTHONUNBUFFERED"] == "1"


def test_perf_analyzer_runs_with_its_env():
    result = subprocess.run([str(perf_analyzer_path()), "--version"], env=perf_analyzer_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Perf Analyzer Version 2.51.0" in result.stdout + result.stderr


def test_perf_analyzer_env_falls_back_to_the_wheels_libb64(monkeypatch):
    monkeypatch.setattr(server_mod, "_loadable", lambda soname: False)  # as if libb64-0d were not installed
    env = perf_analyzer_env()
    ldd = subprocess.run(["ldd", str(perf_analyzer_path())], env=env, capture_output=True, text=True).stdout
    resolved = re.search(r"libb64\.so\.0d => (\S+)", ldd)
    assert resolved and ".cache/perf_libs/libb64.so.0d" in resolved.group(1), ldd
    assert re.search(r"libcudart\.so\.12 => \S+", ldd), ldd
    assert subprocess.run([str(perf_analyzer_path()), "--version"], env=env, capture_output=True).returncode == 0


def test_command_line_flags(tmp_path):
    server = TritonServer(tmp_path, host="127.0.0.1", http_port=18000, grpc_port=18001, metrics_port=18002,
                          models_to_load=("a", "b"), admin_key="k", extra_args=("--log-info=false",))
    cmd = server.command(Path("/x/tritonserver"), tmp_path / "backends")
    assert cmd[0] == "/x/tritonserver"
    for flag in (f"--model-repository={tmp_path.resolve()}", f"--backend-directory={tmp_path / 'backends'}",
                 "--model-control-mode=explicit", "--load-model=a", "--load-model=b", "--http-address=127.0.0.1",
                 "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--http-port=18000",
                 "--grpc-port=18001", "--metrics-port=18002",
                 "--http-restricted-api=model-repository,shared-memory,trace,logging:admin-key=k",
                 "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:admin-key=k"):
        assert flag in cmd
    assert cmd[-1] == "--log-info=false"
    assert not any("backend-directory" in a for a in server.command(Path("/x/tritonserver"), None))


def test_urls_for_clients():
    server = TritonServer(host="0.0.0.0", http_port=1, grpc_port=2, metrics_port=3)
    assert (server.http_url, server.grpc_url, server.metrics_url) == (
        "127.0.0.1:1", "127.0.0.1:2", "http://127.0.0.1:3/metrics")
    assert TritonServer().repository == Path(server_mod.__file__).resolve().parents[1] / "model_repository"


def test_serve_parser_defaults_flags_and_env(monkeypatch):
    for var in ("CHORUS_HOST", "CHORUS_HTTP_PORT", "CHORUS_GRPC_PORT", "CHORUS_METRICS_PORT", "CHORUS_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    args = serve_parser().parse_args(["serve"])
    assert (args.host, args.http_port, args.grpc_port, args.metrics_port, args.admin_key) == (
        "127.0.0.1", 8000, 8001, 8002, None)
    assert args.func is server_mod.serve
    monkeypatch.setenv("CHORUS_HOST", "0.0.0.0")
    monkeypatch.setenv("CHORUS_HTTP_PORT", "9100")
    monkeypatch.setenv("CHORUS_ADMIN_KEY", "k")
    args = serve_parser().parse_args(["serve", "--grpc-port", "0", "--log-file", "/tmp/x.log"])
    assert (args.host, args.http_port, args.grpc_port, args.admin_key, args.log_file) == (
        "0.0.0.0", 9100, 0, "k", Path("/tmp/x.log"))
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["serve", "--http-port", "70000"])


def test_serve_without_a_built_repository_says_make_repository(tmp_path, capsys):
    args = serve_parser().parse_args(["serve", "--repository", str(tmp_path)])
    assert args.func(args) == 2
    assert "make repository" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real servers
@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    repository = write_toy(tmp_path_factory.mktemp("repo"))
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, models_to_load=("toy",),
                      admin_key=KEY, ready_timeout_s=120) as server:
        yield server


@pytest.mark.functional
def test_infer_over_http_and_grpc(toy_server):
    assert toy_server.running and toy_server.http_port != 0
    np.testing.assert_array_equal(infer_http(toy_server.http_url, "toy", [1, 2, 3.5]), [2, 3, 4.5])
    client = grpcclient.InferenceServerClient(toy_server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [2], "FP32")
    tensor.set_data_from_numpy(np.array([-1, 10], dtype=np.float32))
    np.testing.assert_array_equal(client.infer("toy", [tensor]).as_numpy("OUTPUT0"), [0, 11])


@pytest.mark.functional
def test_metrics_listen_on_the_given_address(toy_server):
    infer_http(toy_server.http_url, "toy", [0.0])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(toy_server.metrics_url, timeout=10).read().decode()
    assert re.search(r'nv_inference_request_success\{model="toy",version="1"\} [1-9]', text), text[:2000]
    assert f"Started Metrics Service at 127.0.0.1:{toy_server.metrics_port}" in toy_server.log_path.read_text()


@pytest.mark.functional
def test_admin_key_guards_model_repository_api(toy_server):
    http = httpclient.InferenceServerClient(toy_server.http_url)
    for headers in (None, {"admin-key": "wrong"}):
        with pytest.raises(InferenceServerException, match="restricted"):
            http.load_model("toy", headers=headers)
    http.load_model("toy", headers={"admin-key": KEY})
    grpc = grpcclient.InferenceServerClient(toy_server.grpc_url)
    for headers in (None, {"admin-key": KEY}, {GRPC_KEY_HEADER: "wrong"}):
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.load_model("toy", headers=headers)
    grpc.load_model("toy", headers={GRPC_KEY_HEADER: KEY})
    assert http.is_model_ready("toy")  # inference and health stay open
    np.testing.assert_array_equal(infer_http(toy_server.http_url, "toy", [41.0]), [42.0])


@pytest.mark.functional
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_against_the_server(toy_server, protocol):
    url = toy_server.http_url if protocol == "http" else toy_server.grpc_url
    result = subprocess.run(
        [str(perf_analyzer_path()), "-m", "toy", "-u", url, "-i", protocol, "--shape", "INPUT0:8",
         "--concurrency-range", "1", "--request-count", "200"],  # a fixed count: no stability windows to miss
        env=perf_analyzer_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    sent = re.search(r"Client:\s+Request count: (\d+)", result.stdout)
    assert sent and int(sent.group(1)) == 200, result.stdout[-2000:]
    # as the server counted them: perf_analyzer reads the server's statistics as the last response arrives, and the
    # server may not have counted that one yet (a fresh-clone CI run saw 199)
    count = re.search(r"Successful request count: (\d+)", result.stdout)
    assert count and int(count.group(1)) in (199, 200), result.stdout[-2000:]


@pytest.mark.functional
def test_a_model_that_fails_to_load_is_reported_with_the_log(tmp_path):
    repository = write_toy(tmp_path, init='raise RuntimeError("toy refuses to start")')
    server = TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, models_to_load=("toy",))
    with pytest.raises(ServerError, match="(?s)exited with code .*toy refuses to start"):
        with server:
            pass
    assert server.poll() is not None


@pytest.mark.functional
def test_stop_ends_server_and_backend_stubs(tmp_path):
    repository = write_toy(tmp_path)
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, models_to_load=("toy",)) as server:
        pid, port = server.pid, server.http_port
        assert processes_mentioning(str(repository / "toy")), "the Python backend stub should be running"
    assert server.poll() == 0  # graceful exit on SIGINT
    assert not alive(pid)
    wait_until(lambda: not processes_mentioning(str(repository / "toy")), 30, "backend stub to exit")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: ignores TIME_WAIT, not listeners
        s.bind(("127.0.0.1", port))  # nothing listens on the port any more


@pytest.mark.functional
def test_server_dies_with_its_parent(tmp_path):
    repository = write_toy(tmp_path)
    script = ("from chorus.server import TritonServer\nimport sys, time\n"
              f"s = TritonServer({str(repository)!r}, http_port=0, grpc_port=0, metrics_port=0, "
              "models_to_load=('toy',))\ns.start(); s.wait_ready(120); print(s.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert alive(pid)
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not alive(pid), 60, f"tritonserver {pid} to exit after its parent was killed")


@pytest.mark.functional
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_chorus_serve_runs_until_signalled(tmp_path, stop_signal):
    repository = write_toy(tmp_path / "repo", name="chorus")
    log = tmp_path / "server.log"
    script = ("import argparse, sys\nfrom chorus.server import register\np = argparse.ArgumentParser()\n"
              "register(p.add_subparsers())\na = p.parse_args(sys.argv[1:])\nsys.exit(a.func(a))\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--repository", str(repository), "--http-port", "0",
         "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line or "error" in line.lower():
                break
        banner = "".join(lines)
        url = re.search(r"HTTP\s+http://(\S+)", banner)
        pid = re.search(r"pid (\d+)", banner)
        assert url and pid and str(log) in banner and "tritonserver" in banner, banner
        np.testing.assert_array_equal(infer_http(url.group(1), "chorus", [1.0]), [2.0])
        proc.send_signal(stop_signal)
        assert proc.wait(60) == 0, proc.stdout.read()
        assert not alive(int(pid.group(1)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
