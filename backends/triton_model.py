"""The Triton Python-backend glue of the entry model `chorus`: parse the config once, decode requests, call the engine.

`model_repository/chorus/1/model.py` only imports `TritonPythonModel` from here. Config parameters:
- `backbone`: a packaged model name (default all-MiniLM-L6-v2) or a Hugging Face BERT directory;
- `tasks`: JSON object {task name: task directory}; relative paths are under the model's directory. This map is the
  served task set: `chorus task add/remove` reload the model with a changed map (Triton's repository API);
- `max_length` (tokens; a longer text is refused with INVALID_ARG unless the request sets the parameter
  `truncate=true`, which keeps its first tokens),
  `dtype` (float32 | float16 | bfloat16), `device` (auto | cpu | cuda[:N], see `_device`), `task_capacity` (initial
  task-bank slots), `max_rank` (largest LoRA rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from chorus.backends.engine import DEFAULT_BACKBONE, Engine
from chorus.backends.requests import decode_request
from chorus.errors import InvalidInput

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _truncate(request) -> bool:
    """The request parameter `truncate` (true/false; a bool, or a string from clients that only send strings)."""
    value = json.loads(request.parameters() or "{}").get("truncate", False)
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InvalidInput(f"request parameter truncate={value!r}: expected true or false")
        return value.lower() in ("true", "1")
    return bool(value)


def _check_numpy() -> None:
    """tritonserver 24.10's Python backend stub is built against numpy 1.x: under numpy 2 it hands BYTES inputs over
    corrupted and crashes (seen on the H100, perf/results/h100-2026-11-22). Refuse to load rather than crash later."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(f"numpy {np.__version__} is loaded in the Python backend stub, which tritonserver 24.10 "
                           "built against numpy 1.x: BYTES inputs would arrive corrupted. Install numpy<2 in the "
                           "environment tritonserver runs the stub with (requirements.txt pins numpy 1.26.4).")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        _check_numpy()
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        dtype = _param(params, "dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"parameter dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        device = _device(_param(params, "device", "auto"), args)
        self.engine = Engine(_param(params, "backbone", DEFAULT_BACKBONE), device=device, dtype=DTYPES[dtype],
                             capacity=int(_param(params, "task_capacity", "16")),
                             max_length=int(_param(params, "max_length", "0")) or None,
                             max_rank=int(_param(params, "max_rank", "16")))
        try:
            tasks = json.loads(_param(params, "tasks", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"parameter tasks is not a JSON object {{name: path}}: {e}") from None
        model_dir = Path(args["model_repository"])
        for name, path in tasks.items():
            self.engine.load_task(name, model_dir / path)  # an absolute path stays as it is
        pb_utils.Logger.log_info(f"chorus: {self.engine.cfg} on {device} serves {len(tasks)} tasks: {sorted(tasks)} "
                                 f"(numpy {np.__version__}, torch {torch.__version__})")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        decoded = []
        for i, request in enumerate(requests):
            try:
                arrays = {n.lower(): pb_utils.get_input_tensor_by_name(request, n) for n in ("TEXT", "INPUT_IDS", "TASK")}
                arrays = {k: None if v is None else v.as_numpy() for k, v in arrays.items()}
                decoded.append((i, decode_request(self.engine, **arrays, truncate=_truncate(request))))
            except InvalidInput as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if not decoded:
            return responses
        try:  # one mixed batch over every good row of every request
            out = self.engine.run([r for _, d in decoded for r in d.ids], [t for _, d in decoded for t in d.tasks])
        except Exception as e:  # noqa: BLE001 - the batch fails, the server does not
            pb_utils.Logger.log_error(f"chorus: batch failed: {e!r}")
            for i, _ in decoded:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"batch failed: {e}"))
            return responses
        start = 0
        for i, d in decoded:
            rows = slice(start, start + len(d.ids))
            start += len(d.ids)
            responses[i] = self._response(out.logits[rows], out.labels[rows], out.label_names[rows])
        return responses

    @staticmethod
    def _response(logits: np.ndarray, labels: list[str], names: list[list[str]]):
        width = max(len(n) for n in names)  # this request's largest label count
        label_names = np.array([[s.encode() for s in n] + [b""] * (width - len(n)) for n in names], dtype=np.object_)
        outputs = [
            pb_utils.Tensor("LOGITS", np.ascontiguousarray(logits[:, :width], dtype=np.float32)),
            pb_utils.Tensor("LABEL", np.array([[s.encode()] for s in labels], dtype=np.object_)),
            pb_utils.Tensor("LABEL_NAMES", label_names),
        ]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self) -> None:
        self.engine = None
