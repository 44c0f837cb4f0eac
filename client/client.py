"""Clients for the `chorus` Triton model: `ChorusClient` (blocking) and `AsyncChorusClient` (asyncio), same methods.

    with ChorusClient("127.0.0.1:8000") as c:
        c.classify(["a fine film"], task="sst2")      # -> [Prediction(task="sst2", label="positive", ...)]
        c.add_task("emotion", "tasks/emotion")         # hot reload; other tasks keep being served
        c.tasks()                                      # -> {"emotion": "/abs/tasks/emotion", "sst2": ...}

Task management edits the model config's `tasks` parameter and reloads the model through Triton's model-repository
API (the server must run with `--model-control-mode=explicit`). Triton swaps the new instance in only once it is
ready, and keeps the old one if the load fails. It is read-modify-write: two admins changing tasks at the same
moment can lose one change. Task paths are resolved by the server, so they must exist on the server's filesystem
(same host or a shared volume).

Every failure is raised as a `chorus.errors` exception: `InvalidInput` (bad input, failed load), `UnknownTask`,
`Overloaded` (server answered UNAVAILABLE), `ServerError` (not reachable / timed out), `ChorusError` (the rest, e.g.
a repository call without the right admin key). A client object is meant for one thread / one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from chorus.admin_key import client_key
from chorus.errors import ChorusError

from .wire import (
    MAX_BATCH_SIZE,
    Prediction,
    Request,
    ids_requests,
    normalize_config,
    plan_add,
    plan_remove,
    plan_students,
    predictions,
    request_parameters,
    resolve_url,
    map_from_config,
    tasks_from_config,
    text_requests,
    translate_error,
)

OUTPUTS = ("LOGITS", "LABEL", "LABEL_NAMES", "STUDENTS")


class _Transport:
    """The tritonclient module and the per-call keyword arguments that differ between http and grpc, sync and aio."""

    def __init__(self, protocol: str, url: str, aio: bool, timeout: float, admin_key: str | None):
        self.module = importlib.import_module(f"tritonclient.{protocol}{'.aio' if aio else ''}")
        grpc = protocol == "grpc"
        if grpc:
            client_kwargs: dict[str, Any] = {}
        elif aio:
            client_kwargs = {"conn_timeout": timeout}
        else:
            client_kwargs = {"connection_timeout": timeout, "network_timeout": timeout}
        self.client = self.module.InferenceServerClient(url, **client_kwargs)
        self.call: dict[str, Any] = {"client_timeout": timeout} if grpc else {}  # http: timeouts live on the client
        self.as_json: dict[str, Any] = {"as_json": True} if grpc else {}  # grpc returns protobuf messages otherwise
        self._url, self._grpc, self._admin_key = url, grpc, admin_key
        self.errors: tuple[type[BaseException], ...] = (InferenceServerException, OSError, asyncio.TimeoutError)
        if aio and not grpc:
            import aiohttp

            self.errors += (aiohttp.ClientError,)

    @functools.cached_property
    def admin(self) -> dict[str, str] | None:
        """The admin-key headers for repository calls: the key given, else `chorus.admin_key.client_key` (env
        CHORUS_ADMIN_KEY, or the local `chorus serve`'s key file for a loopback url); None sends none. Looked up at
        the first repository call, so inference never depends on the key file."""
        key = self._admin_key if self._admin_key is not None else client_key(self._url)
        if key is None:
            return None
        headers = {"admin-key": key}
        if self._grpc:  # Triton's gRPC server expects restricted-API headers with a "triton-grpc-protocol-" prefix
            headers["triton-grpc-protocol-admin-key"] = key
        return headers

    def admin_for_reading(self) -> dict[str, str] | None:
        """`admin` for calls that work without the key (model config): a key-file problem is raised by the next
        load, which needs the key, not by a read."""
        try:
            return self.admin
        except ChorusError:
            return None

    def inputs(self, tensors: dict[str, np.ndarray]) -> list:
        out = []
        for name, array in tensors.items():
            tensor = self.module.InferInput(name, list(array.shape), "BYTES" if array.dtype == np.object_ else "INT32")
            tensor.set_data_from_numpy(array)
            out.append(tensor)
        return out


class _ClientBase:
    _aio: bool  # which tritonclient flavour the subclass talks through

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "http",
        admin_key: str | None = None,
        model: str = "chorus",
        timeout: float = 120.0,
        max_batch_size: int = MAX_BATCH_SIZE,
    ):
        self.protocol = protocol
        self.url = resolve_url(url, protocol)
        self.model = model
        self.max_batch_size = max_batch_size
        self._t = _Transport(protocol, self.url, self._aio, timeout, admin_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Re-raise tritonclient / transport exceptions as chorus errors (works around `await` too)."""
        try:
            yield
        except ChorusError:
            raise
        except self._t.errors as exc:
            raise translate_error(exc, action, self.url, self.protocol) from exc

    @staticmethod
    def _place(out: list, request: Request, arrays: dict[str, np.ndarray]) -> None:
        tasks = [t[0].decode("utf-8") for t in request.tensors["TASK"]]
        for row, prediction in zip(request.rows, predictions(tasks, arrays["LOGITS"], arrays["LABEL"],
                                                             arrays["LABEL_NAMES"], arrays.get("STUDENTS"))):
            out[row] = prediction

    def _health(self, live: bool, ready: bool, model_ready: bool, metadata: dict, tasks: int | None) -> dict:
        return {
            "url": self.url,
            "protocol": self.protocol,
            "server_live": live,
            "server_ready": ready,
            "model_ready": model_ready,
            "server_version": metadata.get("version"),
            "task_count": tasks,
        }


class ChorusClient(_ClientBase):
    """Blocking client of the `chorus` model.

    `url` is host:port (default 127.0.0.1:8000 for http, 127.0.0.1:8001 for grpc). `admin_key` is sent as header
    `admin-key` on model-config and model-repository calls; None uses env CHORUS_ADMIN_KEY, else, for a server on a
    loopback address, the key file of this machine's `chorus serve` (`chorus.admin_key`). `timeout` bounds any one
    call in seconds, a model reload included. Rows go in requests of at most `max_batch_size` (the model's, 64) rows
    each.
    """

    _aio = False

    def __enter__(self) -> ChorusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._t.client.close()

    def classify(self, texts: Sequence[str], task: str | Sequence[str], truncate: bool = False,
                 students: int | None = None, deadline_ms: float | None = None) -> list[Prediction]:
        """One Prediction per text, in order. `task` names one task for all texts, or one per text. A text longer
        than the model reads is refused, unless `truncate` asks the server to classify its first tokens. For a task
        with students, `students=0` asks for the teacher and `students=n` for at most n students (default: as many as
        the server's load allows); `Prediction.students` says how many answered. `deadline_ms` replaces the
        server's default deadline: a request the scheduler cannot answer in time is refused at once (Overloaded)."""
        return self._run(text_requests(texts, task, self.max_batch_size),
                         request_parameters(truncate, students, deadline_ms))

    def classify_ids(self, ids: Sequence[Sequence[int]], task: str | Sequence[str],
                     students: int | None = None) -> list[Prediction]:
        """Like `classify` for pre-tokenized rows (ids include [CLS]/[SEP]); one request per length and chunk."""
        return self._run(ids_requests(ids, task, self.max_batch_size), request_parameters(False, students))

    def tasks(self) -> dict[str, str]:
        """Served tasks: {name: task path on the server}."""
        return tasks_from_config(self._config())

    def add_task(self, name: str, path: str | os.PathLike, replace: bool = False) -> dict[str, str]:
        """Serve task `name` from `path` (made absolute; must exist on the server). Returns the new task map."""
        config, tasks = plan_add(self._config(), name, path, replace)
        self._load(config, f"add task {name!r}")
        return tasks

    def remove_task(self, name: str) -> dict[str, str]:
        """Stop serving task `name` (and its students). Returns the new task map."""
        config, tasks = plan_remove(self._config(), name)
        self._load(config, f"remove task {name!r}")
        return tasks

    def students(self) -> dict[str, str]:
        """Tasks served through their students: {task: student directory on the server}."""
        return map_from_config(self._config(), "students")

    def set_students(self, task: str, path: str | os.PathLike | None) -> dict[str, str]:
        """Serve `task` through the students in `path` (`chorus distill`; must exist on the server), or with None
        through its teacher again (hot reload). Returns the new students map."""
        config, students = plan_students(self._config(), task, path)
        self._load(config, f"set students of {task!r}")
        return students

    def health(self) -> dict:
        """{url, protocol, server_live, server_ready, model_ready, server_version, task_count (None if not ready)}."""
        c, call = self._t.client, self._t.call
        with self._errors("health check"):
            live, ready = c.is_server_live(**call), c.is_server_ready(**call)
            model_ready = c.is_model_ready(self.model, **call)
            metadata = c.get_server_metadata(**self._t.as_json, **call)
        return self._health(live, ready, model_ready, metadata, len(self.tasks()) if model_ready else None)

    def _infer_arrays(self, tensors: dict[str, np.ndarray], parameters: dict | None = None) -> dict[str, np.ndarray]:
        result = self._t.client.infer(self.model, self._t.inputs(tensors), parameters=parameters, **self._t.call)
        return {name: result.as_numpy(name) for name in OUTPUTS}

    def _run(self, requests: list[Request], parameters: dict | None = None) -> list[Prediction]:
        out: list[Any] = [None] * sum(len(r.rows) for r in requests)
        for request in requests:
            with self._errors("classify"):
                arrays = self._infer_arrays(request.tensors, parameters)
            self._place(out, request, arrays)
        return out

    def _config(self) -> dict:
        with self._errors(f"read model {self.model!r} config"):
            raw = self._t.client.get_model_config(self.model, headers=self._t.admin_for_reading(), **self._t.as_json,
                                                  **self._t.call)
        return normalize_config(raw)

    def _load(self, config: str, action: str) -> None:
        with self._errors(action):
            self._t.client.load_model(self.model, config=config, headers=self._t.admin, **self._t.call)


class AsyncChorusClient(_ClientBase):
    """asyncio client with ChorusClient's methods as coroutines and its arguments; a batch's requests run
    concurrently, at most `max_in_flight` at a time. Create it inside a running event loop (aiohttp needs one)."""

    _aio = True

    def __init__(self, *args, max_in_flight: int = 8, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ChorusError("create AsyncChorusClient inside a running event loop (in a coroutine)") from None
        super().__init__(*args, **kwargs)
        self.max_in_flight = max_in_flight

    async def __aenter__(self) -> AsyncChorusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._t.client.close()

    async def classify(self, texts: Sequence[str], task: str | Sequence[str], truncate: bool = False,
                       students: int | None = None, deadline_ms: float | None = None) -> list[Prediction]:
        return await self._run(text_requests(texts, task, self.max_batch_size),
                               request_parameters(truncate, students, deadline_ms))

    async def classify_ids(self, ids: Sequence[Sequence[int]], task: str | Sequence[str],
                           students: int | None = None) -> list[Prediction]:
        return await self._run(ids_requests(ids, task, self.max_batch_size), request_parameters(False, students))

    async def tasks(self) -> dict[str, str]:
        return tasks_from_config(await self._config())

    async def add_task(self, name: str, path: str | os.PathLike, replace: bool = False) -> dict[str, str]:
        config, tasks = plan_add(await self._config(), name, path, replace)
        await self._load(config, f"add task {name!r}")
        return tasks

    async def remove_task(self, name: str) -> dict[str, str]:
        config, tasks = plan_remove(await self._config(), name)
        await self._load(config, f"remove task {name!r}")
        return tasks

    async def students(self) -> dict[str, str]:
        return map_from_config(await self._config(), "students")

    async def set_students(self, task: str, path: str | os.PathLike | None) -> dict[str, str]:
        config, students = plan_students(await self._config(), task, path)
        await self._load(config, f"set students of {task!r}")
        return students

    async def health(self) -> dict:
        c, call = self._t.client, self._t.call
        with self._errors("health check"):
            live, ready = await c.is_server_live(**call), await c.is_server_ready(**call)
            model_ready = await c.is_model_ready(self.model, **call)
            metadata = await c.get_server_metadata(**self._t.as_json, **call)
        return self._health(live, ready, model_ready, metadata, len(await self.tasks()) if model_ready else None)

    async def _infer_arrays(self, tensors: dict[str, np.ndarray], parameters: dict | None = None) -> dict[str, np.ndarray]:
        result = await self._t.client.infer(self.model, self._t.inputs(tensors), parameters=parameters, **self._t.call)
        return {name: result.as_numpy(name) for name in OUTPUTS}

    async def _run(self, requests: list[Request], parameters: dict | None = None) -> list[Prediction]:
        limit = asyncio.Semaphore(self.max_in_flight)

        async def send(request: Request) -> dict[str, np.ndarray]:
            async with limit:
                with self._errors("classify"):
                    return await self._infer_arrays(request.tensors, parameters)

        out: list[Any] = [None] * sum(len(r.rows) for r in requests)
        for request, arrays in zip(requests, await asyncio.gather(*map(send, requests))):
            self._place(out, request, arrays)
        return out

    async def _config(self) -> dict:
        with self._errors(f"read model {self.model!r} config"):
            raw = await self._t.client.get_model_config(self.model, headers=self._t.admin_for_reading(),
                                                        **self._t.as_json, **self._t.call)
        return normalize_config(raw)

    async def _load(self, config: str, action: str) -> None:
        with self._errors(action):
            await self._t.client.load_model(self.model, config=config, headers=self._t.admin, **self._t.call)
