"""Student groups (Student Parallelism) as ONNX: one graph per prefix k, and an onnxruntime runner.

One graph per k, not k as an input: a prefix is chosen at deployment from the per-prefix accuracy and latency the
students are stored with (`prefixes` in chorus_students.json), not per request, and a graph of exactly k students
computes exactly k — the fused layer-0 GEMM is (C, k·3C) and every later op has a static student axis of k, which
onnxruntime and TensorRT can plan for. k as a graph input would slice the stacked weights by a runtime value (the
TorchScript exporter traces `[:k]` as a constant anyway) and leave that axis dynamic. The price: each file holds its
k students and the shared embedding table (the runner opens only the prefixes it is asked for).

Each graph: `input_ids`, `attention_mask` (batch, sequence) int64 -> `logits` (batch, num_labels) float, the boosting
ensemble `Σ_{j<k} α_j·S_j(x)` exactly as `StudentGroup.forward(..., k)`. Exporter: as `chorus.export.backbone`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chorus.backends.engine import Classified
from chorus.backends.students import StudentGroup
from chorus.errors import InvalidInput, TaskFileError
from chorus.export.backbone import EXPORTER, OPSET

log = logging.getLogger(__name__)

FORMAT = "chorus-onnx-students/1"
MANIFEST_FILE = "chorus_students_onnx.json"


def student_file(k: int) -> str:
    return f"students_k{k}.onnx"


class StudentPrefix(nn.Module):
    """The first k students of a group as a two-input module, for tracing."""

    def __init__(self, group: StudentGroup, k: int):
        super().__init__()
        group._check_k(k)
        self.group, self.k = group, k

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.group(input_ids, attention_mask, self.k)


def export_students(group: StudentGroup, out: str | Path, labels: list[str], ks: list[int] | None = None,
                    opset: int = OPSET, pad_token_id: int = 0, prefixes: list[dict] | None = None) -> Path:
    """Write `out/students_k{k}.onnx` for each k (default: every prefix 1..K) and `chorus_students_onnx.json`."""
    K = group.num_students
    ks = sorted(set(range(1, K + 1) if ks is None else ks))
    for k in ks:
        group._check_k(k)
    if len(labels) != group.cfg.num_labels:
        raise InvalidInput(f"{len(labels)} labels {labels} for students with {group.cfg.num_labels} outputs")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = group.head_w.device
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        example = (torch.ones(2, 3, dtype=torch.long, device=device), torch.ones(2, 3, dtype=torch.long, device=device))
        for k in ks:
            torch.onnx.export(StudentPrefix(group, k).eval(), example, out / student_file(k), dynamo=False,
                              opset_version=opset, input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], do_constant_folding=True,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}})
            log.info("exported students k=%d of %d", k, K)
    emb = group.embeddings
    manifest = {"format": FORMAT, "exporter": EXPORTER, "opset": opset, "num_students": K, "labels": list(labels),
                "files": {str(k): student_file(k) for k in ks}, "pad_token_id": pad_token_id,
                "vocab_size": emb.vocab_size, "max_positions": int(emb.position.shape[0]),
                "prefixes": prefixes or []}
    tmp = tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp", encoding="utf-8")
    with tmp:
        tmp.write(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp.name, out / MANIFEST_FILE)
    return out


class OrtStudents:
    """Runs exported student prefixes with onnxruntime: `logits(input_ids, attention_mask, k)` on padded arrays, or
    `run(ids, k) -> Classified` on rows of token ids like `Engine.run` (every row is the students' one task).
    A prefix's session opens on its first use."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, session_options=None):
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise TaskFileError(f"{path / MANIFEST_FILE} is missing: not a student export (`chorus export --students`)")
        self.path, self.manifest = path, json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise TaskFileError(f"{path / MANIFEST_FILE}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.labels: list[str] = self.manifest["labels"]
        self.ks = sorted(int(k) for k in self.manifest["files"])
        self.providers = providers or ["CPUExecutionProvider"]
        self.session_options = session_options
        self._sessions: dict[int, object] = {}

    def session(self, k: int | None = None):
        import onnxruntime as ort

        k = self.ks[-1] if k is None else k
        if k not in self.ks:
            raise InvalidInput(f"k={k!r}: this export holds student prefixes k in {self.ks} "
                               f"(export others with `chorus export --students TASK --k ...`)")
        if k not in self._sessions:
            self._sessions[k] = ort.InferenceSession(str(self.path / self.manifest["files"][str(k)]),
                                                     self.session_options, providers=self.providers)
        return self._sessions[k]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, k: int | None = None) -> np.ndarray:
        """input_ids, attention_mask (B, T) -> the first k students' ensemble logits (B, num_labels)."""
        input_ids, attention_mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or input_ids.size == 0:
            raise InvalidInput(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be the "
                               "same non-empty (batch, sequence) shape")
        vocab, positions = self.manifest["vocab_size"], self.manifest["max_positions"]
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise InvalidInput(f"row {i}: token id {int(input_ids[i, j])} is outside the vocabulary [0, {vocab})")
        if input_ids.shape[1] > positions:
            raise InvalidInput(f"{input_ids.shape[1]} token ids exceed the students' {positions} positions")
        return self.session(k).run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def run(self, ids: list[list[int]], k: int | None = None) -> Classified:
        if not ids or any(len(r) == 0 for r in ids):
            raise InvalidInput("students need at least one row, and no empty rows, of token ids")
        T = max(len(r) for r in ids)
        input_ids = np.full((len(ids), T), self.manifest["pad_token_id"], np.int64)
        mask = np.zeros((len(ids), T), np.int64)
        for i, r in enumerate(ids):
            input_ids[i, : len(r)], mask[i, : len(r)] = r, 1
        logits = self.logits(input_ids, mask, k)
        return Classified(logits, [self.labels[int(i)] for i in logits.argmax(1)], [list(self.labels)] * len(ids))
