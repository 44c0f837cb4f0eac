"""What chorus's own directory formats share (tasks, `chorus-task/1`; students, `chorus-students/1`): a JSON header
naming its format beside one safetensors file, read with json and safetensors only (nothing is unpickled) and
written atomically — a directory is either the old one or the complete new one, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from chorus.errors import TaskFileError


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


def read_bundle(path: str | Path, who: str, meta_file: str, tensor_file: str, fmt: str,
                keys: set[str]) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """A directory written by `write_bundle`: (its header's path, the header, the tensors as float32). Every
    problem raises TaskFileError starting with `who` (e.g. "task 'sst2'") and naming the file: a missing file, JSON
    that does not parse, a header without `"format": fmt` or with keys outside `keys`, an unreadable tensor file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "missing"
        raise TaskFileError(f"{who}: {path} is {what} (expected a directory of {meta_file} + {tensor_file})")
    meta_path, tensor_path = path / meta_file, path / tensor_file
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise TaskFileError(f"{who}: {p} is missing (the directory holds {meta_file} + {tensor_file})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskFileError(f"{who}: {meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise TaskFileError(f"{who}: {meta_path} must be a JSON object with \"format\": \"{fmt}\"")
    unknown = sorted(set(meta) - keys)
    if unknown:
        raise TaskFileError(f"{who}: {meta_path} has unknown keys {unknown}; known: {sorted(keys)}")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise TaskFileError(f"{who}: {tensor_path} is not a readable safetensors file: {e}") from None
    return meta_path, meta, {k: v.float() for k, v in tensors.items()}
