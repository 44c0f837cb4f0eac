"""Session 13 experiment (issue 3): launch variants of the adapter and sparse kernels on the mixed forward's cases.

    python3 -m perf.exp13 $OUT      (on the H100; graphed time per call as perf.fused_kernels measures it)

Adapters at 0, 8 and 16 of 64 rows (the mixed batch's attention and feed-forward output sites) with RT lengths; the
two sparse methods at one site, 8 rows each, into a delta buffer with row subsets (as `Overlap` launches them)."""
import json
import sys
from pathlib import Path

import torch

from chorus.backends.pet import fused
from perf.fused_kernels import B, SLOTS, bench_tensors, graphed_us, rt_lengths, sparse_bank


def main(out_dir: str) -> None:
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    x, y, weight, vec, _, _, down, up, bias64, gelu = bench_tensors(dt, g)
    rows = torch.tensor(rt_lengths(Path(".gpu")), dtype=torch.int32).cuda()
    perm = torch.randperm(B, generator=g)
    out = {}

    def rec(k, fn):
        out[k] = graphed_us(fn)
        print(f"{k:70s} {out[k]:7.1f}", flush=True)

    for active in (0, 8, 16):
        for where in ("spread", "first", "last"):  # which of the 64 rows have an adapter (grid order: rows fastest)
            chosen = {"spread": perm[:active], "first": torch.arange(active),
                      "last": torch.arange(B - active, B)}[where]
            slots = torch.zeros(B, dtype=torch.long)
            slots[chosen] = torch.randint(1, SLOTS, (active,), generator=g)
            slots = slots.cuda()
            bitfit = torch.zeros_like(slots)  # the mixed batch: BitFit rows (8 others) beside the adapter rows
            bitfit[torch.nonzero(slots == 0).flatten()[:8]] = 1
            rec(f"adapter {active} rows, {where}", lambda s=slots: fused.adapter_(
                y, s, down, bias64, up, vec, gelu, bias=(bitfit, vec), residual=x, lengths=rows))
            rec(f"adapter {active} rows, {where}, no bias term", lambda s=slots: fused.adapter_(
                y, s, down, bias64, up, vec, gelu, residual=x, lengths=rows))
            rec(f"adapter {active} rows, {where}, each adapter row's task with a bias", lambda s=slots: fused.adapter_(
                y, s, down, bias64, up, vec, gelu, bias=(s, vec), residual=x, lengths=rows))
            if not active:
                break
    rec("residual add", lambda: y.add_(x))
    # two sparse methods, 8 rows each, as Overlap launches them (delta buffer, row subsets)
    rowptr, index, value = sparse_bank(0.05, dt, g)
    sa, sb = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    sa[perm[:8]] = torch.randint(1, SLOTS, (8,), generator=g)
    sb[perm[8:16]] = torch.randint(1, SLOTS, (8,), generator=g)
    csr = {"rowptr": rowptr, "index": index, "value": value}
    terms = [{"slots": sa.cuda(), **csr, "weight": weight, "rows": perm[:8].cuda()},
             {"slots": sb.cuda(), **csr, "bias": vec, "rows": perm[8:16].cuda()}]
    buf = torch.empty_like(y)
    rec("sparse 2x8 rows", lambda: fused.sparse_deltas_(buf, x, terms, rows, {}, accumulate=False))
    rec("transpose all rows", lambda: fused.transposed(x, rows))
    rec("transpose the 16 rows of two sparse methods", lambda: fused.transposed(x, rows, None, (terms[0]["slots"],
                                                                                             terms[1]["slots"])))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "exp13.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
