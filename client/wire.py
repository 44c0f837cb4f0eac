"""The `chorus` model's wire contract in plain code, with no I/O: task-name rules, the model-config round trip behind
hot reload, splitting rows into requests, turning outputs into `Prediction`s, and mapping tritonclient errors onto
`chorus.errors`. The sync and asyncio clients in `client.py` are thin I/O around these functions.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chorus.admin_key import key_file
from chorus.errors import ChorusError, InvalidInput, Overloaded, ServerError, UnknownTask

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TASK_NAME_RULE = "1 to 64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
MAX_BATCH_SIZE = 64  # the `chorus` model's max_batch_size
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Prediction:
    """One row's result. `probabilities` and `logits` cover the task's labels only (padding dropped), in the
    task's label order; `label` is the server's argmax."""

    task: str
    label: str
    probabilities: dict[str, float]
    logits: list[float]
    students: int = 0  # students that answered (Student Parallelism); 0: the teacher


@dataclass(frozen=True)
class Request:
    """One inference request: `rows` are the indices of the caller's inputs it carries, `tensors` its inputs."""

    rows: list[int]
    tensors: dict[str, np.ndarray]


# ---------------------------------------------------------------- names and urls


def validate_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise InvalidInput(f"invalid task name {name!r}: a task name is {TASK_NAME_RULE}")
    return name


def resolve_url(url: str | None, protocol: str) -> str:
    """`host:port` for tritonclient; None means 127.0.0.1 on the protocol's default port (8000 http, 8001 grpc)."""
    if protocol not in DEFAULT_PORTS:
        raise InvalidInput(f"unknown protocol {protocol!r}: expected one of {sorted(DEFAULT_PORTS)}")
    if not url:
        return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
    for scheme in ("http://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    if "://" in url:
        raise InvalidInput(f"unsupported url {url!r}: give host:port (TLS is not supported)")
    return url.rstrip("/")


# ---------------------------------------------------------------- model config and the task map


def normalize_config(raw: dict) -> dict:
    """The model config in the HTTP JSON form that Triton's load API takes.

    HTTP `get_model_config` already returns it. gRPC `get_model_config(as_json=True)` wraps it as {"config": {...}},
    leaves out default-valued fields, and writes int64 values (dims, reshape shapes) as strings; Triton 2.51 loads that
    form too, but we unwrap it and turn dims back into ints so both protocols send the same thing.
    """
    config = copy.deepcopy(raw["config"] if set(raw) == {"config"} else raw)

    def ints(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("dims", "shape") and isinstance(value, list):
                    node[key] = [int(v) for v in value]
                else:
                    ints(value)
        elif isinstance(node, list):
            for item in node:
                ints(item)

    ints(config)
    return config


def map_from_config(config: dict, key: str = "tasks") -> dict[str, str]:
    """A JSON-object model parameter: `tasks` (the served task map {name: path on the server}) or `students`
    ({task: student directory})."""
    param = config.get("parameters", {}).get(key)
    if param is None:
        return {}
    try:
        value = json.loads(param["string_value"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ChorusError(f"model parameter {key!r} is not a JSON object string ({exc}): {param!r}") from None
    if not isinstance(value, dict):
        raise ChorusError(f"model parameter {key!r} must be a JSON object {{name: path}}, got {value!r}")
    return value


def tasks_from_config(config: dict) -> dict[str, str]:
    return map_from_config(config, "tasks")


def config_with(config: dict, **maps: dict[str, str]) -> str:
    """`config` with these JSON-object parameters (tasks=..., students=...) replaced, as the JSON string
    `load_model(config=...)` takes."""
    new = copy.deepcopy(config)
    for key, value in maps.items():
        new.setdefault("parameters", {})[key] = {"string_value": json.dumps(value, sort_keys=True)}
    return json.dumps(new)


def plan_add(config: dict, name: str, path: str | os.PathLike, replace: bool = False) -> tuple[str, dict[str, str]]:
    """(config JSON to load, resulting task map) for adding task `name` from `path`.

    The path is made absolute here, but the server resolves it: it must exist on the server's filesystem.
    """
    validate_task_name(name)
    tasks = tasks_from_config(config)
    if name in tasks and not replace:
        raise InvalidInput(f"task {name!r} is already served (from {tasks[name]}); use --replace (replace=True) to swap it")
    tasks[name] = os.path.abspath(os.fspath(path))
    students = map_from_config(config, "students")
    students.pop(name, None)  # a replaced task's students were distilled from the old one
    return config_with(config, tasks=tasks, students=students), tasks


def plan_remove(config: dict, name: str) -> tuple[str, dict[str, str]]:
    """(config JSON to load, resulting task map) for removing task `name` (and its students)."""
    tasks = tasks_from_config(config)
    if name not in tasks:
        raise UnknownTask(f"task {name!r} is not served; served tasks: {', '.join(sorted(tasks)) or '(none)'}")
    del tasks[name]
    students = map_from_config(config, "students")
    students.pop(name, None)
    return config_with(config, tasks=tasks, students=students), tasks


def plan_students(config: dict, task: str, path: str | os.PathLike | None) -> tuple[str, dict[str, str]]:
    """(config JSON to load, resulting students map) for serving `task` through the students in `path` (made
    absolute; must exist on the server), or, with path None, through its teacher again."""
    tasks, students = tasks_from_config(config), map_from_config(config, "students")
    if task not in tasks:
        raise UnknownTask(f"task {task!r} is not served; served tasks: {', '.join(sorted(tasks)) or '(none)'}")
    if path is None:
        if task not in students:
            raise InvalidInput(f"task {task!r} has no students (tasks with students: {sorted(students) or 'none'})")
        del students[task]
    else:
        students[task] = os.path.abspath(os.fspath(path))
    return config_with(config, students=students), students


# ---------------------------------------------------------------- requests


def _row_tasks(task: str | Sequence[str], n: int) -> list[str]:
    tasks = [task] * n if isinstance(task, str) else list(task)
    if len(tasks) != n:
        raise InvalidInput(f"got {len(tasks)} task names for {n} inputs: give one task, or one per input")
    for name in set(tasks):
        validate_task_name(name)
    return tasks


def _bytes_column(values: Sequence[str]) -> np.ndarray:
    return np.array([[v.encode("utf-8")] for v in values], dtype=np.object_).reshape(len(values), 1)  # (B, 1)


def chunk(rows: Sequence[int], max_batch_size: int = MAX_BATCH_SIZE) -> list[list[int]]:
    return [list(rows[i : i + max_batch_size]) for i in range(0, len(rows), max_batch_size)]


def text_requests(texts: Sequence[str], task: str | Sequence[str], max_batch_size: int = MAX_BATCH_SIZE) -> list[Request]:
    """TEXT + TASK requests of at most `max_batch_size` rows each, in input order."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InvalidInput("texts must be a list of str (wrap a single text as [text])")
    tasks = _row_tasks(task, len(texts))
    return [
        Request(rows, {"TEXT": _bytes_column([texts[i] for i in rows]), "TASK": _bytes_column([tasks[i] for i in rows])})
        for rows in chunk(range(len(texts)), max_batch_size)
    ]


def ids_requests(
    ids: Sequence[Sequence[int]], task: str | Sequence[str], max_batch_size: int = MAX_BATCH_SIZE
) -> list[Request]:
    """INPUT_IDS + TASK requests. Rows of one request must share a length, so rows are grouped by length (no padding,
    which would change the model's answer without an attention mask), then chunked."""
    tasks = _row_tasks(task, len(ids))
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        if isinstance(row, (str, bytes)) or len(row) == 0:
            raise InvalidInput(f"ids[{i}] must be a non-empty list of token ids (incl. [CLS]/[SEP]), got {row!r}")
        by_length.setdefault(len(row), []).append(i)
    requests = []
    for _, group in sorted(by_length.items()):
        for rows in chunk(group, max_batch_size):
            array = np.array([ids[i] for i in rows], dtype=np.int64)  # (B, L)
            if array.min() < INT32_MIN or array.max() > INT32_MAX:
                raise InvalidInput(f"token ids must fit in int32, got values in [{array.min()}, {array.max()}]")
            requests.append(Request(rows, {"INPUT_IDS": array.astype(np.int32), "TASK": _bytes_column([tasks[i] for i in rows])}))
    return requests


# ---------------------------------------------------------------- responses


def softmax(logits: Sequence[float]) -> list[float]:
    """Numerically stable softmax; -inf entries get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return (e / e.sum()).tolist()


def request_parameters(truncate: bool = False, students: int | None = None,
                       deadline_ms: float | None = None) -> dict | None:
    """The `chorus` model's request parameters, None when none is set."""
    params: dict = {}
    if truncate:
        params["truncate"] = True
    if deadline_ms is not None:
        if not isinstance(deadline_ms, (int, float)) or isinstance(deadline_ms, bool) or not deadline_ms > 0:
            raise ChorusError(f"deadline_ms={deadline_ms!r}: expected a positive number of milliseconds")
        params["deadline_ms"] = deadline_ms
    if students is not None:
        if not isinstance(students, int) or isinstance(students, bool) or students < 0:
            raise ChorusError(f"students={students!r}: expected an integer >= 0 (0 = the teacher)")
        params["students"] = students
    return params or None


def predictions(tasks: Sequence[str], logits: np.ndarray, labels: np.ndarray, names: np.ndarray,
                students: np.ndarray | None = None) -> list[Prediction]:
    """Rows of LOGITS (B, W) fp32, LABEL (B, 1) bytes, LABEL_NAMES (B, W) bytes and STUDENTS (B, 1) int32 (None from
    a server without it) -> Predictions.

    A row's labels are its non-empty LABEL_NAMES; the rest is padding (logit -inf) and is dropped before the softmax.
    """
    out = []
    for r, task in enumerate(tasks):
        keep = [j for j, n in enumerate(names[r]) if n not in (b"", "")]
        label_names = [_text(names[r, j]) for j in keep]
        row_logits = [float(logits[r, j]) for j in keep]
        if not keep:
            raise ChorusError(f"server returned no labels for row {r} (task {task!r}): LABEL_NAMES {names[r]!r}")
        k = 0 if students is None else int(students[r].reshape(-1)[0])
        out.append(Prediction(task, _text(labels[r].reshape(-1)[0]), dict(zip(label_names, softmax(row_logits))),
                              row_logits, k))
    return out


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- errors

_INVALID = {"400", "StatusCode.INVALID_ARGUMENT"}
_UNAVAILABLE = {"503", "StatusCode.UNAVAILABLE"}


def translate_error(exc: BaseException, action: str, url: str, protocol: str) -> ChorusError:
    """A `chorus.errors` exception for a tritonclient / transport exception raised while doing `action`.

    `exc` is an InferenceServerException (HTTP status "400" or gRPC "StatusCode.INVALID_ARGUMENT" style), or a
    transport error (OSError, TimeoutError, aiohttp.ClientError) meaning the server could not be reached.
    """
    status = getattr(exc, "status", None)
    if not callable(status):  # transport error: nothing answered
        return ServerError(
            f"{action}: cannot reach tritonserver at {url} over {protocol} ({type(exc).__name__}: {exc}); "
            "is it running? Set --url / CHORUS_URL and --protocol / CHORUS_PROTOCOL"
        )
    code, msg = str(status() or ""), str(exc.message() or "")
    msg = msg.split("\n\nAt:\n")[0].strip()  # Python-backend load errors append the stub's traceback
    if "is restricted, expecting header" in msg:  # HTTP 403; gRPC says UNAVAILABLE
        return ChorusError(f"{action}: the server refused: {msg}; pass the key with --admin-key / CHORUS_ADMIN_KEY "
                           f"(a `chorus serve` on this machine given none keeps it in {key_file()}, read from there "
                           "for a server on 127.0.0.1; docs/security.md)")
    if code in _UNAVAILABLE and "failed to connect" in msg:
        return ServerError(f"{action}: cannot reach tritonserver at {url} over {protocol}: {msg}")
    if code in _INVALID:
        return (UnknownTask if "unknown task" in msg.lower() else InvalidInput)(f"{action}: {msg}")
    if code in _UNAVAILABLE:
        return Overloaded(f"{action}: {msg}")
    if code in ("StatusCode.DEADLINE_EXCEEDED",):
        return ServerError(f"{action}: no answer from {url} in time: {msg}")
    return ChorusError(f"{action}: [{code}] {msg}")
