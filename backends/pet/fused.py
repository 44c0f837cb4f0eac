"""Fused PET ops for the gathered forward on a GPU: a few Triton kernels per linear site, each row reading its own slot.

The gathered form of a PET op (`PetMethod.gathered_op`, what CUDA graphs replay and ONNX exports) is written with
torch ops over every row of the batch: each row gathers its slot's tensors (`bank[slots]`, a (B, ...) copy of them),
and rows of tasks without the method run the op on the null slot's zeros. A 64-row batch of 64 tasks of every PET
type then ran ~1,650 kernels, most of them gathers and broadcast elementwise ops over rows that add nothing (issue 3,
a profile of the mixed batch on an H100). Here the kernels read the slot of their program's row straight from
the bank and return at once for the null slot, and a linear's post ops of every method run together (`PostOps`,
from each method's `fused_op`):

| op | kernel | replaces (torch, per site) |
| --- | --- | --- |
| BitFit `y += δb`, LoRA's up-projection, IA3 `y ⊙ (1 + l)`: all of a site's in one pass | `epilogue_` (in place) | gathers, broadcast adds, baddbmm, add one + multiply |
| LoRA's down-projection `s·(x·Aᵀ)` | `gathered_matmul` | gathers of A, bmm, scaling |
| IA3 before `output.dense` | `epilogue_` (scale) | gather, add one, multiply |
| adapter `y += up(act(down(y)))`, with the site's BitFit bias and the sublayer's residual (before a LayerNorm: its term alone, on its rows, which `layer_norm` adds) | `adapter_` | four gathers, two bmm, bias adds, both activations, a select and the residual add |
| the sublayer's residual `y += x` at an output linear | the LayerNorm's kernel (without one: `epilogue_` with the site's other terms, alone torch's in-place add) | torch's add |
| MaskBERT, Diff-Pruning `y += x·ΔWᵀ (+ δb)`: both methods in one launch | `sparse_deltas_` (+ `transposed`, shared) | per-row dense ΔW: gathers, zero fill, scatter, bmm, index_add |
| a LayerNorm, with the residual, a lone BitFit bias, the adapter's term and each row's per-task affine (LN tuning) | `layer_norm` | torch's add and LayerNorm (the per-task affine: gathers, normalise, multiply, add) |

The sparse product reads each slot's CSR (positions sorted, `SparseDelta` keeps a `rowptr` per site) in place: no
ΔW is densified; its input's transposed form is made once per linear input and forward (`transposed`), and in a
graph its programs run over the rows that use the method only (`GatheredRows.subsets`); at a layer's query and
value it runs on a side stream beside the value's and key's shared ops (`Overlap`, PetS's operator scheduling).
Every kernel also skips the padding past each row's length (`row_lengths`, from the forward's attention mask;
measured on an H100).
The torch forms stay the reference (tests compare both) and what runs on the CPU, under autograd, while tracing for
export, and wherever Triton does not import (`available`).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)
# CHORUS_FUSED_PET=0 turns the fused kernels off (benchmarks compare both in one process through `ENABLED`)
ENABLED = os.environ.get("CHORUS_FUSED_PET", "1") != "0"
# CHORUS_PET_OVERLAP=0: a layer's query, value and key run their post ops in turn on the main stream, each its
# own terms (no `Overlap`; perf/profile_mixed.py compares both)
OVERLAP = os.environ.get("CHORUS_PET_OVERLAP", "1") != "0"
# CHORUS_FUSED_NORM=0: LayerNorms in the fused gathered forward run torch's kernel, after torch's add of the residual
# (no `layer_norm`; perf/profile_mixed.py compares both)
NORM = os.environ.get("CHORUS_FUSED_NORM", "1") != "0"
# TRITON_INTERPRET=1: Triton runs its kernels on the CPU through its interpreter (development and tests without a GPU)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    try:
        from chorus.backends.pet import triton_kernels
    except ImportError:  # no Triton (CPU builds of torch)
        return None
    return triton_kernels


@functools.cache
def _runs_on(device: torch.device) -> bool:
    """Whether Triton compiles and runs a kernel on `device` (it builds its launcher with the host's C compiler)."""
    try:
        t = torch.zeros(1, 1, 16, device=device)
        epilogue_(t, bias=(torch.ones(1, dtype=torch.long, device=device), torch.ones(2, 16, device=device)))
        if bool((t == 1).all()):
            return True
        log.warning("the fused PET kernels computed a wrong result on %s: the torch ops serve instead", device)
    except Exception:  # noqa: BLE001 - any failure leaves the torch ops in place
        log.warning("the fused PET kernels do not run on %s: the torch ops serve instead", device, exc_info=True)
    return False


def serves(device: torch.device) -> bool:
    """Whether gathered ops on `device` run fused: `ENABLED`, a CUDA device (any under `INTERPRET`), Triton
    importable, and a first kernel ran there."""
    return (ENABLED and (device.type == "cuda" or INTERPRET) and _kernels() is not None
            and _runs_on(torch.device(device)))


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernels serve an op that writes `t` in place: `serves` its device, `t` contiguous, no
    autograd, no tracing (export)."""
    return (serves(t.device) and t.is_contiguous() and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export())


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 as float32 (no TF32 rounding); ignored for halves


def _block(n: int, most: int, least: int = 16) -> int:
    return max(least, min(most, 1 << (n - 1).bit_length()))


def row_lengths(rows) -> torch.Tensor | None:
    """Each row's tokens in a gathered batch (`GatheredRows`): (B,) int32, its last kept position + 1 in the
    forward's attention mask (later tokens are padding: no PET op touches them; attention never reads them and the
    pooling leaves them out). Computed once per forward (kept in `rows.memo`); None without a mask."""
    if "lengths" not in rows.memo:
        mask = rows.mask
        rows.memo["lengths"] = None if mask is None else (
            (mask != 0) * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(1).to(torch.int32)
    return rows.memo["lengths"]


def _lengths(lengths: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    return torch.full((B,), T, dtype=torch.int32, device=device) if lengths is None else lengths


def epilogue_(y: torch.Tensor, bias: tuple | None = None, low_rank: tuple | None = None, scale: tuple | None = None,
              activation: str | None = None, then: tuple | None = None, residual: torch.Tensor | None = None,
              delta: tuple | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """In place, one kernel: `y[b] = act((y[b] + delta[b] + bias_bank[bs] + down[b] · up[ls]ᵀ) *
    (1 + scale_bank[ss])) * (1 + then_bank[ts]) (+ residual[b])`, where bs, ls, ss, ts are row b's slots: `delta` =
    (flags (B,), (B, T, N)) (a weight delta made apart, read on rows whose flag is not 0: the sparse products
    `Overlap` launched ahead), `bias` = (slots (B,), bank (C, N)) (BitFit), `low_rank` = (slots, down (B, T, R), up
    (C, N, R)) (LoRA's up-projection; down's rows on slot 0 are never read), `scale` = (slots, bank (C, N)) (IA3),
    `activation` None or "gelu" (every row), `then` = (slots, bank (C, N)) (the next linear's IA3 on its input),
    `residual` (B, T, N) (the sublayer's input, added before its LayerNorm); each optional. y (B, T, N) contiguous.
    Tokens past a row's `lengths` (B,) (default: all T) are not touched, nor, without an activation, rows on every
    term's slot 0 — except with a residual, which every token of every row gets."""
    B, T, N = y.shape
    lengths = _lengths(lengths, B, T, y.device)
    R = low_rank[1].shape[2] if low_rank is not None else 1
    bs, bias_bank = bias if bias is not None else (lengths, y)  # placeholders of absent terms are never read
    ls, down, up = low_rank if low_rank is not None else (lengths, y, y)
    ss, scale_bank = scale if scale is not None else (lengths, y)
    ts, then_bank = then if then is not None else (lengths, y)
    ds, delta_t = delta if delta is not None else (lengths, y)
    bt, bn = _block(T, 32), _block(N, 128)
    _kernels().epilogue_kernel[(B, _cdiv(T, bt), _cdiv(N, bn))](
        y, lengths, bs, bias_bank, ls, down.contiguous(), up, ss, scale_bank, ts, then_bank,
        residual.contiguous() if residual is not None else y, ds, delta_t, T, N, R, BLOCK_T=bt, BLOCK_N=bn,
        BLOCK_R=_block(R, 64), HAS_BIAS=bias is not None, HAS_LOW_RANK=low_rank is not None,
        HAS_SCALE=scale is not None, ACT=ACTIVATIONS[activation], HAS_THEN=then is not None,
        HAS_RES=residual is not None, HAS_DELTA=delta is not None, PRECISION=_precision(y.dtype))
    return y


# The adapter kernel's launch (`launch` overrides; perf/fused_kernels.py --variants tries them: on the H100, 8 of 64
# rows with an adapter 10.4 us at 256 outputs a program vs 10.4-10.8 at 128, 10.1 with 16 tokens rather than 32;
# 64 of 64 rows 15.2 vs 20.0, 14.0 with 16 tokens; 9.8 us at 8 rows since the kernel loads its up-projection first
# and keeps the bias out of its down-projection's loop, measured on an H100)
ADAPTER = {"block_t": 16, "block_n": 256, "block_k": 64, "num_warps": 4, "num_stages": 3}


def adapter_(y: torch.Tensor, slots: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor,
             up_bias: torch.Tensor, gelu: torch.Tensor, bias: tuple | None = None,
             residual: torch.Tensor | None = None, lengths: torch.Tensor | None = None, delta: bool = False,
             **launch) -> torch.Tensor:
    """One kernel, a new tensor: `z + up[s] · act(down[s] · z + down_bias[s]) + up_bias[s] (+ residual)` with
    `z = y + bias_bank[bs]`, per row b on adapter slot s (`slots` (B,); act gelu where `gelu[s]`, else relu) and
    bias slot bs (`bias` = (slots, bank (C, N)), BitFit's term of the same linear, optional); rows on slot 0 and
    tokens past a row's `lengths` get `z (+ residual)`. y, residual (B, T, N); down (C, M, N), down_bias (C, M),
    up (C, N, M), up_bias (C, N). `delta`: the new tensor is the adapter's term alone, `up[s] · act(down[s] · z +
    down_bias[s]) + up_bias[s]`, written on rows with a slot up to their lengths, unset elsewhere (the sublayer's
    LayerNorm adds it, the bias term and the residual: `layer_norm`'s `delta`, `site_bias`)."""
    B, T, N = y.shape
    M = down.shape[1]
    if delta and residual is not None:
        raise ValueError("an adapter's delta takes no residual (the LayerNorm's pass after it adds it)")
    lengths = _lengths(lengths, B, T, y.device)
    y = y.contiguous()
    out = torch.empty_like(y)
    bs, bias_bank = bias if bias is not None else (slots, y)  # placeholders of absent terms are never read
    opt = {**ADAPTER, **launch}
    bt, bn = _block(T, opt["block_t"]), _block(N, opt["block_n"])
    _kernels().adapter_kernel[(B, _cdiv(T, bt), _cdiv(N, bn))](
        y, out, residual.contiguous() if residual is not None else y, lengths, slots, down, down_bias, up, up_bias,
        gelu, bs, bias_bank, T, N, M, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=_block(N, opt["block_k"]),
        BLOCK_M=_block(M, 128), HAS_BIAS=bias is not None, HAS_RES=residual is not None, DELTA=delta,
        PRECISION=_precision(y.dtype), num_warps=opt["num_warps"], num_stages=opt["num_stages"])
    return out


# The LayerNorm kernel's launch (`launch` overrides; perf/fused_kernels.py --variants tries them: on the H100, the
# residual and LayerNorm of 64 rows of Rotten Tomatoes lengths padded to 64 tokens in 4.1 us with 2 tokens a program,
# 4.3-4.8 with 1 or 4, 5.7-6.1 with 8 or 16; torch's add and LayerNorm 14.1; measured on an H100)
LAYER_NORM = {"block_t": 2, "num_warps": 4}


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None, tuned: tuple | None = None, delta: tuple | None = None,
               site_bias: tuple | None = None, lengths: torch.Tensor | None = None, **launch) -> torch.Tensor:
    """One kernel, a new tensor: each token's `LayerNorm(x + site_bias[b] + delta[b] + residual)` over its N
    features, each term optional: `site_bias` = (slots (B,), bank (C, N)), the linear's per-task bias (BitFit);
    `delta` = (flags (B,), (B, T, N)), read on rows whose flag is not 0 (an adapter's term, `adapter_`'s `delta`).
    Statistics in float32, with the backbone's `weight`, `bias` (N,) or, with `tuned` = (slots (B,), d_weight (C, N),
    d_bias (C, N)), each row's own affine `weight + d_weight[s]`, `bias + d_bias[s]` (a per-task LayerNorm's bank:
    slot 0 zeros). Tokens past a row's `lengths` (default: all T) are zeros, neither read nor normalised. x, residual
    (B, T, N)."""
    B, T, N = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    slots, d_weight, d_bias = tuned if tuned is not None else (weight, weight, bias)  # placeholders, never read
    flags, delta_t = delta if delta is not None else (weight, x)
    bias_slots, bias_bank = site_bias if site_bias is not None else (weight, x)
    opt = {**LAYER_NORM, **launch}
    bt = _block(T, opt["block_t"], least=1)
    _kernels().layer_norm_kernel[(B, _cdiv(T, bt))](
        x, bias_slots, bias_bank, residual.contiguous() if residual is not None else x, flags, delta_t, out,
        _lengths(lengths, B, T, x.device), weight, bias, slots, d_weight, d_bias, T, N, eps, BLOCK_T=bt,
        BLOCK_N=_block(N, 1 << 16), HAS_BIAS=site_bias is not None, HAS_RES=residual is not None,
        HAS_DELTA=delta is not None, TUNED=tuned is not None, num_warps=opt["num_warps"])
    return out


class PostOps:
    """The fused post ops of one linear in a gathered forward, collected from the PET methods' fused forms
    (`PetMethod.fused_op`: each gives a term, e.g. `("bias", (slots, bank))`) and launched together on the linear's
    fresh output: the sparse deltas (MaskBERT, Diff-Pruning) two methods to a kernel (`sparse_deltas_`), then the
    bias (BitFit), low-rank (LoRA's up-projection) and scale (IA3) terms, the linear's activation, the next linear's
    input scaling (IA3 before the feed-forward output) and the sublayer's residual as one `epilogue_` pass — or, at
    a site with an adapter, the adapter with the bias term and the residual as one `adapter_` pass — a kernel or
    two per site where each method's op was one or two of its own; given the sublayer's LayerNorm (`run`'s `norm`),
    its kernel takes the residual, a lone bias term and the adapter's term (written alone, on the adapter's rows).
    Terms arrive in order (weight deltas, scalings, the activation, scalings of the activated output, the adapter,
    the residual); a term that cannot join what is pending (a second of its kind, or a delta after a scaling) runs
    what is pending first. x: the linear's input, which the sparse products read. `add` and `run` return the output
    (the adapter's and the norm's passes write a new tensor)."""

    STAGES = {"sparse": 0, "delta": 0, "bias": 0, "low_rank": 0, "scale": 1, "activation": 2, "then": 3, "adapter": 4,
              "residual": 5}  # the pass's order

    def __init__(self, x: torch.Tensor, rows):
        self.x, self.rows = x, rows
        self.sparse: list[dict] = []
        self.dense: dict = {}
        self.join = None  # with a "delta" made on a side stream (`Overlap`): what makes the main stream wait for it

    def add(self, y: torch.Tensor, kind: str, term) -> torch.Tensor:
        if kind == "scale" and "activation" in self.dense:
            kind = "then"  # scales the activated output
        if kind in self.dense or any(self.STAGES[k] > self.STAGES[kind] for k in self.dense):
            if "delta" in self.dense:  # runs before `Overlap.finish` joins the side stream: join it now
                self.join()
            y = self.run(y)
        if kind == "sparse":
            self.sparse.append(term)
        else:
            self.dense[kind] = term
        return y

    def run(self, y: torch.Tensor, norm=None) -> torch.Tensor:
        """Launch what is pending on y. `norm`: the sublayer's LayerNorm in one kernel, `norm(y, residual, delta,
        site_bias)` (`PetLayerNorm.fused`), which then takes the residual, a lone bias term and an adapter's term
        (`adapter_`'s `delta`; other terms run first, in place on their rows: no pass writes every row but the
        norm's)."""
        lengths = row_lengths(self.rows)
        dense, self.dense = self.dense, {}
        if self.sparse:
            sparse_deltas_(y, self.x, self.sparse, lengths, self.rows.memo)
            self.sparse = []
        adapter, residual = dense.pop("adapter", None), dense.pop("residual", None)
        if norm is not None or adapter is not None:
            bias = dense.pop("bias") if list(dense) == ["bias"] else None  # a lone bias joins the last pass
            if dense:  # in place, on the rows of its terms
                epilogue_(y, **dense, lengths=lengths)
            if norm is None:
                return adapter_(y, *adapter, bias=bias, residual=residual, lengths=lengths)
            delta = None if adapter is None else (adapter[0], adapter_(y, *adapter, bias=bias, lengths=lengths,
                                                                       delta=True))
            return norm(y, residual, delta, bias)
        if dense:
            epilogue_(y, **dense, residual=residual, lengths=lengths)
        elif residual is not None:  # alone: torch's vectorized add beats the epilogue's tiles (3.6 vs 4.2 us, H100)
            y.add_(residual)
        return y


class Overlap:
    """PetS's PET-operator scheduling for a layer's query, value and key linears (they read one input), in the fused
    gathered forward on a GPU. Their sparse products (MaskBERT, Diff-Pruning: they read only the linears' input) are
    launched first (`launch_ahead`), on a side stream, each into a delta buffer of its linear's own, while the main
    stream runs the three shared ops and the other PET kernels; each linear's remaining post ops wait (`defer`) and
    run in `finish`, after the main stream has joined the side stream, adding the delta in their pass. Sparse
    products are bound by L2 bandwidth and the shared GEMMs by tensor cores: side by side, the one hides in the
    other's gaps. In a CUDA graph the side stream's kernels are a parallel branch (captured, as any fork joined
    before the capture ends).

    The key's terms that only shift or rescale attention scores leave its pass (`keys_for`): `q·(k + b) - q·k` is
    the same for every key of a query, which softmax ignores, so a key's bias term (BitFit) is dropped; and
    `q·(k ⊙ s) = (q ⊙ s)·k`, so its scaling (IA3) joins the queries' deferred pass when that has none of its own. In a
    mixed batch the key's pass then has nothing left to launch."""

    def __init__(self):
        self.side: torch.cuda.Stream | None = None
        self.ahead: dict[int, tuple[list, tuple]] = {}  # id(linear) -> (its ops launched ahead, its delta term)
        self.waiting: list[tuple[PostOps, torch.Tensor]] = []
        self.memo: dict = {}  # the side stream's own (transposed inputs made there stay there)
        self.queries: torch.Tensor | None = None

    def launch_ahead(self, x: torch.Tensor, rows, linears) -> None:
        """Launch the sparse products of `linears` (`PetLinear`s that read x) on the side stream now, before their
        shared ops: each linear's into a new (B, T, out) delta, rows flagged by their slots in its sparse methods.
        Only in a gathered forward (`GatheredRows`) where the fused kernels serve a CUDA device."""
        if not (OVERLAP and getattr(rows, "gathered", False) and x.device.type == "cuda" and available(x)):
            return
        lengths = row_lengths(rows)  # made (once per forward) on the main stream, which reads it later too
        for linear in linears:
            ops = [op for op in linear.ops if getattr(op, "fused_ahead", False) and op.method in rows.slots]
            if not ops:
                continue
            methods = tuple(op.method for op in ops)
            if ("delta flags", methods) not in rows.memo:  # a row's flag: its slots summed (0: none), once a forward
                rows.memo["delta flags", methods] = functools.reduce(torch.add, (rows.slots[m] for m in methods))
            delta = torch.empty(*x.shape[:2], linear.weight.shape[0], dtype=x.dtype, device=x.device)
            self.side = self.side or _side_stream(x.device)
            # after everything the main stream has launched: x, the slots, the lengths, and any kernel still
            # reading memory the allocator has just handed to delta
            self.side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(self.side):
                sparse_deltas_(delta, x, [op.fused(x, rows)[1] for op in ops], lengths, self.memo, accumulate=False)
            self.ahead[id(linear)] = (ops, (rows.memo["delta flags", methods], delta))

    def take(self, linear) -> tuple[list, tuple | None]:
        """The ops of `linear` launched ahead and the delta term its pass adds in their place (none: [], None)."""
        return self.ahead.pop(id(linear), ([], None))

    def join(self) -> None:
        """Make the main stream wait for everything launched on the side stream so far."""
        if self.side is not None:
            torch.cuda.current_stream(self.side.device).wait_stream(self.side)

    def keys_for(self, queries: torch.Tensor) -> None:
        """The next deferred linear computes the keys of `queries` (an output deferred here before)."""
        self.queries = queries

    def defer(self, ops: PostOps, y: torch.Tensor) -> bool:
        """Keep `ops` for `finish` (y is final after it); False (nothing done) where they cannot wait: not on a CUDA
        device, terms that make a new tensor or read the sublayer's residual (an adapter, the residual), or
        `OVERLAP` off."""
        if not OVERLAP or y.device.type != "cuda" or {"adapter", "residual"} & set(ops.dense):
            return False
        if self.queries is not None:
            queries = next((o for o, out in self.waiting if out is self.queries), None)
            self.queries = None
            ops.dense.pop("bias", None)  # the same shift of every score of a query
            if queries is not None and "scale" in ops.dense and not {"scale", "activation", "then"} & set(
                    queries.dense):
                queries.dense["scale"] = ops.dense.pop("scale")  # scales the queries instead
        self.waiting.append((ops, y))
        return True

    def finish(self) -> None:
        """Join the side stream and run the deferred linears' post ops (in place: the outputs `defer` kept)."""
        self.join()
        for ops, y in self.waiting:
            ops.run(y)
        self.side, self.ahead, self.waiting, self.memo, self.queries = None, {}, [], {}, None


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of `Overlap` on a device (the gathered forward runs eagerly or in one capture at a time)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


ACTIVATIONS = {None: 0, "gelu": 2}
# The gathered matmul's launch (largest blocks; `launch` overrides, perf/fused_kernels.py tries them)
GATHERED = {"block_t": 64, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}


def gathered_matmul(x: torch.Tensor, weight: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor,
                    lengths: torch.Tensor | None = None, **launch) -> torch.Tensor:
    """Per row b with a slot: `(x[b] · weight[slots[b]]ᵀ) · scale[slot]` (LoRA's down-projection), a new (B, T, N)
    tensor whose null-slot rows (and tokens past a row's `lengths`) are left unset. x (B, T, K); weight (C, N, K);
    scale (C,)."""
    B, T, K = x.shape
    N = weight.shape[1]
    x = x.contiguous()
    out = torch.empty(B, T, N, dtype=x.dtype, device=x.device)
    opt = {**GATHERED, **launch}
    bt, bn, bk = _block(T, opt["block_t"]), _block(N, opt["block_n"]), _block(K, opt["block_k"])
    _kernels().gathered_matmul_kernel[(B, _cdiv(T, bt), _cdiv(N, bn))](
        x, weight, _lengths(lengths, B, T, x.device), slots, out, scale, T, N, K, BLOCK_T=bt, BLOCK_N=bn,
        BLOCK_K=bk, PRECISION=_precision(x.dtype), num_warps=opt["num_warps"], num_stages=opt["num_stages"])
    return out


# The sparse kernel's launch, tuned on the H100 (perf/fused_kernels.py): chunks of 128
# entries where the site's densest slot holds 2% of its weights or more, else 64; `transposed`: gather the inputs
# from x transposed per row (an entry's tokens contiguous; one more kernel) rather than from x itself; `prefetch`:
# load the next chunk's positions while this one's inputs are gathered.
SPARSE = {"block_n": 16, "block_t": 32, "chunk": None, "transposed": True, "prefetch": True, "num_warps": 4}


def transposed(x: torch.Tensor, lengths: torch.Tensor, memo: dict | None = None,
               slots: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """x (B, T, K) -> each row transposed (B, K, T), in blocks of tokens that start before the row's `lengths`, on
    the rows with a slot in one of `slots` (at most two (B,) tensors; none: every row). Other rows and later blocks
    are left unset: the sparse kernel never reads them. With `memo` (a forward's `rows.memo`) once per input tensor
    and slots: a layer's query and value linears read the same x, and each sparse method there reads it."""
    key = ("transposed", id(x), tuple(map(id, slots)))
    if memo is not None and key in memo:
        return memo[key][-1]
    B, T, K = x.shape
    xt = torch.empty(B, K, T, dtype=x.dtype, device=x.device)
    bt, bk = _block(T, 64), 64
    flags = (*slots, lengths, lengths)[:2]  # placeholders past len(slots) are never read
    _kernels().transpose_rows_kernel[(B, _cdiv(T, bt), _cdiv(K, bk))](x, xt, lengths, *flags, T, K, BLOCK_T=bt,
                                                                      BLOCK_K=bk, SLOTS=len(slots))
    if memo is not None:
        memo[key] = (x, slots, xt)  # holds x and the slots: their ids stay theirs until the memo is cleared
    return xt


def sparse_delta_(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, rowptr: torch.Tensor, index: torch.Tensor,
                  value: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  lengths: torch.Tensor | None = None, rows: torch.Tensor | None = None, memo: dict | None = None,
                  **launch) -> torch.Tensor:
    """In place: `y[b] += x[b] · ΔW[slots[b]]ᵀ (+ bias[slot])` for rows with a slot (up to their `lengths`), ΔW a
    slot's CSR at one site: `index` (C, max_nnz) flat positions `n * in + col`, sorted per slot; `rowptr`
    (C, out + 1) int32, where each output's entries start; `value` (C, max_nnz) the entries, or with `weight`
    (out, in) MaskBERT's scores (the entry is `-weight` at positions with a negative score). y (B, T, out)
    contiguous, x (B, T, in). `rows` (n,) int64: the batch rows to run on (every row that uses a slot, and any
    others), launching programs for those only (`GatheredRows.subsets`); None: every row. `memo`: where x's
    transposed form is kept for the forward's other sparse ops (`transposed`)."""
    term = {"slots": slots, "rowptr": rowptr, "index": index, "value": value, "weight": weight, "bias": bias,
            "rows": rows}
    return sparse_deltas_(y, x, [term], lengths, memo, **launch)


def sparse_deltas_(y: torch.Tensor, x: torch.Tensor, terms: list[dict], lengths: torch.Tensor | None = None,
                   memo: dict | None = None, accumulate: bool = True, **launch) -> torch.Tensor:
    """`sparse_delta_` for several sparse methods at one site (`terms`: each a dict of its arguments `slots`,
    `rowptr`, `index`, `value`, `weight`, `bias`, `rows`), two to a kernel: the two methods' programs share one grid
    (rows of each with few users fill the device together rather than one after the other). Not `accumulate`: y is
    a delta buffer, written (at most two methods) where a row uses one of them, up to its length; unset elsewhere."""
    B, T, K = x.shape
    N = y.shape[2]
    x, kernels = x.contiguous(), _kernels()
    lengths = _lengths(lengths, B, T, x.device)
    opt = {**SPARSE, **launch}  # `launch`: overrides of SPARSE (perf/fused_kernels.py tunes them)
    if opt["transposed"]:  # the rows these methods use (with more than two methods: every row)
        x = transposed(x, lengths, memo, tuple(t["slots"] for t in terms) if len(terms) <= 2 else ())
    bn, bt = opt["block_n"], _block(T, opt["block_t"])

    def args(term: dict | None) -> tuple[list, dict, int]:
        if term is None:  # no second method: placeholders, never read
            return [lengths, lengths, lengths, lengths, y, y, y, 0], {"CHUNK": 16, "ROWS": False, "MASK": False,
                                                                       "BIAS": False}, 0
        index, rows = term["index"], term["rows"]
        chunk = opt["chunk"] or (128 if index.shape[1] >= 0.02 * N * K else 64)
        weight, bias = term.get("weight"), term.get("bias")
        return ([rows if rows is not None else lengths, term["slots"], term["rowptr"], index, term["value"],
                 weight if weight is not None else term["value"], bias if bias is not None else term["value"],
                 index.shape[1]],
                {"CHUNK": chunk, "ROWS": rows is not None, "MASK": weight is not None, "BIAS": bias is not None},
                B if rows is None else len(rows))

    if not accumulate and len(terms) > 2:
        raise ValueError(f"a delta buffer takes at most two sparse methods' products, not {len(terms)}")
    for i in range(0, len(terms), 2):
        (a, fa, na), (b, fb, nb) = args(terms[i]), args(terms[i + 1] if i + 1 < len(terms) else None)
        kernels.sparse_delta_kernel[(na + nb, _cdiv(N, bn), _cdiv(T, bt))](
            y, x, lengths, T, N, K, na, *a, *b, BLOCK_N=bn, BLOCK_T=bt, TWO=nb > 0, TRANSPOSED=opt["transposed"],
            PREFETCH=opt["prefetch"], PRECISION=_precision(y.dtype), **{f"{k}_A": v for k, v in fa.items()},
            **{f"{k}_B": v for k, v in fb.items()}, ACCUMULATE=accumulate, num_warps=opt["num_warps"])
    return y


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
