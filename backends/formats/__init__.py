"""Task files people train elsewhere, loaded as chorus `TaskSpec`s: `load_any(path, name)` detects the format.

| format | detected by | loads | see |
| --- | --- | --- | --- |
| `chorus-task/1` | `chorus_task.json` | everything chorus serves | `chorus.backends.task_files` |
| Hugging Face PEFT | `adapter_config.json` with `peft_type` | LoRA (incl. rsLoRA, rank/alpha patterns), IA3, LN tuning | `peft.py` |
| AdapterHub `adapters` | `adapter_config.json` with `config` | bottleneck adapters: Houlsby (`double_seq_bn`), and `seq_bn` with `original_ln_before=False` | `adapterhub.py` |

PEFT and AdapterHub checkpoints carry no labels, and their classifiers read BERT's pooler / the [CLS] token, while
chorus's heads read mean-pooled tokens: their labels and head come from `chorus_head.json` (+ `chorus_head.safetensors`)
beside the checkpoint, or a `TaskHead` argument (`head.py`). Every problem raises `TaskFileError` naming the file, the
tensor and the shapes; unsupported options are refused by name, never dropped.
"""

from __future__ import annotations

from pathlib import Path

from chorus.backends.formats.adapterhub import load_adapterhub
from chorus.backends.formats.files import read_json
from chorus.backends.formats.head import TaskHead, write_head
from chorus.backends.formats.peft import load_peft
from chorus.backends.task_bank import TaskSpec, check_task_name
from chorus.backends.task_files import META_FILE, load_task
from chorus.errors import TaskFileError

FORMATS = ("chorus-task/1", "peft", "adapterhub")


def detect_format(path: str | Path, name: str = "?") -> str:
    """Which of `FORMATS` a task directory is in."""
    path = Path(path)
    if not path.is_dir():
        raise TaskFileError(f"task {name!r}: {path} is not a directory (a chorus task, PEFT or AdapterHub checkpoint)")
    if (path / META_FILE).is_file():
        return "chorus-task/1"
    config = path / "adapter_config.json"
    if config.is_file():
        cfg = read_json(config, name)
        if "peft_type" in cfg:
            return "peft"
        if "config" in cfg:
            return "adapterhub"
        raise TaskFileError(f"task {name!r}: {config} is neither PEFT's (no \"peft_type\") nor AdapterHub's (no "
                            "\"config\")")
    raise TaskFileError(f"task {name!r}: {path} holds neither {META_FILE} (chorus-task/1) nor adapter_config.json "
                        "(PEFT / AdapterHub)")


def load_any(path: str | Path, name: str, head: TaskHead | None = None,
             sites: dict[str, tuple[int, int]] | None = None) -> TaskSpec:
    """Load a task directory in any of `FORMATS`.

    `head`: labels and classifier for a PEFT/AdapterHub checkpoint (else `chorus_head.json` beside it). `sites`: the
    backbone's linears (`EncoderConfig.linear_sites()`), to check shapes against it here, naming the file's tensors.
    """
    check_task_name(name)
    fmt = detect_format(path, name)
    if fmt == "chorus-task/1":
        if head is not None:
            raise TaskFileError(f"task {name!r}: {path} is a chorus task, which holds its own head; pass no head")
        return load_task(path, name)
    load = load_peft if fmt == "peft" else load_adapterhub
    return load(path, name, head=head, sites=sites)


__all__ = ["FORMATS", "TaskHead", "detect_format", "load_adapterhub", "load_any", "load_peft", "write_head"]
