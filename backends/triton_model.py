"""The Triton Python-backend glue of the entry model `chorus`: parse the config once, decode requests, call the engine.

`model_repository/chorus/1/model.py` only imports `TritonPythonModel` from here. Config parameters:
- `backbone`: a packaged model name (default all-MiniLM-L6-v2) or a Hugging Face BERT directory;
- `tasks`: JSON object {task name: task directory}; relative paths are under the model's directory. This map is the
  served task set: `chorus task add/remove` reload the model with a changed map (Triton's repository API);
- `max_length` (tokens; a longer text is refused with INVALID_ARG unless the request sets the parameter
  `truncate=true`, which keeps its first tokens),
  `dtype` (float32 | float16 | bfloat16), `device` (auto | cpu | cuda[:N], see `_device`), `task_capacity` (initial
  task-bank slots), `max_rank` (largest LoRA rank);
- `batching`: `scheduler` (chorus's length-bucket scheduler forms the batches, the default; `scheduler` and
  `latency_table` configure it: a path is read, or profiled once and written there, shared by a model's instances;
  the shipped `dynamic_batching` block has no delay: it only hands execute() what queued meanwhile) or `triton`
  (each execute() runs the requests Triton's dynamic batcher grouped, e.g. with `max_queue_delay_microseconds: 500`,
  as one batch: the baseline); `auto` is `scheduler`;
- `cuda_graphs` (true | false, default true): on a GPU, batches up to 64 x 128 tokens run as CUDA graphs of the
  gathered mixed-task forward (`chorus.backends.graphs`); false runs the eager fast path;
- `runtime`: `torch` (default) or `onnxruntime` (the backbone with its PET operators exported to ONNX, the task bank
  bound once as device-resident inputs: `chorus.export.ort.OrtEngine`);
- `students`: JSON object {task name: student directory} (Student Parallelism, `chorus distill`): such a task is
  answered by its students unless a request sets the parameter `students=0` (the teacher) or `students=n` (at most
  n); `pruning`: JSON of `PruningPolicy` knobs (`utilisation`, `min_students`, `grow_step`) or {"enabled": false}
  (always all K), and `max_accuracy_drop` (points, default 1.0: the students' accuracy budget, see
  `chorus.backends.students.bank`); `student_devices`: "" (the serving device), "all" (every GPU, the serving one
  first) or a list like "cuda:0,cuda:1": a task's students are split over them in contiguous ranges and their
  boosting sum gathered once on the first (`chorus.backends.students.PlacedStudents`; run one model instance then).
  The output STUDENTS says per row how many students answered (0: the teacher).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from chorus.backends.engine import DEFAULT_BACKBONE, DTYPES, Classified, Engine
from chorus.backends.executor import Call, Executor, QueueWait, profile_engine
from chorus.backends.metrics import Metrics
from chorus.backends.paths import task_dir
from chorus.backends.requests import decode_many
from chorus.backends.scheduler import LatencyTable, SchedulerConfig
from chorus.backends.students.bank import StudentBank
from chorus.backends.students.pruning import PruningPolicy
from chorus.errors import InvalidInput, Overloaded

# scheduler: chorus's length-bucket scheduler batches each execute() call's rows;
# triton: Triton's dynamic batcher groups requests, each execute() runs them as one batch (the baseline to compare)
BATCHING = ("scheduler", "triton")
RUNTIMES = ("torch", "onnxruntime")  # what runs the backbone + PET ops (students run in torch)
SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval in the stub (CPython's default: 0.005)


def _param(params: dict, key: str, default: str) -> str:
    return params.get(key, {}).get("string_value", default) or default


def _device(choice: str, args: dict) -> str:
    """Where the engine runs: a KIND_GPU instance on its GPU; the shipped KIND_CPU instance where the `device`
    parameter says: auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N."""
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{args['model_instance_device_id']}"
    if choice == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if choice != "cpu" and not (choice.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(f"parameter device={choice!r}: expected auto, cpu, cuda or cuda:N (with a CUDA GPU present)")
    return choice


def _flag(params: dict, key: str, default: str = "true") -> bool:
    value = _param(params, key, default).lower()
    if value not in ("true", "false"):
        raise ValueError(f"parameter {key}={value!r}: expected true or false")
    return value == "true"


def _json_param(params: dict, key: str, default: str) -> dict:
    try:
        value = json.loads(_param(params, key, default))
    except json.JSONDecodeError as e:
        raise ValueError(f"parameter {key} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"parameter {key} must be a JSON object, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on a folder (flock), held for the block: a model's instances load one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _shared_table(path: Path, profile) -> LatencyTable:
    """The latency table at `path`, or `profile()` saved there (call it holding `_folder_lock(path.parent)`)."""
    if path.is_file():
        pb_utils.Logger.log_info(f"chorus: latency table read from {path}")
        return LatencyTable.load(path)
    table = profile()
    table.save(path)
    pb_utils.Logger.log_info(f"chorus: latency table profiled, saved to {path}")
    return table


def _request_options(request) -> tuple[bool, float | None, int | None]:
    """The request parameters chorus reads, parsed once: `truncate` (true/false; a bool, or a string from clients
    that only send strings), `deadline_ms` (a positive number; returned in seconds) and `students` (0 = the teacher,
    n = at most n students; absent = as many as load allows)."""
    params = json.loads(request.parameters() or "{}")
    truncate = params.get("truncate", False)
    if isinstance(truncate, str):
        if truncate.lower() not in ("true", "false", "1", "0"):
            raise InvalidInput(f"request parameter truncate={truncate!r}: expected true or false")
        truncate = truncate.lower() in ("true", "1")
    deadline_ms = params.get("deadline_ms")
    if deadline_ms is not None and (not isinstance(deadline_ms, (int, float)) or isinstance(deadline_ms, bool)
                                    or deadline_ms <= 0):
        raise InvalidInput(f"request parameter deadline_ms={deadline_ms!r}: expected a positive number")
    students = params.get("students")
    if isinstance(students, str) and students.strip().isdigit():
        students = int(students)
    if students is not None and (not isinstance(students, int) or isinstance(students, bool) or students < 0):
        raise InvalidInput(f"request parameter students={students!r}: expected an integer >= 0 (0 = the teacher)")
    return bool(truncate), None if deadline_ms is None else deadline_ms / 1000, students


def _check_numpy() -> None:
    """tritonserver 24.10's Python backend stub is built against numpy 1.x: under numpy 2 it hands BYTES inputs over
    corrupted and crashes (seen on an H100). Refuse to load rather than crash later."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(f"numpy {np.__version__} is loaded in the Python backend stub, which tritonserver 24.10 "
                           "built against numpy 1.x: BYTES inputs would arrive corrupted. Install numpy<2 in the "
                           "environment tritonserver runs the stub with (requirements.txt pins numpy 1.26.4).")


def _on_own_thread(fn, *args):
    """fn(*args) on a new thread, waited for; its exception is raised here."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            result["error"] = e

    thread = threading.Thread(target=run, name="chorus-load")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class _TritonLogHandler(logging.Handler):
    """chorus's library logging into Triton's log."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


def _route_logging() -> None:
    root = logging.getLogger("chorus")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        handler = _TritonLogHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _outputs(result: Classified, wanted: frozenset[str] | None) -> list[tuple[str, np.ndarray]]:
    """The output arrays (all, or those in `wanted`) of one request's rows."""
    names = result.label_names
    width = max(len(n) for n in names)  # this request's largest label count
    outputs = {
        "LOGITS": lambda: np.ascontiguousarray(result.logits[:, :width], dtype=np.float32),
        "LABEL": lambda: np.array([[s.encode()] for s in result.labels], dtype=np.object_),
        "LABEL_NAMES": lambda: np.array([[s.encode() for s in n] + [b""] * (width - len(n)) for n in names],
                                        dtype=np.object_),
        "STUDENTS": lambda: np.array(result.students, dtype=np.int32).reshape(-1, 1),
    }
    return [(name, make()) for name, make in outputs.items() if wanted is None or name in wanted]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        _check_numpy()
        _route_logging()
        # execute() shares the GIL with the metrics publisher and the CUDA-graph capture thread: at CPython's default
        # 5 ms switch interval a thread that wants the GIL can wait that long per hand-off, more than a student
        # batch takes on a GPU. The stub process is ours alone.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        self.batching = _param(params, "batching", "auto")
        if self.batching not in BATCHING + ("auto",):
            raise ValueError(f"parameter batching={self.batching!r}: expected auto or one of {BATCHING}")
        if self.batching == "auto":
            self.batching = "scheduler"
        # The torch work of loading runs on a thread of its own that ends before serving starts, so that on a CPU the
        # thread that runs execute() is the only one with an OpenMP team: with a second team alive (the stub's main thread's,
        # had it run a GEMM), libgomp on a 2-core machine wakes its threads by futex on every region: a small GEMM on
        # the serving thread ran 7x slower.
        # Several instances share the machine's cores: each stub's torch pool gets its share (with a pool of every core
        # in each, 8 stubs loading at once on a 16-core H100 host spun to a load average of 123 and missed the 240 s
        # a harness waits). One instance keeps torch's default.
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        if instances > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // instances))
            pb_utils.Logger.log_info(f"chorus: {instances} instances share {os.cpu_count()} cores: "
                                     f"{torch.get_num_threads()} torch threads each")
        loaded = _on_own_thread(self._load, params, args)
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.metrics = Metrics(labels, self._graph_stats)
        scheduler = None
        if self.batching == "scheduler":
            scheduler = SchedulerConfig.from_dict(_json_param(params, "scheduler", "{}"))
            if self.students is not None:
                scheduler = replace(scheduler, max_students=self.students.max_students)
        self.max_batch_size = int(config.get("max_batch_size", 0)) or 1
        self.queue = QueueWait()
        self.executor = Executor(self.engine, scheduler, loaded["table"], students=self.students,
                                 choose_k=loaded["policy"], on_batch=self.metrics.observe)
        pb_utils.Logger.log_info(f"chorus: {self.engine.cfg} on {loaded['device']} serves {len(loaded['tasks'])} "
                                 f"tasks: {sorted(loaded['tasks'])} (numpy {np.__version__}, torch "
                                 f"{torch.__version__}); batching {self.batching}; students for "
                                 f"{sorted(loaded['students'])} on {loaded['student_devices']}; CUDA graphs "
                                 f"{'on' if getattr(self.engine, 'graphs', None) is not None else 'off'}")
        # What loading built (weights, the task bank, CUDA graphs, tables) lives until unload: out of the collector's
        # generations, a full collection while serving walks only what requests allocate (its pauses stop every
        # thread: chorus_gc_pause_seconds_total). finalize() gives them back to the collector.
        gc.collect()
        gc.freeze()

    def _graph_stats(self) -> tuple[int, float]:
        """CUDA graphs captured so far by the engine and the students, and the seconds the captures took."""
        runners = [getattr(self.engine, "graphs", None)] + [
            s.runner for s in (self.students.tasks.values() if self.students is not None else ())]
        runners = [r for r in runners if r is not None and hasattr(r, "capture_s")]
        return (sum(getattr(r, "captures", r.captured) for r in runners), sum(r.capture_s for r in runners))

    def _load(self, params: dict, args: dict) -> dict:
        """The engine with its tasks, the students, the pruning policy and (scheduler) the latency tables."""
        dtype = _param(params, "dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"parameter dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        device = _device(_param(params, "device", "auto"), args)
        runtime = _param(params, "runtime", "torch")
        if runtime not in RUNTIMES:
            raise ValueError(f"parameter runtime={runtime!r}: expected one of {RUNTIMES}")
        if runtime == "onnxruntime":  # the backbone + bank exported to ONNX, run by onnxruntime (chorus.export)
            from chorus.export.ort import OrtEngine as engine_class
        else:
            engine_class = Engine
        self.engine = engine_class(_param(params, "backbone", DEFAULT_BACKBONE), device=device, dtype=DTYPES[dtype],
                                   capacity=int(_param(params, "task_capacity", "16")),
                                   max_length=int(_param(params, "max_length", "0")) or None,
                                   max_rank=int(_param(params, "max_rank", "16")),
                                   **({} if runtime == "onnxruntime" else {"cuda_graphs": _flag(params, "cuda_graphs")}))
        tasks = _json_param(params, "tasks", "{}")
        model_dir = Path(args["model_repository"])
        for name, path in tasks.items():
            self.engine.load_task(name, task_dir(model_dir, name, path))  # confined to the task roots
        if runtime == "onnxruntime":
            self.engine.refresh()  # export and bind now, not on the first request
        # A model's instances given a `latency_table` path share it, and load from here one at a time (a lock on the
        # table's folder): the first profiles the table with no other instance capturing CUDA graphs beside it (a
        # profile taken during the others' captures estimated a student batch at 7.4 ms on an H100, and admission
        # refused 56% of a burst the instances could serve), the others read it.
        table_path = _param(params, "latency_table", "") if self.batching == "scheduler" else ""
        with _folder_lock(Path(table_path).parent) if table_path else contextlib.nullcontext():
            return self._load_serving(params, model_dir, device, tasks, table_path)

    def _load_serving(self, params: dict, model_dir: Path, device: str, tasks: dict, table_path: str) -> dict:
        """The CUDA graphs, the students, the pruning policy and the latency tables."""
        graphs = getattr(self.engine, "graphs", None)
        if graphs is not None:  # every shape's bank-wide CUDA graph now, not while a batch waits (chorus.backends.graphs)
            start = time.perf_counter()
            n = graphs.warm_up(self.engine.max_length)
            pb_utils.Logger.log_info(f"chorus: {n} bank-wide CUDA graphs captured in {time.perf_counter() - start:.1f} s")
        student_dirs = _json_param(params, "students", "{}")
        pruning = _json_param(params, "pruning", "{}")
        student_devices = _param(params, "student_devices", "")  # "": the serving device; "all"; "cuda:0,cuda:1"
        if student_devices == "all":
            devices = [device] + [f"cuda:{i}" for i in range(torch.cuda.device_count()) if f"cuda:{i}" != device]
        else:
            devices = [d.strip() for d in student_devices.split(",") if d.strip()] or None
        self.students = (StudentBank(self.engine, pruning.pop("max_accuracy_drop", 1.0), devices=devices)
                         if student_dirs else None)
        for name, path in student_dirs.items():
            self.students.load(name, task_dir(model_dir, name, path, kind="students of task"))
        try:
            policy = (PruningPolicy(self.students.max_students, **pruning)
                      if self.students is not None and pruning.pop("enabled", True) else None)
        except TypeError as e:
            raise ValueError(f"parameter pruning: {e}; known keys: enabled, utilisation, min_students, grow_step, "
                             "max_accuracy_drop") from None
        table = None
        if table_path:  # read from the file, else profiled here and kept there
            table = _shared_table(Path(table_path), lambda: profile_engine(self.engine, self.students))
        elif self.batching == "scheduler":  # PetS's latency tables, profiled on this engine and device
            table = profile_engine(self.engine, self.students)
        return {"device": device, "tasks": tasks, "students": student_dirs, "student_devices": devices or [device],
                "policy": policy, "table": table}

    def execute(self, requests: list) -> list:
        """Decode every request (one tokenizer call for all their texts), run them (`chorus.backends.executor`:
        admission, the length-bucket scheduler's batches, the engine) and return each one's response: one message
        back to the server for the whole call."""
        start = time.perf_counter()
        began = time.monotonic()
        waited_s = self.queue.waited(began)
        calls = [Call() for _ in requests]
        inputs, readable = [], []
        for call, request in zip(calls, requests):
            try:
                arrays = {n.lower(): pb_utils.get_input_tensor_by_name(request, n) for n in ("TEXT", "INPUT_IDS", "TASK")}
                arrays = {k: None if v is None else v.as_numpy() for k, v in arrays.items()}
                truncate, call.deadline_s, call.students = _request_options(request)
                # Only the outputs the client asked for are built (the stub would drop the others)
                call.wanted = frozenset(request.requested_output_names()) or None
            except InvalidInput as e:
                call.error = e
                continue
            inputs.append({**arrays, "truncate": truncate})
            readable.append(call)
        for call, decoded in zip(readable, decode_many(self.engine, inputs)):
            if isinstance(decoded, Exception):
                call.error = decoded
            else:
                call.ids, call.tasks, call.truncated = decoded.ids, decoded.tasks, decoded.truncated
        decoded_at = time.perf_counter()
        try:
            self.executor.run(calls, waited_s, began)
        except Exception as e:  # noqa: BLE001 - a failed call answers its requests with the error; serving goes on
            pb_utils.Logger.log_error(f"chorus: execute failed: {e!r}")
            for call in calls:
                if call.ok and call.result is None:
                    call.error = RuntimeError(f"batch failed: {e!r}")
        ran_at = time.perf_counter()
        responses = [self._response(c) for c in calls]
        rows = sum(max(1, len(c.ids)) for c in calls)  # a request refused at decoding took a row of Triton's batch
        self.queue.called(rows >= self.max_batch_size, time.monotonic())
        answered = [c for c in calls if c.result is not None]
        if answered:
            self.metrics.stages(len(answered), decoded_at - start,
                                sum(c.batch_start - decoded_at for c in answered) * 1e6,
                                sum(c.batch_s for c in answered) * 1e6, time.perf_counter() - ran_at)
            self.metrics.answered([k for c in answered for k in c.result.students])
        return responses

    def _response(self, call: Call):
        if call.result is None:
            error = call.error or RuntimeError("the request was not run")
            code = (pb_utils.TritonError.INVALID_ARG if isinstance(error, InvalidInput)
                    else pb_utils.TritonError.UNAVAILABLE if isinstance(error, Overloaded)
                    else pb_utils.TritonError.INTERNAL)
            if code == pb_utils.TritonError.UNAVAILABLE:
                self.metrics.refused()
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), code))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array)
                                                          for name, array in _outputs(call.result, call.wanted)])

    def finalize(self) -> None:
        """Unload (Triton lets the execute() calls in flight finish first): stop capturing graphs and publishing."""
        if getattr(self.engine, "graphs", None) is not None:
            self.engine.graphs.close()  # its capture thread holds the model
        self.metrics.close()
        self.engine = None
        gc.unfreeze()  # what initialize() froze can be collected again
