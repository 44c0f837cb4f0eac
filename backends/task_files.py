"""chorus's task file format, `chorus-task/1`: a directory holding

- `chorus_task.json`: `{"format": "chorus-task/1", "labels": [...], "pet": {method: options}, "meta": {...}}`
- `task.safetensors`: the task's tensors (see `TaskSpec`), fp32 or fp16.

Files are read with safetensors only (nothing is unpickled) and written atomically: a task directory is either the old
one or the complete new one, never half-written (`chorus.backends.bundle`). A malformed or hostile file is refused with
a `TaskFileError` naming the file and what is wrong, NaN or infinite weights by the tensor's name.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from chorus.backends.bundle import check_labels, read_bundle, write_bundle
from chorus.backends.encoder import LAYER_LINEARS, norm_sites
from chorus.backends.task_bank import TaskSpec, check_task_name
from chorus.errors import TaskFileError

FORMAT = "chorus-task/1"
META_FILE = "chorus_task.json"
TENSOR_FILE = "task.safetensors"


def load_task(path: str | Path, name: str) -> TaskSpec:
    """Read a task directory; every problem raises TaskFileError naming the file and what is wrong."""
    check_task_name(name)
    meta_path, meta, tensors = read_bundle(path, f"task {name!r}", META_FILE, TENSOR_FILE, FORMAT,
                                           {"format", "labels", "pet", "meta"})
    labels = check_labels(meta.get("labels"), meta_path, f"task {name!r}")
    pet, extra = meta.get("pet", {}), meta.get("meta", {})
    if not isinstance(pet, dict) or not all(isinstance(v, dict) for v in pet.values()):
        raise TaskFileError(f"task {name!r}: {meta_path} \"pet\" must map method names to option objects, e.g. "
                            '{"lora": {"r": 8, "alpha": 16}}')
    if not isinstance(extra, dict):
        raise TaskFileError(f"task {name!r}: {meta_path} \"meta\" must be a JSON object, not "
                            f"{type(extra).__name__}")
    return TaskSpec(name, labels, pet, tensors, extra)


def save_task(spec: TaskSpec, path: str | Path) -> Path:
    """Write a task directory atomically (replacing any task already there)."""
    meta = {"format": FORMAT, "labels": spec.labels, "pet": spec.pet, "meta": spec.meta}
    return write_bundle(path, META_FILE, meta, TENSOR_FILE, spec.tensors)


def random_task(name: str, hidden: int, sites: dict[str, tuple[int, int]], pet: dict[str, dict],
                labels: list[str] | None = None, seed: int = 0, scale: float = 0.05) -> TaskSpec:
    """A task with random tensors for the given methods (tests and benchmarks).

    Every method's options as its class documents; `target_modules` (suffixes of site names) limits the sites, and
    adapters take their sites from `placement`. MaskBERT prunes, and Diff-Pruning keeps, a random `density` fraction
    of each site's weights (default 0.05). `layer_norm` tunes every LayerNorm of the backbone `sites` belong to (or the
    `target_modules` ones): weight 1 + noise, bias noise.
    """
    g = torch.Generator().manual_seed(seed)
    labels = labels or ["negative", "positive"]
    rand = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731

    def positions(out_f: int, in_f: int, density: float) -> torch.Tensor:
        n = max(1, round(density * out_f * in_f))
        return torch.randperm(out_f * in_f, generator=g)[:n].sort().values.float()

    tensors = {"classifier.weight": rand(len(labels), hidden), "classifier.bias": rand(len(labels))}
    for method, options in pet.items():
        targets = options.get("target_modules")
        if method == "layer_norm":
            for site in norm_sites(len(sites) // len(LAYER_LINEARS), hidden):
                if not targets or any(site.endswith(t) for t in targets):
                    tensors[f"{site}.weight"], tensors[f"{site}.bias"] = 1 + rand(hidden), rand(hidden)
            continue
        for site, (out_f, in_f) in sites.items():
            if targets and not any(site.endswith(t) for t in targets):
                continue
            within = site.split(".", 3)[-1]  # the site's name inside its layer
            if method == "lora":
                r = options["r"]
                tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"] = rand(r, in_f), rand(out_f, r)
            elif method == "bitfit":
                tensors[f"{site}.bias_delta"] = rand(out_f)
            elif method == "adapter":
                placement = options.get("placement", "houlsby")
                if within not in {"houlsby": ("attention.output.dense", "output.dense"),
                                  "pfeiffer": ("output.dense",)}[placement]:
                    continue
                m = options["bottleneck"]
                tensors.update({f"{site}.adapter_down": rand(m, out_f), f"{site}.adapter_down_bias": rand(m),
                                f"{site}.adapter_up": rand(out_f, m), f"{site}.adapter_up_bias": rand(out_f)})
            elif method == "ia3":
                if not targets and within not in ("attention.self.key", "attention.self.value", "output.dense"):
                    continue  # PEFT's default IA3 targets for BERT
                tensors[f"{site}.ia3_l"] = rand(in_f if within == "output.dense" else out_f)
            elif method == "maskbert":
                tensors[f"{site}.mask_index"] = positions(out_f, in_f, options.get("density", 0.05))
            elif method == "diff_pruning":
                index = positions(out_f, in_f, options.get("density", 0.05))
                tensors[f"{site}.diff_index"], tensors[f"{site}.diff_value"] = index, rand(len(index))
                tensors[f"{site}.diff_bias"] = rand(out_f)
            else:
                raise ValueError(f"random_task does not know PET method {method!r}")
    return TaskSpec(name, labels, copy.deepcopy(pet), tensors)
