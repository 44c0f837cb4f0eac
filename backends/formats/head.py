"""A task's labels and classifier head beside a PEFT or AdapterHub checkpoint (`chorus_head.json`).

chorus's heads read the mean of the last layer's token states (the pooling all-MiniLM-L6-v2 was trained with). A head
trained elsewhere usually reads something else: `BertForSequenceClassification`'s `classifier` reads BERT's pooler
output (`tanh(W_p · h_[CLS] + b_p)`), AdapterHub's classification heads read the [CLS] token through their own layers.
Such heads would give wrong answers here, so chorus never takes a checkpoint's head silently. A checkpoint directory
is servable with, beside it:

- `chorus_head.json`: `{"labels": [...], "pooling": "mean"}` — `"pooling": "mean"` states that the head reads
  mean-pooled tokens (any other value is refused, saying why);
- the head's tensors `classifier.weight` (labels, hidden) and `classifier.bias` (labels,): in `chorus_head.safetensors`
  (e.g. a head trained on chorus's pooling over the adapted backbone), or, without that file, the checkpoint's own
  classifier (PEFT `modules_to_save=["classifier"]` of a model that mean-pools before its `classifier`).

`write_head` writes these files; `load_any(..., head=TaskHead(...))` passes a head directly instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chorus.backends.bundle import check_labels
from chorus.backends.formats.files import read_json, read_tensors
from chorus.errors import TaskFileError

HEAD_META = "chorus_head.json"
HEAD_TENSORS = "chorus_head.safetensors"
HEAD_KEYS = ("classifier.weight", "classifier.bias")


@dataclass
class TaskHead:
    """Labels and a classifier over mean-pooled tokens; `weight`/`bias` None: take the checkpoint's own classifier."""

    labels: list[str]
    weight: torch.Tensor | None = None  # (labels, hidden)
    bias: torch.Tensor | None = None  # (labels,)


def read_head(directory: Path, task: str) -> TaskHead | None:
    """The head described beside a checkpoint, or None when there is no `chorus_head.json`."""
    meta_path = directory / HEAD_META
    if not meta_path.is_file():
        if (directory / HEAD_TENSORS).is_file():
            raise TaskFileError(f"task {task!r}: {directory / HEAD_TENSORS} needs {meta_path} beside it "
                                '(`{"labels": [...], "pooling": "mean"}`)')
        return None
    meta = read_json(meta_path, task)
    unknown = sorted(set(meta) - {"labels", "pooling"})
    if unknown:
        raise TaskFileError(f"task {task!r}: {meta_path} has unknown keys {unknown} (expected labels, pooling)")
    if meta.get("pooling") != "mean":
        raise TaskFileError(f"task {task!r}: {meta_path} says pooling {meta.get('pooling')!r}; chorus's heads read "
                            'mean-pooled tokens only, so the head must have been trained on them ("pooling": "mean")')
    head = TaskHead(check_labels(meta.get("labels"), meta_path, f"task {task!r}"))
    tensor_path = directory / HEAD_TENSORS
    if tensor_path.is_file():
        tensors = read_tensors(tensor_path, task)
        missing = [k for k in HEAD_KEYS if k not in tensors]
        stray = sorted(set(tensors) - set(HEAD_KEYS))
        if missing or stray:
            raise TaskFileError(f"task {task!r}: {tensor_path} must hold exactly {list(HEAD_KEYS)}; "
                                f"missing {missing}, unexpected {stray}")
        head.weight, head.bias = tensors["classifier.weight"], tensors["classifier.bias"]
    return head


def check_head(head: TaskHead, hidden: int | None, file: Path, task: str) -> dict[str, torch.Tensor]:
    """The head as TaskSpec tensors, its shapes checked against its labels (and the hidden size, when known)."""
    n = len(head.labels)
    w, b = head.weight, head.bias
    if w is None or b is None:
        raise TaskFileError(f"task {task!r}: no classifier tensors for the head (in {file})")
    if w.dim() != 2 or w.shape[0] != n or (hidden is not None and w.shape[1] != hidden):
        want = f"({n}, {hidden if hidden is not None else 'hidden'})"
        raise TaskFileError(f"task {task!r}: {file} tensor 'classifier.weight' has shape {tuple(w.shape)}, expected "
                            f"{want} ({n} labels {head.labels} x the hidden size)")
    if tuple(b.shape) != (n,):
        raise TaskFileError(f"task {task!r}: {file} tensor 'classifier.bias' has shape {tuple(b.shape)}, expected "
                            f"({n},) (one per label)")
    return {"classifier.weight": w.detach().float().cpu(), "classifier.bias": b.detach().float().cpu()}


def write_head(directory: str | Path, labels: list[str], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> None:
    """Write `chorus_head.json` (and, with tensors, `chorus_head.safetensors`) beside a checkpoint.

    Without `weight`/`bias` the checkpoint's own classifier is used — only right if it was trained on mean-pooled
    tokens, which writing this file states.
    """
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    if (weight is None) != (bias is None):
        raise ValueError("give both weight and bias, or neither (then the checkpoint's own classifier is used)")
    if weight is not None:
        save_file({"classifier.weight": weight.detach().float().cpu().contiguous(),
                   "classifier.bias": bias.detach().float().cpu().contiguous()}, directory / HEAD_TENSORS)
    (directory / HEAD_META).write_text(json.dumps({"labels": list(labels), "pooling": "mean"}, indent=2) + "\n",
                                       encoding="utf-8")


def resolve_head(directory: Path, task: str, given: TaskHead | None, checkpoint: dict[str, torch.Tensor],
                 checkpoint_file: Path, checkpoint_head: str, hidden: int | None) -> tuple[list[str], dict]:
    """Labels and head tensors of a checkpoint: the `given` head, else `chorus_head.json` beside it.

    `checkpoint`: the checkpoint's own `classifier.weight`/`.bias` (possibly empty); `checkpoint_head` says what that
    classifier reads, for the error when nothing states that it reads mean-pooled tokens.
    """
    head = given if given is not None else read_head(directory, task)
    how = (f"write {directory / HEAD_META} ({{\"labels\": [...], \"pooling\": \"mean\"}}) and "
           f"{directory / HEAD_TENSORS} (classifier.weight, classifier.bias) with "
           "chorus.backends.formats.write_head, or pass head=TaskHead(...)")
    if head is None:
        if checkpoint:
            raise TaskFileError(f"task {task!r}: {checkpoint_file} holds a classifier {sorted(checkpoint)} that reads "
                                f"{checkpoint_head}; chorus's heads read mean-pooled tokens, so it is not served as "
                                f"is. Give a head trained on mean-pooled tokens: {how} (if this classifier was trained "
                                "on mean-pooled tokens, chorus_head.json alone says so)")
        raise TaskFileError(f"task {task!r}: {directory} holds PET weights but no labels or classifier head: {how}")
    if head.weight is None:
        if not checkpoint:
            raise TaskFileError(f"task {task!r}: {directory / HEAD_META} gives labels but no head tensors: add "
                                f"{directory / HEAD_TENSORS}, or save the classifier with the checkpoint "
                                f"({checkpoint_file} holds none)")
        missing = [k for k in HEAD_KEYS if k not in checkpoint]
        if missing:
            raise TaskFileError(f"task {task!r}: {checkpoint_file} lacks {missing} of its classifier")
        head = TaskHead(head.labels, checkpoint["classifier.weight"], checkpoint["classifier.bias"])
        file = checkpoint_file
    else:
        file = directory / HEAD_TENSORS if given is None else Path("<head argument>")
    return list(head.labels), check_head(head, hidden, file, task)
