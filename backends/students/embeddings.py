"""The backbone's embedding layer, shared by every student (and by the serving encoder) by reference.

Why share rather than give each student its own: the word table is 30522 x 384 (11.7 M parameters, 47 MB in fp32)
for all-MiniLM-L6-v2, over 3x a whole 2-layer student (3.6 M); shared, K students cost no embedding memory beyond
what the serving backbone already holds, and the embeddings are computed once per batch for all students. The
distillation keeps them frozen (see perf/results/students-accuracy-*.md for the measured effect on accuracy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedEmbeddings(nn.Module):
    """`LayerNorm(word[ids] + position[:T] + token_type[0])`, exactly as `chorus.backends.encoder.Encoder` computes."""

    def __init__(self, word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
                 norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float):
        super().__init__()
        # Plain attributes, not registered parameters: the tables belong to the backbone, so a student group's
        # state_dict / .to() never copies or saves them.
        self.word, self.position, self.token_type = word, position, token_type
        self.norm_weight, self.norm_bias, self.eps = norm_weight, norm_bias, eps

    @classmethod
    def from_encoder(cls, encoder) -> SharedEmbeddings:
        """Share (not copy) a `chorus.backends.encoder.Encoder`'s embedding parameters."""
        return cls(encoder.word_embeddings.weight, encoder.position_embeddings.weight,
                   encoder.token_type_embeddings.weight, encoder.embeddings_norm.weight, encoder.embeddings_norm.bias,
                   encoder.cfg.layer_norm_eps)

    @classmethod
    def from_hf_state(cls, state: dict[str, torch.Tensor], eps: float) -> SharedEmbeddings:
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        return cls(*(state[f"embeddings.{n}"] for n in ("word_embeddings.weight", "position_embeddings.weight",
                                                        "token_type_embeddings.weight", "LayerNorm.weight",
                                                        "LayerNorm.bias")), eps)

    @property
    def hidden_size(self) -> int:
        return self.word.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.word.shape[0]

    def fingerprint(self) -> list[float]:
        """A cheap identity of the tables (sums in float64), stored with students to catch a wrong backbone."""
        return [float(t.detach().double().sum()) for t in (self.word, self.position, self.norm_weight)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, C)."""
        T = input_ids.shape[1]
        x = F.embedding(input_ids, self.word) + self.position[:T] + self.token_type[0]
        return F.layer_norm(x, self.norm_weight.shape, self.norm_weight, self.norm_bias, self.eps)  # static (ONNX)
