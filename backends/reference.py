"""The plain per-task reference: merge one task's PET into the backbone weights and run Hugging Face's own BertModel.

Independent of chorus's encoder and bank, so tests that compare the two check the fast mixed-batch path end to end.
"""

from __future__ import annotations

import torch

from chorus.backends.encoder import EncoderConfig
from chorus.backends.task_bank import TaskSpec


def merged_state(backbone: dict[str, torch.Tensor], spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Backbone state dict (Hugging Face names) with the task's PET folded into each linear."""
    state = {k.removeprefix("bert."): v.detach().float().clone() for k, v in backbone.items()}
    lora = spec.pet.get("lora")
    for key, t in spec.tensors.items():
        site, _, name = key.rpartition(".")
        if name == "lora_A":
            scaling = lora.get("alpha", lora["r"]) / lora["r"]
            state[f"{site}.weight"] += scaling * spec.tensors[f"{site}.lora_B"] @ t
        elif name == "bias_delta":
            state[f"{site}.bias"] += t
    return state


@torch.no_grad()
def reference_logits(cfg: EncoderConfig, backbone: dict[str, torch.Tensor], spec: TaskSpec,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One task's logits (B, num_labels) through transformers.BertModel with merged weights and mean pooling."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**cfg.to_hf()), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(merged_state(backbone, spec), strict=False)
    assert not [m for m in missing if "position_ids" not in m], f"reference model lacks {missing}"
    model.eval()
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
    w = attention_mask.unsqueeze(-1).float()
    pooled = (hidden * w).sum(1) / w.sum(1)
    return pooled @ spec.tensors["classifier.weight"].T + spec.tensors["classifier.bias"]
