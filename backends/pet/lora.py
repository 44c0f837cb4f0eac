"""LoRA (Hu et al., 2021): `ΔW = (α/r)·B·A`, kept factored; rows gathered per task.

Files hold, per adapted site, `{site}.lora_A` (r, in) and `{site}.lora_B` (out, r), as PEFT does. A slot holds up
to the bank's `max_rank` (a lower-rank task is zero-padded in its slot), but the op runs each rank's rows as one group
on the first r rows/columns only, so a batch mixing ranks 4 and 64 does not pay rank 64 for the rank-4 rows (on 2 CPU
cores, B=32, T=64, hidden 384, ranks {4, 8, 16, 64} mixed: 16-17 ms per site grouped vs 64-84 ms padded to 64; ranks
{2, 4, 8, 16}: 1.7-2.1 ms vs 14-18 ms; one rank 8 everywhere: 12-16 ms vs 19 ms; best of 40). Rows of tasks without
LoRA skip the op.

Semantics, per row r of a task with rank k at a site: `y[r] += scaling · (X[r] · A[:k]ᵀ) · B[:, :k]ᵀ`.

The export form (`gathered_op`) cannot group rows by rank (that reads the slots on the host): every row gathers its
slot padded to `max_rank` (the zero padding adds nothing) and the batch runs as one bmm pair.
"""

from __future__ import annotations

import torch

from chorus.backends.pet import fused
from chorus.backends.pet.base import PetMethod
from chorus.errors import TaskFileError


class LoRA(PetMethod):
    name = "lora"
    tensor_names = ("lora_A", "lora_B")

    def __init__(self, sites, capacity, device=None, dtype=torch.float32, max_rank: int = 16):
        super().__init__(sites, capacity, device, dtype)
        self.max_rank = max_rank
        self.register_buffer("scaling", torch.zeros(capacity, device=device, dtype=dtype))

    def group_key(self, slot, options):
        return options["r"]  # rows run grouped by rank
    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        out_f, in_f = self.site_shapes[site]
        r = options.get("r", self.max_rank)
        return {"lora_A": (r, in_f), "lora_B": (out_f, r)}

    def _bank(self, site, options):
        # the bank holds max_rank; a task of lower rank is zero-padded in its slot
        return super()._bank(site, {**options, "r": self.max_rank})

    def validate(self, task, options, tensors):
        r, alpha = options.get("r"), options.get("alpha", 1)
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= self.max_rank:
            raise TaskFileError(f"task {task!r}: LoRA rank r={r!r} must be an integer in 1..{self.max_rank} "
                                f"(this bank's max_rank)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not abs(alpha) < 2 ** 64:
            raise TaskFileError(f"task {task!r}: LoRA alpha={alpha!r:.100} must be a number of magnitude below 2^64 "
                                "(the scaling is alpha / r)")
        return super().validate(task, options, tensors)

    def write(self, by_site, options):
        r = options["r"]
        padded = {site: {"lora_A": torch.nn.functional.pad(g["lora_A"], (0, 0, 0, self.max_rank - r)),
                         "lora_B": torch.nn.functional.pad(g["lora_B"], (0, self.max_rank - r))}
                  for site, g in by_site.items()}
        return super().write(padded, options)

    def slot_options(self, slot, options):
        self.scaling[slot] = options.get("alpha", options["r"]) / options["r"]

    def read_options(self, slot):
        return {"scaling": float(self.scaling[slot])}

    def _grow_extra(self, capacity):
        new = torch.zeros(capacity, device=self.scaling.device, dtype=self.scaling.dtype)
        new[: len(self.scaling)] = self.scaling
        self.scaling = new

    def make_op(self, site: str):
        key = self._key(site)

        def lora(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            bank = self.banks[key]
            for g in self.row_groups(rows):  # one group per rank in the batch
                r, idx, slots = g.key, g.rows, g.slots
                xs = x if idx is None else x[idx]  # (n, T, in)
                A, B = bank["lora_A"][slots, :r], bank["lora_B"][slots, :, :r]  # (n, r, in), (n, out, r)
                down = torch.bmm(xs, A.transpose(1, 2)) * self.scaling[slots].view(-1, 1, 1)  # (n, T, r): scaled here,
                if idx is None:  # where it is r wide, not out wide; the up-projection adds into y in its own GEMM
                    y = torch.baddbmm(y, down, B.transpose(1, 2))
                else:
                    y = y.index_add(0, idx, torch.bmm(down, B.transpose(1, 2)))  # (n, T, out)
            return y

        return lora

    def bank_tensors(self):
        return {**super().bank_tensors(), "scaling": self.scaling} if self.banks else {}

    def gathered_op(self, site: str):
        key = self._key(site)

        def lora(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            slots = rows.slots[self.name]  # (B,)
            A, B = rows.tensor(self.name, f"{key}.lora_A")[slots], rows.tensor(self.name, f"{key}.lora_B")[slots]
            down = torch.bmm(x, A.transpose(1, 2)) * rows.tensor(self.name, "scaling")[slots].view(-1, 1, 1)
            return torch.baddbmm(y, down, B.transpose(1, 2))  # y + (B, T, out), max_rank inside, in one GEMM

        return lora

    def fused_op(self, site: str):
        key = self._key(site)

        def lora(x: torch.Tensor, rows) -> tuple:
            """The down-projection now (each row reads its slot's A; rows without LoRA skip), the up-projection as
            the site's low-rank term."""
            slots = rows.slots[self.name]
            A, B, scaling = (rows.tensor(self.name, n) for n in (f"{key}.lora_A", f"{key}.lora_B", "scaling"))
            down = fused.gathered_matmul(x, A, slots, scale=scaling, lengths=fused.row_lengths(rows))
            return "low_rank", (slots, down, B)

        return lora
