"""onnxruntime serving of the exported backbone: the task bank bound once on the device, ids and slots per call.

`OrtBackbone` keeps an `InferenceSession` of the model's export (`chorus.export.backbone`) and one `IOBinding`. The
bank's tensors are bound by pointer to the very tensors the `TaskBank` holds (no copy; on CUDA they stay on the GPU),
so the per-call work is binding `input_ids`, `attention_mask` and the rows' slots and running. When the bank's
`version` moves (a task added, replaced or removed) the bank is bound again (its tensors may have been re-allocated
by growth), and when it needs a graph with other inputs (a task opened a PET site or method the graph lacks) the model
is exported again first. `OrtEngine` is `Engine` (tokenizer, task loading, bank bookkeeping) with its logits from
`OrtBackbone`: same `run(ids, tasks) -> Classified`.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import torch

from chorus.backends.engine import DEFAULT_BACKBONE, Engine, MultiTaskModel
from chorus.backends.pet import RowTasks
from chorus.errors import InvalidInput, MissingDependency
from chorus.export.backbone import OPSET, BackboneGraph, export_backbone, graph_of

log = logging.getLogger(__name__)


def _onnx_type(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    types = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
             torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL}
    if dtype not in types:
        raise InvalidInput(f"cannot bind a {dtype} tensor to onnxruntime; supported: {sorted(map(str, types))}")
    return types[dtype]


def providers_for(device: torch.device, providers: list[str] | None = None) -> list[str]:
    """onnxruntime execution providers for a model on `device` (or check the given ones are installed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is not None:
        missing = [p for p in providers if p not in available]
        if missing:
            raise MissingDependency(f"onnxruntime providers {missing} are not available here; available: {available}"
                                    " (CUDAExecutionProvider comes with the onnxruntime-gpu package)")
        return list(providers)
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MissingDependency(f"the model is on {device}, but onnxruntime has no CUDAExecutionProvider "
                                    f"(available: {available}); install onnxruntime-gpu, or run on device='cpu'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtBackbone:
    """`(input_ids, attention_mask, RowTasks) -> logits` through onnxruntime, for a `MultiTaskModel` whose bank it
    binds once (see the module docstring). Thread-safe: one call runs at a time."""

    def __init__(self, model: MultiTaskModel, providers: list[str] | None = None, session_options=None,
                 opset: int = OPSET):
        self.model, self.opset, self.session_options = model, opset, session_options
        self.device = model.bank.device
        self.providers = providers_for(self.device, providers)
        dtype = model.bank.dtype
        if dtype == torch.bfloat16 or (dtype != torch.float32 and self.providers[0] == "CPUExecutionProvider"):
            raise InvalidInput(f"onnxruntime cannot serve this {dtype} model on {self.providers[0]}: its CPU provider "
                               "runs float32 only (float16 lacks ScatterElements(add), bfloat16 most ops); use "
                               "dtype float32, or float16 with the CUDA provider")
        self.session = self.binding = None
        self.graph: BackboneGraph | None = None
        self.exports = 0  # how many times the model was exported (tests and logs)
        self._version: int | None = None
        self._bound: dict[str, torch.Tensor] = {}  # keeps the bound bank tensors alive
        self._inputs: set[str] = set()  # the session's input names (the exporter drops inputs a graph never reads)
        self._lock = threading.Lock()

    # -- binding ----------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bind the bank as it is now; export again first if it needs other graph inputs. Runs by itself before a
        call after the bank changed; call it after loading tasks to take that cost before the first request."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        if self.model.bank.version == self._version and self.session is not None:
            return  # the per-call check: one int (the bound tensors stay alive even if an add is under way)
        version, tensors = self.model.bank.snapshot()
        graph = graph_of(tensors)
        if graph != self.graph:
            import onnxruntime as ort

            buf = io.BytesIO()
            export_backbone(self.model, buf, self.opset, tensors)
            options = {"providers": self.providers}
            if self.device.type == "cuda":
                options["provider_options"] = [{"device_id": self.device.index or 0}, {}]
            self.session = ort.InferenceSession(buf.getvalue(), self.session_options, **options)
            self.graph, self.exports = graph, self.exports + 1
            self._inputs = {i.name for i in self.session.get_inputs()}
        self.binding = self.session.io_binding()
        self._bound = {}
        for name, t in tensors.items():
            if name in self._inputs:
                self._bound[name] = self._bind(name, t)
        self._version = version
        log.info("onnxruntime: bank version %d bound (%d tensors, %s)", version, len(self._bound), self.providers[0])

    def _bind(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()  # a copy: the next bank version binds again anyway
        self.binding.bind_input(name, self.device.type, self.device.index or 0, _onnx_type(t.dtype), tuple(t.shape),
                                t.data_ptr())
        return t

    # -- running ----------------------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: RowTasks) -> np.ndarray:
        """input_ids, attention_mask (B, T) int64; `rows` from `bank.row_tasks` -> logits (B, max_labels) float32."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise InvalidInput(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                               "must be the same (batch, sequence) shape")
        per_call = {"input_ids": input_ids, "attention_mask": attention_mask, "head_slots": rows.head_slots,
                    **{f"slots.{m}": s for m, s in rows.slots.items()}}
        with self._lock:
            self._refresh()
            keep = [self._bind(n, t.to(self.device, torch.long)) for n, t in per_call.items() if n in self._inputs]
            self.binding.bind_output("logits", self.device.type, self.device.index or 0)  # a new (B, L) each call
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the inputs are written before ORT reads them
            self.session.run_with_iobinding(self.binding)
            out = self.binding.copy_outputs_to_cpu()[0]
            del keep
        return out.astype(np.float32, copy=False)


class OrtEngine(Engine):
    """`Engine` whose batches run through onnxruntime (`OrtBackbone`): the same constructor arguments (plus
    `providers`, `session_options`), tokenizer, task loading and `run(ids, tasks) -> Classified`. The PyTorch model
    stays: it holds the backbone weights the graph is exported from and the bank the session binds."""

    def __init__(self, backbone=DEFAULT_BACKBONE, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 capacity: int = 16, max_length: int | None = None, max_rank: int = 16,
                 providers: list[str] | None = None, session_options=None):
        super().__init__(backbone, device, dtype, capacity=capacity, max_length=max_length, max_rank=max_rank,
                         cuda_graphs=False)  # onnxruntime runs the backbone
        self.ort = OrtBackbone(self.model, providers, session_options)

    def refresh(self) -> None:
        """Export and bind now (after loading tasks), rather than on the first request."""
        self.ort.refresh()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows) -> np.ndarray:
        vocab = self.cfg.vocab_size
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bad.any():  # onnxruntime's Gather would fail with an opaque message
            i, j = (int(v) for v in bad.nonzero()[0])
            raise InvalidInput(f"row {i}: token id {int(input_ids[i, j])} is outside the vocabulary [0, {vocab})")
        if input_ids.shape[1] > self.cfg.max_positions:
            raise InvalidInput(f"{input_ids.shape[1]} token ids exceed the backbone's {self.cfg.max_positions} "
                               "positions")
        return self.ort(input_ids, attention_mask, rows)
