"""One task's students on one GPU vs placed over every visible GPU (`PlacedStudents`: contiguous ranges of the K
students per device, the partial boosting sums gathered once on the first), in process, no server.

Students of bert-base width (hidden 768, 12 heads, FFN 3072), 2 layers each, random weights, fp16; K = 4 and 8; rows
of 32 tokens in batches of 1, 16 and 64. Both sides run as the bank runs them: inputs already on the first GPU, CUDA
graphs per (k, shape) (`GraphedStudents`), the first calls (captures) not timed. Each row is timed for all K students
and for the prefix that fits on the first device (k = ceil(K / devices): pruning leaves the other devices idle, so
placed and single should match there). Every timed call is followed by a synchronisation of every GPU.

    python -m perf.students_placement --out students_placement.json

Exits 0 with a message (and, with --out, a JSON saying why) when fewer than 2 GPUs are visible.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from chorus.backends.students import PlacedStudents, SharedEmbeddings, Student, StudentConfig, StudentGroup
from chorus.backends.students.cuda_graphs import GraphedStudents
from chorus.backends.students.placement import balanced_split

VOCAB, POSITIONS, HIDDEN, HEADS, FFN, LAYERS = 30522, 512, 768, 12, 3072, 2  # bert-base width


def random_group(K: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StudentGroup:
    """K random students (std 0.02, LayerNorms at identity) over random bert-base-sized embeddings, on `device`."""
    cfg = StudentConfig(num_students=K, num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, intermediate_size=FFN,
                        num_labels=2, dropout=0.0)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=g, device=device, dtype=dtype)

    ones, zeros = (f(HIDDEN, device=device, dtype=dtype) for f in (torch.ones, torch.zeros))
    emb = SharedEmbeddings(randn(VOCAB, HIDDEN), randn(POSITIONS, HIDDEN), randn(2, HIDDEN), ones, zeros, 1e-12)
    shapes = {name: tuple(t.shape) for name, t in Student(cfg).state_dict().items()}  # names and shapes only
    tensors = {name: (torch.ones((K, *s), device=device, dtype=dtype) if "norm.weight" in name else
                      torch.zeros((K, *s), device=device, dtype=dtype) if "norm.bias" in name else randn(K, *s))
               for name, s in shapes.items()}
    alphas = torch.linspace(1.0, 0.3, K)
    return StudentGroup(cfg, emb, tensors, alphas.to(device)).to(dtype=dtype).eval()


def time_ms(fn, devices: list[torch.device], repeats: int, warmup: int) -> dict[str, float]:
    def sync() -> None:
        for d in devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(1000 * (time.perf_counter() - start))
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p90_ms": samples[int(0.9 * (len(samples) - 1))],
            "mean_ms": statistics.fmean(samples)}


@torch.inference_mode()
def run(visible: list[torch.device], students: list[int], batch_sizes: list[int], seq_len: int, repeats: int,
        warmup: int, dtype: torch.dtype = torch.float16) -> dict:
    first = visible[0]
    rows = []
    for K in students:
        devices = visible[:K]  # as StudentBank does: K students fill at most K devices
        one = random_group(K, first, dtype, seed=K)
        single = GraphedStudents(one)
        placed = PlacedStudents(one, devices)
        ranges = [[r.start, r.stop] for r in placed.ranges]
        for k in sorted({K, math.ceil(K / len(devices))}, reverse=True):
            for B in batch_sizes:
                g = torch.Generator().manual_seed(B)
                ids = torch.randint(VOCAB // 2, VOCAB, (B, seq_len), generator=g).to(first)
                mask = torch.ones_like(ids)
                diff = float((placed(ids, mask, k=k).float() - single(ids, mask, k=k).float()).abs().max())
                t_one = time_ms(lambda: single(ids, mask, k=k), devices, repeats, warmup)  # noqa: B023
                t_placed = time_ms(lambda: placed(ids, mask, k=k), devices, repeats, warmup)  # noqa: B023
                rows.append({"K": K, "k": k, "batch": B, "seq_len": seq_len, "devices": len(devices),
                             "devices_running": len(placed.active(k)), "ranges": ranges, "one_gpu": t_one,
                             "placed": t_placed, "speedup_p50": t_one["p50_ms"] / t_placed["p50_ms"],
                             "max_abs_diff": diff})
                r = rows[-1]
                print(f"{K:>3} {k:>3} {B:>6} {r['devices_running']:>4}/{len(devices):<3} {t_one['p50_ms']:>10.3f} "
                      f"{t_placed['p50_ms']:>10.3f} {r['speedup_p50']:>8.2f}x {diff:>10.2e}", flush=True)
        del one, single, placed
        if first.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def environment() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--students", type=int, nargs="+", default=[4, 8], help="K values")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args(argv)
    config = {"students": args.students, "batch_sizes": args.batch_sizes, "seq_len": args.seq_len,
              "repeats": args.repeats, "warmup": args.warmup, "dtype": "float16", "hidden_size": HIDDEN,
              "num_layers": LAYERS, "intermediate_size": FFN, "num_heads": HEADS}
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        why = f"students placement needs at least 2 CUDA devices; {n} visible: nothing to compare"
        print(why, file=sys.stderr)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"skipped": why, "config": config, "gpus": n}, indent=2) + "\n")
        return 0
    env = environment()
    print(f"{n} x {env['gpus'][0]}, torch {env['torch']}; fp16, {LAYERS}-layer students of width {HIDDEN}, "
          f"seq len {args.seq_len}; p50 over {args.repeats} calls")
    for K in args.students:
        print(f"K={K}: students per GPU {[len(r) for r in balanced_split(K, min(n, K))]}")
    print(f"{'K':>3} {'k':>3} {'batch':>6} {'gpus':>8} {'1 GPU ms':>10} {'placed ms':>10} {'speedup':>9} "
          f"{'max |diff|':>10}")
    rows = run([torch.device("cuda", i) for i in range(n)], args.students, args.batch_sizes, args.seq_len, args.repeats,
               args.warmup)
    result = {"environment": env, "config": config, **rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
