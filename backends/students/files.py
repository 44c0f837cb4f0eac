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

from chorus.backends.bundle import check_finite_number, check_labels, read_bundle, write_bundle
from chorus.backends.students.config import StudentConfig
from chorus.backends.students.embeddings import SharedEmbeddings
from chorus.backends.students.group import StudentGroup
from chorus.backends.students.reference import Student
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
        if embeddings.hidden_size != self.config.hidden_size:
            raise TaskFileError(f"students are {self.config.hidden_size} wide, but the backbone's embeddings are "
                                f"{embeddings.hidden_size} wide; load the students with the backbone they were "
                                "distilled from")
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


def student_shapes(cfg: StudentConfig) -> dict[str, tuple[int, ...]]:
    """The file's tensors for `cfg`: name -> shape, (K, ...) each (a `Student`'s state dict, stacked)."""
    with torch.device("meta"):  # shapes only: nothing is allocated, whatever sizes the config names
        state = Student(cfg).state_dict()
    return {name: (cfg.num_students, *t.shape) for name, t in state.items()}


def _check_tensors(cfg: StudentConfig, tensors: dict[str, torch.Tensor], file: Path) -> None:
    per_layer = len(student_shapes(StudentConfig(num_students=1, num_layers=1, hidden_size=4, num_heads=1,
                                                 intermediate_size=1)))
    want_count = cfg.num_layers * (per_layer - 2) + 2  # the classifier's weight and bias once
    if len(tensors) != want_count:  # before building the shapes: a hostile num_layers costs nothing
        raise TaskFileError(f"students: {file} holds {len(tensors)} tensors, but {cfg.num_layers}-layer students "
                            f"have {want_count} (config {cfg.to_dict()})")
    want = student_shapes(cfg)
    missing, stray = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or stray:
        raise TaskFileError(f"students: {file} does not hold the tensors its config describes: missing "
                            f"{missing[:3]}, unexpected {stray[:3]}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise TaskFileError(f"students: {file} tensor {name!r} has shape {tuple(tensors[name].shape)}, but the "
                                f"config ({cfg.num_students} students, hidden {cfg.hidden_size}, intermediate "
                                f"{cfg.intermediate_size}, {cfg.num_labels} labels) needs {shape}")


def _check_records(meta: dict, meta_path: Path, k_max: int) -> tuple[dict, list[dict], dict]:
    """The header's free-form parts, checked where serving reads them: embeddings, prefixes, meta."""
    embeddings, prefixes, extra = meta.get("embeddings", {}), meta.get("prefixes", []), meta.get("meta", {})
    if not isinstance(embeddings, dict):
        raise TaskFileError(f"students: {meta_path} \"embeddings\" must be a JSON object "
                            '({"backbone": ..., "fingerprint": [numbers]})')
    fingerprint = embeddings.get("fingerprint")
    if fingerprint is not None:
        if not isinstance(fingerprint, list):
            raise TaskFileError(f"students: {meta_path} \"embeddings\".\"fingerprint\" must be a list of numbers")
        for x in fingerprint:
            check_finite_number(x, meta_path, "students", "\"embeddings\".\"fingerprint\" entry")
    if not isinstance(prefixes, list) or len(prefixes) not in (0, k_max):
        raise TaskFileError(f"students: {meta_path} \"prefixes\" must be a list of 0 or {k_max} records "
                            f"(one per number of students k), got {prefixes!r:.200}")
    for k, record in enumerate(prefixes, 1):
        if not isinstance(record, dict) or record.get("k") != k or isinstance(record.get("k"), bool):
            raise TaskFileError(f"students: {meta_path} \"prefixes\"[{k - 1}] must be a JSON object with \"k\": {k}, "
                                f"got {record!r:.200}")
        for key in ("validation_accuracy", "test_accuracy"):
            if record.get(key) is not None:
                check_finite_number(record[key], meta_path, "students", f"\"prefixes\"[{k - 1}].{key}")
    if not isinstance(extra, dict):
        raise TaskFileError(f"students: {meta_path} \"meta\" must be a JSON object")
    teacher = extra.get("teacher_accuracy", {})
    if not isinstance(teacher, dict):
        raise TaskFileError(f"students: {meta_path} \"meta\".\"teacher_accuracy\" must be a JSON object")
    if teacher.get("validation") is not None:
        check_finite_number(teacher["validation"], meta_path, "students",
                            "\"meta\".\"teacher_accuracy\".\"validation\"")
    return embeddings, prefixes, extra


def read_students(path: str | Path) -> StudentFiles:
    """Read a student directory; every problem raises TaskFileError naming the file and what is wrong."""
    meta_path, meta, tensors = read_bundle(path, "students", META_FILE, TENSOR_FILE, FORMAT, _KEYS)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise TaskFileError(f"students: {meta_path} \"config\" must be a StudentConfig object, got {config!r:.200}")
    try:
        cfg = StudentConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        raise TaskFileError(f"students: {meta_path} \"config\" is not a valid StudentConfig: {e}") from None
    weights = meta.get("boosting_weights")
    if not isinstance(weights, list) or len(weights) != cfg.num_students:
        raise TaskFileError(f"students: {meta_path} needs {cfg.num_students} \"boosting_weights\", got "
                            f"{weights!r:.200}")
    weights = [check_finite_number(a, meta_path, "students", "\"boosting_weights\" entry") for a in weights]
    labels = check_labels(meta.get("labels"), meta_path, "students")
    if len(labels) != cfg.num_labels:
        raise TaskFileError(f"students: {meta_path} needs {cfg.num_labels} \"labels\", got {labels!r:.200}")
    _check_tensors(cfg, tensors, meta_path.parent / TENSOR_FILE)
    embeddings, prefixes, extra = _check_records(meta, meta_path, cfg.num_students)
    return StudentFiles(cfg, labels, tensors, torch.tensor(weights), embeddings, prefixes, extra)


def load_students(path: str | Path, embeddings: SharedEmbeddings, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, k: int | None = None) -> StudentGroup:
    """Read a student directory onto a device as a fused `StudentGroup` over the given (shared) embeddings;
    with `k`, only the first k students are kept."""
    group = read_students(path).group(embeddings, device, dtype)
    return group if k is None else group.prune_to(k)
