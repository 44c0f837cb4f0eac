"""Diff-Pruning (Guo et al., 2021): a task adds a sparse difference vector δ to the backbone's weights (and a dense
one to the biases of the sites it changes).

Files hold, per changed site, `{site}.diff_index` (nnz,) — flat positions `row * in + col` —, `{site}.diff_value`
(nnz,) — δ at those positions — and optionally `{site}.diff_bias` (out,). Training (`chorus train --pet diff_pruning`)
does not use the paper's L0 relaxation: δ starts at zero over every weight of the targeted sites, is trained densely,
and `finish_training` then keeps the largest |δ| of the task (magnitude pruning across all its sites) down to the
task's `density` (fraction of the targeted weights kept; Guo et al. reach 0.5%).

Semantics, per row r of a task at a site: `y[r] += X[r] · δᵀ + diff_bias` (see `SparseDelta` for how it runs).
"""

from __future__ import annotations

import torch

from chorus.backends.pet.sparse import SparseDelta


class DiffPruning(SparseDelta):
    name = "diff_pruning"
    tensor_names = ("diff_index", "diff_value", "diff_bias")
    index_name, value_name, bias_name = "diff_index", "diff_value", "diff_bias"

    def delta_values(self, site, index, values):
        return values

    @torch.no_grad()
    def finish_training(self, slot: int, options: dict) -> None:
        """Magnitude-prune the slot's δ to `options["density"]` of its sites' weights."""
        density = options.get("density")
        if density is None:
            return
        keys = [k for k in self.indices if slot in self.nnz_host[k]]
        total = sum(self.site_shapes[k.replace("__", ".")][0] * self.site_shapes[k.replace("__", ".")][1] for k in keys)
        values = torch.cat([self.stored(k, slot)[1].abs().float() for k in keys])
        keep = max(1, min(len(values), round(density * total)))
        threshold = torch.topk(values, keep).values[-1]
        for k in keys:
            index, v = self.stored(k, slot)
            chosen = (v.abs() >= threshold) & (v != 0)
            self.store(k, slot, index[chosen].clone(), v[chosen].detach().clone())
