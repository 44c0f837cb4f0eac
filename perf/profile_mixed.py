"""Where a mixed all-PET batch's time goes on the GPU (issue 3: mixed vs single-task batch), in one process.

    python -m perf.profile_mixed --bundle .gpu --out $OUT     (bash perf/gpu/run.sh profile)

The bert-base-shaped backbone and 64 random tasks of every PET type as the benchmark harness builds them
(perf.gpu_check), 64 real Rotten Tomatoes sentences. Prints and writes `profile_mixed.json`:
    graphed ms: the mixed batch, a single-task batch (LoRA r8), a single-task batch of each entry of the mix
                (`alone:<task>`), the mix without each PET type (PET ops as fused Triton kernels where they serve
                the GPU, `chorus.backends.pet.fused`), each the median of ROUNDS rounds over all of them in turn;
                and the mixed and single-task batches with the torch gathered ops instead (`:torch_ops`)
    replay ms: those batches' graphs replayed alone (device time, no host work): the mixed one, the single-task
               ones and their mean weighted by each entry's rows in the mix (the same 64 rows served as
               single-task batches of their own PET types), and the mixed one with the sparse products on the
               main stream (`fused.OVERLAP` off), and the mixed and single-task ones recaptured with one part of
               the forward changed (`VARIANTS`: torch's residual add and LayerNorm, cuDNN's attention); and the
               mix with its Diff-Pruning tasks at 0.5% density, what `chorus train` makes (Guo et al.), against
               the same rows by type (`dp_trained`); and at larger batches of the same 64 tasks (`SIZES` rows, more
               of the real sentences), the mixed batch against the single-task LoRA batch and the same rows by type
               (`by_size`)
    kernels: the gathered forward run without capture (the same kernels a graph replays) under torch.profiler,
             the top kernels by device time for the mixed and the single-task batch
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from chorus.backends.engine import Engine
from chorus.backends.graphs import GraphedForward
from chorus.backends.pet import fused
from chorus.backends.task_files import random_task, save_task
from perf.gpu_check import PET_MIX, cuda_ms, make_backbone, make_tasks
from perf.inprocess import torch_pet_ops

ROUNDS = 5
SIZES = (128,)  # batch sizes beside 64 rows (`by_size`): the 64 tasks with 2 rows each (graphs.BATCH_BUCKETS' largest)
DP_TRAINED = 0.005  # Diff-Pruning's density in what `chorus train` makes (Guo et al.'s 0.5%); the mix's is 5%


# graphs anew with one part of the forward changed: label -> (what changes, which batches)
VARIANTS = {
    "no_overlap": (lambda: mock.patch.object(fused, "OVERLAP", False), ("mixed",)),  # on the main stream
    "torch_norm": (lambda: mock.patch.object(fused, "NORM", False), ("mixed", "single")),
    "sdpa_cudnn": (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION), ("mixed", "single")),  # `Engine` turns it off
}


def kernels(fn, top: int, cuda: bool) -> list[dict]:
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA if cuda
                                            else torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    rows = sorted(prof.key_averages(), key=us, reverse=True)
    total = sum(map(us, rows))
    return [{"kernel": e.key[:90], "calls": e.count, "ms": us(e) / 1000, "share": us(e) / total}
            for e in rows[:top]] + [{"kernel": "TOTAL", "ms": total / 1000}]


def replay_ms(fn, repeat: int = 50) -> float:
    """The device time of the CUDA graph `fn` (an `Engine.run`) replays: that graph replayed on its own, the median
    of `repeat` (the batch's host work — padding, slots, copies, labels — left out)."""
    used = []
    replay = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = lambda graph: (used.append(graph), replay(graph))[1]
    try:
        fn()
        fn()  # a second time: the batch's own key is captured on its first (hot_after = 1)
    finally:
        torch.cuda.CUDAGraph.replay = replay
    return cuda_ms(used[-1].replay, repeat=repeat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=Path(".gpu"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/profile-mixed"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (times mean nothing there)")
    args = ap.parse_args(argv)
    cfg = make_backbone(args.work / "bert-base", args.bundle / "tokenizer.json")
    tasks = make_tasks(cfg, args.work / "tasks", 64)
    engine = Engine(args.work / "bert-base", device=args.device, dtype=torch.float16, capacity=80, max_length=128)
    trained = {}  # the mix's Diff-Pruning tasks at the density `chorus train` makes
    for i, name in enumerate(sorted(tasks)):
        pet = PET_MIX[i % len(PET_MIX)]
        if "diff_pruning" in pet:
            trained[name] = f"{name}_trained"
            save_task(random_task(trained[name], cfg.hidden_size, cfg.linear_sites(),
                                  {"diff_pruning": {**pet["diff_pruning"], "density": DP_TRAINED}}, seed=i, scale=0.02),
                      args.work / "tasks" / trained[name])
    for name, path in [*tasks.items(), *((t, args.work / "tasks" / t) for t in trained.values())]:
        engine.load_task(name, path)
    if engine.graphs is not None:
        engine.graphs.hot_after, engine.graphs.background = 1, False  # captured at once
    cuda = args.device.startswith("cuda")
    timed = cuda_ms if cuda else lambda fn: float("nan")
    texts = json.loads((args.bundle / "rt_texts.json").read_text())
    ids = engine.tokenize(texts[:64])
    names = sorted(tasks)
    types = sorted({n.split("_", 1)[1] for n in names})
    mixed = [names[i % len(names)] for i in range(64)]
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "rows": 64,
                 "longest": max(map(len, ids)), "graphed_ms": {}}
    runs = {"mixed": lambda: engine.run(ids, mixed), "single:" + names[0]: lambda: engine.run(ids, [names[0]] * 64)}
    entries = names[:len(PET_MIX)]  # one task of each entry of the mix (LoRA r8 and r16, Houlsby and Pfeiffer, ...)
    for one in entries:
        runs["alone:" + one] = lambda one=one: engine.run(ids, [one] * 64)
    mixed_dp = [trained.get(n, n) for n in mixed]
    dp_one = next(one for one in entries if one in trained)
    runs["mixed:dp_trained"] = lambda: engine.run(ids, mixed_dp)
    runs["alone:" + trained[dp_one]] = lambda: engine.run(ids, [trained[dp_one]] * 64)
    for t in types:
        rest = [n for n in names if not n.endswith("_" + t)]
        runs["mixed_without:" + t] = lambda rest=rest: engine.run(ids, [rest[i % len(rest)] for i in range(64)])
    # rounds over every batch in turn, each figure the median of its rounds: a slow spell of the host or the GPU
    # falls on all of them alike rather than on whichever ran then
    rounds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(ROUNDS):
        for k, fn in runs.items():
            rounds[k].append(timed(fn))
    g = res["graphed_ms"] = {k: statistics.median(v) for k, v in rounds.items()}
    res["graphed_ms_rounds"] = rounds
    # the ratio within each round (the two batches timed moments apart), and its median over the rounds
    res["single_over_mixed_rounds"] = [s / m for s, m in zip(rounds["single:" + names[0]], rounds["mixed"])]
    res["single_over_mixed"] = statistics.median(res["single_over_mixed_rounds"])
    # the same 64 rows as single-task batches of each entry of the mix, weighted by the entry's rows in the mix
    share = {one: sum(names.index(n) % len(PET_MIX) == i for n in mixed) / len(mixed) for i, one in enumerate(entries)}
    res["single_task_mean_ms"] = sum(share[one] * g["alone:" + one] for one in entries)
    if engine.graphs is not None and fused.serves(engine.device):  # the torch gathered ops, in the same process
        with torch_pet_ops(engine):
            g["mixed:torch_ops"] = timed(lambda: engine.run(ids, mixed))
            g["single:torch_ops"] = timed(lambda: engine.run(ids, [names[0]] * 64))
    if engine.graphs is not None:  # the graphs alone: replays of the captured forward, no host work between
        r = res["replay_ms"] = {k: replay_ms(runs[k]) for k in ("mixed", "single:" + names[0],
                                                                 *("alone:" + one for one in entries),
                                                                 "mixed:dp_trained", "alone:" + trained[dp_one])}
        res["single_over_mixed_replay"] = r["single:" + names[0]] / r["mixed"]
        res["single_task_mean_replay_ms"] = sum(share[one] * r["alone:" + one] for one in entries)
        res["single_mean_over_mixed_replay"] = res["single_task_mean_replay_ms"] / r["mixed"]
        res["dp_trained"] = {"density": DP_TRAINED, "single_task_mean_replay_ms": sum(
            share[one] * r["alone:" + trained.get(one, one)] for one in entries)}
        res["dp_trained"]["single_mean_over_mixed_replay"] = (res["dp_trained"]["single_task_mean_replay_ms"]
                                                              / r["mixed:dp_trained"])
        res["dp_trained"]["single_over_mixed_replay"] = r["single:" + names[0]] / r["mixed:dp_trained"]
        res["by_size"] = {64: {"longest": res["longest"], "mixed": r["mixed"], "single": r["single:" + names[0]],
                               "by_type": res["single_task_mean_replay_ms"]}}
        for n in SIZES:  # the same tasks, more rows each: the PET kernels' fixed costs over more rows
            more = engine.tokenize(texts[:n])
            engine.graphs.max_tokens = n * 512  # graphed whatever its longest sentence (serving runs them eagerly)
            mixed_n = (mixed * n)[:n]  # the 64 tasks in turn, as at 64 rows
            size = res["by_size"][n] = {
                "longest": max(map(len, more)),
                "mixed": replay_ms(lambda: engine.run(more, mixed_n)),
                "single": replay_ms(lambda: engine.run(more, [names[0]] * n)),
                "by_type": sum(share[one] * replay_ms(lambda one=one: engine.run(more, [one] * n)) for one in entries)}
        for n, size in res["by_size"].items():
            size["single_over_mixed"], size["by_type_over_mixed"] = (size["single"] / size["mixed"],
                                                                     size["by_type"] / size["mixed"])
            print(f"{n:4d} rows (longest {size['longest']:3d}): mixed {size['mixed']:.3f} ms, single-task "
                  f"{size['single']:.3f} ({size['single_over_mixed']:.2f}), by type {size['by_type']:.3f} "
                  f"({size['by_type_over_mixed']:.2f})", flush=True)
        if fused.serves(engine.device):
            for variant, (change, batches) in VARIANTS.items():
                graphs, engine.graphs = engine.graphs, GraphedForward(engine.model, hot_after=1, background=False)
                try:
                    with change():
                        for batch in batches:
                            r[f"{batch}:{variant}"] = replay_ms(runs["mixed" if batch == "mixed" else
                                                                    "single:" + names[0]])
                except RuntimeError as e:  # a backend that does not run here (e.g. no cuDNN attention)
                    print(f"{variant}: {e}", flush=True)
                finally:
                    engine.graphs = graphs
        for k, v in res["replay_ms"].items():
            print(f"replay {k:33s} {v:8.3f} ms", flush=True)
        print(f"{'single-task / mixed, replays':40s} {res['single_over_mixed_replay']:8.2f}", flush=True)
        print(f"{'single-task batches of the mix / mixed':40s} {res['single_mean_over_mixed_replay']:8.2f}", flush=True)
        print(f"{'the same, Diff-Pruning at 0.5%':40s} {res['dp_trained']['single_mean_over_mixed_replay']:8.2f}",
              flush=True)
    res["fused_pet_kernels"] = fused.serves(engine.device)
    for k, v in g.items():
        print(f"{k:40s} {v:8.2f} ms", flush=True)
    print(f"{'single-task batches, mean over the mix':40s} {res['single_task_mean_ms']:8.2f} ms", flush=True)
    print(f"{'single-task / mixed, median of rounds':40s} {res['single_over_mixed']:8.2f}", flush=True)
    eager = GraphedForward(engine.model, capture=False, hot_after=1)  # each batch's own key, as `graphed_ms`
    pad_ids, mask = engine.pad(ids)
    res["kernels_mixed"] = kernels(lambda: eager(pad_ids, mask, mixed), 30, cuda)
    res["kernels_single"] = kernels(lambda: eager(pad_ids, mask, [names[0]] * 64), 15, cuda)
    for label in ("kernels_mixed", "kernels_single"):
        print(f"\n{label}")
        for r in res[label]:
            print(f"  {r['ms']:8.3f} ms {r.get('calls', ''):>6} {r['kernel']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_mixed.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
