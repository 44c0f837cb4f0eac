"""AdapterHub `adapters` bottleneck adapters (`model.save_adapter`): `adapter_config.json` + `adapter.safetensors`
or `pytorch_adapter.bin` (read with `torch.load(weights_only=True)` only).

Implemented from the format (the `adapters` package, 1.3.0, needs transformers 4.57, not chorus's 5.x). Keys look like
`[bert.]encoder.layer.N.{attention.output|output}.adapters.NAME.{adapter_down.0|adapter_up}.{weight|bias}`; the
config's `"config"` is the adapter's `BnConfig` (or a name such as "double_seq_bn").

AdapterHub's bottleneck layer after a BERT sublayer whose output linear gives `h` and whose input was `x`:
`original_ln_before=False` (Houlsby, `double_seq_bn`): `LN(h + s·up(act(down(h))) + x)` — exactly chorus's `adapter`
op (`y + up(act(down(y)))` before the residual + LayerNorm), with the scaling `s` folded into `up`.
`original_ln_before=True` (Pfeiffer, `seq_bn`, AdapterHub's default): `LN(h + s·up(act(down(LN(h + x)))) + x)` — the
adapter reads the LayerNorm'd sum, which chorus's op (given only `h`) cannot compute: refused, saying so.

| AdapterHub | chorus |
| --- | --- |
| `mh_adapter` + `output_adapter`, `original_ln_before=False` (`double_seq_bn`, "houlsby") | `adapter`, placement houlsby |
| `output_adapter` only, `original_ln_before=False` | `adapter`, placement pfeiffer (one site after the FFN) |
| `non_linearity` relu, gelu (exact) | activation relu, gelu; `swish`/`silu` only once chorus's adapter op has it |
| `scaling` (a number, or "learned"/"channel" tensors) | folded into `adapter_up` and its bias |

Refused by name: `original_ln_before=True` (Pfeiffer/`seq_bn` as AdapterHub defines it), `original_ln_after=False`,
`ln_before`/`ln_after`, gating, parallel adapters, PHM layers (Compacter), invertible adapters, cross adapters,
bottleneck sizes that differ between layers, attention-only adapters, and non-bottleneck architectures (LoRA, prefix
tuning, …: use PEFT's files for LoRA/IA3). AdapterHub prediction heads read the [CLS] token: see
`chorus.backends.formats.head` for the head.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from chorus.backends.formats.files import check_against_backbone, read_adapter_dir, read_tensors
from chorus.backends.formats.head import TaskHead, resolve_head
from chorus.backends.pet.adapter import ACTIVATIONS
from chorus.backends.task_bank import TaskSpec, check_task_name
from chorus.errors import TaskFileError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG = "head_config.json"
KEY = re.compile(r"^(?:[A-Za-z_]\w*\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<where>attention\.output|output)\.adapters\."
                 r"(?P<name>[^.]+)\.(?P<tensor>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|"
                 r"adapter_up\.bias|scaling)$")
SITES = {"attention.output": "attention.output.dense", "output": "output.dense"}
TENSORS = {"adapter_down.0.weight": "adapter_down", "adapter_down.0.bias": "adapter_down_bias",
           "adapter_up.weight": "adapter_up", "adapter_up.bias": "adapter_up_bias"}

# BnConfig's defaults, and the named configs' required fields (adapters 1.3.0 `configuration/adapter_config.py`).
BN_DEFAULTS = {"original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
               "is_parallel": False, "scaling": 1.0, "use_gating": False, "residual_before_ln": True,
               "adapter_residual_before_ln": False, "inv_adapter": None, "cross_adapter": False, "phm_layer": False}
NAMED = {
    "seq_bn": {"original_ln_before": True, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu"},
    "double_seq_bn": {"original_ln_before": False, "mh_adapter": True, "output_adapter": True,
                      "non_linearity": "swish"},
}
NAMED["pfeiffer"], NAMED["houlsby"] = NAMED["seq_bn"], NAMED["double_seq_bn"]
# Options that change nothing at inference (initialisation, dropout, which layers), or only matter with options refused
IGNORED = {"architecture", "mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "init_weights",
           "init_weights_seed", "leave_out", "dropout", "stochastic_depth", "residual_before_ln",
           "inv_adapter_reduction_factor", "phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule",
           "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm", "hypercomplex_nonlinearity",
           "phm_rank", "phm_bias", "adapter_residual_before_ln"}
REFUSED = {  # option -> (the value chorus serves, why another value cannot be served)
    "original_ln_after": (True, "the sublayer's own residual + LayerNorm after the adapter is what chorus keeps"),
    "ln_before": (False, "it adds a LayerNorm before the bottleneck"),
    "ln_after": (False, "it adds a LayerNorm after the bottleneck"),
    "is_parallel": (False, "parallel adapters read the sublayer's input, not its output"),
    "use_gating": (False, "gated adapters scale by a learned sigmoid gate"),
    "phm_layer": (False, "PHM (Compacter) layers are not plain linears"),
    "inv_adapter": (None, "invertible adapters change the embeddings"),
    "invertible_adapter": (None, "invertible adapters change the embeddings"),
    "cross_adapter": (False, "cross-attention adapters are for encoder-decoders"),
}
ACTIVATION_NAMES = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "swish": "silu", "silu": "silu"}


def _fits_float(x: int | float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _options(meta: dict, file: Path, task: str) -> tuple[str, str, float | str]:
    """(placement, chorus activation, scaling) from the file's adapter config, refusing what chorus cannot serve."""
    cfg = meta.get("config")
    if isinstance(cfg, str):
        if cfg not in NAMED:
            raise TaskFileError(f"task {task!r}: {file} names adapter config {cfg!r}; chorus knows {sorted(NAMED)}")
        cfg = NAMED[cfg]
    if not isinstance(cfg, dict):
        raise TaskFileError(f"task {task!r}: {file} needs \"config\": the adapter's config object")
    if cfg.get("architecture") not in (None, "bottleneck"):
        raise TaskFileError(f"task {task!r}: {file} holds an AdapterHub {cfg['architecture']!r} adapter; chorus loads "
                            "AdapterHub's bottleneck adapters (for LoRA/IA3, save with PEFT)")
    cfg = {**BN_DEFAULTS, **cfg}
    for key, (want, why) in REFUSED.items():
        if key in cfg and cfg[key] != want and not (want is None and not cfg[key]):
            raise TaskFileError(f"task {task!r}: {file} sets {key}={cfg[key]!r}, which chorus cannot serve: {why}")
    if cfg["original_ln_before"]:
        raise TaskFileError(
            f"task {task!r}: {file} sets original_ln_before=True (AdapterHub's Pfeiffer/seq_bn): its adapter reads "
            "LayerNorm(h + residual) of the sublayer, which chorus's adapter op (after the output linear, before the "
            "residual + LayerNorm) cannot compute. Train with original_ln_before=False (e.g. "
            "SeqBnConfig(original_ln_before=False)) or a double_seq_bn (Houlsby) adapter")
    unknown = sorted(k for k in cfg if k not in IGNORED | set(REFUSED) | {"original_ln_before", "scaling"}
                     and cfg[k] not in (None, False, [], {}))
    if unknown:
        raise TaskFileError(f"task {task!r}: {file} sets {unknown}, options chorus does not know for bottleneck "
                            "adapters, so it cannot tell whether they would compute the same here")
    mh, out = cfg.get("mh_adapter"), cfg.get("output_adapter")
    if not out:
        raise TaskFileError(f"task {task!r}: {file} has output_adapter={out!r}: chorus places adapters after the "
                            "feed-forward (pfeiffer) or after attention and feed-forward (houlsby), not "
                            f"{'after attention only' if mh else 'nowhere'}")
    act = str(cfg.get("non_linearity", "")).lower()
    chorus_act = ACTIVATION_NAMES.get(act)
    if chorus_act not in ACTIVATIONS:
        served = sorted(k for k, v in ACTIVATION_NAMES.items() if v in ACTIVATIONS)
        raise TaskFileError(f"task {task!r}: {file} uses non_linearity {act!r}; chorus's adapters run "
                            f"{sorted(ACTIVATIONS)} (AdapterHub names: {served})")
    scaling = cfg["scaling"]
    number = isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
    if (not number and scaling not in ("learned", "channel")) or (number and not _fits_float(scaling)):
        raise TaskFileError(f"task {task!r}: {file} sets scaling={cfg['scaling']!r}; expected a number, "
                            "'learned' or 'channel'")
    return ("houlsby" if mh else "pfeiffer"), chorus_act, cfg["scaling"]


def load_adapterhub(path: str | Path, name: str, head: TaskHead | None = None,
                    sites: dict[str, tuple[int, int]] | None = None) -> TaskSpec:
    """An AdapterHub bottleneck adapter directory as a chorus `adapter` task (head: `chorus.backends.formats.head`)."""
    check_task_name(name)
    path = Path(path)
    cfg_file, meta, weights = read_adapter_dir(path, name, CONFIG, WEIGHTS)
    placement, activation, scaling = _options(meta, cfg_file, name)

    adapter_name = meta.get("name")
    by_site: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in read_tensors(weights, name).items():
        m = KEY.match(key)
        if m is None:
            raise TaskFileError(f"task {name!r}: {weights} tensor {key!r} is not a bottleneck adapter tensor chorus "
                                "knows (…encoder.layer.N.{attention.output|output}.adapters.NAME."
                                "{adapter_down.0|adapter_up}.{weight|bias})")
        if adapter_name is not None and m.group("name") != adapter_name:
            raise TaskFileError(f"task {name!r}: {weights} tensor {key!r} belongs to adapter {m.group('name')!r}, "
                                f"but {cfg_file} is adapter {adapter_name!r}")
        adapter_name = m.group("name")
        if placement == "pfeiffer" and m.group("where") == "attention.output":
            raise TaskFileError(f"task {name!r}: {weights} tensor {key!r} sits after attention, but {cfg_file} has "
                                "mh_adapter=false")
        site = f"encoder.layer.{m.group('layer')}.{SITES[m.group('where')]}"
        by_site.setdefault(site, {})[m.group("tensor")] = (key, t)
    if not by_site:
        raise TaskFileError(f"task {name!r}: {weights} holds no adapter tensors")

    tensors, origin, bottlenecks = {}, {}, {}
    for site, group in sorted(by_site.items()):
        missing = sorted(set(TENSORS) - set(group))
        if missing:
            raise TaskFileError(f"task {name!r}: {weights} has {sorted(k for k, _ in group.values())} for {site} but "
                                f"lacks its {missing}")
        (kd, down), (_, down_b), (ku, up), (_, up_b) = (group[k] for k in TENSORS)
        if down.dim() != 2:
            raise TaskFileError(f"task {name!r}: {weights} tensor {kd!r} has shape {tuple(down.shape)}, expected "
                                "(bottleneck, hidden)")
        m = down.shape[0]
        shapes = {"adapter_down.0.weight": (m, down.shape[-1]), "adapter_down.0.bias": (m,),
                  "adapter_up.weight": (down.shape[-1], m), "adapter_up.bias": (down.shape[-1],)}
        for tensor, (key, t) in group.items():
            if tensor in shapes and tuple(t.shape) != shapes[tensor]:
                raise TaskFileError(f"task {name!r}: {weights} tensor {key!r} has shape {tuple(t.shape)}, expected "
                                    f"{shapes[tensor]} for a bottleneck of {m} over {down.shape[-1]} features "
                                    f"({kd!r} is {tuple(down.shape)})")
        s = group["scaling"][1] if "scaling" in group else torch.tensor(float(scaling))
        if scaling in ("learned", "channel") and "scaling" not in group:
            raise TaskFileError(f"task {name!r}: {weights} lacks the {scaling} scaling tensor of {site}")
        if s.numel() not in (1, up.shape[0]):
            raise TaskFileError(f"task {name!r}: {weights} tensor {group['scaling'][0]!r} has shape "
                                f"{tuple(s.shape)}, expected (1,) or ({up.shape[0]},)")
        s = s.reshape(-1)
        for tensor, value in (("adapter_down", down), ("adapter_down_bias", down_b),
                              ("adapter_up", up * s[:, None]), ("adapter_up_bias", up_b * s)):
            tensors[f"{site}.{tensor}"] = value
            origin[f"{site}.{tensor}"] = group[{v: k for k, v in TENSORS.items()}[tensor]][0]
        bottlenecks[site] = m
    if len(set(bottlenecks.values())) > 1:
        raise TaskFileError(f"task {name!r}: {weights} has bottleneck sizes {sorted(set(bottlenecks.values()))} "
                            "across layers (a reduction_factor mapping); a chorus task has one bottleneck")
    check_against_backbone(origin, tensors, sites, weights, name)
    hidden = sites["encoder.layer.0.attention.self.query"][0] if sites else None
    if (path / HEAD_CONFIG).is_file() and head is None and not (path / "chorus_head.json").is_file():
        raise TaskFileError(f"task {name!r}: {path / HEAD_CONFIG} is an AdapterHub prediction head, which reads the "
                            "[CLS] token through its own layers; chorus's heads read mean-pooled tokens. Give a head "
                            "trained on mean-pooled tokens: chorus.backends.formats.write_head (chorus_head.json + "
                            "chorus_head.safetensors beside the adapter) or head=TaskHead(...)")
    # AdapterHub keeps heads out of the adapter's weights file: the head comes from chorus_head.* or `head`
    labels, head_tensors = resolve_head(path, name, head, {}, weights, "the [CLS] token", hidden)
    options = {"bottleneck": next(iter(bottlenecks.values())), "activation": activation, "placement": placement}
    meta_out = {"source": {"format": "adapterhub", "path": str(path), "adapter": adapter_name,
                           "version": meta.get("version"), "model_name": meta.get("model_name")}}
    return TaskSpec(name, labels, {"adapter": options}, {**head_tensors, **tensors}, meta_out)
