"""Reading other tools' files safely: JSON objects and tensor files (safetensors, or PyTorch pickles through
`torch.load(weights_only=True)` only), every problem a `TaskFileError` that names the file."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from chorus.backends.bundle import float_tensors, read_json_object, read_safetensors
from chorus.backends.encoder import EMBEDDINGS_NORM, LAYER_LINEARS, LAYER_NORMS, norm_sites
from chorus.errors import TaskFileError

LAYER_SITE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
NORM_SITE = re.compile(rf"^(?:{re.escape(EMBEDDINGS_NORM)}|encoder\.layer\.\d+\.(?:"
                       rf"{'|'.join(map(re.escape, LAYER_NORMS))}))$")


def read_json(path: Path, task: str) -> dict:
    return read_json_object(path, f"task {task!r}")


def read_adapter_dir(path: Path, task: str, config: str, weights: tuple[str, ...]) -> tuple[Path, dict, Path]:
    """A PEFT / AdapterHub directory: (its config file, the config, the first weights file that exists)."""
    cfg_file = path / config
    cfg = read_json(cfg_file, task)
    found = next((path / w for w in weights if (path / w).is_file()), None)
    if found is None:
        raise TaskFileError(f"task {task!r}: {path} has {config} but neither of {list(weights)}")
    return cfg_file, cfg, found


def read_tensors(path: Path, task: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or a PyTorch `.bin` state dict read with `weights_only=True` (no code is unpickled), as
    float32 tensors with finite values (`chorus.backends.bundle.float_tensors`)."""
    who = f"task {task!r}"
    if path.suffix == ".safetensors":
        return read_safetensors(path, who)
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise TaskFileError(f"{who}: {path} is not a PyTorch state dict that loads with "
                            f"weights_only=True: {type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict):
        raise TaskFileError(f"{who}: {path} must hold a dict of tensors (a state dict), not a "
                            f"{type(tensors).__name__}")
    return float_tensors(tensors, path, who)


def check_site(site: str, key: str, file: Path, task: str) -> str:
    """`site` (e.g. `encoder.layer.0.attention.self.query`) must be one of chorus's encoder linears."""
    m = LAYER_SITE.match(site)
    if m is None or m.group(2) not in LAYER_LINEARS:
        raise TaskFileError(f"task {task!r}: {file} tensor {key!r} adapts {site!r}, which is not a linear chorus "
                            f"adapts (encoder.layer.N.{{{', '.join(LAYER_LINEARS)}}})")
    return site


def _chorus_shape(site: str, name: str, out_f: int, in_f: int, t: torch.Tensor) -> tuple[int, ...]:
    """The shape chorus's bank needs for tensor `name` at a site of (out_f, in_f); ranks and bottlenecks from `t`."""
    if NORM_SITE.match(site):
        return (out_f,)  # a LayerNorm's weight or bias
    within = LAYER_SITE.match(site).group(2)
    return {"lora_A": lambda: (t.shape[0], in_f), "lora_B": lambda: (out_f, t.shape[-1]),
            "ia3_l": lambda: (in_f,) if within == "output.dense" else (out_f,),
            "adapter_down": lambda: (t.shape[0], out_f), "adapter_down_bias": lambda: (t.shape[0],),
            "adapter_up": lambda: (out_f, t.shape[-1]), "adapter_up_bias": lambda: (out_f,)}[name]()


def check_against_backbone(origin: dict[str, str], tensors: dict[str, torch.Tensor],
                           sites: dict[str, tuple[int, int]] | None, file: Path, task: str) -> None:
    """Every converted PET tensor's values must be finite; with the backbone's `sites` (its linears, site -> (out,
    in)), check its shape too (linears' and LayerNorms'), naming the file and the tensor's key there. `origin`: chorus
    key -> the key in `file` it came from."""
    for key, original in origin.items():
        if not torch.isfinite(tensors[key]).all():  # finite in the file, but not once scaled (e.g. a huge alpha)
            raise TaskFileError(f"task {task!r}: {file} tensor {original!r} overflows to NaN or infinity as chorus's "
                                f"{key.rpartition('.')[2]} (its scaling from the config is too large)")
    if sites is None:
        return
    layers = len(sites) // len(LAYER_LINEARS)
    sites = {**sites, **norm_sites(layers, sites["encoder.layer.0.attention.self.query"][0])}
    for key, original in origin.items():
        t = tensors[key]
        site, _, name = key.rpartition(".")
        if site not in sites:
            raise TaskFileError(f"task {task!r}: {file} tensor {original!r} adapts {site!r}, but the backbone has "
                                f"{layers} layers (encoder.layer.0..{layers - 1})")
        out_f, in_f = sites[site]
        want = _chorus_shape(site, name, out_f, in_f, t)
        what = f"a LayerNorm of {out_f} features" if NORM_SITE.match(site) else f"{out_f} out x {in_f} in"
        if tuple(t.shape) != tuple(want):
            raise TaskFileError(f"task {task!r}: {file} tensor {original!r} (as chorus's {name}: shape "
                                f"{tuple(t.shape)}) does not fit the backbone: {site} is {what}, "
                                f"so chorus needs {tuple(want)}")
