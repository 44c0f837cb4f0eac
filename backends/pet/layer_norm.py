"""Per-task LayerNorm (LN-tuning, Qi et al., 2022; PEFT's `LN_TUNING`; also what Houlsby et al. tune beside their
adapters): a task overrides the gamma/beta of some of the encoder's LayerNorms, nothing else.

Norm sites are named as Hugging Face names the modules: `embeddings.LayerNorm`, `encoder.layer.{i}.attention.output.
LayerNorm`, `encoder.layer.{i}.output.LayerNorm`. Files hold, per tuned site, the tuned `{site}.weight` and
`{site}.bias` (hidden,) themselves, as a Hugging Face state dict does. The bank stores them as deltas from the
backbone's weight and bias, so the null slot of zeros is the backbone's own LayerNorm, and sites a task does not tune
stay the backbone's for its rows.

Shared op: the normalisation `(x - mean) / std`, once for the whole batch; PET op: each row's affine from its task's
slot. `PetLayerNorm` runs this method's op; when no row of a batch overrides a norm, the op steps aside and the plain
`F.layer_norm` with the backbone's weights runs, as before this method existed. A batch mixing rows with and
without an override runs the backbone's LayerNorm (`torch.native_layer_norm`, the kernel behind `F.layer_norm`, so
rows without an override are bit for bit what they were) and gives the rows that override their own affine of the
statistics it computed (under autograd those rows are normalised again: the kernel's statistics carry no gradient).
Half-precision affines are computed in float32, as the LayerNorm kernel does.

Semantics, per row r of a task at a norm site: `y[r] = (x[r] - mean) / sqrt(var + eps) ⊙ γ_task + β_task`, where
(γ_task, β_task) is the task's tuned pair at that site, or the backbone's where it tunes none.

The export form (`gathered_op`) normalises every row and gathers every row's slot (the null slot adds zeros to the
backbone's weight and bias); where the fused kernels serve, one kernel reads each row's slot (`fused.layer_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chorus.backends.pet.base import PetMethod


def _affine(n: torch.Tensor, norm, d_weight: torch.Tensor, d_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`n ⊙ (γ + δγ) + (β + δβ)` per row: n (rows, T, C) normalised, δ (rows, C); float32 for half dtypes."""
    acc = torch.promote_types(dtype, torch.float32)
    weight = norm.weight.to(acc) + d_weight.to(acc)  # (rows, C)
    bias = norm.bias.to(acc) + d_bias.to(acc)
    return (n.to(acc) * weight.unsqueeze(1) + bias.unsqueeze(1)).to(dtype)


class LayerNormTuning(PetMethod):
    name = "layer_norm"
    tensor_names = ("weight", "bias")
    site_kind = "LayerNorm"

    @classmethod
    def backbone_sites(cls, cfg):
        return cfg.norm_sites()

    @classmethod
    def backbone_modules(cls, encoder):
        return encoder.pet_norms()

    @classmethod
    def owns(cls, key: str) -> bool:
        # `weight` / `bias` of a LayerNorm only (`classifier.weight` is the head's, `….dense.weight` no PET tensor)
        site, _, name = key.rpartition(".")
        return name in cls.tensor_names and site.rpartition(".")[2] == "LayerNorm"

    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        hidden = self.site_shapes[site][0]
        return {"weight": (hidden,), "bias": (hidden,)}

    def write(self, by_site, options):
        deltas = {}
        for site, group in by_site.items():
            norm = self.linears[site]
            deltas[site] = {n: t.to(device=norm.weight.device, dtype=torch.float32) - getattr(norm, n).float()
                            for n, t in group.items()}
        return super().write(deltas, options)

    def read(self, slot):
        out = {}
        for key, t in super().read(slot).items():  # deltas of the sites the slot tunes
            site, _, n = key.rpartition(".")
            out[key] = t + getattr(self.linears[site], n).detach().cpu().float()
        return out

    def make_op(self, site: str):
        key, norm = self._key(site), self.linears[site]

        def layer_norm(x: torch.Tensor, rows):
            idx = rows.active[self.name]
            if idx is not None and len(idx) == 0:
                return None  # no row of this batch overrides: the backbone's LayerNorm, as without this method
            bank, slots = self.banks[key], rows.slots[self.name]
            if idx is None:  # every row overrides: normalise once, then each row's own affine
                n = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
                return _affine(n, norm, bank["weight"][slots], bank["bias"][slots], x.dtype)
            # the backbone's LayerNorm over the whole batch, keeping each position's statistics
            y, mean, rstd = torch.native_layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            xs, slots = x[idx], slots[idx]
            if torch.is_grad_enabled() and xs.requires_grad:
                n = F.layer_norm(xs, norm.normalized_shape, None, None, norm.eps)
            else:
                n = (xs.float() - mean[idx].float()) * rstd[idx].float()
            return y.index_copy(0, idx, _affine(n, norm, bank["weight"][slots], bank["bias"][slots], x.dtype))

        return layer_norm

    def fused_op(self, site: str):
        key = self._key(site)  # the term `fused.layer_norm` takes: (slots, weight deltas, bias deltas)
        return lambda x, rows: ("affine", (rows.slots[self.name], rows.tensor(self.name, f"{key}.weight"),
                                           rows.tensor(self.name, f"{key}.bias")))

    def gathered_op(self, site: str):
        key, norm = self._key(site), self.linears[site]

        def layer_norm(x: torch.Tensor, rows) -> torch.Tensor:
            slots = rows.slots[self.name]  # (B,)
            n = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
            d_weight = rows.tensor(self.name, f"{key}.weight")[slots]  # (B, C): zeros for rows of other tasks
            return _affine(n, norm, d_weight, rows.tensor(self.name, f"{key}.bias")[slots], x.dtype)

        return layer_norm
