"""Start and stop a real NVIDIA Triton ``tritonserver`` for chorus (modelled on pytriton's launcher).

The server binary normally comes from the ``nvidia-pytriton`` wheel (tritonserver 2.51.0). That wheel keeps its
Python backend and one backend stub per Python version apart, so :func:`python_backend_dir` assembles a backend
directory for the running Python, and :func:`server_env` sets the libraries and ``PATH`` the stub needs. A
``tritonserver`` that is not the pip build (the NGC container's ``/opt/tritonserver/bin/tritonserver``) runs with its
own backend directory.

Typical use::

    with TritonServer(models_to_load=("chorus",), http_port=0) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from chorus import admin_key as keys
from chorus.backends.paths import TASK_ROOTS_ENV, task_roots as model_task_roots
from chorus.errors import ChorusError, ServerError
from chorus.supervisor import Supervisor

LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
# The checkout's .cache/ (editable install, as `make venv` does); ~/.cache/chorus for an installed copy.
CACHE_DIR = (REPO_ROOT / ".cache" if (REPO_ROOT / "pyproject.toml").is_file()
             else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chorus")
DEFAULT_BACKENDS_CACHE = CACHE_DIR / "triton_backends"
NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
HTTP_ADMIN_HEADER = "admin-key"  # the header named in the restricted-API flags
# What the admin key guards: loading and unloading models (which runs the model's code), registering shared-memory
# regions of the host, and changing trace and log settings. Inference, health, metadata, model config and statistics
# stay open, as tritonserver has them.
RESTRICTED_CATEGORIES = ("model-repository", "shared-memory", "trace", "logging")
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + HTTP_ADMIN_HEADER  # what gRPC clients must send for it
_FIX = "Fix: run `make venv` (installs nvidia-pytriton==0.7.0, which ships tritonserver 2.51.0), " \
       "or set TRITONSERVER=/path/to/tritonserver."


# --------------------------------------------------------------------------------------------- locating things
def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _pip_tritonserver() -> Path | None:
    pytriton = _package_dir("pytriton")
    return pytriton / "tritonserver" / "bin" / "tritonserver" if pytriton else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tritonserver() -> Path:
    """The tritonserver binary to run.

    Order: ``$TRITONSERVER`` (if set, it is the only place looked), the nvidia-pytriton wheel's
    ``<site>/pytriton/tritonserver/bin/tritonserver``, ``tritonserver`` on ``PATH``, ``/opt/tritonserver/bin``.
    """
    explicit = os.environ.get("TRITONSERVER")
    if explicit:
        path = Path(explicit).expanduser().absolute()
        if _is_executable(path):
            return path
        raise ServerError(f"TRITONSERVER={explicit} is not an executable file. "
                          "Fix: point TRITONSERVER at a tritonserver binary, or unset it to use the nvidia-pytriton "
                          "wheel's (`make venv` installs it).")
    looked: list[str] = []
    pip = _pip_tritonserver()
    looked.append(str(pip) if pip else "the nvidia-pytriton wheel (package `pytriton` is not installed)")
    on_path = shutil.which("tritonserver")
    looked.append(on_path or "`tritonserver` on PATH (none)")
    for candidate in (pip, Path(on_path) if on_path else None, NGC_TRITONSERVER):
        if candidate is not None and _is_executable(candidate):
            return candidate.absolute()
    looked.append(str(NGC_TRITONSERVER))
    raise ServerError("tritonserver not found. Looked at:\n  " + "\n  ".join(looked) + "\n" + _FIX)


def _pip_layout_root(tritonserver: Path) -> Path | None:
    """``<site>/pytriton/tritonserver`` if ``tritonserver`` is the nvidia-pytriton build, else None."""
    root = tritonserver.resolve().parent.parent
    return root if (root / "python_backend_stubs").is_dir() else None


def python_backend_dir(tritonserver: Path | None = None, dest: Path | None = None) -> Path | None:
    """A ``--backend-directory`` whose ``python/`` serves the running Python, or None for a non-pip tritonserver.

    For the pip binary this (idempotently) links ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the
    ``python_backend_stubs/<major.minor>/triton_python_backend_stub`` into ``dest/python/`` (default:
    ``.cache/triton_backends/python<major.minor>/`` in the repository root). None means: use the server's default
    backend directory (e.g. the NGC container's ``/opt/tritonserver/backends``).
    """
    root = _pip_layout_root(tritonserver or find_tritonserver())
    if root is None:
        return None
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub",
    }
    for src in sources.values():
        if not src.is_file():
            stubs = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
            raise ServerError(f"{src} is missing, so tritonserver cannot run Python models with Python {PY_VERSION}. "
                              f"The wheel has stubs for Python {', '.join(stubs)}. Fix: use one of those Pythons "
                              "for .venv (`make distclean venv`), or reinstall nvidia-pytriton==0.7.0.")
    dest = Path(dest) if dest is not None else DEFAULT_BACKENDS_CACHE / f"python{PY_VERSION}"
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        link = python_dir / name
        if link.is_symlink() and os.readlink(link) == str(src):
            continue
        tmp = python_dir / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(src, tmp)
        os.replace(tmp, link)  # atomic, so concurrent starts never see a half-made directory
    return dest


def _prepend_paths(value: str | None, *paths: Path | str) -> str:
    parts = [str(p) for p in paths] + [p for p in (value or "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))  # drop duplicates, keep order


def _venv_bin() -> Path:
    return Path(sysconfig.get_path("scripts"))


def server_env(tritonserver: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python backend stub.

    ``LD_LIBRARY_PATH`` gets ``<site>/nvidia_pytriton.libs`` (the stub's libcudart, needed even on CPU) and the
    running Python's libpython folder; ``PATH`` starts with this environment's ``bin`` (the stub embeds the
    ``python3`` it finds on ``PATH``, so it must be the venv's, with the venv's packages); ``PYTHONUNBUFFERED=1``.
    """
    env = dict(os.environ if base is None else base)
    root = _pip_layout_root(tritonserver or find_tritonserver())
    libs: list[Path] = []
    if root is not None:
        libs.append(root.parent.parent / "nvidia_pytriton.libs")
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and (Path(libdir) / soname).is_file():
            libs.append(Path(libdir))
    if libs:
        env["LD_LIBRARY_PATH"] = _prepend_paths(env.get("LD_LIBRARY_PATH"), *libs)
    env["PATH"] = _prepend_paths(env.get("PATH"), _venv_bin())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def perf_analyzer_path() -> Path:
    """The ``perf_analyzer`` of the tritonclient==2.51.0 wheel (in the venv's ``bin``)."""
    candidate = _venv_bin() / "perf_analyzer"
    if _is_executable(candidate):
        return candidate
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return Path(on_path)
    raise ServerError(f"perf_analyzer not found at {candidate} nor on PATH. It ships in the tritonclient==2.51.0 "
                      "wheel: run `make venv`.")


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
        return True
    except OSError:
        return False


def perf_analyzer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment in which ``perf_analyzer`` finds ``libcudart.so.12`` (nvidia-cuda-runtime-cu12) and ``libb64``.

    libb64 normally comes from Debian's ``libb64-0d`` (``make venv`` installs it); when the system lacks it, the copy
    in nvidia_pytriton.libs is linked under its soname in ``.cache/perf_libs``.
    """
    env = dict(os.environ if base is None else base)
    libs: list[Path] = []
    cudart = _package_dir("nvidia.cuda_runtime")
    if cudart is not None and (cudart / "lib").is_dir():
        libs.append(cudart / "lib")
    if not _loadable("libb64.so.0d"):
        shim = _libb64_shim()
        if shim is not None:
            libs.append(shim)
    env["LD_LIBRARY_PATH"] = _prepend_paths(env.get("LD_LIBRARY_PATH"), *libs)
    return env


def _libb64_shim() -> Path | None:
    pip = _pip_tritonserver()
    copies = sorted((pip.parents[3] / "nvidia_pytriton.libs").glob("libb64-*.so.0d")) if pip else []
    if not copies:
        LOGGER.warning("libb64.so.0d not found: perf_analyzer will not start. Fix: apt-get install libb64-0d")
        return None
    shim = CACHE_DIR / "perf_libs"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "libb64.so.0d"
    if not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(copies[0])
    return shim


# --------------------------------------------------------------------------------------------- the server
def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (all sockets held until all are picked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _client_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _death_signal(cmd: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """`cmd` (and a preexec_fn) such that the child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG).

    util-linux's `setpriv --pdeathsig` sets it and execs the command, so no Python runs between fork and exec: a
    preexec_fn runs Python in the forked child, which can deadlock on a lock another thread (a gRPC client's, an
    import) held at the fork. Without setpriv, a preexec_fn calls prctl. The signal fires when the *thread* that
    started the child exits, so start servers from a long-lived thread.
    """
    if not sys.platform.startswith("linux"):
        return cmd, None
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *cmd], None
    return cmd, _death_signal_preexec()


def _death_signal_preexec() -> Callable[[], None]:
    """A preexec_fn that calls prctl(PR_SET_PDEATHSIG, SIGTERM) in the child."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class TritonServer:
    """A tritonserver child process (context manager: starts, waits until ready, stops).

    Ports given as 0 are replaced by free ones at :meth:`start`. ``admin_key`` guards the model-repository
    endpoints (index, load, unload), shared-memory registration and the trace and log settings
    (RESTRICTED_CATEGORIES): HTTP clients must send the header ``admin-key: <key>``, gRPC clients
    ``triton-grpc-protocol-admin-key: <key>`` (tritonserver prefixes restricted gRPC headers; see GRPC_ADMIN_HEADER).
    Without one the repository API is open to whoever reaches the ports, so a ``host`` beyond loopback needs a key
    (`chorus serve` always passes one: ``chorus.admin_key``). ``task_roots`` are folders the chorus model may read
    task and student directories from besides its own directory (env ``CHORUS_TASK_ROOTS`` of the server;
    ``chorus.backends.paths``).
    """

    def __init__(
        self,
        repository: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        models_to_load: Sequence[str] = ("chorus",),
        admin_key: str | None = None,
        task_roots: Sequence[Path | str] = (),
        log_path: Path | str | None = None,
        extra_args: Sequence[str] = (),
        tritonserver: Path | str | None = None,
        exit_timeout_s: int = 10,
        ready_timeout_s: float = 300.0,
    ) -> None:
        self.repository = Path(repository if repository is not None else DEFAULT_REPOSITORY).resolve()
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.models_to_load = tuple(models_to_load)
        self.admin_key = admin_key
        self.task_roots = tuple(Path(r).expanduser().absolute() for r in task_roots)
        self.extra_args = tuple(extra_args)
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.exit_timeout_s = exit_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self._log_path = Path(log_path).resolve() if log_path else None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ---- properties
    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http wants it."""
        return f"{_client_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """``http://host:port/metrics`` (Prometheus text)."""
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def poll(self) -> int | None:
        """The exit code if the server has exited, else None (also None before start)."""
        return self._process.poll() if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ---- lifecycle
    def command(self, tritonserver: Path, backend_dir: Path | None) -> list[str]:
        """The tritonserver command line (ports must already be concrete)."""
        cmd = [str(tritonserver), f"--model-repository={self.repository}"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models_to_load]
        cmd += [f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--log-verbose=0", f"--exit-timeout-secs={self.exit_timeout_s}"]
        if self.admin_key:  # form `<apis>:<header>=<value>` (2.51's --help shows a `,` there: that is wrong)
            guarded = ",".join(RESTRICTED_CATEGORIES)
            cmd += [f"--http-restricted-api={guarded}:{HTTP_ADMIN_HEADER}={self.admin_key}",
                    f"--grpc-restricted-protocol={guarded}:{HTTP_ADMIN_HEADER}={self.admin_key}"]
        return cmd + list(self.extra_args)

    def start(self) -> None:
        """Start tritonserver in the background (returns at once; see :meth:`wait_ready`)."""
        if self.running:
            raise ServerError(f"tritonserver is already running (pid {self.pid}); stop() it first.")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist. Fix: run `make repository`, "
                              "or pass the right --repository.")
        if not self.admin_key and not keys.is_loopback(self.host):
            raise ServerError(f"refusing to listen on {self.host!r} with an open model-repository API (anyone who "
                              "reaches the port could load models and run their code). Fix: pass admin_key=..., or "
                              "listen on 127.0.0.1.")
        binary = self.tritonserver or find_tritonserver()
        backend_dir = python_backend_dir(binary)
        wanted = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p == 0]
        free = iter(_free_ports(self.host, len(wanted)))
        self.http_port, self.grpc_port, self.metrics_port = (
            p or next(free) for p in (self.http_port, self.grpc_port, self.metrics_port))
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="chorus-tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(binary, backend_dir)
        LOGGER.info("starting %s (log: %s)", " ".join(self._redacted(cmd)), self._log_path)
        env = server_env(binary)
        if self.task_roots:
            env[TASK_ROOTS_ENV] = _prepend_paths(env.get(TASK_ROOTS_ENV), *self.task_roots)
        self._log_file = open(self._log_path, "ab")
        try:
            argv, preexec = _death_signal(cmd)
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=preexec)
        except OSError as exc:
            self._close_log()
            raise ServerError(f"could not start {binary}: {exc}. {_FIX}") from exc

    def _redacted(self, cmd: list[str]) -> list[str]:
        return [a.replace(self.admin_key, "***") if self.admin_key else a for a in cmd]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/v2/health/ready`` until it answers 200; raise ServerError if the server exits or time runs out."""
        if self._process is None:
            raise ServerError("tritonserver was not started: call start() first.")
        timeout = self.ready_timeout_s if timeout is None else timeout
        url = f"http://{self.http_url}/v2/health/ready"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before it was ready. "
                                  f"Last lines of {self._log_path}:\n{self.log_tail()}")
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        LOGGER.info("tritonserver ready at %s (pid %s)", self.http_url, self.pid)
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or listening but not ready (HTTP 400)
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver (pid {self.pid}) was not ready at {url} after {timeout:.0f} s. "
                                  f"Last lines of {self._log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        with open(self._log_path, "rb") as f:
            return b"".join(deque(f, maxlen=lines)).decode(errors="replace").rstrip()

    def stop(self) -> int | None:
        """Stop: SIGINT (graceful), then SIGTERM, then SIGKILL of its process group. Returns the exit code."""
        proc = self._process
        if proc is None:
            return None
        try:
            for sig, wait_s in ((signal.SIGINT, self.exit_timeout_s + 10), (signal.SIGTERM, 10)):
                if proc.poll() is not None:
                    break
                LOGGER.info("stopping tritonserver (pid %s) with %s", proc.pid, sig.name)
                proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    continue
            if proc.poll() is None:
                LOGGER.warning("tritonserver (pid %s) ignored SIGINT and SIGTERM: killing it", proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: takes the backend stubs too
                except ProcessLookupError:
                    pass
                proc.wait()
        finally:
            self._close_log()
        return proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- `chorus serve`
def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer 0..65535, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 (0 = any free port), got {port}")
    return port


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an argparse subparsers object."""
    env = os.environ
    p = subparsers.add_parser(
        "serve", help="run tritonserver with the chorus model repository in the foreground (Ctrl-C stops)",
        description="Start tritonserver on the chorus model repository, wait until it is ready, print where it "
                    "listens, and run until Ctrl-C or SIGTERM.")
    p.add_argument("--repository", type=Path, default=Path(env.get("CHORUS_REPOSITORY", DEFAULT_REPOSITORY)),
                   help="model repository (default: %(default)s; env CHORUS_REPOSITORY)")
    p.add_argument("--host", default=env.get("CHORUS_HOST", "127.0.0.1"),
                   help="address to bind HTTP, gRPC and metrics to (default: %(default)s; env CHORUS_HOST)")
    for name, default in (("http", "8000"), ("grpc", "8001"), ("metrics", "8002")):
        var = f"CHORUS_{name.upper()}_PORT"
        p.add_argument(f"--{name}-port", type=_port, default=env.get(var, default),
                       help=f"{name} port, 0 = any free port (default: %(default)s; env {var})")
    p.add_argument("--admin-key", default=env.get(keys.KEY_ENV) or None,
                   help="the key model load/unload need: HTTP header `admin-key: KEY`, gRPC header "
                        "`triton-grpc-protocol-admin-key: KEY` (env CHORUS_ADMIN_KEY). Default: a generated key "
                        "kept in $CHORUS_ADMIN_KEY_FILE, else $XDG_STATE_HOME/chorus/admin-key or "
                        "~/.local/state/chorus/admin-key (mode 0600; chorus clients on this machine read it). "
                        "Required with a --host beyond loopback")
    p.add_argument("--task-root", dest="task_roots", action="append", type=Path, default=[], metavar="DIR",
                   help="a folder task and student directories may come from, besides the model's own directory "
                        "(repeatable; added to env CHORUS_TASK_ROOTS, os.pathsep-separated)")
    p.add_argument("--log-file", type=Path, default=None,
                   help="tritonserver log (default: a new chorus-tritonserver-*.log in the temp folder)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness (%(default)s)")
    p.set_defaults(func=serve)
    return p


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve(args: argparse.Namespace) -> int:
    """``chorus serve``: run tritonserver in the foreground until Ctrl-C / SIGTERM. Returns the exit code."""
    repository = Path(args.repository).resolve()
    if not (repository / "chorus" / "config.pbtxt").is_file():
        print(f"chorus serve: {repository} has no chorus/config.pbtxt. Run `make repository` first "
              "(it trains the default tasks and writes the model repository).", file=sys.stderr)
        return 2
    task_roots = [Path(r).expanduser().resolve() for r in getattr(args, "task_roots", [])]
    try:
        key = keys.server_key(args.admin_key, args.host)
        roots = model_task_roots(repository / "chorus", {
            TASK_ROOTS_ENV: _prepend_paths(os.environ.get(TASK_ROOTS_ENV), *task_roots)})
    except ChorusError as exc:
        print(f"chorus serve: {exc}", file=sys.stderr)
        return 2
    server = TritonServer(repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, admin_key=key.value, log_path=args.log_file,
                          task_roots=task_roots)
    if key.file is None:
        guard = "the key given (--admin-key / CHORUS_ADMIN_KEY)"
    else:
        guard = f"the key in {key.file}{' (new)' if key.created else ''}; chorus clients on this machine read it"
    # Both stop the server; SIGINT explicitly too, as a shell starting us in the background leaves it ignored.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(server)  # reloads a model whose Python backend stub died (chorus.supervisor)
    try:
        server.start()
        print(f"chorus: starting tritonserver (pid {server.pid}); log: {server.log_path}", flush=True)
        server.wait_ready(args.ready_timeout)
        print(f"chorus: tritonserver is ready, serving {repository}\n"
              f"  HTTP     http://{server.http_url}   (tritonclient.http url: {server.http_url})\n"
              f"  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n"
              f"  log      {server.log_path}\n"
              f"  binary   {server.tritonserver or find_tritonserver()}\n"
              f"  model load/unload (chorus task add|remove) need {guard}: header {HTTP_ADMIN_HEADER} (HTTP) or "
              f"{GRPC_ADMIN_HEADER} (gRPC); inference is open\n"
              f"  task and student directories may come from: {', '.join(map(str, roots))}\n"
              "Press Ctrl-C to stop.", flush=True)
        supervisor.start()
        while server.poll() is None:
            time.sleep(0.5)
        print(f"chorus: tritonserver exited unexpectedly with code {server.poll()}. Last lines of "
              f"{server.log_path}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chorus: stopping tritonserver ...", flush=True)
        return 0
    except ServerError as exc:
        print(f"chorus serve: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the server half-stopped
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()
        code = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if code is not None:
            LOGGER.info("tritonserver exited with code %s", code)
