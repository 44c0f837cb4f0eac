"""Hugging Face PEFT checkpoints (`save_pretrained`): `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).

| PEFT | chorus | how |
| --- | --- | --- |
| LoRA `…encoder.layer.N.<linear>.lora_A.weight` (r, in) / `lora_B.weight` (out, r) | `lora` `lora_A` / `lora_B` | as is; `r`, `lora_alpha` from the config, `use_rslora` (scaling α/√r) as chorus `alpha = lora_alpha·√r`; `rank_pattern`/`alpha_pattern`: ranks zero-padded to the largest and each site's scaling folded into `lora_B` |
| IA3 `…<linear>.ia3_l` (out, 1) scales the output, (1, in) the input (`feedforward_modules`) | `ia3` `ia3_l` (l − 1) | output scaling anywhere but `output.dense`; input scaling at `output.dense` only (chorus's IA3 sites) |
| LN tuning (`LN_TUNING`) `…<LayerNorm>.ln_tuning_layers.weight` / `.bias` (hidden,) | `layer_norm` `{site}.weight` / `.bias` | as is (the tuned values); the encoder's LayerNorms only (`embeddings.LayerNorm`, `encoder.layer.N.{attention.output,output}.LayerNorm`) |
| `modules_to_save` `classifier.weight`/`.bias` | head | only with `chorus_head.json` (see `chorus.backends.formats.head`) |

Refused by name: DoRA (`use_dora`), `lora_bias`, `bias != "none"` (trained base biases), PiSSA/OLoRA/CorDA/LoftQ
initialisations (they change the base weights), layer replication, `target_parameters`, trainable tokens, aLoRA,
LoRA on anything but the encoder's linears (embeddings, pooler), other `modules_to_save`, other PEFT methods, and any
option chorus does not know set to a non-default value. PEFT's default IA3 targets for BERT are refused too: its
`feedforward_modules=["output.dense"]` also matches `attention.output.dense`, whose input PEFT scales but chorus's IA3
scales that linear's output. LN tuning of anything but a LayerNorm (PEFT trains a copy of whatever module it targets:
of a linear, that is a full fine-tune of it) is refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from chorus.backends.formats.files import check_against_backbone, check_site, read_adapter_dir, read_tensors
from chorus.backends.formats.head import TaskHead, resolve_head
from chorus.backends.pet.base import layer_site
from chorus.backends.task_bank import TaskSpec, check_task_name
from chorus.errors import TaskFileError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
PET_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<lora>lora_A|lora_B)\.weight|(?P<ia3>ia3_l)|"
                     r"ln_tuning_layers\.(?P<ln>weight|bias))$")
NORM_MODULE = re.compile(r"^(?:[A-Za-z_]\w*\.)?(?P<site>embeddings\.LayerNorm|"
                         r"encoder\.layer\.\d+\.(?:attention\.output|output)\.LayerNorm)$")
# per PEFT type: the tensor kinds its file holds (PET_KEY's group) and what their keys look like, for messages
KINDS = {"LORA": (("lora_A", "lora_B"), "…encoder.layer.N.<linear>.lora_A.weight"),
         "IA3": (("ia3_l",), "…encoder.layer.N.<linear>.ia3_l"),
         "LN_TUNING": (("weight", "bias"), "…<LayerNorm>.ln_tuning_layers.weight / .bias")}

# Options that do not change what a trained adapter computes (bookkeeping, dropout, which modules were targeted —
# the tensors say that —, initialisations of A/B only).
COMMON_OPTIONS = {"auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "task_type", "peft_version",
                  "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
                  "modules_to_save"}
LORA_OPTIONS = COMMON_OPTIONS | {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                                 "init_lora_weights", "lora_dropout", "loftq_config", "eva_config", "corda_config",
                                 "megatron_core", "qalora_group_size", "ensure_weight_tying"}
IA3_OPTIONS = COMMON_OPTIONS | {"feedforward_modules", "init_ia3_weights"}
OPTIONS = {"LORA": LORA_OPTIONS, "IA3": IA3_OPTIONS, "LN_TUNING": COMMON_OPTIONS}
UNSUPPORTED = {  # option -> why chorus cannot serve it (refused when set to anything truthy)
    "use_dora": "DoRA rescales every adapted weight's columns by a learned magnitude (lora_magnitude_vector); "
                "chorus's LoRA is a plain low-rank delta",
    "lora_bias": "it trains a bias on lora_B, which chorus's LoRA does not have",
    "layer_replication": "it duplicates backbone layers",
    "target_parameters": "it adapts raw nn.Parameters, not the encoder's linears",
    "trainable_token_indices": "it trains rows of the embedding matrix",
    "alora_invocation_tokens": "activated LoRA switches on after given tokens",
    "use_qalora": "QA-LoRA pools the input into groups",
    "megatron_config": "it targets Megatron's parallel linears",
}
A_B_ONLY_INITS = (True, False, "gaussian", "eva", "orthogonal")  # PiSSA, OLoRA, CorDA, LoftQ also change base weights


def _check_options(cfg: dict, known: set[str], file: Path, task: str) -> None:
    for key, value in cfg.items():
        if key in UNSUPPORTED and value:
            raise TaskFileError(f"task {task!r}: {file} sets {key}={value!r}, which chorus cannot serve: "
                                f"{UNSUPPORTED[key]}")
        if key not in known and key not in UNSUPPORTED and key != "peft_type" and value not in (None, False, {}, []):
            raise TaskFileError(f"task {task!r}: {file} sets {key}={value!r}, an option chorus does not know, so it "
                                f"cannot tell whether the adapter would compute the same here; it reads "
                                f"{sorted(known)}")


def _finite(x) -> bool:
    """A JSON number (not a bool) that fits a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _pattern_value(pattern: dict, module: str, default, file: Path, task: str):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup (`peft.utils.other.get_pattern_key`): first key matching the
    module path's end."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise TaskFileError(f"task {task!r}: {file} pattern {key!r} is not a regular expression: {e}") from None
    return default


def _site_of(module: str, key: str, file: Path, task: str) -> str:
    """`bert.encoder.layer.0.attention.self.query` -> `encoder.layer.0.attention.self.query`."""
    at = module.find("encoder.layer.")
    prefix = module[:at] if at >= 0 else module
    if at < 0 or (prefix and not re.fullmatch(r"[A-Za-z_]\w*\.", prefix)):
        raise TaskFileError(f"task {task!r}: {file} tensor {key!r} adapts {module!r}; chorus adapts only the "
                            "encoder's linears (encoder.layer.N.…), not embeddings, the pooler or heads")
    return check_site(module[at:], key, file, task)


def _norm_site_of(module: str, key: str, file: Path, task: str) -> str:
    """`bert.encoder.layer.0.output.LayerNorm` -> `encoder.layer.0.output.LayerNorm`; LN tuning of anything else is
    refused."""
    m = NORM_MODULE.match(module)
    if m is None:
        raise TaskFileError(f"task {task!r}: {file} tensor {key!r} is PEFT's LN tuning of {module!r}, which is not "
                            "one of the encoder's LayerNorms (embeddings.LayerNorm, encoder.layer.N.attention.output."
                            "LayerNorm, encoder.layer.N.output.LayerNorm): PEFT then trains a whole copy of that "
                            "module, which chorus does not serve (target_modules=['LayerNorm'] keeps to them)")
    return m.group("site")


def load_peft(path: str | Path, name: str, head: TaskHead | None = None,
              sites: dict[str, tuple[int, int]] | None = None) -> TaskSpec:
    """A PEFT LoRA, IA3 or LN tuning checkpoint directory as a chorus task (its head: `chorus.backends.formats.head`).

    `sites`: the backbone's linears (site -> (out, in), `EncoderConfig.linear_sites()`), to check shapes here and name
    the file's tensors in errors; without it the bank checks them when the task is added.
    """
    check_task_name(name)
    path = Path(path)
    cfg_file, cfg, weights = read_adapter_dir(path, name, CONFIG, WEIGHTS)
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in KINDS:
        raise TaskFileError(f"task {name!r}: {cfg_file} has peft_type {peft_type!r}; chorus loads PEFT's LORA, IA3 "
                            "and LN_TUNING checkpoints (for bottleneck adapters, AdapterHub's format)")
    _check_options(cfg, OPTIONS[peft_type], cfg_file, name)
    kinds, form = KINDS[peft_type]

    pet_tensors: dict[str, tuple[str, str, torch.Tensor]] = {}  # file key -> (site, tensor name, tensor)
    classifier: dict[str, torch.Tensor] = {}
    for key, t in read_tensors(weights, name).items():
        inner = key.removeprefix(PREFIX)
        if inner in ("classifier.weight", "classifier.bias"):
            classifier[inner] = t
            continue
        m = PET_KEY.match(inner)
        kind = m and (m.group("lora") or m.group("ia3") or m.group("ln"))
        if kind not in kinds:
            raise TaskFileError(f"task {name!r}: {weights} tensor {key!r} is not a {peft_type} tensor chorus knows "
                                f"({form}) nor the classifier (modules_to_save=['classifier'])")
        site_of = _norm_site_of if peft_type == "LN_TUNING" else _site_of
        pet_tensors[key] = (site_of(m.group("module"), key, weights, name), kind, t)
    if not pet_tensors:
        raise TaskFileError(f"task {name!r}: {weights} holds no {peft_type} tensors")

    if peft_type == "LORA":
        options, tensors, origin = _lora(cfg, pet_tensors, cfg_file, weights, name)
        method = "lora"
    elif peft_type == "IA3":
        options, tensors, origin = _ia3(pet_tensors, weights, name)
        method = "ia3"
    else:
        options, tensors, origin = _ln_tuning(pet_tensors, weights, name)
        method = "layer_norm"
    check_against_backbone(origin, tensors, sites, weights, name)

    hidden = sites["encoder.layer.0.attention.self.query"][0] if sites else None
    reads = ("BERT's pooler output ([CLS] -> dense -> tanh), as BertForSequenceClassification does"
             if cfg.get("task_type") == "SEQ_CLS" else "whatever its model fed it")
    labels, head_tensors = resolve_head(path, name, head, classifier, weights, reads, hidden)
    meta = {"source": {"format": "peft", "path": str(path), "peft_type": peft_type,
                       "base_model": cfg.get("base_model_name_or_path"), "peft_version": cfg.get("peft_version")}}
    return TaskSpec(name, labels, {method: options}, {**head_tensors, **tensors}, meta)


def _lora(cfg, pet_tensors, cfg_file, weights, task):
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not _finite(alpha):
        raise TaskFileError(f"task {task!r}: {cfg_file} needs an integer r >= 1 and a number lora_alpha, got "
                            f"r={r!r}, lora_alpha={alpha!r}")
    if cfg.get("bias", "none") != "none":
        raise TaskFileError(f"task {task!r}: {cfg_file} sets bias={cfg['bias']!r}: PEFT then saves whole trained "
                            "bias vectors, which chorus could only serve as BitFit deltas against the exact base "
                            "biases; train with bias='none' (or chorus train --pet lora,bitfit)")
    init = cfg.get("init_lora_weights", True)
    if init not in A_B_ONLY_INITS:
        raise TaskFileError(f"task {task!r}: {cfg_file} sets init_lora_weights={init!r}, which also changes the base "
                            "model's weights, so the adapter is not a delta on the shared backbone; convert it to "
                            "plain LoRA first (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for key, pattern, kind in (("rank_pattern", rank_pattern, int), ("alpha_pattern", alpha_pattern, (int, float))):
        if not isinstance(pattern, dict) or not all(isinstance(v, kind) and _finite(v) and v > 0
                                                    for v in pattern.values()):
            raise TaskFileError(f"task {task!r}: {cfg_file} {key} must map module patterns to positive "
                                f"{'integers' if kind is int else 'numbers'}, got {pattern!r:.200}")
    rslora = bool(cfg.get("use_rslora"))

    by_site: dict[str, dict] = {}
    for key, (site, kind, t) in pet_tensors.items():
        by_site.setdefault(site, {"module": key.removeprefix(PREFIX).rsplit(".", 2)[0]})[kind] = (key, t)
    sites = {}
    for site, g in sorted(by_site.items()):
        if "lora_A" not in g or "lora_B" not in g:
            have = [k for k in ("lora_A", "lora_B") if k in g][0]
            raise TaskFileError(f"task {task!r}: {weights} has {g[have][0]!r} but lacks its "
                                f"{'lora_B' if have == 'lora_A' else 'lora_A'} partner")
        (ka, A), (kb, B) = g["lora_A"], g["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise TaskFileError(f"task {task!r}: {weights} tensors {ka!r} {tuple(A.shape)} and {kb!r} "
                                f"{tuple(B.shape)} do not pair as lora_A (r, in) and lora_B (out, r)")
        r_site = A.shape[0]
        want_r = _pattern_value(rank_pattern, g["module"], r, cfg_file, task)
        if r_site != want_r:
            raise TaskFileError(f"task {task!r}: {weights} tensor {ka!r} has shape {tuple(A.shape)}, but {cfg_file} "
                                f"gives this module rank {want_r} (expected ({want_r}, {A.shape[1]}))")
        a_site = _pattern_value(alpha_pattern, g["module"], alpha, cfg_file, task)
        scaling = a_site / (math.sqrt(r_site) if rslora else r_site)
        sites[site] = (A, B, r_site, scaling, ka, kb)

    tensors, origin = {}, {}
    shared = {(s[2], s[3]) for s in sites.values()}
    if len(shared) == 1:  # one rank and scaling: chorus's options say it (rsLoRA: alpha = lora_alpha·√r)
        (rank, scaling), = shared
        options = {"r": rank, "alpha": alpha if not rslora and not alpha_pattern else scaling * rank}
    else:  # per-site ranks/scalings: pad to the largest rank, fold each site's scaling into B, scaling 1
        rank = max(s[2] for s in sites.values())
        options = {"r": rank, "alpha": rank}
    for site, (A, B, r_site, scaling, ka, kb) in sites.items():
        if len(shared) > 1:
            A = torch.nn.functional.pad(A, (0, 0, 0, rank - r_site))
            B = torch.nn.functional.pad(B * scaling, (0, rank - r_site))
        tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"] = A, B
        origin[f"{site}.lora_A"], origin[f"{site}.lora_B"] = ka, kb
    options["target_modules"] = sorted({layer_site(s) for s in sites})
    return options, tensors, origin


def _ia3(pet_tensors, weights, task):
    tensors, origin = {}, {}
    for key, (site, _, t) in pet_tensors.items():
        if t.dim() != 2 or 1 not in t.shape:
            raise TaskFileError(f"task {task!r}: {weights} tensor {key!r} has shape {tuple(t.shape)}; PEFT's ia3_l "
                                "is (out, 1) (scales the output) or (1, in) (scales the input, feedforward_modules)")
        scales_input = t.shape[0] == 1 and t.shape[1] != 1
        chorus_input = layer_site(site) == "output.dense"
        if scales_input != chorus_input:
            raise TaskFileError(
                f"task {task!r}: {weights} tensor {key!r} {tuple(t.shape)} scales the "
                f"{'input' if scales_input else 'output'} of {site}, but chorus's IA3 scales the input of "
                "output.dense (the feed-forward activations) and the output of every other linear. PEFT's default "
                "IA3 for BERT does this at attention.output.dense (feedforward_modules=['output.dense'] matches it "
                "too); train with target_modules / feedforward_modules that keep to chorus's sites, e.g. "
                r"target_modules=r'.*\.(key|value|layer\.\d+\.output\.dense)', "
                r"feedforward_modules=r'.*layer\.\d+\.output\.dense'")
        tensors[f"{site}.ia3_l"] = t.reshape(-1) - 1  # chorus stores l - 1: zeros are the identity
        origin[f"{site}.ia3_l"] = key
    return {"target_modules": sorted({layer_site(k.rpartition('.')[0]) for k in tensors})}, tensors, origin


def _ln_tuning(pet_tensors, weights, task):
    """PEFT keeps the tuned LayerNorm's weight and bias whole: chorus's `layer_norm` files hold them the same way."""
    tensors, origin, by_site = {}, {}, {}
    for key, (site, kind, t) in pet_tensors.items():
        tensors[f"{site}.{kind}"], origin[f"{site}.{kind}"] = t, key
        by_site.setdefault(site, {})[kind] = key
    for site, group in sorted(by_site.items()):
        if len(group) == 1:
            (have, key), = group.items()
            raise TaskFileError(f"task {task!r}: {weights} has {key!r} but lacks the "
                                f"{'bias' if have == 'weight' else 'weight'} of {site}")
    return {"target_modules": sorted({layer_site(s) for s in by_site})}, tensors, origin
