"""What chorus's own directory formats share (tasks, `chorus-task/1`; students, `chorus-students/1`): a JSON header
naming its format beside one safetensors file, read with json and safetensors only (nothing is unpickled) and
written atomically — a directory is either the old one or the complete new one, never half-written.

The readers here are also what the other formats' readers (`chorus.backends.formats`) use: every problem with a file —
missing, unreadable, truncated, not JSON or not safetensors, a hostile header, a tensor of a type chorus cannot hold,
NaN or infinite values — raises `TaskFileError` naming the file (and the tensor) and what was wrong.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path

import torch

from chorus.errors import TaskFileError

MAX_JSON_BYTES = 16 * 2**20  # a task's or students' header is a few KiB; a larger file is not one of ours
MAX_LABEL_CHARS = 256


def write_bundle(path: str | Path, meta_file: str, meta: dict, tensor_file: str,
                 tensors: dict[str, torch.Tensor]) -> Path:
    """Write `meta` (JSON) and `tensors` (float32 safetensors) as directory `path`, replacing whatever is there."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / meta_file).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu().float() for k, v in tensors.items()}, tmp / tensor_file)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (write finite numbers)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} does not fit a float (write finite numbers)")
    return value


def read_json_object(path: Path, who: str) -> dict:
    """A JSON object from `path` (UTF-8, at most MAX_JSON_BYTES, finite numbers only), or TaskFileError saying why
    not."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise TaskFileError(f"{who}: {path} is {size} bytes, more than the {MAX_JSON_BYTES} a header may be; "
                                "it is not a chorus header file")
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except TaskFileError:
        raise
    except OSError as e:
        raise TaskFileError(f"{who}: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{who}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); JSON files must be "
                            "UTF-8") from None
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        why = "it nests too deeply" if isinstance(e, RecursionError) else e
        raise TaskFileError(f"{who}: {path} is not valid JSON: {why}") from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{who}: {path} must hold a JSON object ({{...}}), not a JSON {type(data).__name__}")
    return data


def _file_kind(path: Path) -> str:
    """What a file that is not safetensors looks like, for the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return " It looks like a PyTorch torch.save() archive (a pickle): chorus reads safetensors only here; " \
               "convert it with safetensors.torch.save_file(state_dict, path)."
    if head[:1] == b"\x80":
        return " It looks like a Python pickle: chorus reads safetensors only here; convert it with " \
               "safetensors.torch.save_file(state_dict, path)."
    return ""


def float_tensors(tensors: dict[str, torch.Tensor], path: Path, who: str) -> dict[str, torch.Tensor]:
    """`tensors` as float32, refusing types that are not real numbers and tensors holding NaN or infinite values,
    by name."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TaskFileError(f"{who}: {path} must map tensor names to tensors; {name!r} holds a "
                                f"{type(t).__name__}")
        if t.is_complex():
            raise TaskFileError(f"{who}: {path} tensor {name!r} is complex ({t.dtype}); chorus's tensors are real "
                                "floating point (float32, float16 or bfloat16)")
        try:
            f = t.to(torch.float32, copy=True)  # memory of its own, whatever the tensor was read from
        except (RuntimeError, NotImplementedError, TypeError) as e:
            raise TaskFileError(f"{who}: {path} tensor {name!r} has type {t.dtype}, which chorus cannot read as "
                                f"float32 ({e}); save it as float32, float16 or bfloat16") from None
        if f.numel() and not torch.isfinite(f).all():
            bad = int((~torch.isfinite(f)).sum())
            raise TaskFileError(f"{who}: {path} tensor {name!r} holds {bad} NaN or infinite value(s) of "
                                f"{f.numel()}; the weights are broken (a diverged training run?): retrain or "
                                "re-export them")
        out[name] = f
    return out


def read_safetensors(path: Path, who: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as float32 (see `float_tensors`); anything else raises TaskFileError naming the
    file: truncated or corrupt files, headers whose sizes or offsets do not fit the file, pickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        # read, not memory-mapped: a file truncated or rewritten in place while it is read, or after, cannot fault
        # the serving process (SIGBUS); every tensor is copied into memory of its own (float_tensors)
        data = path.read_bytes()
    except OSError as e:
        raise TaskFileError(f"{who}: cannot read {path}: {e.strerror or e}") from None
    try:
        tensors = load(data)
    except KeyError as e:  # a dtype safetensors knows but torch's loader does not map
        raise TaskFileError(f"{who}: {path} is not a readable safetensors file: tensor type {e} is not one chorus "
                            "reads; save float32, float16 or bfloat16 tensors") from None
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as e:
        raise TaskFileError(f"{who}: {path} is not a readable safetensors file: {e}.{_file_kind(path)}") from None
    del data
    return float_tensors(tensors, path, who)


def check_labels(labels: object, path: Path, who: str, key: str = "labels") -> list[str]:
    """`labels` must be a list of label names: non-empty strings of at most MAX_LABEL_CHARS characters that encode as
    UTF-8 and hold no control characters (they travel as UTF-8 BYTES outputs and show in clients' output)."""
    if not isinstance(labels, list) or not labels:
        raise TaskFileError(f"{who}: {path} \"{key}\" must be a list of non-empty strings, got {labels!r:.200}")
    for label in labels:
        if not isinstance(label, str) or not label:
            raise TaskFileError(f"{who}: {path} \"{key}\" must be a list of non-empty strings; it holds "
                                f"{label!r:.200}")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise TaskFileError(f"{who}: {path} label {label!r:.200} is not valid Unicode (a lone surrogate escape "
                                "such as \\ud800); labels must encode as UTF-8") from None
        if len(label) > MAX_LABEL_CHARS:
            raise TaskFileError(f"{who}: {path} label {label[:40]!r}... is {len(label)} characters long; at most "
                                f"{MAX_LABEL_CHARS}")
        if any(unicodedata.category(c) == "Cc" for c in label):
            raise TaskFileError(f"{who}: {path} label {label!r:.200} holds control characters; labels are printable "
                                "names")
    return labels


def check_finite_number(value: object, path: Path, who: str, what: str) -> float:
    """`value` must be a finite JSON number (not a bool)."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise TaskFileError(f"{who}: {path} {what} must be a finite number, got {str(value)[:100]}")
    return number


def read_bundle(path: str | Path, who: str, meta_file: str, tensor_file: str, fmt: str,
                keys: set[str]) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """A directory written by `write_bundle`: (its header's path, the header, the tensors as float32). Every
    problem raises TaskFileError starting with `who` (e.g. "task 'sst2'") and naming the file: a missing file, JSON
    that does not parse, a header without `"format": fmt` or with keys outside `keys`, an unreadable tensor file, a
    tensor with NaN or infinite values."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "missing"
        raise TaskFileError(f"{who}: {path} is {what} (expected a directory of {meta_file} + {tensor_file})")
    meta_path, tensor_path = path / meta_file, path / tensor_file
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise TaskFileError(f"{who}: {p} is missing (the directory holds {meta_file} + {tensor_file})")
    meta = read_json_object(meta_path, who)
    if meta.get("format") != fmt:
        raise TaskFileError(f"{who}: {meta_path} must be a JSON object with \"format\": \"{fmt}\", got "
                            f"{meta.get('format')!r:.100}")
    unknown = sorted(map(str, set(meta) - keys))
    if unknown:
        raise TaskFileError(f"{who}: {meta_path} has unknown keys {unknown}; known: {sorted(keys)}")
    return meta_path, meta, read_safetensors(tensor_path, who)
