"""Session 14 experiment (issue 3): the sparse products with ΔW as a bitmap of tiles vs the CSR kernel.

    python3 -m perf.exp14 $OUT      (on the H100; graphed time per call as perf.fused_kernels measures it)

Both sparse methods at one 768 x 768 site (MaskBERT's scores, Diff-Pruning's values + bias), 8 rows each of 64
with RT lengths, into a delta buffer with row subsets (as `Overlap` launches them), at 5% and 0.5% density; one
method on all 64 rows; the bitmap kernel's launch variants."""
import json
import sys
from pathlib import Path

import torch

from chorus.backends.pet import fused
from perf.fused_kernels import B, HIDDEN, SLOTS, bench_tensors, graphed_us, rt_lengths, sparse_bank


def bitmap_bank(index: torch.Tensor, value: torch.Tensor, rowptr: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The CSR bank `sparse_bank` made as the bitmap kernel reads it (values reordered tile by tile), and the bits
    of its negative values' positions only (MaskBERT's pruned weights)."""
    bits, tiles, tiled, pruned = [], [], torch.zeros_like(value), []
    for s in range(len(index)):
        n = int(rowptr[s, -1])
        order, t, b = fused.tile_order(index[s, :n], HIDDEN, HIDDEN)
        tiled[s, :n] = value[s, :n][order]
        bits.append(b)
        tiles.append(t)
        pruned.append(fused.tile_order(index[s, :n][value[s, :n] < 0], HIDDEN, HIDDEN)[2])
    return {"bits": torch.stack(bits), "tiles": torch.stack(tiles), "value": tiled}, torch.stack(pruned)


def main(out_dir: str) -> None:
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    x, y, weight, vec, *_ = bench_tensors(dt, g)
    rows = torch.tensor(rt_lengths(Path(".gpu")), dtype=torch.int32).cuda()
    perm = torch.randperm(B, generator=g)
    out = {}

    def rec(k, fn):
        out[k] = graphed_us(fn)
        print(f"{k:70s} {out[k]:7.1f}", flush=True)

    sa, sb = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    sa[perm[:8]] = torch.randint(1, SLOTS, (8,), generator=g)
    sb[perm[8:16]] = torch.randint(1, SLOTS, (8,), generator=g)
    sa, sb = sa.cuda(), sb.cuda()
    every = torch.randint(1, SLOTS, (B,), generator=g).cuda()
    buf = torch.empty_like(y)
    dense = weight.expand(SLOTS, -1, -1).contiguous()  # the floor: each row's own dense ΔW, one matmul
    scale = torch.ones(SLOTS, dtype=dt, device="cuda")
    rec("dense floor: gathered matmul 768 x 768, 8 rows", lambda: fused.gathered_matmul(x, dense, sa, scale, rows))
    rec("dense floor: gathered matmul 768 x 768, 16 rows", lambda: fused.gathered_matmul(x, dense, sa + sb, scale,
                                                                                          rows))
    for density in (0.05, 0.005):
        rowptr, index, value = sparse_bank(density, dt, g)
        csr = {"rowptr": rowptr, "index": index, "value": value}
        bm, pruned = bitmap_bank(index, value, rowptr)
        csr_fn = lambda *a, **k: fused.sparse_deltas_(*a, memo={}, **k)  # noqa: E731 - transposes x each call
        for name, bank, fn in (("csr", csr, csr_fn), ("bitmap", bm, fused.bitmap_deltas_),
                               ("bitmap pruned", {**bm, "bits": pruned, "pruned": True}, fused.bitmap_deltas_)):
            terms = [{"slots": sa, **bank, "weight": weight, "rows": perm[:8].cuda()},
                     {"slots": sb, **(csr if name == "csr" else bm), "bias": vec, "rows": perm[8:16].cuda()}]
            # the check: both kernels' products agree
            fn(buf, x, terms, rows, accumulate=False)
            got = buf.clone()
            if name == "csr":
                ref = got
            else:
                live = ((sa != 0) | (sb != 0))[:, None, None] & (torch.arange(64, device="cuda")[None, :, None]
                                                                 < rows[:, None, None])
                err = float(torch.where(live, (got - ref).abs(), 0).max())
                out[f"max |{name} - csr| at {density:.1%}"] = err
                print(f"max |{name} - csr| at {density:.1%}: {err:.4f}", flush=True)
            rec(f"{name} {density:.1%}: MaskBERT + Diff-Pruning, 8 rows each", lambda: fn(
                buf, x, terms, rows, accumulate=False))
            rec(f"{name} {density:.1%}: MaskBERT, 8 rows", lambda: fn(buf, x, terms[:1], rows, accumulate=False))
            rec(f"{name} {density:.1%}: Diff-Pruning, 8 rows", lambda: fn(buf, x, terms[1:], rows, accumulate=False))
            rec(f"{name} {density:.1%}: MaskBERT, 64 rows", lambda: fn(
                y, x, [{"slots": every, **bank, "weight": weight, "rows": None}], rows))
            if name != "csr":
                for launch in ({"block_t": 16}, {"block_t": 64}, {"num_warps": 8}, {"num_stages": 2},
                               {"num_stages": 4}, {"num_warps": 8, "num_stages": 2}):
                    rec(f"{name} {density:.1%} 8+8 rows {launch}", lambda: fn(
                        buf, x, terms, rows, accumulate=False, **launch))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "exp14.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
