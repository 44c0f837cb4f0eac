"""The student directory format, `chorus-students/1`:

- `chorus_students.json`: `{"format", "config": StudentConfig, "labels", "boosting_weights": [α_1..α_K],
  "embeddings": {"backbone", "fingerprint"}, "prefixes": [{"k", "test_accuracy", "validation_accuracy",
  "latency": {...}}, ...], "meta": {...}}` — `prefixes[k-1]` describes running the first k students, which is what
  pruning reads.
- `students.safetensors`: the stacked student state dicts, (K, ...) per tensor (`stack_students`), e.g.
  `layers.0.query.weight` (K, C, C), `classifier.weight` (K, num_labels, C).

The embeddings are not stored: students share the backbone's (see `embeddings.py`); the fingerprint catches loading
them onto a different backbone. Read with safetensors and json only (nothing is unpickled); written atomically
(`chorus.backends.bundle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chorus.backends.bundle import read_bundle, write_bundle
from chorus.backends.students.config import StudentConfig
from chorus.backends.students.embeddings import SharedEmbeddings
from chorus.backends.students.group import StudentGroup
from chorus.errors import TaskFileError

FORMAT = "chorus-students/1"
META_FILE = "chorus_students.json"
TENSOR_FILE = "students.safetensors"
_KEYS = {"format", "config", "labels", "boosting_weights", "embeddings", "prefixes", "meta"}


@dataclass
class StudentFiles:
    """A student directory's contents, before it is put on a device."""

    config: StudentConfig
    labels: list[str]
    tensors: dict[str, torch.Tensor]  # (K, ...) each
    boosting_weights: torch.Tensor  # (K,)
    embeddings: dict = field(default_factory=dict)  # {"backbone": name, "fingerprint": [...]}
    prefixes: list[dict] = field(default_factory=list)  # prefixes[k-1]: metrics of the first k students
    meta: dict = field(default_factory=dict)

    def group(self, embeddings: SharedEmbeddings, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, check_fingerprint: bool = True) -> StudentGroup:
        if check_fingerprint and self.embeddings.get("fingerprint"):
            got, want = embeddings.fingerprint(), self.embeddings["fingerprint"]
            if len(got) != len(want) or not all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-2) for a, b in zip(got, want)):
                raise TaskFileError(f"students were trained on the embeddings of backbone "
                                    f"{self.embeddings.get('backbone')!r} (fingerprint {want}), but the given "
                                    f"embeddings differ (fingerprint {got}); load the students with that backbone")
        return StudentGroup(self.config, embeddings, self.tensors, self.boosting_weights).to(device=device, dtype=dtype)


def save_students(files: StudentFiles, path: str | Path) -> Path:
    """Write a student directory atomically (replacing whatever is there)."""
    K = files.config.num_students
    if len(files.boosting_weights) != K or len(files.prefixes) not in (0, K):
        raise ValueError(f"{K} students need {K} boosting weights and 0 or {K} prefix records, got "
                         f"{len(files.boosting_weights)} and {len(files.prefixes)}")
    meta = {"format": FORMAT, "config": files.config.to_dict(), "labels": list(files.labels),
            "boosting_weights": [float(a) for a in files.boosting_weights], "embeddings": files.embeddings,
            "prefixes": files.prefixes, "meta": files.meta}
    return write_bundle(path, META_FILE, meta, TENSOR_FILE, files.tensors)


def read_students(path: str | Path) -> StudentFiles:
    """Read a student directory; every problem raises TaskFileError naming the file and what is wrong."""
    meta_path, meta, tensors = read_bundle(path, "students", META_FILE, TENSOR_FILE, FORMAT, _KEYS)
    try:
        cfg = StudentConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise TaskFileError(f"students: {meta_path} \"config\" is not a valid StudentConfig: {e}") from None
    weights = meta.get("boosting_weights")
    if not isinstance(weights, list) or len(weights) != cfg.num_students:
        raise TaskFileError(f"students: {meta_path} needs {cfg.num_students} \"boosting_weights\", got {weights!r}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != cfg.num_labels:
        raise TaskFileError(f"students: {meta_path} needs {cfg.num_labels} \"labels\", got {labels!r}")
    bad = sorted(n for n, t in tensors.items() if t.shape[0] != cfg.num_students)
    if bad:
        raise TaskFileError(f"students: {meta_path.parent / TENSOR_FILE} tensors {bad[:3]} do not have "
                            f"{cfg.num_students} students in their first dimension")
    return StudentFiles(cfg, labels, tensors, torch.tensor(weights),
                        meta.get("embeddings", {}), meta.get("prefixes", []), meta.get("meta", {}))


def load_students(path: str | Path, embeddings: SharedEmbeddings, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, k: int | None = None) -> StudentGroup:
    """Read a student directory onto a device as a fused `StudentGroup` over the given (shared) embeddings;
    with `k`, only the first k students are kept."""
    group = read_students(path).group(embeddings, device, dtype)
    return group if k is None else group.prune_to(k)
