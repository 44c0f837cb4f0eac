"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), one bank for both placements.

An adapter rescales nothing and adds no weight delta: it runs a small bottleneck MLP on a sublayer's output and adds
it back, `y + up(act(down(y) + b_down)) + b_up`, right after the sublayer's output linear and before that sublayer's
residual + LayerNorm — the placement of AdapterHub's bottleneck layer with `original_ln_before=False` (its Houlsby
config). Here it is a post op of the output PetLinear, so rows of other tasks never see it.

- `placement: "houlsby"`: after the attention output (`attention.output.dense`) and the feed-forward output
  (`output.dense`) of each layer.
- `placement: "pfeiffer"`: after the feed-forward output only. AdapterHub's Pfeiffer config (`SeqBnConfig`) also runs
  the layer's own LayerNorm once before the adapter (`original_ln_before=True`); chorus does not (that would need the
  LayerNorm inside the op), so a Pfeiffer task here is Houlsby's adapter at Pfeiffer's one site.

Options: `bottleneck` m (1..the bank's `max_bottleneck`), `activation` "relu" (default) or "gelu" (exact), per task.
Files hold per site `{site}.adapter_down` (m, out), `.adapter_down_bias` (m,), `.adapter_up` (out, m),
`.adapter_up_bias` (out,) — names without dots, since a task tensor's name is what follows its site's last dot.
Slots are padded to `max_bottleneck` (zeros: act(0) = 0 for relu and gelu, so padding adds nothing), and rows are
grouped by (bottleneck, activation) so each group runs on its own width only.

Semantics, per row r of a task at one of its sites: `y[r] += up_r(act_r(down_r(y[r])))` (biases included).

The export form (`gathered_op`) runs every row at `max_bottleneck` (zero padding adds nothing) and picks each row's
activation from the per-slot flag `gelu` (both are computed; a graph cannot branch per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chorus.backends.pet.base import PetMethod, layer_site
from chorus.errors import TaskFileError

PLACEMENTS = {"houlsby": ("attention.output.dense", "output.dense"), "pfeiffer": ("output.dense",)}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class Adapter(PetMethod):
    name = "adapter"
    tensor_names = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")
    op_order = 2  # on the linear's finished output (deltas and IA3 scaling included), as a hook after it

    def __init__(self, sites, capacity, device=None, dtype=torch.float32, max_bottleneck: int = 64):
        super().__init__(sites, capacity, device, dtype)
        self.max_bottleneck = max_bottleneck
        self.register_buffer("gelu", torch.zeros(capacity, dtype=torch.bool, device=device))  # per slot: act is gelu

    @staticmethod
    def options_of(options: dict) -> tuple[int, str, str]:
        return options.get("bottleneck"), options.get("activation", "relu"), options.get("placement", "houlsby")

    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        out_f = self.site_shapes[site][0]
        m = options.get("bottleneck", self.max_bottleneck)
        return {"adapter_down": (m, out_f), "adapter_down_bias": (m,), "adapter_up": (out_f, m),
                "adapter_up_bias": (out_f,)}

    def _bank(self, site, options):
        return super()._bank(site, {**options, "bottleneck": self.max_bottleneck})

    def validate(self, task, options, tensors):
        m, act, placement = self.options_of(options)
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= self.max_bottleneck:
            raise TaskFileError(f"task {task!r}: adapter bottleneck={m!r} must be an integer in "
                                f"1..{self.max_bottleneck} (this bank's max_bottleneck)")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise TaskFileError(f"task {task!r}: adapter activation {act!r}; supported: {sorted(ACTIVATIONS)}")
        if not isinstance(placement, str) or placement not in PLACEMENTS:
            raise TaskFileError(f"task {task!r}: adapter placement {placement!r}; supported: {sorted(PLACEMENTS)}")
        wrong = sorted({k.rpartition(".")[0] for k in tensors} - {s for s in self.site_shapes
                                                                    if layer_site(s) in PLACEMENTS[placement]})
        if wrong:
            raise TaskFileError(f"task {task!r}: {placement} adapters sit only after {list(PLACEMENTS[placement])}, "
                                f"not at {wrong[:3]}")
        return super().validate(task, options, tensors)

    def write(self, by_site, options):
        pad = self.max_bottleneck - options["bottleneck"]
        padded = {site: {"adapter_down": F.pad(g["adapter_down"], (0, 0, 0, pad)),
                         "adapter_down_bias": F.pad(g["adapter_down_bias"], (0, pad)),
                         "adapter_up": F.pad(g["adapter_up"], (0, pad)),
                         "adapter_up_bias": g["adapter_up_bias"]}
                  for site, g in by_site.items()}
        return super().write(padded, options)

    def group_key(self, slot, options):
        m, act, _ = self.options_of(options)
        return m, act

    def slot_options(self, slot, options):
        self.gelu[slot] = self.options_of(options)[1] == "gelu"

    def clear(self, slot):
        self.gelu[slot] = False
        super().clear(slot)

    def _grow_extra(self, capacity):
        self.gelu = F.pad(self.gelu, (0, capacity - len(self.gelu)))

    def bank_tensors(self):
        return {**super().bank_tensors(), "gelu": self.gelu} if self.banks else {}

    def read(self, slot):
        m = self.slot_keys[slot][0]  # un-pad to the task's bottleneck
        return {k: v[:m] if k.endswith(("adapter_down", "adapter_down_bias")) else v[:, :m] if k.endswith("adapter_up")
                else v for k, v in super().read(slot).items()}

    def make_op(self, site: str):
        key = self._key(site)

        def adapter(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            bank = self.banks[key]
            for g in self.row_groups(rows):  # one group per (bottleneck, activation) in the batch
                (m, act), idx, slots = g.key, g.rows, g.slots
                ys = y if idx is None else y[idx]  # (n, T, out)
                down, b_down = bank["adapter_down"][slots, :m], bank["adapter_down_bias"][slots, :m]  # (n, m, out)
                up, b_up = bank["adapter_up"][slots, :, :m], bank["adapter_up_bias"][slots]  # (n, out, m)
                h = ACTIVATIONS[act](torch.bmm(ys, down.transpose(1, 2)) + b_down.unsqueeze(1))  # (n, T, m)
                delta = torch.bmm(h, up.transpose(1, 2)) + b_up.unsqueeze(1)  # (n, T, out)
                y = y + delta if idx is None else y.index_add(0, idx, delta)
            return y

        return adapter

    def gathered_op(self, site: str):
        key = self._key(site)

        def adapter(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            slots = rows.slots[self.name]  # (B,)
            down, b_down, up, b_up = (rows.tensor(self.name, f"{key}.{n}")[slots] for n in self.tensor_names)
            z = torch.bmm(y, down.transpose(1, 2)) + b_down.unsqueeze(1)  # (B, T, max_bottleneck)
            gelu = rows.tensor(self.name, "gelu")[slots].view(-1, 1, 1)  # (B, 1, 1)
            h = torch.where(gelu, F.gelu(z), F.relu(z))
            return y + torch.bmm(h, up.transpose(1, 2)) + b_up.unsqueeze(1)  # (B, T, out)

        return adapter

    def fused_op(self, site: str):
        key = self._key(site)

        def adapter(x: torch.Tensor, rows) -> tuple:
            """The whole adapter as the site's adapter term: one kernel (`fused.adapter_`) that also takes the
            site's bias term and its sublayer's residual; each row reads its slot, rows without one pass through."""
            return "adapter", (rows.slots[self.name], *(rows.tensor(self.name, f"{key}.{n}") for n in
                                                        self.tensor_names), rows.tensor(self.name, "gelu"))

        return adapter
