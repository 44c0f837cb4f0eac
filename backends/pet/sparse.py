"""What the sparse weight-delta methods (MaskBERT, Diff-Pruning) share: a per-site sparse `ΔW` per task.

A slot holds, per site, the task's flat weight positions (`row * in + col`, int64) and one real value per position,
padded to the site's largest task (`max_nnz`, grown on demand, contents kept); a subclass turns the values into `ΔW`'s
entries (`delta_values`). Rows run grouped per task: the task's `ΔW` is applied to its rows only,
`y[rows] += X[rows]·ΔWᵀ`. Without autograd (serving) `ΔW` is a CSR matrix built once per (slot, site) and cached
until the slot's tensors change (keyed on their versions), and the product is `torch.sparse.mm`; while training
(autograd on) `ΔW` is scattered into a dense (out, in) matrix so gradients reach the values.

The export form (`gathered_op`) is a gather-scatter over the bank's own sparse tensors, not a densified ΔW: each row
gathers its slot's positions and values (padded to the site's `max_nnz`; padding is position 0 with ΔW entry 0),
gathers the inputs those positions read and scatter-adds their products into the output rows they write,
`y[b, t, row_j] += ΔW_j · x[b, t, col_j]` (ONNX GatherElements + ScatterElements(reduction=add)). Why not densify:
a dense ΔW per slot would hold out × in per task and site (the full weight's size, against 12 bytes per stored
entry here) and its per-row product costs B·T·out·in; the gather-scatter costs B·T·max_nnz, binds the bank's
tensors as they are (adding a task rebuilds nothing), and its temporary (B, T, max_nnz) stays below one dense
per-row ΔW (B, out, in) while T·density < 1 (Diff-Pruning's 0.5% up to T = 200). Its cost grows with the densest
task at a site: a MaskBERT task pruning 30% pays for it on every row of the batch. Past T·density = 1 (5% density at
T >= 20: the H100 measured 259 ms for a graphed mixed batch of 64 rows that way) the op scatters each row's entries
into a dense (out, in) ΔW for that batch and multiplies: the smaller temporary, and one batched GEMM. Per row that
costs about what the shared op does, so graphed batches run it on the rows that use the method only (`row_subset`).
On a GPU with Triton neither runs: the fused kernel (`fused_op`, `chorus.backends.pet.fused.sparse_deltas_`) reads
each row's slot as a CSR in place — positions are stored sorted, with `SiteIndex.rowptr` marking where each output
row's entries start — and skips rows on the null slot; at a layer's query, value and key it is launched before their
shared ops, on a side stream (`fused_ahead`, `chorus.backends.pet.fused.Overlap`).

Positions travel in task files as float32 (chorus's files are float tensors) and are exact below 2^24 — every
position of bert-large's largest linear (4096 × 1024) is; the loader refuses anything else.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from chorus.backends.pet.base import PetMethod
from chorus.errors import TaskFileError

EXACT_FLOAT32_INT = 2**24


class SiteIndex(nn.Module):
    """Positions of every slot at one site: `index` (capacity, max_nnz) int64, sorted per slot (a CSR's entries),
    `nnz` (capacity,) int64, and `rowptr` (capacity, out + 1) int32: where each output row's entries start (the
    fused kernel's CSR, `chorus.backends.pet.fused.sparse_delta_`)."""

    def __init__(self, capacity: int, max_nnz: int, outputs: int, device):
        super().__init__()
        self.register_buffer("index", torch.zeros(capacity, max_nnz, dtype=torch.long, device=device))
        self.register_buffer("nnz", torch.zeros(capacity, dtype=torch.long, device=device))
        self.register_buffer("rowptr", torch.zeros(capacity, outputs + 1, dtype=torch.int32, device=device))


class SparseDelta(PetMethod):
    row_subset = True
    fused_ahead = True
    index_name = ""  # file tensor of positions, (nnz,)
    value_name = ""  # file tensor of one value per position, (nnz,)
    bias_name = ""  # optional file tensor (out,) added to the bias, "" if the method has none
    value_optional = False  # a file may leave the values out (then `default_value` fills them)
    default_value = 0.0
    scores_prune = False  # ΔW's entries are `-W` where the stored value (a score) is negative, else 0 (MaskBERT)

    def __init__(self, sites, capacity, device=None, dtype=torch.float32):
        super().__init__(sites, capacity, device, dtype)
        self.indices = nn.ModuleDict()  # site key -> SiteIndex
        self.nnz_host: dict[str, dict[int, int]] = {}  # site key -> slot -> nnz, read on the host (no device sync)
        self._csr: dict[tuple[str, int], tuple[tuple, torch.Tensor]] = {}  # (site key, slot) -> (versions, ΔW)

    # -- what a subclass defines ------------------------------------------------------------------------------------
    def delta_values(self, site: str, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The entries of ΔW at `index` (flat positions) from the stored `values`."""
        raise NotImplementedError

    # -- files ------------------------------------------------------------------------------------------------------
    def site_tensors(self, site: str, options: dict) -> dict[str, tuple[int, ...]]:
        return {}  # shapes depend on each file's nnz: `validate` checks them

    def validate(self, task, options, tensors):
        by_site: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            site, name = self.split_key(task, key)
            if not torch.isfinite(t).all():
                raise TaskFileError(f"task {task!r}: tensor {key!r} holds NaN or infinite values")
            by_site.setdefault(site, {})[name] = t
        for site, group in by_site.items():
            out_f, in_f = self.site_shapes[site]
            where = f"task {task!r}: tensor {site}.{self.index_name}"
            index = group.get(self.index_name)
            if index is None:
                raise TaskFileError(f"task {task!r}: site {site!r} has {sorted(group)} but lacks {self.index_name!r} "
                                    f"(the flat positions row * {in_f} + col of its nonzero entries)")
            if index.dim() != 1:
                raise TaskFileError(f"{where} has shape {tuple(index.shape)}, expected (nnz,): flat positions")
            if len(index) and (index != index.round()).any():
                raise TaskFileError(f"{where} holds non-integer positions")
            if len(index) and not (0 <= index.min() and index.max() < out_f * in_f):
                raise TaskFileError(f"{where} holds positions outside [0, {out_f * in_f}) = [0, out {out_f} x in "
                                    f"{in_f}) of the backbone's weight")
            if out_f * in_f > EXACT_FLOAT32_INT:
                raise TaskFileError(f"{where}: weight ({out_f}, {in_f}) has positions beyond 2^24, which float32 "
                                    "task files cannot hold exactly")
            as_long = index.long()
            if len(torch.unique(as_long)) != len(as_long):
                raise TaskFileError(f"{where} lists a position twice")
            values = group.get(self.value_name)
            if values is None and not self.value_optional:
                raise TaskFileError(f"task {task!r}: site {site!r} lacks {self.value_name!r} (nnz,)")
            if values is not None and tuple(values.shape) != tuple(index.shape):
                raise TaskFileError(f"task {task!r}: tensor {site}.{self.value_name} has shape {tuple(values.shape)}, "
                                    f"but {site}.{self.index_name} needs {tuple(index.shape)} (one value per position)")
            bias = group.get(self.bias_name) if self.bias_name else None
            if bias is not None and tuple(bias.shape) != (out_f,):
                raise TaskFileError(f"task {task!r}: tensor {site}.{self.bias_name} has shape {tuple(bias.shape)}, but "
                                    f"the backbone needs ({out_f},) for {self.name}")
            group[self.index_name] = as_long
        return by_site

    # -- slots ------------------------------------------------------------------------------------------------------
    def _site(self, site: str, nnz: int) -> tuple[SiteIndex, nn.ParameterDict]:
        key = self._key(site)
        if key not in self.indices:
            self.indices[key] = SiteIndex(self.capacity, 0, self.site_shapes[site][0], self.device)
            params = {"value": nn.Parameter(torch.zeros(self.capacity, 0, device=self.device, dtype=self.dtype),
                                            requires_grad=False)}
            if self.bias_name:
                params["bias"] = nn.Parameter(torch.zeros(self.capacity, self.site_shapes[site][0], device=self.device,
                                                          dtype=self.dtype), requires_grad=False)
            self.banks[key] = nn.ParameterDict(params)
            self.nnz_host[key] = {}
            self.hook(site)
        idx, bank = self.indices[key], self.banks[key]
        if nnz > idx.index.shape[1]:  # grow every slot's row to the new largest task, keeping contents
            self._forget(key)
            old = idx.index.shape[1]
            idx.index = F.pad(idx.index, (0, nnz - old))
            value = bank["value"]
            bank["value"] = nn.Parameter(F.pad(value.detach(), (0, nnz - old)), requires_grad=value.requires_grad)
        return idx, bank

    def write(self, by_site, options):
        if not self.free:
            self.grow(max(2 * self.capacity, 2))
        slot = self.free.pop()
        with torch.no_grad():
            for site, group in by_site.items():
                index = group[self.index_name]
                n = len(index)
                _, bank = self._site(site, n)
                values = group.get(self.value_name)
                self.store(self._key(site), slot, index, torch.full((n,), self.default_value) if values is None else values)
                if self.bias_name and self.bias_name in group:
                    bank["bias"][slot] = group[self.bias_name].to(bank["bias"].device, bank["bias"].dtype)
        self.slot_options(slot, options)
        self.slot_keys[slot] = slot  # rows run grouped per task
        return slot

    @torch.no_grad()
    def store(self, key: str, slot: int, index: torch.Tensor, values: torch.Tensor) -> None:
        """(Re)write a slot's positions and values at a site (the site holds at least len(index) entries), sorted
        by position: output row by row, as a CSR, whose row starts go to `rowptr`."""
        n = len(index)
        idx, value = self.indices[key], self.banks[key]["value"]
        index, order = index.to(idx.index.device).sort()
        in_f = self.site_shapes[key.replace("__", ".")][1]
        idx.index[slot] = 0
        idx.index[slot, :n] = index
        idx.nnz[slot] = n
        starts = torch.arange(idx.rowptr.shape[1], device=index.device) * in_f  # output n's first position
        idx.rowptr[slot] = torch.searchsorted(index, starts).to(torch.int32)
        value[slot] = 0
        value[slot, :n] = values.to(value.device, value.dtype)[order]
        self.nnz_host[key][slot] = n
        self._csr.pop((key, slot), None)

    def _forget(self, key: str, slot: int | None = None) -> None:
        """Drop cached CSR matrices of a site (one slot's, or all)."""
        for k in [k for k in self._csr if k[0] == key and slot in (None, k[1])]:
            del self._csr[k]

    def group_key(self, slot, options):
        return slot

    def clear(self, slot):
        with torch.no_grad():
            for key, idx in self.indices.items():
                idx.index[slot] = 0
                idx.nnz[slot] = 0
                idx.rowptr[slot] = 0
                self.nnz_host[key].pop(slot, None)
                self._forget(key, slot)
        super().clear(slot)

    def _grow_extra(self, capacity):
        for idx in self.indices.values():
            idx.index = F.pad(idx.index, (0, 0, 0, capacity - len(idx.index)))
            idx.nnz = F.pad(idx.nnz, (0, capacity - len(idx.nnz)))
            idx.rowptr = F.pad(idx.rowptr, (0, 0, 0, capacity - len(idx.rowptr)))

    def stored(self, key: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's positions and values at a site (its nnz entries only)."""
        n = self.nnz_host[key].get(slot, 0)
        return self.indices[key].index[slot, :n], self.banks[key]["value"][slot, :n]

    def read(self, slot):
        out = {}
        for key in self.indices:
            site = key.replace("__", ".")
            if slot not in self.nnz_host[key]:
                continue
            index, values = self.stored(key, slot)
            out[f"{site}.{self.index_name}"] = index.detach().cpu().float()
            out[f"{site}.{self.value_name}"] = values.detach().cpu().float()
            if self.bias_name:
                out[f"{site}.{self.bias_name}"] = self.banks[key]["bias"][slot].detach().cpu().float()
        return out

    def bytes_per_slot(self):
        return sum(idx.index[0].numel() * 8 + self.banks[k]["value"][0].numel() * self.banks[k]["value"].element_size()
                   + (self.banks[k]["bias"][0].numel() * self.banks[k]["bias"].element_size() if self.bias_name else 0)
                   for k, idx in self.indices.items())

    # -- the op -----------------------------------------------------------------------------------------------------
    def delta_weight(self, site: str, slot: int, sparse: bool) -> torch.Tensor:
        """The slot's ΔW at a site: (out, in), dense (differentiable) or CSR (cached while the slot is unchanged)."""
        key = self._key(site)
        out_f, in_f = self.site_shapes[site]
        index, values = self.stored(key, slot)
        if not sparse:
            vals = self.delta_values(site, index, values)
            return torch.zeros(out_f * in_f, device=vals.device, dtype=vals.dtype).index_add(0, index, vals).view(
                out_f, in_f)
        versions = (self.indices[key].index._version, self.banks[key]["value"]._version,
                    self.linears[site].weight._version, len(index))
        hit = self._csr.get((key, slot))
        if hit is None or hit[0] != versions:
            vals = self.delta_values(site, index, values)
            nonzero = vals != 0  # e.g. MaskBERT's kept candidates while training
            index, vals = index[nonzero], vals[nonzero]
            positions = torch.stack([index // in_f, index % in_f])
            with warnings.catch_warnings():  # "CSR support is in beta": the tests compare it against the reference
                warnings.simplefilter("ignore", UserWarning)
                csr = torch.sparse_coo_tensor(positions, vals, (out_f, in_f), check_invariants=False).coalesce()
                csr = csr.to_sparse_csr()
            hit = self._csr[(key, slot)] = (versions, csr)
        return hit[1]

    def make_op(self, site: str):
        key = self._key(site)

        in_f = self.site_shapes[site][1]

        def scatter(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            """Every row of a sparse task at once, straight from the bank (no ΔW built): each stored entry (r, c, v)
            of the row's slot adds v·x[:, c] to output r. Padding entries are zeros."""
            idx = rows.active[self.name]
            if idx is not None and len(idx) == 0:
                return y
            slots = rows.slots[self.name] if idx is None else rows.slots[self.name][idx]  # (n,)
            xs = x if idx is None else x[idx]  # (n, T, in)
            index = self.indices[key].index[slots]  # (n, max_nnz) flat positions r * in + c
            vals = self.delta_values(site, index, self.banks[key]["value"][slots]).to(x.dtype)  # (n, max_nnz)
            n, T, _ = xs.shape
            cols = (index % in_f).unsqueeze(1).expand(n, T, -1)  # (n, T, max_nnz)
            outs = torch.div(index, in_f, rounding_mode="floor").unsqueeze(1).expand(n, T, -1)
            delta = y.new_zeros((n, T, y.shape[-1])).scatter_add_(2, outs, xs.gather(2, cols) * vals.unsqueeze(1))
            if self.bias_name:
                delta = delta + self.banks[key]["bias"][slots].unsqueeze(1)
            return y + delta if idx is None else y.index_add(0, idx, delta)

        def sparse_delta(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            # Serving: CSR products per task in float32 (CPU), the gather-scatter over all sparse rows in half
            # precision (GPU: one kernel pair per site, no ΔW densified per call); training: the dense ΔW (autograd)
            if not torch.is_grad_enabled() and x.dtype != torch.float32:
                return scatter(x, y, rows)
            sparse = not torch.is_grad_enabled()
            for g in self.row_groups(rows):  # one group per task
                slot, idx = g.key, g.rows
                if slot not in self.nnz_host[key]:
                    continue  # the task has no delta at this site
                xs = x if idx is None else x[idx]  # (n, T, in)
                dW = self.delta_weight(site, slot, sparse)
                if sparse:
                    n, T, in_f = xs.shape
                    delta = torch.sparse.mm(dW, xs.reshape(n * T, in_f).T).T.reshape(n, T, -1)  # (n, T, out)
                else:
                    delta = F.linear(xs, dW)
                if self.bias_name:
                    delta = delta + self.banks[key]["bias"][slot]
                y = y + delta if idx is None else y.index_add(0, idx, delta)
            return y

        return sparse_delta

    def fused_op(self, site: str):
        key = self._key(site)
        return lambda x, rows: ("sparse", {  # each row reads its slot's CSR in the kernel; rows without it skip
            "slots": rows.slots[self.name], "rowptr": self.indices[key].rowptr,
            "index": rows.tensor(self.name, f"{key}.index"), "value": rows.tensor(self.name, f"{key}.value"),
            "weight": self.linears[site].weight if self.scores_prune else None,
            "bias": rows.tensor(self.name, f"{key}.bias") if self.bias_name else None,
            "rows": rows.subsets.get(self.name)})  # the rows that use the method (graphs), or None: every row

    def bank_tensors(self):
        return {**super().bank_tensors(), **{f"{key}.index": idx.index for key, idx in self.indices.items()}}

    def gathered_op(self, site: str):
        key = self._key(site)
        out_f, in_f = self.site_shapes[site]

        def sparse_delta(x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
            subset = rows.subsets.get(self.name)  # the rows that use the method (graphs), or None: every row
            slots = rows.slots[self.name] if subset is None else rows.slots[self.name][subset]  # (B,)
            xs = x if subset is None else x.index_select(0, subset)
            index = rows.tensor(self.name, f"{key}.index")[slots]  # (B, max_nnz) flat positions row * in + col
            vals = self.delta_values(site, index, rows.tensor(self.name, f"{key}.value")[slots])  # (B, max_nnz)
            B, T, _ = xs.shape
            if T * index.shape[1] > out_f * in_f:  # T·density > 1: a dense ΔW per row is the smaller temporary
                # A slot's positions are unique, so ΔW is written without atomics (scatter, not scatter-add: an H100
                # spent 78 us a site in half-precision scatter-add), once padding — position 0 with entry 0, which
                # may share position 0 with a real entry — and any other zero entry write to spare columns past ΔW
                # (8 of them: each row's ΔW then starts 16-byte aligned, else cuBLAS falls back to a kernel 5x slower).
                vals = vals.to(x.dtype)
                spare = out_f * in_f
                index = torch.where(vals != 0, index, spare)
                dense = torch.zeros(B, spare + 8, dtype=x.dtype, device=x.device).scatter(1, index, vals)
                delta = torch.bmm(xs, dense[:, :spare].view(B, out_f, in_f).transpose(1, 2))  # (B, T, out)
            else:
                cols = (index % in_f).unsqueeze(1).expand(B, T, -1)  # (B, T, max_nnz)
                outs = torch.div(index, in_f, rounding_mode="floor").unsqueeze(1).expand(B, T, -1)
                delta = torch.zeros(B, T, out_f, dtype=y.dtype, device=y.device).scatter_add(
                    2, outs, xs.gather(2, cols) * vals.unsqueeze(1))  # (B, T, out)
            if self.bias_name:
                delta = delta + rows.tensor(self.name, f"{key}.bias")[slots].unsqueeze(1)
            # y is this linear's own fresh output: add the subset's rows in place (no copy of the whole batch)
            return y + delta if subset is None else y.index_add_(0, subset, delta)  # null-slot rows add 0

        return sparse_delta
