"""BitFit (Ben Zaken et al., 2022): a task tunes only biases. Files hold `{site}.bias_delta` (out,), the tuned bias
minus the backbone's, for each linear the task tuned; rows of other tasks read the null slot (zeros)."""

from __future__ import annotations

import torch

from chorus.backends.pet.base import PetMethod


class BitFit(PetMethod):
    name = "bitfit"
    tensor_names = ("bias_delta",)

    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        return {"bias_delta": (self.site_shapes[site][0],)}

    def make_op(self, site: str):
        key = self._key(site)

        def bitfit(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            idx = rows.active["bitfit"]
            if idx is not None and len(idx) == 0:
                return y
            delta = self.banks[key]["bias_delta"][rows.slots["bitfit"]]  # (B, out)
            return y + delta.unsqueeze(1)

        return bitfit

    def gathered_op(self, site: str):
        key = self._key(site)

        def bitfit(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            return y + rows.tensor(self.name, f"{key}.bias_delta")[rows.slots[self.name]].unsqueeze(1)  # (B, 1, out)

        return bitfit

    def fused_op(self, site: str):
        key = self._key(site)
        return lambda x, rows: ("bias", (rows.slots[self.name], rows.tensor(self.name, f"{key}.bias_delta")))
