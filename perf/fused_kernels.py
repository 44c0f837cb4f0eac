"""Device time per call of the fused PET kernels (`chorus.backends.pet.fused`) at the benchmark's shape, one
site's ops of several methods in one launch against one launch each, and (`--variants`) the launch variants of the
matmul, adapter, sparse and LayerNorm kernels (what `fused.GATHERED`, `fused.ADAPTER`, `fused.SPARSE` and
`fused.LAYER_NORM` are tuned from).

    python -m perf.fused_kernels --bundle .gpu --out $OUT [--variants]   (on the GPU: bash perf/gpu/run.sh kernels)

A 64-row batch of 64 tokens, bert-base's sites (768 -> 768); `active` rows of the 64 use the method (the mixed
benchmark has 8 rows of each PET type; 0: what a method costs a batch that does not use it; 64: a single-task
batch); each row with all 64 tokens, and again with the token counts of 64 real Rotten Tomatoes sentences (the rest
padding, which the kernels skip). Each measurement is 20 calls captured in one CUDA graph, replayed 20 times: the
median replay / 20 (the kernels' own time plus their launch gaps inside a graph, as the served forward runs them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chorus.backends.pet import fused

B, T, HIDDEN, SLOTS = 64, 64, 768, 17
# launch options of the sparse kernel tried against `fused.SPARSE` (MaskBERT, real lengths, programs for the 8 or 64
# rows that use it, as graphs launch it)
VARIANTS = ({}, {"transposed": False}, {"prefetch": False}, {"chunk": 64}, {"chunk": 256}, {"block_t": 64},
            {"block_t": 64, "chunk": 256}, {"block_t": 16}, {"block_n": 32}, {"block_n": 32, "chunk": 256},
            {"num_warps": 2}, {"num_warps": 8}, {"chunk": 256, "num_warps": 8})
ADAPTER_VARIANTS = ({}, {"block_n": 128}, {"block_t": 32}, {"block_t": 64}, {"block_k": 128}, {"block_k": 32},
                    {"num_warps": 8}, {"num_stages": 2}, {"num_stages": 4}, {"num_stages": 1})
LAYER_NORM_VARIANTS = ({}, {"block_t": 1}, {"block_t": 2}, {"block_t": 8}, {"block_t": 16}, {"num_warps": 2},
                      {"num_warps": 8}, {"block_t": 8, "num_warps": 8}, {"block_t": 2, "num_warps": 2})
GATHERED_VARIANTS = ({}, {"block_k": 128}, {"block_k": 256}, {"block_t": 32}, {"block_t": 16},
                     {"block_t": 32, "block_k": 128}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 2},
                     {"num_stages": 4})


def graphed_us(fn, calls: int = 20, replays: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def sweep(out: list, label: str, base: dict, variants, call, **fields) -> None:
    """Each launch variant of `call(**variant)` (overrides of `base`): its time per call, appended to `out` with
    `fields`."""
    for variant in variants:
        us = graphed_us(lambda v=variant: call(**v))
        out.append({**fields, "launch": {**base, **variant}, "us": us})
        print(f"{label} {variant}: {us:.1f} us", flush=True)


def rt_lengths(bundle: Path) -> list[int]:
    """Token counts of the first B Rotten Tomatoes sentences (the mixed benchmark batch's rows), at most T."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tok.no_padding()
    texts = json.loads((bundle / "rt_texts.json").read_text())[:B]
    return [min(T, len(e.ids)) for e in tok.encode_batch(texts)]


def bench_tensors(dtype, g) -> tuple[torch.Tensor, ...]:
    """The benchmark's random CUDA tensors, drawn from `g` in this order: x, y (B, T, HIDDEN); a weight (HIDDEN,
    HIDDEN); a bank of vectors (SLOTS, HIDDEN); LoRA r16 A, B; adapter m64 down, up; then the adapter's down bias
    (the vectors' first 64) and per-slot gelu flags (all relu)."""
    rand = lambda *shape, scale=0.02: (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()  # noqa: E731
    x, y = rand(B, T, HIDDEN, scale=1.0), rand(B, T, HIDDEN, scale=1.0)
    weight, vec = rand(HIDDEN, HIDDEN), rand(SLOTS, HIDDEN)
    lora_a, lora_b, down, up = rand(SLOTS, 16, HIDDEN), rand(SLOTS, HIDDEN, 16), rand(SLOTS, 64, HIDDEN), rand(
        SLOTS, HIDDEN, 64)
    return (x, y, weight, vec, lora_a, lora_b, down, up, vec[:, :64].contiguous(),
            torch.zeros(SLOTS, dtype=torch.bool, device="cuda"))


def sparse_bank(density: float, dtype, g):
    """SLOTS slots (0 null) of random positions at `density` of a (HIDDEN, HIDDEN) weight, CSR as the bank keeps it."""
    n = int(density * HIDDEN * HIDDEN)
    index = torch.zeros(SLOTS, n, dtype=torch.long)
    rowptr = torch.zeros(SLOTS, HIDDEN + 1, dtype=torch.int32)
    for s in range(1, SLOTS):
        pos = torch.randperm(HIDDEN * HIDDEN, generator=g)[:n].sort().values
        index[s] = pos
        rowptr[s] = torch.searchsorted(pos, torch.arange(HIDDEN + 1) * HIDDEN)
    value = (torch.randn(SLOTS, n, generator=g) * 0.02).to(dtype)
    return rowptr.cuda(), index.cuda(), value.cuda()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=Path(".gpu"), help="tokenizer.json and rt_texts.json")
    ap.add_argument("--variants", action="store_true",
                    help="also every launch variant of the matmul, adapter and sparse kernels")
    args = ap.parse_args(argv)
    if not fused.serves(torch.device("cuda")):
        print("the fused kernels do not serve this machine (no CUDA device or no Triton)", file=sys.stderr)
        return 2
    dtype, g = torch.float16, torch.Generator().manual_seed(0)
    x, y, weight, vec, lora_a, lora_b, down, up, bias64, gelu = bench_tensors(dtype, g)
    scaling = torch.ones(SLOTS, dtype=dtype, device="cuda")
    ln_w, ln_b = 1 + vec[1], vec[2]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "B": B, "T": T,
                 "hidden": HIDDEN, "us_per_call": {}, "sparse_variants": [],
                 "gathered_variants": [], "adapter_variants": [], "layer_norm_variants": []}
    lengths = rt_lengths(args.bundle)
    res["rt_lengths"] = {"mean": sum(lengths) / B, "longest": max(lengths)}
    for active in (0, 8, 64):
        slots = torch.zeros(B, dtype=torch.long)
        slots[torch.randperm(B, generator=g)[:active]] = torch.randint(1, SLOTS, (active,), generator=g)
        slots = slots.cuda()
        users = torch.nonzero(slots).flatten()
        for padded in (False, True):
            # padded: each row's tokens are a real sentence's (Rotten Tomatoes, as the benchmark's batches), the rest
            # of the 64 padding the kernels skip; else every row has all 64 tokens
            rows = torch.tensor(lengths, dtype=torch.int32).cuda() if padded else None
            lora_down = lambda s=slots: fused.gathered_matmul(x, lora_a, s, scale=scaling, lengths=rows)  # noqa: E731
            ops = {
                "epilogue: bias (BitFit)": lambda: fused.epilogue_(y, bias=(slots, vec), lengths=rows),
                "epilogue: scale (IA3)": lambda: fused.epilogue_(y, scale=(slots, vec), lengths=rows),
                "LoRA r16 (down + epilogue)": lambda: fused.epilogue_(y, low_rank=(slots, lora_down(), lora_b),
                                                                      lengths=rows),
                "adapter m64 + bias + residual (one kernel)": lambda: fused.adapter_(
                    y, slots, down, bias64, up, vec, gelu, bias=(slots, vec), residual=x, lengths=rows),
                "residual: epilogue": lambda: fused.epilogue_(y, residual=x, lengths=rows),
                "residual: torch add": lambda: torch.add(y, x),
                "LayerNorm: torch": lambda: F.layer_norm(y, (HIDDEN,), ln_w, ln_b, 1e-12),
                "residual + LayerNorm: torch add, torch LayerNorm": lambda: F.layer_norm(y + x, (HIDDEN,), ln_w, ln_b,
                                                                                          1e-12),
                "LayerNorm: fused": lambda: fused.layer_norm(y, ln_w, ln_b, 1e-12, lengths=rows),
                "residual + LayerNorm: fused": lambda: fused.layer_norm(y, ln_w, ln_b, 1e-12, residual=x,
                                                                        lengths=rows),
            }
            if active:  # an adapter site's passes: the adapter writing every row, then the LayerNorm; or its term
                # alone on its rows into a delta buffer, which the LayerNorm's kernel adds with the residual
                ops["adapter m64 + residual, then LayerNorm"] = lambda: fused.layer_norm(fused.adapter_(
                    y, slots, down, bias64, up, vec, gelu, residual=x, lengths=rows), ln_w, ln_b, 1e-12, lengths=rows)
                ops["adapter m64 delta, then residual + delta + LayerNorm"] = lambda: fused.layer_norm(
                    y, ln_w, ln_b, 1e-12, residual=x, lengths=rows, delta=(slots, fused.adapter_(
                        y, slots, down, bias64, up, vec, gelu, lengths=rows, delta=True)))
                # rows with a per-task LayerNorm of their own
                ops["residual + per-task LayerNorm: fused"] = lambda: fused.layer_norm(
                    y, ln_w, ln_b, 1e-12, residual=x, tuned=(slots, vec, vec), lengths=rows)
            if active == 8 and padded:  # one site's ops for three methods' rows (8 each, disjoint): one launch or
                other = torch.zeros_like(slots)  # one launch per method, the alternative measured
                free = torch.nonzero(slots == 0).flatten()
                third = torch.zeros_like(slots)
                other[free[:8]], third[free[8:16]] = slots[users], slots[users]
                ops["BitFit + LoRA + IA3 rows, one epilogue"] = lambda o=other, t=third: fused.epilogue_(
                    y, bias=(slots, vec), low_rank=(o, lora_down(o), lora_b), scale=(t, vec), lengths=rows)
                ops["BitFit + LoRA + IA3 rows, one launch each"] = lambda o=other, t=third: (
                    fused.epilogue_(y, bias=(slots, vec), lengths=rows),
                    fused.epilogue_(y, low_rank=(o, lora_down(o), lora_b), lengths=rows),
                    fused.epilogue_(y, scale=(t, vec), lengths=rows))
                rowptr, index, value = sparse_bank(0.05, dtype, g)
                subset_b = torch.nonzero(other).flatten()
                terms = [{"slots": slots, "rowptr": rowptr, "index": index, "value": value, "weight": weight,
                          "rows": users},
                         {"slots": other, "rowptr": rowptr, "index": index, "value": value, "bias": vec,
                          "rows": subset_b}]
                ops["MaskBERT + Diff-Pruning 5% rows, one launch"] = lambda tm=terms: fused.sparse_deltas_(
                    y, x, tm, rows)
                ops["MaskBERT + Diff-Pruning 5% rows, one launch each"] = lambda tm=terms: [
                    fused.sparse_deltas_(y, x, [t], rows) for t in tm]
            if not active and args.variants:
                sweep(res["layer_norm_variants"], f"residual + LayerNorm padded={padded}", fused.LAYER_NORM,
                      LAYER_NORM_VARIANTS, lambda **v: fused.layer_norm(y, ln_w, ln_b, 1e-12, residual=x, lengths=rows,
                                                                         **v), padded=padded)
            if active and padded and args.variants:  # the down projection's launch (one K loop per program)
                sweep(res["gathered_variants"], f"LoRA r16 down {active}/{B} rows", fused.GATHERED, GATHERED_VARIANTS,
                      lambda **v: fused.gathered_matmul(x, lora_a, slots, scaling, rows, **v),
                      op="LoRA r16 down", rows=active)
                sweep(res["adapter_variants"], f"adapter m64 {active}/{B} rows", fused.ADAPTER, ADAPTER_VARIANTS,
                      lambda **v: fused.adapter_(y, slots, down, bias64, up, vec, gelu, residual=x, lengths=rows, **v),
                      rows=active)
            for density in (0.05, 0.005):
                rowptr, index, value = sparse_bank(density, dtype, g)
                ops[f"MaskBERT {density:.1%}"] = (lambda rowptr=rowptr, index=index, value=value: fused.sparse_delta_(
                    y, x, slots, rowptr, index, value, weight, lengths=rows))
                if active:  # programs for the method's rows only (graphs' row subsets)
                    ops[f"MaskBERT {density:.1%} on its rows"] = (
                        lambda rowptr=rowptr, index=index, value=value: fused.sparse_delta_(
                            y, x, slots, rowptr, index, value, weight, lengths=rows, rows=users))
                ops[f"Diff-Pruning {density:.1%} + bias"] = (
                    lambda rowptr=rowptr, index=index, value=value: fused.sparse_delta_(
                        y, x, slots, rowptr, index, value, bias=vec, lengths=rows))
                if active and padded and args.variants:
                    sweep(res["sparse_variants"], f"sparse {density:.1%} {active}/{B} rows", fused.SPARSE, VARIANTS,
                          lambda **v: fused.sparse_delta_(y, x, slots, rowptr, index, value, weight, lengths=rows,
                                                          rows=users, **v),
                          density=density, rows=active)
            for name, fn in ops.items():
                us = graphed_us(fn)
                label = f"{name}, {active}/{B} rows" + (", RT lengths" if padded else "")
                res["us_per_call"][label] = us
                print(f"{label:58s} {us:8.1f} us", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_kernels.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
