"""Crash recovery for `chorus serve`: a thread that notices a dead Python backend stub and brings its model back.

tritonserver runs each instance of a Python-backend model (chorus) in a child process, `triton_python_backend_stub`.
If that process dies — killed, out of memory, a crash in native code — tritonserver 2.51 (Triton 24.10) neither
restarts it nor reports it: the model's and the server's ready endpoints keep answering 200, and every later request
fails with HTTP 500 "Stub process 'chorus_0_0' is not healthy." (its Python backend dropped the restart-on-next-request
of 24.05 and earlier; a readiness check that sees a dead stub came with 25.12). Nothing reaps the dead process either:
it stays a zombie child of tritonserver until the model instance is destroyed.

`Supervisor` watches tritonserver's children in /proc. A stub that has been a zombie for `confirm_s` has died (one that
Triton stops on purpose, at unload, is reaped at once). It then reloads the stub's model through Triton's repository
API with the config it had, without restarting tritonserver:

1. `GET v2/models/<model>/config` (still served by the broken model; else the config read while it was healthy);
2. `POST v2/repository/models/<model>/unload`: from here on the model's ready endpoint says not ready, the server's
   ready endpoint says not ready (strict readiness: a model is unloading / loading), and requests are refused at once
   (HTTP 404 "Request for unknown model: 'chorus' has no available versions") instead of failing a second later;
3. `POST v2/repository/models/<model>/load` with `{"parameters": {"config": <that config>}}`: the same tasks and
   parameters; it returns once the new instances are ready.

Every restart is logged (logger `chorus.supervisor`) with its reason — which instance, which pid, killed by which
signal or exit code — and how long the model was down; `restarts` keeps the record. A load that fails is retried with
backoff (a bad task file makes every load fail, and the message says so). Requests that the stub had taken before it
died were in its memory: no one can answer them, and their clients wait for their own timeouts (docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

STUB_COMM = "triton_python_backend_stub"[:15]  # /proc/<pid>/comm keeps the first 15 bytes of the name


@dataclass(frozen=True)
class Stub:
    """A Python backend stub process: its pid, and the model instance it runs (from its command line)."""

    pid: int
    model: str
    instance: str


@dataclass
class Restart:
    """One reload of a model after its stub died."""

    model: str
    reason: str
    started: float  # time.time()
    seconds: float | None = None  # until the model was loaded again; None while it is not
    attempts: int = 0
    error: str | None = None  # the last failed attempt's error


@dataclass
class _Proc:
    comm: str
    state: str  # R, S, D, Z, ...
    exit_code: int | None  # the wait status of a zombie (Linux >= 3.5)


def _read_proc(pid: int) -> _Proc | None:
    """`/proc/<pid>/stat`'s name, state and exit code; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    left, right = stat.find("("), stat.rfind(")")  # the name may hold spaces and parentheses
    fields = stat[right + 2:].split()
    exit_code = int(fields[-1]) if len(fields) >= 50 else None  # field 52 of stat
    return _Proc(stat[left + 1:right], fields[0], exit_code)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (every thread's children: tritonserver forks stubs from its loader threads)."""
    tasks = Path(f"/proc/{pid}/task")
    kids: set[int] = set()
    try:
        for task in tasks.iterdir():
            try:
                kids.update(int(c) for c in (task / "children").read_text().split())
            except OSError:  # the thread ended, or the kernel has no CONFIG_PROC_CHILDREN: scan /proc instead
                if not (task / "children").exists() and task.exists():
                    return _children_by_scan(pid)
    except OSError:
        return []
    return sorted(kids)


def _children_by_scan(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _stub_of(pid: int) -> Stub | None:
    """The model and instance a live stub runs: its command line is `triton_python_backend_stub
    <repository>/<model>/<version>/model.py <shm region> <sizes> <parent pid> <python lib> <ipc handle> <instance> ...`
    (python_backend's StubLauncher::Launch). A zombie's command line is empty: read it while the stub lives."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 9 or not argv[1]:
        return None
    model_file = Path(os.fsdecode(argv[1]))
    return Stub(pid, model_file.parent.parent.name, os.fsdecode(argv[8]))


def describe_exit(code: int | None) -> str:
    """A zombie's wait status in words: "killed by SIGKILL", "exited with code 1"."""
    if code is None:
        return "exited"
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}" + (" (core dumped)" if os.WCOREDUMP(code) else "")
    if os.WIFEXITED(code):
        return f"exited with code {os.WEXITSTATUS(code)}"
    return f"ended (wait status {code})"


@dataclass
class _Watch:
    stubs: dict[int, Stub] = field(default_factory=dict)  # live stubs seen, by pid
    zombie_since: dict[int, float] = field(default_factory=dict)  # pid -> when first seen dead
    handled: set[int] = field(default_factory=set)  # dead stubs already acted on (they stay zombies)
    unknown: set[int] = field(default_factory=set)  # dead stubs never seen alive (already warned about)


class Supervisor:
    """Watches a running `TritonServer`'s Python backend stubs and reloads a model whose stub died (module doc).

    `start()` runs the watch on a daemon thread; `stop()` ends it. `poll_s`: how often /proc is read; `confirm_s`:
    how long a stub must have been dead before the model is reloaded (a stub stopped on purpose is reaped at once);
    `config_refresh_s`: how often the served config is read while all is well, for when the broken model no longer
    answers with it; `load_timeout_s`: the longest a load may take; `retry_s`: the first wait before a failed load is
    tried again (doubling up to `max_retry_s`).
    """

    def __init__(self, server: Any, *, poll_s: float = 0.2, confirm_s: float = 0.4, config_refresh_s: float = 10.0,
                 load_timeout_s: float = 600.0, retry_s: float = 2.0, max_retry_s: float = 60.0) -> None:
        self.server = server
        self.poll_s, self.confirm_s, self.config_refresh_s = poll_s, confirm_s, config_refresh_s
        self.load_timeout_s, self.retry_s, self.max_retry_s = load_timeout_s, retry_s, max_retry_s
        self.restarts: list[Restart] = []
        self._configs: dict[str, dict] = {}  # model -> its config, read while it served
        self._down: dict[str, tuple[Restart, float]] = {}  # model -> (its restart, when to try loading again)
        self._watch = _Watch()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy

    # ---- lifecycle
    def start(self) -> Supervisor:
        """Start watching (returns at once). Outside Linux there is no /proc to watch: it logs that and does nothing."""
        if not Path(f"/proc/{os.getpid()}/stat").is_file():
            LOGGER.warning("chorus supervisor: no /proc on this system, so a crashed Python backend stub is not "
                           "noticed; restart `chorus serve` if requests fail with 'Stub process ... is not healthy'")
            return self
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="chorus-supervisor", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop watching (a reload in progress finishes on its own; its outcome is not waited for)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the watch
    def _run(self) -> None:
        next_refresh = 0.0
        while not self._stop.is_set() and self.server.poll() is None:
            try:
                now = time.monotonic()
                for model, reasons in self.dead_stubs(now).items():
                    self._begin(model, "; ".join(reasons))
                for model, (record, when) in list(self._down.items()):
                    if now >= when:
                        self._reload(model, record)
                if now >= next_refresh and not self._down:
                    self._refresh_configs()
                    next_refresh = now + self.config_refresh_s
            except Exception:  # noqa: BLE001 - the watch must outlive any one failure
                LOGGER.exception("chorus supervisor: unexpected error (watching on)")
            self._stop.wait(self.poll_s)

    def dead_stubs(self, now: float) -> dict[str, list[str]]:
        """{model: why} for the models whose stub has been dead for `confirm_s` (each dead stub reported once)."""
        pid = self.server.pid
        if pid is None:
            return {}
        w, dead = self._watch, {}
        present = set()
        for child in _children(pid):
            proc = _read_proc(child)
            if proc is None or proc.comm != STUB_COMM:
                continue
            present.add(child)
            if proc.state != "Z":
                if child not in w.stubs:
                    stub = _stub_of(child)
                    if stub is not None:
                        w.stubs[child] = stub
                continue
            if child in w.handled:
                continue
            stub = w.stubs.get(child)
            if stub is None:
                if child not in w.unknown:
                    w.unknown.add(child)
                    LOGGER.warning("chorus supervisor: Python backend stub pid %d died (%s) before it was seen alive; "
                                   "its model is not known, so nothing is reloaded", child,
                                   describe_exit(proc.exit_code))
                continue
            since = w.zombie_since.setdefault(child, now)
            if now - since >= self.confirm_s:
                w.handled.add(child)
                dead.setdefault(stub.model, []).append(
                    f"stub {stub.instance} (pid {child}) {describe_exit(proc.exit_code)}")
        for gone in (set(w.stubs) | set(w.zombie_since)) - present:  # reaped: stopped on purpose, or destroyed
            w.stubs.pop(gone, None)
            w.zombie_since.pop(gone, None)
        w.handled &= present
        w.unknown &= present
        return dead

    # ---- reloading
    def _begin(self, model: str, reason: str) -> None:
        if model in self._down:  # already being reloaded (another instance of it died too)
            self._down[model][0].reason += f"; {reason}"
            return
        record = Restart(model, reason, time.time())
        self.restarts.append(record)
        LOGGER.warning("chorus supervisor: model %r lost its Python backend: %s. Reloading it with the same config "
                       "(tritonserver keeps running; requests to it are refused until it is ready)", model, reason)
        config = self._get_config(model)
        if config is not None:
            self._configs[model] = config
        elif model not in self._configs:
            LOGGER.warning("chorus supervisor: the config of model %r could not be read; it is reloaded from its "
                           "config.pbtxt (tasks added since with `chorus task add` are not in it)", model)
        self._request("POST", f"v2/repository/models/{model}/unload", {"parameters": {"unload_dependents": False}},
                      timeout=30.0, what=f"unload {model!r}")
        self._down[model] = (record, time.monotonic())

    def _reload(self, model: str, record: Restart) -> None:
        record.attempts += 1
        config = self._configs.get(model)
        if config is None:
            config = self._get_config(model)  # the model's files on disk, if it was never read while serving
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        start = time.monotonic()
        error = self._request("POST", f"v2/repository/models/{model}/load", body, timeout=self.load_timeout_s,
                              what=f"load {model!r}")
        if error is None:
            record.seconds, record.error = time.time() - record.started, None
            self._down.pop(model, None)
            LOGGER.warning("chorus supervisor: model %r is serving again, %.1f s after its stub died (load %.1f s, "
                           "attempt %d)", model, record.seconds, time.monotonic() - start, record.attempts)
            return
        record.error = error
        wait = min(self.max_retry_s, self.retry_s * 2 ** (record.attempts - 1))
        LOGGER.error("chorus supervisor: reloading model %r failed (attempt %d): %s. Trying again in %.0f s",
                     model, record.attempts, error, wait)
        self._down[model] = (record, time.monotonic() + wait)

    def _refresh_configs(self) -> None:
        for model in sorted({s.model for s in self._watch.stubs.values()}):
            config = self._get_config(model)
            if config is not None:
                self._configs[model] = config

    def _get_config(self, model: str) -> dict | None:
        out: list[Any] = []
        error = self._request("GET", f"v2/models/{model}/config", None, timeout=10.0, what=f"read {model!r} config",
                              out=out, quiet=True)
        return out[0] if error is None and out and isinstance(out[0], dict) else None

    def _request(self, method: str, path: str, body: dict | None, *, timeout: float, what: str,
                 out: list | None = None, quiet: bool = False) -> str | None:
        """One HTTP call to tritonserver, with the admin key if it has one; None on success, else the error."""
        from chorus.server import HTTP_ADMIN_HEADER

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.server.http_url}/{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        key = getattr(self.server, "admin_key", None)
        if key:
            request.add_header(HTTP_ADMIN_HEADER, key)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                text = response.read()
            if out is not None:
                out.append(json.loads(text) if text else None)
            return None
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            error = f"{what}: HTTP {e.code}: {detail}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            error = f"{what}: {e}"
        if not quiet:
            LOGGER.error("chorus supervisor: %s", error)
        return error
