"""Crash recovery: `chorus serve` brings the chorus model back after its Python backend stub is killed (kill -9) under
load, without restarting tritonserver (chorus.supervisor; docs/operations.md).

Outcomes are counted per request, by when it was sent and answered: before the kill every request is answered; after
it, requests fail only until the model is ready again, and every request sent after that is answered. The health
endpoints are polled throughout: the model's and the server's ready endpoints say not ready while the model reloads.
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from chorus.client.client import ChorusClient
from tests.functional.conftest import DEFAULT_TASKS, REPOSITORY, Background

pytestmark = pytest.mark.slow  # two model loads on a 2-core machine: over a minute

KEY = "crash-recovery-test-key"
STARTUP_S = 600  # `chorus serve` until ready (loads the model, profiles its latency tables)
RECOVERY_S = 600  # kill -9 until the model answers again: detection (~1 s) + one model load
REQUEST_TIMEOUT_S = 30  # the clients' own timeout, for requests the dead stub had taken
DETECTION_S = 5  # kill -9 until the ready endpoints say not ready


@dataclass
class Outcome:
    sent: float
    done: float
    error: str | None  # None: answered


class Load(Background):
    """Threads classifying through HTTP until stopped, each request's outcome kept."""

    join_s = REQUEST_TIMEOUT_S + 10

    def __init__(self, url: str, threads: int = 3):
        super().__init__(threads)
        self.url, self.outcomes = url, []

    def run(self, i: int) -> None:
        with ChorusClient(self.url, protocol="http", timeout=REQUEST_TIMEOUT_S) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    got = client.classify(["a wonderful, moving film", "a dreadful bore"], DEFAULT_TASKS[i % 4])
                    error = None if len(got) == 2 else f"{len(got)} predictions for 2 texts"
                except Exception as e:  # noqa: BLE001 - every failure is an outcome to count
                    error = f"{type(e).__name__}: {e}"
                self.outcomes.append(Outcome(sent, time.monotonic(), error))
                if error is not None:
                    time.sleep(0.05)  # an error comes back at once: do not spin

    def answered_since(self, t: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.sent >= t and o.error is None)


class Probe(Background):
    """Polls the server's and the model's ready endpoints: [(time, server ready, model ready)]."""

    join_s = 10.0

    def __init__(self, url: str, every_s: float = 0.1):
        super().__init__()
        self.url, self.every_s, self.samples = url, every_s, []
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def ready(self, path: str) -> bool:
        try:
            with self.opener.open(f"http://{self.url}/{path}", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def run(self, i: int) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            self.samples.append((t, self.ready("v2/health/ready"), self.ready("v2/models/chorus/ready")))
            self.stop.wait(self.every_s)


class Serve:
    """`chorus serve` on free ports, as a user runs it; its stdout and stderr go to files."""

    def __init__(self, tmp: Path):
        self.out, self.err = tmp / "serve.out", tmp / "serve.err"
        self.log = tmp / "tritonserver.log"
        chorus = Path(sys.executable).with_name("chorus")
        cmd = [str(chorus), "serve", "--repository", str(REPOSITORY), "--http-port", "0", "--grpc-port", "0",
               "--metrics-port", "0", "--admin-key", KEY, "--log-file", str(self.log),
               "--ready-timeout", str(STARTUP_S)]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_S + 30
        while "Press Ctrl-C to stop." not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"chorus serve did not become ready:\n{self.out.read_text()}\n{self.err.read_text()}")
            time.sleep(0.5)
        text = self.out.read_text()
        self.triton_pid = int(re.search(r"starting tritonserver \(pid (\d+)\)", text).group(1))
        self.http_url = re.search(r"HTTP\s+http://(\S+)", text).group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stubs_of(pid: int) -> dict[int, str]:
    """{pid: state} of tritonserver's triton_python_backend_stub children."""
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    out = {}
    for kid in kids:
        try:
            stat = Path(f"/proc/{kid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:]
        if name == "triton_python_b":
            out[kid] = rest.split()[0]
    return out


def wait_for(condition, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor reads /proc")
def test_a_killed_stub_is_replaced_and_requests_succeed_again(tmp_path):
    serve = Serve(tmp_path)
    try:
        with Probe(serve.http_url) as probe, Load(serve.http_url) as load:
            wait_for(lambda: load.answered_since(0) >= 6, 120, "answers before the kill")
            (stub, state), = stubs_of(serve.triton_pid).items()  # one instance: one stub
            assert state != "Z"
            t_kill = time.monotonic()
            os.kill(stub, signal.SIGKILL)
            t_down = wait_for(lambda: any(t > t_kill and not m for t, _, m in probe.samples), DETECTION_S,
                              "the model's ready endpoint says not ready")
            t_up = wait_for(lambda: any(t > t_down and m for t, _, m in probe.samples), RECOVERY_S,
                            "the model's ready endpoint says ready again")
            wait_for(lambda: load.answered_since(t_up + 0.5) >= 6, 60, "answers after the reload")
        outcomes = list(load.outcomes)
        samples = list(probe.samples)
        new_stubs = stubs_of(serve.triton_pid)
        triton_alive = serve.proc.poll() is None and Path(f"/proc/{serve.triton_pid}").exists()
    finally:
        serve.stop()
    err = serve.err.read_text()
    report = (f"kill at 0; not ready at {t_down - t_kill:.1f} s; ready at {t_up - t_kill:.1f} s\n"
              + "\n".join(f"  sent {o.sent - t_kill:+7.2f} s, took {o.done - o.sent:5.2f} s: {o.error or 'answered'}"
                          for o in outcomes if o.done > t_kill - 1 and o.sent < t_up + 2) + f"\nserve stderr:\n{err}")

    print(report)
    # tritonserver was not restarted; a new stub serves (the dead one stays a zombie until Triton frees its instance)
    assert triton_alive, report
    assert new_stubs.get(stub, "Z") == "Z" and [p for p, state in new_stubs.items() if state != "Z"], \
        f"stubs now: {new_stubs}\n{report}"
    # every request before the kill was answered
    before = [o for o in outcomes if o.done < t_kill]
    assert before and all(o.error is None for o in before), report
    # the crash was seen by clients, and only between the kill and the model's return
    failed = [o for o in outcomes if o.error is not None]
    assert failed, f"no request failed after the kill:\n{report}"
    assert all(o.done > t_kill for o in failed), report
    after = [o for o in outcomes if o.sent > t_up + 0.5]
    assert len(after) >= 6 and all(o.error is None for o in after), report
    # no request hung: those sent while the model was down were refused at once, with a clear error; those the dead
    # stub had taken ended by the clients' timeout at the latest
    during = [o for o in outcomes if t_down + 0.5 < o.sent < t_up - 0.5]
    assert all(o.error is not None and o.done - o.sent < 2.0 for o in during), report
    assert all(re.search(r"not ready|unknown model|is not found|no available version|is not healthy|unavailable",
                         o.error, re.I) for o in during), report
    assert all(o.done - o.sent < REQUEST_TIMEOUT_S + 5 for o in outcomes), report
    # the ready endpoints: ready before, not ready while reloading (server too: strict readiness), ready after
    assert all(s and m for t, s, m in samples if t < t_kill), report
    assert any(not s and not m for t, s, m in samples if t_down <= t < t_up), report
    assert all(s and m for t, s, m in samples if t > t_up + 0.5), report
    assert t_up - t_kill < RECOVERY_S
    # the restart was logged with its reason
    assert re.search(rf"model 'chorus' lost its Python backend: stub chorus_0_0 \(pid {stub}\) killed by SIGKILL",
                     err), err
    assert re.search(r"model 'chorus' is serving again", err), err
