"""chorus.supervisor: which of a process's children are Python backend stubs, which model they run, and when one has
died (real child processes laid out as tritonserver launches its stubs: an executable named triton_python_backend_stub,
argv as python_backend's StubLauncher writes it); and the reload, against a real tritonserver serving a toy Python
model (functional). `chorus serve` with the chorus model under load: tests/functional/test_crash_recovery.py."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from chorus.supervisor import STUB_COMM, Supervisor, _children, _read_proc, _stub_of, describe_exit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture
def stubs(tmp_path):
    """Start fake stubs of models in a repository under tmp_path: `start(model, instance)` -> Popen."""
    exe = tmp_path / "bin" / "triton_python_backend_stub"
    exe.parent.mkdir()
    exe.symlink_to(sys.executable)  # the process's name comes from the file run: a stub's
    started = []

    def start(model: str, instance: str) -> subprocess.Popen:
        script = tmp_path / "repo" / model / "1" / "model.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text("import time\ntime.sleep(120)\n")
        argv = [str(exe), str(script), "shm_region", "1048576", "1048576", str(os.getpid()), "/lib", "0", instance,
                str(script.parent.parent)]
        proc = subprocess.Popen(argv)
        started.append(proc)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[1:2] != [str(script).encode()]:
            assert time.monotonic() < deadline, "the fake stub did not start"
            time.sleep(0.01)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def watcher(confirm_s=0.3):
    """A supervisor of "the server" that is this test process (its children are the fake stubs)."""
    return Supervisor(SimpleNamespace(pid=os.getpid(), poll=lambda: None), confirm_s=confirm_s)


def test_a_stub_killed_and_left_unreaped_is_reported_once_with_its_model_and_signal(stubs):
    sup = watcher()
    chorus, other = stubs("chorus", "chorus_0_0"), stubs("other", "other_0_0")
    t = 100.0
    assert sup.dead_stubs(t) == {}
    assert {s.pid: (s.model, s.instance) for s in sup._watch.stubs.values()} == {
        chorus.pid: ("chorus", "chorus_0_0"), other.pid: ("other", "other_0_0")}
    assert Path(f"/proc/{chorus.pid}/comm").read_text().strip() == STUB_COMM

    os.kill(chorus.pid, signal.SIGKILL)  # nobody waits for it: a zombie, as tritonserver leaves a dead stub
    while Path(f"/proc/{chorus.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    assert sup.dead_stubs(t + 0.1) == {}  # dead for less than confirm_s
    assert sup.dead_stubs(t + 0.5) == {"chorus": [f"stub chorus_0_0 (pid {chorus.pid}) killed by SIGKILL"]}
    assert sup.dead_stubs(t + 1.0) == {}  # reported once

    chorus.wait()  # reaped (its instance destroyed): forgotten
    assert sup.dead_stubs(t + 1.5) == {}
    assert chorus.pid not in sup._watch.stubs and other.pid in sup._watch.stubs


def test_a_stub_that_exits_and_is_reaped_at_once_is_not_a_crash(stubs):
    sup = watcher(confirm_s=0.0)
    proc = stubs("chorus", "chorus_0_0")
    assert sup.dead_stubs(1.0) == {}
    proc.terminate()
    proc.wait()  # what Triton does when it stops an instance on purpose
    assert sup.dead_stubs(2.0) == {}


def test_exit_statuses_in_words():
    assert describe_exit(signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(signal.SIGSEGV | 0x80) == "killed by SIGSEGV (core dumped)"
    assert describe_exit(3 << 8) == "exited with code 3"
    assert describe_exit(None) == "exited"


# ---- against a real tritonserver: a toy Python model that adds its config's `offset` ------------------------------
TOY_CONFIG = """name: "toy"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters [ { key: "offset", value: { string_value: "1" } } ]
"""
TOY_MODEL = """import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {init}
        self.offset = float(json.loads(args["model_config"])["parameters"]["offset"]["string_value"])

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", (pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + self.offset).astype(np.float32))])
            for r in requests]
"""
KEY = "supervisor-test-key"


def write_toy(root: Path, init: str = "pass") -> Path:
    (root / "toy" / "1").mkdir(parents=True, exist_ok=True)
    (root / "toy" / "config.pbtxt").write_text(TOY_CONFIG)
    (root / "toy" / "1" / "model.py").write_text(TOY_MODEL.format(init=init))
    return root


def call(server, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"http://{server.http_url}/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("admin-key", KEY)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def add_one(server, values=(1.0, 2.0)):
    status, body = call(server, "POST", "v2/models/toy/infer", {"inputs": [
        {"name": "INPUT0", "shape": [len(values)], "datatype": "FP32", "data": list(values)}]})
    return status, (body["outputs"][0]["data"] if status == 200 else body)


def live_stubs(server, model: str = "toy") -> list[int]:
    """Pids of the model's running stubs (zombies left out)."""
    procs = {pid: _read_proc(pid) for pid in _children(server.pid)}
    return sorted(pid for pid, p in procs.items() if p is not None and p.comm == STUB_COMM and p.state != "Z"
                  and getattr(_stub_of(pid), "model", None) == model)


def toy_stub(server) -> int:
    wait(lambda: len(live_stubs(server)) == 1, 30, "one toy stub (a replaced instance's stub stops within ~1 s)")
    return live_stubs(server)[0]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


@pytest.fixture
def toy_server(tmp_path):
    from chorus.server import TritonServer

    with TritonServer(write_toy(tmp_path / "repo"), http_port=0, grpc_port=0, metrics_port=0, models_to_load=("toy",),
                      admin_key=KEY, log_path=tmp_path / "triton.log") as server:
        # serve offset 5 through the repository API, as `chorus task add` changes chorus's served tasks
        status, config = call(server, "GET", "v2/models/toy/config")
        assert status == 200
        config["parameters"]["offset"] = {"string_value": "5"}
        assert call(server, "POST", "v2/repository/models/toy/load",
                    {"parameters": {"config": json.dumps(config)}})[0] == 200
        assert add_one(server) == (200, [6.0, 7.0])
        yield server


@pytest.mark.functional
def test_a_killed_stub_is_reloaded_with_the_config_it_served(toy_server, caplog):
    server, pid = toy_server, toy_server.pid
    ready = []
    with Supervisor(server, poll_s=0.05) as sup:
        stub = toy_stub(server)
        wait(lambda: stub in sup._watch.stubs, 10, "the supervisor sees the stub")
        os.kill(stub, signal.SIGKILL)
        t_kill = time.monotonic()
        while not (sup.restarts and sup.restarts[0].seconds is not None):
            ready.append(call(server, "GET", "v2/models/toy/ready")[0] == 200)
            assert time.monotonic() - t_kill < 120, "the model did not come back"
            time.sleep(0.02)
        assert add_one(server) == (200, [6.0, 7.0])  # the served config (offset 5), not config.pbtxt's 1
    (restart,) = sup.restarts
    assert restart.model == "toy" and restart.attempts == 1 and restart.error is None
    assert restart.reason == f"stub toy_0_0 (pid {stub}) killed by SIGKILL"
    assert False in ready  # the model said not ready while it reloaded
    assert call(server, "GET", "v2/models/toy/ready")[0] == 200 and call(server, "GET", "v2/health/ready")[0] == 200
    assert server.pid == pid and server.running  # tritonserver was not restarted
    assert toy_stub(server) != stub
    logged = [r.getMessage() for r in caplog.records if r.name == "chorus.supervisor"]
    assert any(f"model 'toy' lost its Python backend: stub toy_0_0 (pid {stub}) killed by SIGKILL" in m
               for m in logged), logged
    assert any("model 'toy' is serving again" in m for m in logged), logged


@pytest.mark.functional
def test_a_reload_that_fails_is_retried_until_the_model_loads(toy_server, tmp_path, caplog):
    server = toy_server
    model_file = server.repository / "toy" / "1" / "model.py"
    good = model_file.read_text()
    with Supervisor(server, poll_s=0.05, retry_s=0.2, max_retry_s=0.5) as sup:
        stub = toy_stub(server)
        wait(lambda: stub in sup._watch.stubs, 10, "the supervisor sees the stub")
        model_file.write_text(TOY_MODEL.format(init='raise RuntimeError("toy cannot start")'))
        os.kill(stub, signal.SIGKILL)
        wait(lambda: sup.restarts and sup.restarts[0].attempts >= 3, 60, "two failed loads (a third begun)")
        status, body = add_one(server)
        assert status != 200 and "toy" in body  # refused at once while it cannot load
        model_file.write_text(good)
        wait(lambda: sup.restarts[0].seconds is not None, 60, "the load that works")
        assert add_one(server) == (200, [6.0, 7.0])
    assert sup.restarts[0].error is None and sup.restarts[0].attempts >= 3
    failed = [r.getMessage() for r in caplog.records if "reloading model 'toy' failed" in r.getMessage()]
    assert len(failed) >= 2 and all("toy cannot start" in m for m in failed), failed


@pytest.mark.functional
def test_every_crash_is_recovered_and_reported_once(toy_server):
    server = toy_server
    with Supervisor(server, poll_s=0.05) as sup:
        killed = []
        for n, sig in enumerate((signal.SIGKILL, signal.SIGSEGV), 1):
            stub = toy_stub(server)
            wait(lambda: stub in sup._watch.stubs, 10, "the supervisor sees the stub")
            os.kill(stub, sig)
            killed.append(stub)
            wait(lambda: len(sup.restarts) == n and sup.restarts[-1].seconds is not None, 120, f"recovery {n}")
            assert add_one(server) == (200, [6.0, 7.0])
        time.sleep(1)  # the dead stubs stay zombies: they are not reported again
    assert [r.reason.split(" killed by ")[0] for r in sup.restarts] == [f"stub toy_0_0 (pid {p})" for p in killed]
    assert "SIGKILL" in sup.restarts[0].reason and "SIGSEGV" in sup.restarts[1].reason
