"""Serving overhead: what the entry model spends per request when the model itself costs almost nothing.

A two-layer, 64-wide BERT (random weights, the real tokenizer), a few random tasks and K=4 random students, served by
the real tritonserver with each batching mode, beside the do-nothing floor model (`perf/floor_model.py`: chorus's
inputs and outputs, no work) in the same server; perf_analyzer drives each at the given concurrencies, and (with
`--py-spy`) py-spy samples the Python backend stub, so the profile shows the serving path, not the model.

    python -m perf.overhead --out /tmp/overhead [--py-spy] [--concurrency 1 16] [--seconds 6]

Prints throughput, p50/p99, each as a fraction of (throughput) or time above (latency) the floor at the same
concurrency, and the server's mean decode/queue/compute/encode per request; writes overhead.json (+ py-spy raw text).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from chorus.backends.encoder import Encoder, EncoderConfig, init_random
from chorus.backends.engine import resolve_backbone
from chorus.backends.task_files import random_task, save_task
from chorus.server import TritonServer
from perf import loadgen, pa, repos
from perf.bench import STAGES, random_students, stage_means

TINY = EncoderConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)


def tiny_world(work: Path, tokenizer: Path | None = None) -> tuple[dict[str, str], dict[str, str]]:
    backbone = work / "tiny-bert"
    backbone.mkdir(parents=True, exist_ok=True)
    enc = Encoder(TINY)
    init_random(enc)
    (backbone / "config.json").write_text(json.dumps(TINY.to_hf()))
    save_file({k: v.contiguous() for k, v in enc.hf_parameter_map().items()}, backbone / "model.safetensors")
    shutil.copy(tokenizer or resolve_backbone("all-MiniLM-L6-v2") / "tokenizer.json", backbone / "tokenizer.json")
    tasks = {}
    for i, pet in enumerate([{"lora": {"r": 4}}, {"bitfit": {}}, {"ia3": {}}, {"adapter": {"bottleneck": 8}}]):
        name = f"t{i}_{next(iter(pet))}"
        save_task(random_task(name, TINY.hidden_size, TINY.linear_sites(), pet, seed=i), work / "tasks" / name)
        tasks[name] = str(work / "tasks" / name)
    students = {"t0_lora": str(random_students(TINY, work / "students" / "t0_lora", K=4, layers=2))}
    params = {"backbone": str(backbone), "device": "cpu", "max_length": "64", "students": json.dumps(students)}
    return tasks, params


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the all-MiniLM-L6-v2 package's; on the "
                    "GPU machine .gpu/tokenizer.json)")
    ap.add_argument("--py-spy", action="store_true", help="sample the backend stub with py-spy during each run")
    ap.add_argument("--variants", nargs="+", default=["floor", "scheduler-teacher", "scheduler-students",
                                                      "triton-teacher"],
                    help="floor (the do-nothing model) or <batching>-<teacher|students>; batching: scheduler (as "
                         "shipped), unbatched (one request per execute() call: no dynamic_batching block), triton "
                         "(Triton's batcher, 500 us)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "world"
    tasks, params = tiny_world(work, args.tokenizer)
    repo = args.out / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repos.scheduler_model(repo, tasks, **params)
    repos.dynamic_batcher_model(repo, tasks, 500, **params)
    unbatched = repos.write_model(repo, "chorus_unbatched", {"batching": "scheduler", "tasks": json.dumps(tasks), **params})
    config = unbatched / "config.pbtxt"
    config.write_text(repos.DYNAMIC_BATCHING.sub("", config.read_text()))
    texts = ["a quietly moving film about grief", "the plot never comes together", "sharp, funny and humane"] * 10
    data = {"data": [{"TEXT": {"content": [t], "shape": [1]}, "TASK": {"content": ["t0_lora"], "shape": [1]}}
                     for t in texts]}
    (args.out / "input.json").write_text(json.dumps(data))
    repos.floor_model(repo)
    results: dict = {}
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_path=args.out / "server.log",
                      models_to_load=("chorus", "chorus_db500", "chorus_unbatched", repos.FLOOR)) as server:
        for concurrency in args.concurrency:
            for variant in args.variants:
                results[f"{variant}@c{concurrency}"] = measure(server, variant, concurrency, args)
    for key, r in results.items():
        floor = results.get(f"floor@c{key.split('@c')[1]}") or {}
        if floor.get("infer_per_s") and r.get("infer_per_s"):
            r["throughput_vs_floor"] = r["infer_per_s"] / floor["infer_per_s"]
            r["p50_above_floor_ms"] = r["p50_ms"] - floor["p50_ms"]
        stages = r.get("server_stages_ms")
        staged = "" if stages is None else "  server: " + ", ".join(f"{k} {stages[k]:.2f}" for k in STAGES) + " ms"
        vs = (f"  {r['throughput_vs_floor']:.2f}x floor, p50 +{r['p50_above_floor_ms']:.2f} ms"
              if "throughput_vs_floor" in r else "")
        print(f"{key:26s} {r.get('infer_per_s') or 0:8.1f} infer/s  p50 {r.get('p50_ms') or 0:6.2f} ms  "
              f"p99 {r.get('p99_ms') or 0:6.2f} ms{vs}{staged}"
              + (f"  gc longest {r['gc_longest_pause_s'] * 1e3:.0f} ms" if r.get("gc_longest_pause_s") else ""),
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    (args.out / "overhead.json").write_text(json.dumps({
        "date": time.strftime("%FT%T%z"), "commit": commit, "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "command": "python -m perf.overhead " + " ".join(sys.argv[1:]), "concurrency": args.concurrency,
        "results": results}, indent=2))
    return 0


def measure(server: TritonServer, variant: str, concurrency: int, args) -> dict:
    """One perf_analyzer point of `variant` at `concurrency` (and the server's stage means over it)."""
    batching, _, who = variant.partition("-")
    model = {"scheduler": "chorus", "unbatched": "chorus_unbatched", "triton": "chorus_db500",
             "floor": repos.FLOOR}[batching]
    spy = None
    if args.py_spy and model != repos.FLOOR:
        stub = subprocess.run(["pgrep", "-f", f"triton_python_backend_stub .*/{model}/1/model.py"],
                              capture_output=True, text=True).stdout.split()
        if stub:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # the venv's
            spy = subprocess.Popen([py_spy, "record", "--pid", stub[0], "--threads", "-f", "raw",
                                    "-d", str(int(args.seconds * 3 + 3)), "-o",
                                    str(args.out / f"pyspy-{variant}-c{concurrency}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = loadgen.scrape_text(server.metrics_url)
    r = pa.run(model, server.grpc_url, args.out / "input.json", args.out / f"pa-{variant}-c{concurrency}.csv",
               ["--concurrency-range", str(concurrency)], pa.Measurement(int(args.seconds * 1000), 3),
               parameters=None if who == "" else {"students": 0 if who == "teacher" else 4})
    time.sleep(0.3)  # the stub publishes its counters every 0.25 s
    after = loadgen.scrape_text(server.metrics_url)
    stages = stage_means(before, after)
    gc_longest = max((float(line.rsplit(" ", 1)[1]) for line in after.splitlines()
                      if line.startswith("chorus_gc_longest_pause_seconds{") and f'model="{model}"' in line),
                     default=None)
    if spy is not None:
        spy.wait(timeout=120)
    row = r["rows"][0] if r["rows"] else {}
    return {"infer_per_s": row.get("infer_per_s"), "p50_ms": row.get("p50_ms"), "p99_ms": row.get("p99_ms"),
            "server_stages_ms": stages, "gc_longest_pause_s": gc_longest, "command": r["command"],
            "error": None if r["rows"] else r["output_tail"]}


if __name__ == "__main__":
    raise SystemExit(main())
