"""chorus.supervisor's watch: which of a process's children are Python backend stubs, which model they run, and when
one has died. Real child processes laid out as tritonserver launches its stubs (an executable named
triton_python_backend_stub, argv as python_backend's StubLauncher writes it); the reload itself runs against a real
tritonserver in tests/functional/test_crash_recovery.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from chorus.supervisor import STUB_COMM, Supervisor, describe_exit

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
