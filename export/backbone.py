"""The backbone with its PET operators and classifier heads as one ONNX graph, the task bank as graph inputs.

Graph (`BackboneGraph` lists the inputs of one export, in order):

| input | shape | |
| --- | --- | --- |
| `input_ids`, `attention_mask` | (batch, sequence) int64 | trailing 0s of the mask are padding |
| `head_slots` | (batch,) int64 | each row's classifier head slot |
| `slots.{method}` | (batch,) int64 | each row's slot in that PET method (0: the null slot), for methods with a bank |
| bank tensors | ({method}_capacity, ...) | `TaskBank.bank_tensors()` by export name, e.g. `lora.{site key}.lora_A`, `head.weight`; sparse sites' positions and values also have a dynamic `max_nnz` |

Output `logits` (batch, max_labels) float, -inf past each row's labels. The backbone weights are the graph's
initializers; the bank is not, so the bank is bound once on the device (`chorus.export.ort.OrtBackbone`) and only
ids, mask and slots travel per request; adding a task writes its slots in place, and growing a bank only changes the
capacity axis, so neither re-exports. A task that opens a PET site or method the graph lacks changes its inputs
(`graph_of(bank)` differs): then the graph is exported again.

The PET ops are their export forms (`PetMethod.gathered_op`: every row gathers its own slot, no host-side grouping).

Exporter: `torch.onnx.export(..., dynamo=False)`, the TorchScript-based exporter. torch 2.13's default torch.export-based
exporter (`dynamo=True`) needs the `onnxscript` package, which chorus does not install; the TorchScript exporter
traces this model with truly dynamic batch, sequence, capacity and nnz axes (the tests run other sizes than traced).
Opset 17: ScatterElements(reduction=add) needs 16, LayerNormalization 17.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chorus.backends.engine import MultiTaskModel
from chorus.backends.pet import GatheredRows
from chorus.errors import InvalidInput, TaskFileError

log = logging.getLogger(__name__)

OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript-based; the dynamo exporter needs onnxscript)"
FORMAT = "chorus-onnx-backbone/1"
MODEL_FILE, BANK_FILE, MANIFEST_FILE = "backbone.onnx", "bank.safetensors", "chorus_onnx.json"
FIXED_INPUTS = ("input_ids", "attention_mask", "head_slots")


@dataclass(frozen=True)
class BackboneGraph:
    """The inputs an exported graph takes: the PET methods with slot inputs and the bank tensors, in input order,
    with each bank tensor's dtype and rank. Two banks with the same `BackboneGraph` run on the same graph."""

    methods: tuple[str, ...]
    bank_inputs: tuple[tuple[str, str, int], ...]  # (export name, torch dtype, rank)

    @property
    def input_names(self) -> list[str]:
        return [*FIXED_INPUTS, *(f"slots.{m}" for m in self.methods), *(n for n, _, _ in self.bank_inputs)]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "head_slots": {0: "batch"}, "logits": {0: "batch"}}
        axes.update({f"slots.{m}": {0: "batch"} for m in self.methods})
        for name, _, rank in self.bank_inputs:
            method = name.split(".", 1)[0]
            if rank == 0:
                continue
            axes[name] = {0: f"{method}_capacity"}
            if name.endswith((".index", ".value")) and rank == 2:  # sparse sites: (capacity, max_nnz)
                axes[name][1] = f"{name.rsplit('.', 1)[0]}.max_nnz"
        return axes


def graph_of(tensors: dict[str, torch.Tensor]) -> BackboneGraph:
    """The graph a bank (its `bank_tensors()`) needs."""
    methods = tuple(dict.fromkeys(n.split(".", 1)[0] for n in tensors if not n.startswith("head.")))
    return BackboneGraph(methods, tuple((n, str(t.dtype), t.dim()) for n, t in tensors.items()))


class GatheredModel(nn.Module):
    """A `MultiTaskModel` with flat tensor arguments, for tracing: `(input_ids, attention_mask, head_slots,
    *method slots, *bank tensors) -> logits`, the PET ops in their gathered form."""

    def __init__(self, model: MultiTaskModel, graph: BackboneGraph):
        super().__init__()
        self.model, self.graph = model, graph

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head_slots: torch.Tensor,
                *inputs: torch.Tensor) -> torch.Tensor:
        n = len(self.graph.methods)
        rows = GatheredRows(dict(zip(self.graph.methods, inputs[:n])), head_slots,
                            dict(zip((b for b, _, _ in self.graph.bank_inputs), inputs[n:])))
        return self.model(input_ids, attention_mask, rows)


def export_backbone(model: MultiTaskModel, f: str | Path | io.BytesIO, opset: int = OPSET,
                    tensors: dict[str, torch.Tensor] | None = None) -> BackboneGraph:
    """Export `model` with the PET sites its bank holds now (`tensors`: a `bank.snapshot()`, default the live bank)
    to `f` (a path or a BytesIO). Returns the graph's inputs."""
    tensors = model.bank.bank_tensors() if tensors is None else tensors
    graph = graph_of(tensors)
    device = model.bank.device
    B, T = 2, 3  # any sizes: every axis is exported dynamic
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        example = (torch.ones(B, T, dtype=torch.long, device=device), torch.ones(B, T, dtype=torch.long, device=device),
                   torch.zeros(B, dtype=torch.long, device=device),
                   *(torch.zeros(B, dtype=torch.long, device=device) for _ in graph.methods),
                   *(t.detach() for t in tensors.values()))
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(GatheredModel(model, graph).eval(), example, f, dynamo=False, opset_version=opset,
                          input_names=graph.input_names, output_names=["logits"],
                          dynamic_axes=graph.dynamic_axes(), do_constant_folding=True)
    log.info("exported the backbone with %d PET methods and %d bank inputs (opset %d)", len(graph.methods),
             len(graph.bank_inputs), opset)
    return graph


# -- files ---------------------------------------------------------------------------------------------------------
def save_backbone_export(model: MultiTaskModel, out: str | Path, opset: int = OPSET) -> Path:
    """Write `out/backbone.onnx`, the bank it reads (`bank.safetensors`, by input name) and `chorus_onnx.json`
    (inputs, and each task's labels and slots: what a caller feeds for a row of that task)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bank = model.bank
    version, tensors = bank.snapshot()
    graph = export_backbone(model, out / MODEL_FILE, opset, tensors)
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, out / BANK_FILE)
    manifest = {
        "format": FORMAT, "exporter": EXPORTER, "opset": opset, "inputs": graph.input_names, "outputs": ["logits"],
        "methods": list(graph.methods), "max_labels": bank.max_labels, "pad_token_id": model.encoder.cfg.pad_token_id,
        "vocab_size": model.encoder.cfg.vocab_size, "max_positions": model.encoder.cfg.max_positions,
        "tasks": {name: {"labels": e.labels, "head_slot": e.head_slot, "slots": e.slots, "pet": e.pet}
                  for name, e in bank.tasks.items()},
    }
    tmp = tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp", encoding="utf-8")
    with tmp:
        tmp.write(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp.name, out / MANIFEST_FILE)
    return out


@dataclass
class ExportedBackbone:
    """An export directory read back: the manifest and the bank, and the feeds of a batch for any ONNX runtime."""

    path: Path
    manifest: dict
    bank: dict[str, np.ndarray]

    @classmethod
    def read(cls, path: str | Path) -> ExportedBackbone:
        from safetensors.numpy import load_file

        path = Path(path)
        for f in (MODEL_FILE, BANK_FILE, MANIFEST_FILE):
            if not (path / f).is_file():
                raise TaskFileError(f"{path / f} is missing: an ONNX backbone export holds {MODEL_FILE}, {BANK_FILE} "
                                    f"and {MANIFEST_FILE} (`chorus export --out {path}`)")
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise TaskFileError(f"{path / MANIFEST_FILE}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        return cls(path, manifest, load_file(path / BANK_FILE))

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, tasks: list[str]) -> dict[str, np.ndarray]:
        """Every graph input for a padded batch whose rows belong to `tasks`."""
        known = self.manifest["tasks"]
        unknown = sorted({t for t in tasks if t not in known})
        if unknown:
            raise InvalidInput(f"unknown tasks {unknown}; this export holds {sorted(known)}")
        if len(tasks) != len(input_ids):
            raise InvalidInput(f"{len(input_ids)} rows of tokens but {len(tasks)} task names")
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
                 "head_slots": np.array([known[t]["head_slot"] for t in tasks], np.int64)}
        for m in self.manifest["methods"]:
            feeds[f"slots.{m}"] = np.array([known[t]["slots"].get(m, 0) for t in tasks], np.int64)
        return {**feeds, **self.bank}
