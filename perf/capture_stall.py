"""What a background CUDA-graph capture costs the batches served meanwhile (GPU; `GraphedForward.background`).

    python3 -m perf.capture_stall --bundle .gpu --out $OUT        (on the GPU machine, after perf/gpu/run.sh's setup)

The bert-base-shaped backbone and 64 random tasks of every PET type (perf.gpu_check), fp16, every shape's bank-wide
graph captured (`warm_up`). A probe batch (2 real Rotten Tomatoes rows of one LoRA task, on its own graph) runs
back to back on this thread while the capture thread records `--keys` mixed-batch graphs; the probe's latencies
(engine.run, host to host) are compared with the same probe while nothing is captured, for each Python switch interval
in `--switch-ms` (how long the capture thread may hold the GIL while the probe's thread waits for it). Prints and
writes capture_stall.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from chorus.backends.engine import Engine
from perf.gpu_check import make_backbone, make_tasks


def probe_ms(engine: Engine, ids: list[list[int]], tasks: list[str], until) -> list[float]:
    out = []
    while not until():
        start = time.perf_counter()
        engine.run(ids, tasks)
        out.append((time.perf_counter() - start) * 1000)
    return out


def summary(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"n": len(ms), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=Path(".gpu"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/capture-stall"))
    ap.add_argument("--keys", type=int, default=4, help="mixed-batch graphs captured per measurement")
    ap.add_argument("--switch-ms", type=float, nargs="+", default=[5.0, 0.5, 0.1])
    args = ap.parse_args(argv)
    cfg = make_backbone(args.work / "bert-base", args.bundle / "tokenizer.json")
    tasks = make_tasks(cfg, args.work / "tasks", 64)
    engine = Engine(args.work / "bert-base", device="cuda", dtype=torch.float16, capacity=80, max_length=64)
    for name, path in tasks.items():
        engine.load_task(name, path)
    graphs = engine.graphs
    graphs.warm_up(engine.max_length)
    names = sorted(tasks)
    texts = json.loads((args.bundle / "rt_texts.json").read_text())
    probe_ids = engine.tokenize(texts[:2])
    probe_tasks = [names[0]] * 2
    pad_ids, mask = engine.pad(probe_ids)
    entry = engine.bank.tasks[names[0]]
    graphs.forward(pad_ids, mask, [entry.head_slot] * 2, {m: [s] * 2 for m, s in entry.slots.items()}, exact=True)
    methods = tuple(sorted({m for n in names for m in engine.bank.tasks[n].slots}))
    shapes = [(b, t) for b in (64, 32, 16, 8) for t in (64, 48, 32)]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "keys": args.keys, "runs": []}
    default_switch = sys.getswitchinterval()
    used = 0
    for switch_ms in args.switch_ms:
        sys.setswitchinterval(switch_ms / 1000)
        quiet_until = time.perf_counter() + 1.0
        quiet = probe_ms(engine, probe_ids, probe_tasks, lambda: time.perf_counter() > quiet_until)
        keys = []
        for b, t in shapes[used:used + args.keys]:  # never captured yet: each is a real capture
            keys.append((b, t, methods, (("maskbert", 1), ("diff_pruning", 1))))
        used += args.keys
        start = time.perf_counter()
        with graphs._lock:
            for key in keys:
                graphs._capture_later(key)
        busy = probe_ms(engine, probe_ids, probe_tasks, lambda: not graphs._queued)
        took = time.perf_counter() - start
        run = {"switch_ms": switch_ms, "quiet": summary(quiet), "capturing": summary(busy), "capture_s": took}
        res["runs"].append(run)
        print(f"switch {switch_ms:4.1f} ms: quiet p50 {run['quiet']['p50_ms']:.2f} p99 {run['quiet']['p99_ms']:.2f} "
              f"max {run['quiet']['max_ms']:.2f} | while capturing {len(keys)} keys ({took:.2f} s): p50 "
              f"{run['capturing']['p50_ms']:.2f} p99 {run['capturing']['p99_ms']:.2f} max "
              f"{run['capturing']['max_ms']:.2f} ms", flush=True)
    sys.setswitchinterval(default_switch)
    graphs.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capture_stall.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
