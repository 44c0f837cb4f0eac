"""The plain per-task reference: merge one task's PET into the backbone weights and run Hugging Face's own BertModel.

Independent of chorus's encoder and bank, so tests that compare the two check the fast mixed-batch path end to end.
Weight-space methods are merged (LoRA, BitFit, IA3 — rows or columns of W scaled —, MaskBERT, Diff-Pruning), and a
task's LayerNorms replace the backbone's; adapters cannot be merged and run as forward hooks on the Hugging Face output
linears, one plain bottleneck MLP per site. `layer_norm_rows` is the plain form of one per-task LayerNorm op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chorus.backends.encoder import EncoderConfig
from chorus.backends.task_bank import TaskSpec

FEED_FORWARD_OUTPUT = "output.dense"  # IA3 scales this linear's input; everywhere else its output


def _layer_site(site: str) -> str:
    return site.split(".", 3)[3]


def merged_state(backbone: dict[str, torch.Tensor], spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Backbone state dict (Hugging Face names) with the task's weight-space PET folded into each linear."""
    state = {k.removeprefix("bert."): v.detach().float().clone() for k, v in backbone.items()}
    lora = spec.pet.get("lora")
    for key, t in spec.tensors.items():
        site, _, name = key.rpartition(".")
        if name == "lora_A":
            scaling = lora.get("alpha", lora["r"]) / lora["r"]
            state[f"{site}.weight"] += scaling * spec.tensors[f"{site}.lora_B"] @ t
        elif name == "bias_delta":
            state[f"{site}.bias"] += t
        elif name == "mask_index":  # pruned positions (those with score < 0 when scores are given)
            scores = spec.tensors.get(f"{site}.mask_score")
            pruned = t.long() if scores is None else t.long()[scores < 0]
            state[f"{site}.weight"].view(-1)[pruned] = 0.0
        elif name == "diff_index":
            state[f"{site}.weight"].view(-1)[t.long()] += spec.tensors[f"{site}.diff_value"]
        elif name == "diff_bias":
            state[f"{site}.bias"] += t
        elif name in ("weight", "bias") and site.endswith(".LayerNorm"):  # the task's own LayerNorm at that site
            state[key] = t.detach().float().clone()
    for key, t in spec.tensors.items():  # IA3 last: it scales the linear, deltas included (its op runs after theirs)
        site, _, name = key.rpartition(".")
        if name == "ia3_l":
            if _layer_site(site) == FEED_FORWARD_OUTPUT:
                state[f"{site}.weight"] *= (1 + t)[None, :]
            else:
                state[f"{site}.weight"] *= (1 + t)[:, None]
                state[f"{site}.bias"] *= 1 + t
    return state


def layer_norm_rows(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                    eps: float) -> torch.Tensor:
    """Row by row, `F.layer_norm(x[r], weight=weights[r], bias=biases[r])` in float64: x (B, T, C) -> float64."""
    C = x.shape[-1]
    return torch.stack([F.layer_norm(x[r].double(), (C,), weights[r].double(), biases[r].double(), eps)
                        for r in range(len(x))])


def _adapter_hook(spec: TaskSpec, site: str):
    t = {n: spec.tensors[f"{site}.{n}"] for n in ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")}
    act = {"relu": F.relu, "gelu": F.gelu}[spec.pet["adapter"].get("activation", "relu")]

    def hook(module, inputs, y):  # after the output linear, before its residual + LayerNorm
        return y + act(y @ t["adapter_down"].T + t["adapter_down_bias"]) @ t["adapter_up"].T + t["adapter_up_bias"]

    return hook


@torch.no_grad()
def reference_logits(cfg: EncoderConfig, backbone: dict[str, torch.Tensor], spec: TaskSpec,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One task's logits (B, num_labels) through transformers.BertModel with merged weights and mean pooling."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**cfg.to_hf()), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(merged_state(backbone, spec), strict=False)
    assert not [m for m in missing if "position_ids" not in m], f"reference model lacks {missing}"
    model.eval()
    adapter_sites = {k.rpartition(".")[0] for k in spec.tensors if k.endswith(".adapter_down")}
    hooks = [model.get_submodule(site).register_forward_hook(_adapter_hook(spec, site)) for site in adapter_sites]
    try:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
    finally:
        for h in hooks:
            h.remove()
    w = attention_mask.unsqueeze(-1).float()
    pooled = (hidden * w).sum(1) / w.sum(1)
    return pooled @ spec.tensors["classifier.weight"].T + spec.tensors["classifier.bias"]
