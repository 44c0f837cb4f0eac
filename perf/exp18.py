"""Session 18 experiment (issue 3): the mixed batch's PET kernels with their weights cold in L2, as a forward finds
them (each layer's PET tensors are read once a forward; a forward's adapter and sparse banks outgrow L2), against
warm (what `perf.fused_kernels` measures: 20 calls on the same tensors).

    python -m perf.exp18 --bundle .gpu --out $OUT

Each op: a CUDA graph of 20 x (an L2 flush, the op), less a graph of 20 flushes alone; per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from chorus.backends.pet import fused
from perf.fused_kernels import B, SLOTS, bench_tensors, rt_lengths, sparse_bank

FLUSH_MB = 128  # more than the H100's 50 MB L2


def graphed_us(fn, flush: torch.Tensor | None, calls: int = 20, replays: int = 20) -> float:
    def body():
        if flush is not None:
            flush.zero_()
        if fn is not None:
            fn()

    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            body()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=Path(".gpu"))
    args = ap.parse_args(argv)
    dtype, g = torch.float16, torch.Generator().manual_seed(0)
    x, y, weight, vec, lora_a, lora_b, down, up, bias64, gelu = bench_tensors(dtype, g)
    scaling = torch.ones(SLOTS, dtype=dtype, device="cuda")
    ln_w, ln_b = 1 + vec[1], vec[2]
    rows = torch.tensor(rt_lengths(args.bundle), dtype=torch.int32).cuda()
    flush = torch.empty(FLUSH_MB << 20, dtype=torch.uint8, device="cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "us": {}}
    for active in (8, 16, 64):
        slots = torch.zeros(B, dtype=torch.long)
        slots[torch.randperm(B, generator=g)[:active]] = torch.arange(1, active + 1) % (SLOTS - 1) + 1
        slots = slots.cuda()
        users = torch.nonzero(slots).flatten()
        rowptr, index, value = sparse_bank(0.05, dtype, g)
        ops = {
            "residual + LayerNorm": lambda: fused.layer_norm(y, ln_w, ln_b, 1e-12, residual=x, lengths=rows),
            "adapter m64 delta": lambda s=slots: fused.adapter_(y, s, down, bias64, up, vec, gelu, lengths=rows,
                                                                delta=True),
            "adapter m64 delta, then residual + delta + LayerNorm": lambda s=slots: fused.layer_norm(
                y, ln_w, ln_b, 1e-12, residual=x, lengths=rows, delta=(s, fused.adapter_(
                    y, s, down, bias64, up, vec, gelu, lengths=rows, delta=True))),
            "LoRA r16 down + epilogue": lambda s=slots: fused.epilogue_(
                y, low_rank=(s, fused.gathered_matmul(x, lora_a, s, scale=scaling, lengths=rows), lora_b),
                lengths=rows),
            "MaskBERT 5% on its rows": lambda s=slots, u=users: fused.sparse_delta_(
                y, x, s, rowptr, index, value, weight, lengths=rows, rows=u),
        }
        base = graphed_us(None, flush)
        for name, fn in ops.items():
            warm, cold = graphed_us(fn, None), graphed_us(fn, flush) - base
            res["us"][f"{name}, {active}/{B} rows"] = {"warm": warm, "cold": cold}
            print(f"{name + f', {active}/{B} rows':60s} warm {warm:6.1f} us  cold {cold:6.1f} us", flush=True)
    res["flush_us"] = base
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exp18.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
