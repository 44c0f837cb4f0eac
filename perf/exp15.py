"""Session 15 experiment (issue 3): an adapter's bottleneck from the linear's input, beside the shared GEMM.

    python3 -m perf.exp15 $OUT      (on the H100; graphed time per call as perf.fused_kernels measures it)

`down · (x·Wᵀ + b) = x · (down·W)ᵀ + down·b`: with `down·W` kept per task, an adapter's bottleneck reads the linear's
input and can run on a side stream while the shared GEMM runs; the up-projection then joins the site's epilogue as a
low-rank term. Each case is one output site of the mixed batch, shared GEMM included (64 rows, RT lengths, a 64-token
bucket): the attention output (768 inputs, 8 adapter rows, 8 BitFit rows) and the feed-forward output (3072 inputs,
16 adapter rows, 8 BitFit rows)."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chorus.backends.pet import fused
from perf.fused_kernels import B, HIDDEN, SLOTS, T, graphed_us, rt_lengths

M = 64


def main(out_dir: str) -> None:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, scale=0.02: (torch.randn(*shape, generator=g) * scale).half().cuda()  # noqa: E731
    lengths = torch.tensor(rt_lengths(Path(".gpu")), dtype=torch.int32).cuda()
    perm = torch.randperm(B, generator=g)
    side = torch.cuda.Stream()
    out = {}

    def rec(k, fn):
        out[k] = graphed_us(fn)
        print(f"{k:70s} {out[k]:7.1f}", flush=True)

    for site, K, n in (("attention.output", HIDDEN, 8), ("output", 4 * HIDDEN, 16)):
        x, res = rand(B, T, K, scale=1.0), rand(B, T, HIDDEN, scale=1.0)
        W, b = rand(HIDDEN, K), rand(HIDDEN)
        down, up, fold = rand(SLOTS, M, HIDDEN), rand(SLOTS, HIDDEN, M), rand(SLOTS, M, K)
        vec, db, ones = rand(SLOTS, HIDDEN), rand(SLOTS, M), torch.ones(SLOTS, dtype=torch.float16, device="cuda")
        gelu = torch.zeros(SLOTS, dtype=torch.bool, device="cuda")
        slots, bitfit = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        slots[perm[:n]] = torch.randint(1, SLOTS, (n,), generator=g)
        bitfit[perm[n:n + 8]] = torch.randint(1, SLOTS, (8,), generator=g)
        slots, bitfit = slots.cuda(), bitfit.cuda()

        def now():
            y = F.linear(x, W, b)
            return fused.adapter_(y, slots, down, db, up, vec, gelu, bias=(bitfit, vec), residual=res, lengths=lengths)

        def single():
            return F.linear(x, W, b).add_(res)

        def bitfit_only():
            return fused.epilogue_(F.linear(x, W, b), bias=(bitfit, vec), residual=res, lengths=lengths)

        def folded(on_side: bool):
            def run():
                main_stream = torch.cuda.current_stream()
                if on_side:
                    side.wait_stream(main_stream)
                    with torch.cuda.stream(side):
                        z = fused.gathered_matmul(x, fold, slots, ones, lengths)
                else:
                    z = fused.gathered_matmul(x, fold, slots, ones, lengths)
                y = F.linear(x, W, b)
                if on_side:
                    main_stream.wait_stream(side)
                return fused.epilogue_(y, bias=(bitfit, vec), low_rank=(slots, z, up), residual=res, lengths=lengths)
            return run

        rec(f"{site}: GEMM alone", lambda: F.linear(x, W, b))
        rec(f"{site}: single-task (GEMM + residual add)", single)
        rec(f"{site}: BitFit rows only (GEMM + epilogue)", bitfit_only)
        rec(f"{site}: now (GEMM + adapter_ with bias and residual)", now)
        rec(f"{site}: folded, bottleneck on the main stream", folded(False))
        rec(f"{site}: folded, bottleneck on a side stream", folded(True))
        rec(f"{site}: the bottleneck alone ({n} rows, {K} inputs)",
            lambda: fused.gathered_matmul(x, fold, slots, ones, lengths))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "exp15.json").write_text(json.dumps(out, indent=1))




# ---- part 2: the sparse product with each output block's entries split over S programs (shorter chains) ----------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def split_sparse_kernel(y_ptr, xt_ptr, len_ptr, rows_ptr, slot_ptr, rowptr_ptr, index_ptr, value_ptr, T, N, K,
                        max_nnz, S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
                        ATOMIC: tl.constexpr):
    """y (B, T, N) float32 += x · ΔWᵀ on rows `rows`, ΔW a slot's CSR; program (row, split) walks 1/S of its output
    block's entries and adds its partial sums atomically (ATOMIC; else stores: S must be 1)."""
    p = tl.program_id(0)
    b = tl.load(rows_ptr + p // S)
    s = p % S
    n0 = tl.program_id(1) * BLOCK_N
    t0 = tl.program_id(2) * BLOCK_T
    slot = tl.load(slot_ptr + b)
    length = tl.load(len_ptr + b)
    if (slot != 0) & (t0 < length):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, CHUNK)
        rowptr = rowptr_ptr + slot * (N + 1)
        first = tl.load(rowptr + n0)
        last = tl.load(rowptr + tl.minimum(n0 + BLOCK_N, N))
        per = tl.cdiv(last - first, S)
        start = first + s * per
        end = tl.minimum(start + per, last)
        entries = index_ptr + slot.to(tl.int64) * max_nnz
        values = value_ptr + slot.to(tl.int64) * max_nnz
        x_row = xt_ptr + b * T * K
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for e0 in range(start, end, CHUNK):
            ok = e0 + offs_e < end
            pos = tl.load(entries + e0 + offs_e, mask=ok, other=0).to(tl.int32)
            val = tl.load(values + e0 + offs_e, mask=ok, other=0.0)
            col = pos % K
            xv = tl.load(x_row + col[:, None] * T + offs_t[None, :], mask=ok[:, None] & (offs_t < T)[None, :],
                         other=0.0)
            mine = (pos // K - n0)[None, :] == tl.arange(0, BLOCK_N)[:, None]
            placed = tl.where(mine, val[None, :], tl.zeros_like(val)[None, :]).to(xv.dtype)
            acc = tl.dot(placed, xv, acc)
        ptrs = y_ptr + b * T * N + offs_t[None, :] * N + offs_n[:, None]
        mask = (offs_n < N)[:, None] & (offs_t < length)[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
        else:
            tl.store(ptrs, acc, mask=mask)


def split_sparse(buf, xt, lengths, rows, slots, rowptr, index, value, S, chunk=128, block_n=16, block_t=32,
                 atomic=True, num_warps=4):
    B, K, T = xt.shape
    N = buf.shape[2]
    split_sparse_kernel[(len(rows) * S, N // block_n, -(-T // block_t))](
        buf, xt, lengths, rows, slots, rowptr, index, value, T, N, K, index.shape[1], S=S, BLOCK_N=block_n,
        BLOCK_T=block_t, CHUNK=chunk, ATOMIC=atomic, num_warps=num_warps)


def sparse_split(out_dir: str) -> None:
    from perf.fused_kernels import sparse_bank

    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor(rt_lengths(Path(".gpu")), dtype=torch.int32).cuda()
    x = (torch.randn(B, T, HIDDEN, generator=g)).half().cuda()
    xt = fused.transposed(x, lengths)
    perm = torch.randperm(B, generator=g)
    out = {}
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def rec(k, fn):
        out[k] = graphed_us(fn)
        print(f"{k:70s} {out[k]:7.1f}", flush=True)

    for density in (0.05, 0.005):
        rowptr, index, value = sparse_bank(density, torch.float16, g)
        for n in (8, 16, 64):
            rows = perm[:n].sort().values
            slots = torch.zeros(B, dtype=torch.long)
            slots[rows] = torch.randint(1, SLOTS, (n,), generator=g)
            slots, rows = slots.cuda(), rows.cuda()
            term = {"slots": slots, "rowptr": rowptr, "index": index, "value": value, "rows": rows}
            y16 = torch.empty(B, T, HIDDEN, dtype=torch.float16, device="cuda")
            rec(f"{density:.1%} {n} rows: CSR kernel (main), delta buffer", lambda t=term: fused.sparse_deltas_(
                y16, x, [t], lengths, None, accumulate=False))
            buf = torch.zeros(B, T, HIDDEN, dtype=torch.float32, device="cuda")
            args = (buf, xt, lengths, rows, slots, rowptr, index, value)
            rec(f"{density:.1%} {n} rows: split S=1, store", lambda a=args: split_sparse(*a, 1, atomic=False))
            for S in (1, 2, 4, 8):
                for chunk in (64, 128):
                    rec(f"{density:.1%} {n} rows: split S={S} chunk {chunk}, atomic",
                        lambda a=args, S=S, c=chunk: split_sparse(*a, S, chunk=c))
            buf.zero_()
            split_sparse(*args, 4)
            y16.zero_()
            fused.sparse_deltas_(y16, x, [term], lengths, accumulate=True)
            out[f"{density:.1%} {n} rows: max abs diff S=4 vs main"] = float((buf - y16.float()).abs().max())
            print("  max abs diff", out[f"{density:.1%} {n} rows: max abs diff S=4 vs main"], flush=True)
    buf = torch.zeros(B, T, HIDDEN, dtype=torch.float32, device="cuda")
    rec("zero a (64, 64, 768) float32 buffer", lambda: buf.zero_())
    small = torch.zeros(16, T, HIDDEN, dtype=torch.float32, device="cuda")
    rec("zero a (16, 64, 768) float32 buffer", lambda: small.zero_())
    (Path(out_dir) / "exp15-sparse.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    if "--sparse" in sys.argv:
        sparse_split(sys.argv[1])
    else:
        main(sys.argv[1])
