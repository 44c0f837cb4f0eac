"""What every PET method's bank shares: slot bookkeeping, lazily allocated per-site tensors, and row routing."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from chorus.errors import TaskFileError


def layer_site(site: str) -> str:
    """A site's name within its layer: `encoder.layer.3.output.dense` -> `output.dense`."""
    return site.split(".", 3)[3] if site.startswith("encoder.layer.") else site


@dataclass
class RowTasks:
    """Which slot each batch row reads in each PET method, and the head slot of each row.

    `slots[method]`: (B,) int64, 0 = the method's null slot. `active[method]`: indices of rows with a non-null slot,
    or None when every row has one (then ops skip the gather of rows).
    """

    slots: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor | None]
    head_slots: torch.Tensor
    memo: dict = field(default_factory=dict)  # per-batch values ops share across sites and layers (row groups)
    gathered: ClassVar[bool] = False  # PetLinears run the fast (grouped) ops

    @classmethod
    def build(cls, slots: dict[str, torch.Tensor], head_slots: torch.Tensor) -> RowTasks:
        active: dict[str, torch.Tensor | None] = {}
        for name, s in slots.items():
            nz = torch.nonzero(s, as_tuple=True)[0]
            active[name] = None if len(nz) == len(s) else nz
        return cls(slots, active, head_slots)

    def cached(self, key: Hashable, make: Callable[[], object]) -> object:
        """`make()` once per batch: e.g. a method's row groups, computed at its first site and reused by the rest."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


@dataclass
class GatheredRows:
    """The export form of `RowTasks`: per-row slots and the bank's tensors, all plain tensors (graph inputs).

    PetLinears given these run each method's `gathered_op` instead of its fast op: every row gathers its own slot's
    tensors and the op runs on the whole batch (rows of other tasks read the null slot, whose zeros add nothing), with
    no host-side grouping, so the encoder traces into one ONNX graph whose bank is an input (see `chorus.export`).

    `slots[method]`: (B,) int64; `head_slots`: (B,) int64; `tensors`: `TaskBank.bank_tensors()`, by export name
    (`{method}.{site key}.{tensor}`, `{method}.{per-slot scalar}`, `head.{weight,bias,num_labels}`).
    `subsets[method]` (optional, methods with `row_subset`): (n,) int64 rows of the batch the method's op runs on,
    every row that uses it and, to fill a fixed n, rows that read its null slot (they add nothing); without it the
    op runs on every row.
    """

    slots: dict[str, torch.Tensor]
    head_slots: torch.Tensor
    tensors: dict[str, torch.Tensor]
    subsets: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # the forward's attention mask (B, T), set by `begin`
    memo: dict = field(default_factory=dict)  # what a forward's ops share across sites (rows' lengths, transposed x)
    gathered: ClassVar[bool] = True

    def begin(self, attention_mask: torch.Tensor) -> None:
        """At the start of each forward (`Encoder.forward`): its mask; what the previous forward's ops shared is dropped
        (a captured graph computes its own)."""
        self.mask = attention_mask
        self.memo.clear()

    def tensor(self, method: str, name: str) -> torch.Tensor:
        return self.tensors[f"{method}.{name}"]


@dataclass
class RowGroup:
    """Rows of one batch that a method runs together: `key` (e.g. a LoRA rank), the rows' indices in the batch (None:
    every row, in order) and their slots."""

    key: Hashable
    rows: torch.Tensor | None
    slots: torch.Tensor


class PetMethod(nn.Module):
    """A PET method's task bank. Subclasses define `site_tensors` (the per-site tensors a task file holds, with their
    shapes) and `make_op` (the per-row op added to a PetLinear).

    Semantics: for a row r of task t at site s, `y[r] = X[r]·W_sᵀ + b_s + op_s(X[r], slot(t))`.
    """

    name: str = ""
    tensor_names: tuple[str, ...] = ()  # what a task file holds per site: `{site}.{tensor_name}`
    stage: str = "post"  # "post": op(x, y, rows) -> y after the shared op; "pre": op(x, rows) -> x before it
                         # (per site: see `site_stage`)
    op_order: int = 0  # a PetLinear runs its post ops in this order: weight deltas (0), then scalings of the whole
                       # output (IA3, 1), then ops on the finished output (adapters, 2) — what merging into W means

    site_kind: str = "linear"  # what the method's sites are: the encoder's linears, or its LayerNorms ("LayerNorm")
    # The gathered op costs per row about what the shared op does (a dense ΔW per row), or its fused kernel's grid
    # is large per row: a graphed batch runs it on the rows that use the method only (`GatheredRows.subsets`).
    row_subset: bool = False
    # The fused term reads only the linear's input (not its output): `fused.Overlap` may launch it before the
    # linear's shared op, on a side stream (the sparse weight deltas).
    fused_ahead: bool = False

    def __init__(self, sites: dict[str, tuple[int, int]], capacity: int, device=None, dtype=torch.float32):
        super().__init__()
        self.site_shapes = sites  # site -> (out, in) of the shared linear
        self.capacity = capacity  # slots including the null slot 0
        self.device, self.dtype = device, dtype
        self.banks = nn.ModuleDict()  # site (dots replaced) -> ParameterDict of (capacity, ...) tensors
        self.free = list(range(capacity - 1, 0, -1))
        self.linears: dict[str, nn.Module] = {}
        self.slot_keys: dict[int, Hashable] = {}  # slot -> its row-group key (see `row_groups`), host-side


    # -- what a subclass defines ------------------------------------------------------------------------------------
    @classmethod
    def backbone_sites(cls, cfg) -> dict[str, tuple[int, int]]:
        """The sites this method may adapt, from the backbone's `EncoderConfig`: site -> (out, in)."""
        return cfg.linear_sites()

    @classmethod
    def backbone_modules(cls, encoder) -> dict[str, nn.Module]:
        """The encoder's modules at those sites, which `attach` hooks this method's ops into."""
        return encoder.pet_linears()

    @classmethod
    def owns(cls, key: str) -> bool:
        """Whether a task tensor `{site}.{name}` is this method's (see `TaskSpec.method_tensors`)."""
        return key.rpartition(".")[2] in cls.tensor_names

    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def make_op(self, site: str):
        raise NotImplementedError

    def gathered_op(self, site: str):
        """The export form of `make_op(site)`: the same op (same signature) over `GatheredRows`, every row gathering
        its own slot, with no data-dependent Python (it traces into one graph for any batch)."""
        raise NotImplementedError

    def fused_op(self, site: str):
        """The fused form of a post op at `site`, where the fused kernels serve a gathered forward:
        `op(x, rows) -> (kind, term)`, the term `fused.PostOps` launches with the site's other post ops ("bias",
        "low_rank", "scale", "sparse" or "adapter"; see there). None (the default): the gathered op runs on its own."""
        return None

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the gathered ops read, by export name `{site key}.{tensor}` (subclasses add per-slot scalars);
        live references, not copies. Empty while no task has written a site."""
        return {f"{key}.{n}": p for key, bank in self.banks.items() for n, p in bank.items()}

    def slot_options(self, slot: int, options: dict) -> None:
        """Store per-slot scalars from the task's options (e.g. LoRA's scaling)."""

    def read_options(self, slot: int) -> dict:
        return {}

    def site_stage(self, site: str) -> str:
        """Where this method's op sits at `site`: "pre" (changes the shared op's input) or "post"."""
        return self.stage

    def group_key(self, slot: int, options: dict) -> Hashable:
        """Rows whose slots share a key run together (`row_groups`); by default all of a method's rows are one group."""
        return None

    def finish_training(self, slot: int, options: dict) -> None:
        """After training a task in `slot`: turn its trained state into what it serves (e.g. prune to a density)."""

    # -- routing ----------------------------------------------------------------------------------------------------
    def row_groups(self, rows: RowTasks) -> list[RowGroup]:
        """The batch's rows of this method, grouped by `group_key` of their slots; computed once per batch (one host
        read of the slots), shared by every site and layer."""

        def make() -> list[RowGroup]:
            idx, slots = rows.active[self.name], rows.slots[self.name]
            if idx is not None:
                slots = slots[idx]
            host = slots.tolist()
            if not host:
                return []
            keys = [self.slot_keys.get(s) for s in host]
            if len(set(keys)) == 1:
                return [RowGroup(keys[0], idx, slots)]
            by_key: dict[Hashable, list[int]] = {}
            for i, k in enumerate(keys):
                by_key.setdefault(k, []).append(i)
            groups = []
            for k, members in by_key.items():
                pos = torch.tensor(members, dtype=torch.long, device=slots.device)
                groups.append(RowGroup(k, pos if idx is None else idx[pos], slots[pos]))
            return groups

        return rows.cached((self.name, "row_groups"), make)

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    def attach(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears

    @staticmethod
    def _key(site: str) -> str:
        return site.replace(".", "__")

    def _bank(self, site: str, options: dict) -> nn.ParameterDict:
        key = self._key(site)
        if key not in self.banks:
            shapes = self.site_tensors(site, options)
            self.banks[key] = nn.ParameterDict({
                n: nn.Parameter(torch.zeros(self.capacity, *s, device=self.device, dtype=self.dtype), requires_grad=False)
                for n, s in shapes.items()})
            self.hook(site)
        return self.banks[key]

    def hook(self, site: str) -> None:
        """Add this method's op to the site's PetLinear, keeping post ops in `op_order`."""
        op = self.make_op(site)
        op.order = self.op_order
        op.method = self.name  # a gathered forward leaves out the ops of methods its rows do not use
        op.gathered = self.gathered_op(site)
        op.fused = self.fused_op(site)
        op.fused_ahead = self.fused_ahead
        ops = self.linears[site].pre_ops if self.site_stage(site) == "pre" else self.linears[site].ops
        ops.append(op)
        ops.sort(key=lambda o: getattr(o, "order", 0))  # stable: same order, first hooked first

    def tensor(self, site: str, name: str) -> torch.Tensor:
        return self.banks[self._key(site)][name]

    def grow(self, capacity: int) -> None:
        """Re-allocate every site's bank with more slots, keeping what is stored."""
        for bank in self.banks.values():
            for n, p in list(bank.items()):
                new = torch.zeros(capacity, *p.shape[1:], device=p.device, dtype=p.dtype)
                new[: self.capacity] = p.data
                bank[n] = nn.Parameter(new, requires_grad=p.requires_grad)
        self.free = list(range(capacity - 1, self.capacity - 1, -1)) + self.free
        self.capacity = capacity
        self._grow_extra(capacity)

    def _grow_extra(self, capacity: int) -> None:
        """Grow per-slot buffers that are not per-site tensors."""

    def split_key(self, task: str, key: str) -> tuple[str, str]:
        """`{site}.{tensor name}` -> (site, name); a site that is no linear (LayerNorm) of the backbone is refused."""
        site, _, name = key.rpartition(".")
        if site not in self.site_shapes:
            raise TaskFileError(f"task {task!r}: tensor {key!r} names no {self.site_kind} of the backbone "
                                f"(sites look like {next(iter(self.site_shapes))!r})")
        return site, name

    def validate(self, task: str, options: dict, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Check a task's tensors of this method against the backbone; return them grouped by site."""
        by_site: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            site, name = self.split_key(task, key)
            expected = self.site_tensors(site, options)
            if name not in expected:
                raise TaskFileError(f"task {task!r}: tensor {key!r} is not a {self.name} tensor "
                                    f"(expected one of {sorted(expected)})")
            if tuple(t.shape) != tuple(expected[name]):
                raise TaskFileError(f"task {task!r}: tensor {key!r} has shape {tuple(t.shape)}, but the backbone "
                                    f"needs {tuple(expected[name])} for {self.name} with {options}")
            if not torch.isfinite(t).all():
                raise TaskFileError(f"task {task!r}: tensor {key!r} holds NaN or infinite values")
            by_site.setdefault(site, {})[name] = t
        for site, group in by_site.items():
            missing = sorted(set(self.site_tensors(site, options)) - set(group))
            if missing:
                raise TaskFileError(f"task {task!r}: site {site!r} has {sorted(group)} but lacks {missing}")
        return by_site

    def write(self, by_site: dict[str, dict[str, torch.Tensor]], options: dict) -> int:
        """Store a validated task in a free slot; return the slot."""
        if not self.free:
            self.grow(max(2 * self.capacity, 2))
        slot = self.free.pop()
        with torch.no_grad():
            for site, group in by_site.items():
                bank = self._bank(site, options)
                for n, t in group.items():
                    bank[n][slot] = t.to(device=bank[n].device, dtype=bank[n].dtype)
        self.slot_options(slot, options)
        self.slot_keys[slot] = self.group_key(slot, options)
        return slot

    def clear(self, slot: int) -> None:
        """Zero a slot and give it back."""
        with torch.no_grad():
            for bank in self.banks.values():
                for p in bank.values():
                    p[slot] = 0
        self.slot_keys.pop(slot, None)
        self.free.append(slot)

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        """A slot's tensors, keyed as in task files (`{site}.{name}`); sites where the slot is all zeros are left out."""
        out = {}
        for key, bank in self.banks.items():
            site = key.replace("__", ".")
            group = {n: p[slot].detach().cpu().float() for n, p in bank.items()}
            if any(t.any() for t in group.values()):
                out.update({f"{site}.{n}": t for n, t in group.items()})
        return out

    def bytes_per_slot(self) -> int:
        return sum(p[0].numel() * p.element_size() for bank in self.banks.values() for p in bank.values())
