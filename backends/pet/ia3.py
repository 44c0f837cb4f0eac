"""IA3 (Liu et al., 2022, "(IA)³"): learned vectors that rescale activations; nothing else changes.

At the feed-forward output linear (`output.dense`) the vector scales that linear's input — the feed-forward
activations — before the shared op (a "pre" op, as PEFT's `feedforward_modules`); at every other site it scales the
linear's output after the shared op (PEFT's default targets: `attention.self.key`, `attention.self.value`,
`output.dense`). Files hold `{site}.ia3_l`, the vector minus one, (out,) or (in,) at `output.dense`: the null slot of
zeros is then the identity, and a row of any other task is left as it was.

Semantics: post sites `y[r] = (X[r]·Wᵀ + b) ⊙ (1 + l)`; `output.dense` `y[r] = (X[r] ⊙ (1 + l))·Wᵀ + b`. Both merge into
W (rows or columns scaled), which is how the reference checks them.
"""

from __future__ import annotations

import torch

from chorus.backends.pet.base import PetMethod, layer_site

FEED_FORWARD_OUTPUT = "output.dense"


class IA3(PetMethod):
    name = "ia3"
    tensor_names = ("ia3_l",)
    op_order = 1  # after weight deltas: it scales the linear's whole output, as merged into W

    def site_stage(self, site: str) -> str:
        return "pre" if layer_site(site) == FEED_FORWARD_OUTPUT else "post"

    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        out_f, in_f = self.site_shapes[site]
        return {"ia3_l": (in_f if self.site_stage(site) == "pre" else out_f,)}

    def make_op(self, site: str):
        key = self._key(site)

        def scale(t: torch.Tensor, rows) -> torch.Tensor:
            idx = rows.active["ia3"]
            if idx is not None and len(idx) == 0:
                return t
            l = self.banks[key]["ia3_l"][rows.slots["ia3"]]  # (B, features): zeros for rows of other tasks
            return t * (1 + l).unsqueeze(1)

        if self.site_stage(site) == "pre":
            return scale  # op(x, rows) -> x

        def ia3(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            return scale(y, rows)

        return ia3

    def gathered_op(self, site: str):
        key = self._key(site)

        def scale(t: torch.Tensor, rows) -> torch.Tensor:
            bank, slots = rows.tensor(self.name, f"{key}.ia3_l"), rows.slots[self.name]
            return t * (1 + bank[slots]).unsqueeze(1)  # (B, 1, features)

        if self.site_stage(site) == "pre":
            return scale

        def ia3(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            return scale(y, rows)

        return ia3

    def fused_op(self, site: str):  # post sites: a scaling of the output; output.dense: of the intermediate's
        key = self._key(site)         # activated output, in that linear's pass (`PetLinear.forward`'s `then`)
        return lambda x, rows: ("scale", (rows.slots[self.name], rows.tensor(self.name, f"{key}.ia3_l")))

