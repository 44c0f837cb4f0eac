"""Plain students: one nn.Module per student, run one after another. Training uses these; `StudentGroup` (the fused
path) is tested against `ReferenceStudentGroup`.

Attention is written out (softmax of scaled scores), not `scaled_dot_product_attention`, so the comparison also
checks the fused path's use of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from chorus.backends.students.config import StudentConfig
from chorus.backends.students.embeddings import SharedEmbeddings

# A student layer's modules and the Hugging Face BertLayer module each starts from (see `Student.init_layer_from`).
HF_LAYER_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 -> (B, 1, 1, T): 0 where kept, the dtype's minimum where padded (broadcast over heads, queries)."""
    B, T = attention_mask.shape
    mask = torch.zeros(B, 1, 1, T, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill_(~attention_mask.bool()[:, None, None, :], torch.finfo(dtype).min)


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """h (..., B, T, C), mask (B, T) -> (..., B, C): the mean over real tokens, as all-MiniLM-L6-v2 pools."""
    w = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * w).sum(-2) / w.sum(-2).clamp(min=1.0)


class StudentLayer(nn.Module):
    """One post-LayerNorm BERT layer of plain nn.Linear / nn.LayerNorm."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value, self.attention_output = (nn.Linear(C, C) for _ in range(4))
        self.attention_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(C, I)
        self.output = nn.Linear(I, C)
        self.output_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), mask (B, 1, 1, T) additive -> (B, T, C)."""
        B, T, C = x.shape
        H, d = self.num_heads, C // self.num_heads
        q, k, v = (lin(x).view(B, T, H, d).transpose(1, 2) for lin in (self.query, self.key, self.value))  # (B,H,T,d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask  # (B, H, T, T)
        a = (self.dropout(scores.softmax(-1)) @ v).transpose(1, 2).reshape(B, T, C)
        x = self.attention_norm(x + self.dropout(self.attention_output(a)))
        f = self.output(F.gelu(self.intermediate(x)))
        return self.output_norm(x + self.dropout(f))


class Student(nn.Module):
    """`num_layers` BERT layers over the shared embeddings, mean pooling, a linear head: logits (B, num_labels)."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(StudentLayer(cfg) for _ in range(cfg.num_layers))
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: embeddings (B, T, C); attention_mask (B, T) -> (logits (B, L), each layer's output (B, T, C))."""
        mask = additive_mask(attention_mask, x.dtype)
        hidden = []
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        return self.classifier(mean_pool(x, attention_mask)), hidden

    @torch.no_grad()
    def init_layer_from(self, index: int, hf_state: dict[str, torch.Tensor], teacher_layer: int) -> None:
        """Copy Hugging Face BertModel layer `teacher_layer` (from a state dict) into this student's layer `index`."""
        layer = self.layers[index]
        for attr, hf in HF_LAYER_MODULES.items():
            module = getattr(layer, attr)
            for p in ("weight", "bias"):
                src = hf_state[f"encoder.layer.{teacher_layer}.{hf}.{p}"]
                if src.shape != getattr(module, p).shape:
                    raise ValueError(f"teacher encoder.layer.{teacher_layer}.{hf}.{p} has shape {tuple(src.shape)}, "
                                     f"student layer {index} {attr}.{p} expects {tuple(getattr(module, p).shape)}")
                getattr(module, p).copy_(src)


def stack_students(students: list[Student]) -> dict[str, torch.Tensor]:
    """Students' state dicts -> one dict of (K, ...) tensors under the same names (the file format's tensors)."""
    if not students:
        raise ValueError("stack_students needs at least one student")
    states = [s.state_dict() for s in students]
    return {name: torch.stack([st[name].detach() for st in states]) for name in states[0]}


def unstack_students(cfg: StudentConfig, tensors: dict[str, torch.Tensor]) -> list[Student]:
    """(K, ...) tensors -> K `Student` modules (in eval mode)."""
    K = next(iter(tensors.values())).shape[0]
    students = []
    for k in range(K):
        s = Student(cfg)
        s.load_state_dict({name: t[k] for name, t in tensors.items()})
        students.append(s.to(next(iter(tensors.values())).dtype).eval())
    return students


class ReferenceStudentGroup(nn.Module):
    """The boosting ensemble, one student at a time: `Σ_{j<k} α_j·S_j(x)`."""

    def __init__(self, embeddings: SharedEmbeddings, students: list[Student], boosting_weights: torch.Tensor):
        super().__init__()
        if len(students) != len(boosting_weights):
            raise ValueError(f"{len(students)} students but {len(boosting_weights)} boosting weights")
        self.embeddings = embeddings
        self.students = nn.ModuleList(students)
        self.register_buffer("boosting_weights", boosting_weights.detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
        k = len(self.students) if k is None else k
        x = self.embeddings(input_ids)
        out = 0
        for j in range(k):
            out = out + self.boosting_weights[j] * self.students[j](x, attention_mask)[0]
        return out
