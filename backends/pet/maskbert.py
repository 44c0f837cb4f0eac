"""MaskBERT (Zhao et al., 2020, "Masking as an efficient alternative to finetuning"): a task keeps the backbone's
weights but prunes some of them with a learned binary mask M, i.e. `ΔW = -W ⊙ (1 - M)`.

Files hold, per masked site, `{site}.mask_index` (nnz,): the flat positions `row * in + col` of the pruned weights
(the mask stored sparse, as the complement of the kept weights), and, only while a task is being trained,
`{site}.mask_score` (nnz,): one real-valued score per candidate position; a weight is pruned where its score < 0.
Without scores every listed position is pruned (stored as score -1). Training follows the paper: the forward uses the
binary mask `1[score ≥ 0]` and the backward passes the gradient straight through to the scores (straight-through
estimator); `chorus train --pet maskbert` starts with every weight of the targeted sites as a candidate, kept
(score > 0), and writes only the pruned positions.

Semantics, per row r of a task at a site: `y[r] += X[r] · (-W ⊙ pruned)ᵀ` (see `SparseDelta` for how it runs).
"""

from __future__ import annotations

from chorus.backends.pet.sparse import SparseDelta


class MaskBERT(SparseDelta):
    name = "maskbert"
    tensor_names = ("mask_index", "mask_score")
    index_name, value_name = "mask_index", "mask_score"
    value_optional, default_value = True, -1.0
    scores_prune = True

    def delta_values(self, site, index, values):
        kept = (values >= 0).to(values.dtype)
        if values.requires_grad:  # straight-through: forward binary, gradient to the scores
            kept = kept + values - values.detach()
        weight = self.linears[site].weight.reshape(-1)[index].to(values.dtype)
        return weight * (kept - 1)

    def read(self, slot):
        """The pruned positions only (what is served); scores are training state."""
        out = {}
        for key in self.indices:
            if slot in self.nnz_host[key]:
                index, values = self.stored(key, slot)
                out[f"{key.replace('__', '.')}.mask_index"] = index[values < 0].detach().cpu().float()
        return out
