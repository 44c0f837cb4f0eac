"""The chorus deployment on a GPU: a bert-base-shaped backbone (random weights: the real all-MiniLM-L6-v2 does not fit
the GPU machine's 64 MiB carry limit next to tritonserver) with LoRA and BitFit tasks, served in fp16 by a real
tritonserver, checked against the in-process engine, and measured with perf_analyzer; plus in-process timings of one
mixed-task batch vs the same rows one task at a time (PetS's SeqS) vs a single-task batch.

Run through perf/gpu/run.sh on the GPU machine; writes gpu_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

from chorus.backends.encoder import Encoder, EncoderConfig, init_random
from chorus.backends.engine import Engine
from chorus.backends.task_files import random_task, save_task
from chorus.server import TritonServer
from perf import repos

ROOT = Path(__file__).resolve().parents[1]


def make_backbone(path: Path, tokenizer: Path) -> EncoderConfig:
    cfg = EncoderConfig()  # bert-base: 12 layers, hidden 768, 12 heads, FFN 3072
    enc = Encoder(cfg)
    init_random(enc, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    save_file({k: v.contiguous() for k, v in enc.hf_parameter_map().items()}, path / "model.safetensors")
    shutil.copy(tokenizer, path / "tokenizer.json")
    return cfg


# Every PET type (issue 3's mixed batch): LoRA of two ranks, BitFit, Houlsby and Pfeiffer adapters, IA3, MaskBERT
# and Diff-Pruning (5% of each adapted weight).
PET_MIX = [
    {"lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]}},
    {"bitfit": {}},
    {"adapter": {"placement": "houlsby", "bottleneck": 64}},
    {"ia3": {}},
    {"lora": {"r": 16, "alpha": 32, "target_modules": ["query", "value"]}},
    {"adapter": {"placement": "pfeiffer", "bottleneck": 48}},
    {"maskbert": {"density": 0.05, "target_modules": ["query", "value"]}},
    {"diff_pruning": {"density": 0.05, "target_modules": ["query", "value"]}},
]


def make_tasks(cfg: EncoderConfig, tasks_dir: Path, n: int) -> dict[str, str]:
    tasks = {}
    for i in range(n):
        pet = PET_MIX[i % len(PET_MIX)]
        name = f"task{i:03d}_{next(iter(pet))}"
        save_task(random_task(name, cfg.hidden_size, cfg.linear_sites(), pet, seed=i, scale=0.02), tasks_dir / name)
        tasks[name] = str(tasks_dir / name)
    return tasks


def write_repository(repo: Path, backbone: Path, tasks: dict[str, str], batching: str) -> None:
    """The shipped chorus config with this backbone and these tasks; `batching: triton` adds Triton's batcher."""
    model = repo / "chorus"
    shutil.rmtree(model, ignore_errors=True)
    (model / "1").mkdir(parents=True)
    shutil.copy(ROOT / "model_repository/chorus/1/model.py", model / "1/model.py")
    head, _ = repos.split_config((ROOT / "model_repository/chorus/config.pbtxt").read_text())
    params = {"backbone": str(backbone), "dtype": "float16", "max_length": "128", "task_capacity": str(len(tasks) + 1),
              "batching": batching, "scheduler": json.dumps({"default_deadline_s": 1.0}), "tasks": json.dumps(tasks)}
    (model / "config.pbtxt").write_text(repos.render_config(head, "chorus", params,
                                                            2000 if batching == "triton" else None))


def cuda_ms(fn, repeat: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def in_process(engine: Engine, texts: list[str], names: list[str]) -> dict:
    """64 rows: one mixed batch of 64 tasks vs SeqS (each task's rows as its own batch) vs one single-task batch."""
    rows = texts[:64]
    ids = engine.tokenize(rows)
    mixed = [names[i % len(names)] for i in range(64)]
    single = [names[0]] * 64
    t_mixed = cuda_ms(lambda: engine.run(ids, mixed))
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(mixed):
        by_task.setdefault(t, []).append(i)
    t_seqs = cuda_ms(lambda: [engine.run([ids[i] for i in r], [t] * len(r)) for t, r in by_task.items()], repeat=10)
    t_single = cuda_ms(lambda: engine.run(ids, single))
    return {"rows": 64, "tasks_in_mixed_batch": len(by_task), "mixed_ms": t_mixed, "seqs_ms": t_seqs,
            "single_task_ms": t_single, "mixed_speedup_vs_seqs": t_seqs / t_mixed,
            "mixed_vs_single_task_ratio": t_single / t_mixed}


def http_infer(url: str, texts: list[str], tasks: list[str]) -> dict:
    body = {"inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts},
                       {"name": "TASK", "shape": [len(tasks), 1], "datatype": "BYTES", "data": tasks}],
            "outputs": [{"name": "LOGITS"}, {"name": "LABEL"}]}
    req = urllib.request.Request(f"http://{url}/v2/models/chorus/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return {o["name"]: o for o in json.loads(r.read())["outputs"]}


def perf_analyzer(url: str, texts: list[str], names: list[str], out: Path, concurrency: int, tag: str) -> dict:
    data = {"data": [{"TEXT": {"content": [t], "shape": [1]}, "TASK": {"content": [names[i % len(names)]], "shape": [1]}}
                     for i, t in enumerate(texts[:500])]}
    data_file = out / "pa_input.json"
    data_file.write_text(json.dumps(data))
    csv = out / f"pa_{tag}_c{concurrency}.csv"
    cmd = [os.environ["PERF_ANALYZER"], "-m", "chorus", "-u", url, "-i", "http", "-b", "1", "--input-data",
           str(data_file), "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
           "--measurement-request-count", str(max(200, 50 * concurrency)), "--stability-percentage", "100",
           "--max-trials", "6", "--percentile", "99", "-f", str(csv)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        return {"concurrency": concurrency, "error": (p.stdout + p.stderr)[-1500:]}
    header, row = csv.read_text().splitlines()[:2]
    rec = dict(zip(header.split(","), row.split(",")))
    return {"concurrency": concurrency, "throughput_infer_per_s": float(rec["Inferences/Second"]),
            "p50_ms": float(rec["p50 latency"]) / 1000, "p99_ms": float(rec["p99 latency"]) / 1000,
            "command": " ".join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--label", default="default", help="names this environment in the results")
    ap.add_argument("--batching", nargs="+", default=["triton", "scheduler"], choices=["triton", "scheduler"])
    args = ap.parse_args()
    work = Path("/tmp/chorus-gpu")
    shutil.rmtree(work, ignore_errors=True)
    texts = json.loads((args.bundle / "rt_texts.json").read_text())
    cfg = make_backbone(work / "bert-base", args.bundle / "tokenizer.json")
    tasks = make_tasks(cfg, work / "tasks", args.tasks)
    names = sorted(tasks)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "host": platform.node(),
              "command": "bash perf/gpu/run.sh  (device tool, nvidia-h100-x1)",
              "backbone": "bert-base-shaped, random weights, fp16", "tasks": len(tasks)}

    engine = Engine(work / "bert-base", device="cuda", dtype=torch.float16, capacity=len(tasks) + 1, max_length=128)
    for name, path in tasks.items():
        engine.load_task(name, path)
    if not args.skip_in_process:
        result["in_process"] = in_process(engine, texts, names)
        print("in-process:", json.dumps(result["in_process"]), flush=True)

    for batching in args.batching:
        write_repository(work / "repo", work / "bert-base", tasks, batching)
        label = f"{args.label}, batching={batching}"
        log = args.out / f"tritonserver-{args.label.replace(' ', '_')}-{batching}.log"
        try:
            with TritonServer(work / "repo", http_port=0, grpc_port=0, metrics_port=0, log_path=log) as server:
                probe, probe_tasks = texts[:8], names[:8]
                got = http_infer(server.http_url, probe, probe_tasks)
                want = engine.classify(probe, probe_tasks)
                served = torch.tensor(got["LOGITS"]["data"]).view(8, -1)[:, :2]
                err = (served - torch.tensor(want.logits[:, :2])).abs().max().item()
                result.setdefault("serving", []).append({"env": label, "ok": True,
                                                         "max_abs_logit_diff_vs_in_process": err})
                print(f"served over HTTP with {label}: max |served - in-process| = {err:.4f}", flush=True)
                runs = [perf_analyzer(server.http_url, texts, names, args.out, c, batching) for c in (1, 8, 32)]
                result.setdefault("perf_analyzer", {})[batching] = runs
                for r in runs:
                    print(f"perf_analyzer {batching}:", json.dumps({k: v for k, v in r.items() if k != "command"}),
                          flush=True)
        except Exception as e:  # noqa: BLE001 - recorded; run.sh retries in another environment
            tail = log.read_text()[-2000:] if log.exists() else ""
            result.setdefault("serving", []).append({"env": label, "ok": False, "error": repr(e)[:1500], "log": tail})
            print(f"FAILED with {label}: {e!r}\n{tail[-600:]}", flush=True)
    (args.out / f"gpu_check-{args.label.replace(' ', '_')}.json").write_text(json.dumps(result, indent=2))
    return 0 if any(r["ok"] for r in result["serving"]) else 1


if __name__ == "__main__":
    sys.exit(main())
