"""The fused inference path: all K students in one computation over stacked (K, ...) weights.

Semantics (what `ReferenceStudentGroup` computes, student by student):

    x = embeddings(input_ids)                                   # (B, T, C), once for every student
    for j in range(k): logits_j = S_j(x, attention_mask)        # (B, L)
    return Σ_{j<k} α_j · logits_j                               # (B, L)

Here the students' dimension is a batch dimension of every matmul: layer 0 reads the same `x` for every student, so
its query/key/value projections of all k students are ONE (B·T, C) x (C, k·3C) GEMM; later layers are `baddbmm`
over (k, B·T, C); attention runs over a (k·B) batch; the heads are one `baddbmm` and the boosting sum one `einsum`.
A prefix `k` slices the first k students' weights (views, no copy); `prune_to(k)` makes a smaller group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chorus.backends.students.config import StudentConfig
from chorus.backends.students.embeddings import SharedEmbeddings
from chorus.backends.students.reference import additive_mask, mean_pool


class StudentGroup(nn.Module):
    """K students, fused. `tensors` are the stacked student state dicts (`stack_students`, the file's tensors)."""

    def __init__(self, cfg: StudentConfig, embeddings: SharedEmbeddings, tensors: dict[str, torch.Tensor],
                 boosting_weights: torch.Tensor):
        super().__init__()
        K = cfg.num_students
        if tuple(boosting_weights.shape) != (K,):
            raise ValueError(f"boosting_weights has shape {tuple(boosting_weights.shape)}, expected ({K},)")
        if embeddings.hidden_size != cfg.hidden_size:
            raise ValueError(f"embeddings are {embeddings.hidden_size} wide, students {cfg.hidden_size}")
        self.cfg, self.embeddings = cfg, embeddings
        C = cfg.hidden_size

        def get(name: str, *shape: int) -> torch.Tensor:
            t = tensors.get(name)
            if t is None:
                raise KeyError(f"student tensor {name!r} is missing (expected shape {(K, *shape)})")
            if tuple(t.shape) != (K, *shape):
                raise ValueError(f"student tensor {name!r} has shape {tuple(t.shape)}, expected {(K, *shape)}")
            return t.detach()

        def linear(prefix: str, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
            # nn.Linear (K, out, in) -> (K, in, out) for x @ W; bias (K, 1, out) to broadcast over rows
            w = get(f"{prefix}.weight", out_f, in_f).transpose(1, 2).contiguous()
            return w, get(f"{prefix}.bias", out_f).unsqueeze(1).contiguous()

        def norm(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
            return get(f"{prefix}.weight", C).unsqueeze(1).contiguous(), get(f"{prefix}.bias", C).unsqueeze(1).contiguous()

        I, L = cfg.intermediate_size, cfg.num_labels
        for l in range(cfg.num_layers):
            p = f"layers.{l}"
            qkv = [linear(f"{p}.{n}", C, C) for n in ("query", "key", "value")]
            qkv_w = torch.cat([w for w, _ in qkv], dim=2)  # (K, C, 3C): [q | k | v] columns
            qkv_b = torch.cat([b for _, b in qkv], dim=2)  # (K, 1, 3C)
            if l == 0:  # layer 0 reads the shared embeddings: all students' q/k/v as one (C, K·3C) GEMM
                qkv_w = qkv_w.permute(1, 0, 2).reshape(C, K * 3 * C)  # column block j = student j
                qkv_b = qkv_b.reshape(K * 3 * C)
            buffers = {"qkv_w": qkv_w, "qkv_b": qkv_b}
            buffers["o_w"], buffers["o_b"] = linear(f"{p}.attention_output", C, C)
            buffers["ln1_w"], buffers["ln1_b"] = norm(f"{p}.attention_norm")
            buffers["ff1_w"], buffers["ff1_b"] = linear(f"{p}.intermediate", I, C)
            buffers["ff2_w"], buffers["ff2_b"] = linear(f"{p}.output", C, I)
            buffers["ln2_w"], buffers["ln2_b"] = norm(f"{p}.output_norm")
            for name, t in buffers.items():
                self.register_buffer(f"l{l}_{name}", t.contiguous())
        head_w, head_b = linear("classifier", L, C)
        self.register_buffer("head_w", head_w)  # (K, C, L)
        self.register_buffer("head_b", head_b)  # (K, 1, L)
        self.register_buffer("boosting_weights", boosting_weights.detach().clone().to(head_w.dtype))
        self._tensors = {k: v.detach() for k, v in tensors.items()}  # kept for prune_to / saving

    @property
    def num_students(self) -> int:
        return self.cfg.num_students

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stacked student state dicts this group was built from (what `save_students` writes)."""
        return dict(self._tensors)

    def prune_to(self, k: int) -> StudentGroup:
        """A group of the first `k` students only (always a prefix: boosting made each student fit the earlier ones'
        residual, so a prefix is a model, an arbitrary subset is not)."""
        self._check_k(k)
        cfg = StudentConfig.from_dict({**self.cfg.to_dict(), "num_students": k})
        group = StudentGroup(cfg, self.embeddings, {n: t[:k] for n, t in self._tensors.items()},
                             self.boosting_weights[:k])
        return group.to(device=self.head_w.device, dtype=self.head_w.dtype)

    def _apply(self, fn, recurse=True):  # keep the saved tensors on the module's device/dtype too
        super()._apply(fn, recurse)
        self._tensors = {k: fn(v) for k, v in self._tensors.items()}
        return self

    def _check_k(self, k: int) -> None:
        if not isinstance(k, int) or not 1 <= k <= self.num_students:
            raise ValueError(f"k={k!r}: a student group of {self.num_students} runs a prefix of 1..{self.num_students}")

    def _norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-student LayerNorm: x (k, N, C), w/b (k, 1, C)."""
        return torch.addcmul(b, F.layer_norm(x, (self.cfg.hidden_size,), eps=self.cfg.layer_norm_eps), w)

    def student_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Each of the first k students' logits: input_ids, attention_mask (B, T) -> (k, B, L)."""
        k = self.num_students if k is None else k
        self._check_k(k)
        B, T = input_ids.shape
        C, H = self.cfg.hidden_size, self.cfg.num_heads
        d = C // H
        dtype = self.head_w.dtype
        x = self.embeddings(input_ids).to(dtype).reshape(B * T, C)  # (B·T, C), shared by every student
        mask = additive_mask(attention_mask, dtype)  # (B, 1, 1, T)
        mask = mask.expand(k, B, 1, 1, T).reshape(k * B, 1, 1, T)
        h = x.unsqueeze(0)  # (1, B·T, C): the residual stream, broadcast over students until layer 0 splits it
        for l in range(self.cfg.num_layers):
            buf = lambda name: getattr(self, f"l{l}_{name}")  # noqa: E731
            if l == 0:
                qkv = torch.addmm(buf("qkv_b")[: k * 3 * C], x, buf("qkv_w")[:, : k * 3 * C])  # (B·T, k·3C)
                qkv = qkv.view(B * T, k, 3 * C).transpose(0, 1)  # (k, B·T, 3C)
            else:
                qkv = torch.baddbmm(buf("qkv_b")[:k], h, buf("qkv_w")[:k])  # (k, B·T, 3C)
            # (k, B·T, 3C) -> 3 x (k·B, H, T, d)
            q, kk, v = (t.reshape(k * B, T, H, d).transpose(1, 2) for t in qkv.split(C, dim=-1))
            a = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask)  # (k·B, H, T, d)
            a = a.transpose(1, 2).reshape(k, B * T, C)
            h = self._norm(h + torch.baddbmm(buf("o_b")[:k], a, buf("o_w")[:k]), buf("ln1_w")[:k], buf("ln1_b")[:k])
            f = F.gelu(torch.baddbmm(buf("ff1_b")[:k], h, buf("ff1_w")[:k]))  # (k, B·T, I)
            h = self._norm(h + torch.baddbmm(buf("ff2_b")[:k], f, buf("ff2_w")[:k]), buf("ln2_w")[:k], buf("ln2_b")[:k])
        pooled = mean_pool(h.view(k, B, T, C), attention_mask)  # (k, B, C)
        return torch.baddbmm(self.head_b[:k], pooled, self.head_w[:k])  # (k, B, L)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The boosting ensemble of the first k students (all by default): (B, T) -> logits (B, L)."""
        per_student = self.student_logits(input_ids, attention_mask, k)  # (k, B, L)
        return torch.einsum("k,kbl->bl", self.boosting_weights[: per_student.shape[0]], per_student)
