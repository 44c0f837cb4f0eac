"""The benchmark harness: start the servers each comparison needs, run it, stop them, write a results folder.

    python -m perf.bench --profile cpu                 # `make perf`: this machine, real all-MiniLM-L6-v2 + 4 tasks
    python -m perf.bench --profile gpu --bundle .gpu --hf-python python3   # `bash perf/gpu/run.sh perf` (GPU)

Systems compared, all on the same real tritonserver binary and chorus's entry-model code:
    chorus         one model, every task, chorus's length-bucket scheduler (`batching: scheduler`)
    chorus_db<us>  the same model with the scheduler off: Triton's dynamic batcher, one per tuned queue delay
    teacher_<task> Triton as deployed today: one model per task (its own backbone copy) with the dynamic batcher
    hf_inprocess   Hugging Face transformers' BertModel with the task merged in, no server (`python -m
                   perf.inprocess hf` under --hf-python: on the GPU machine the main environment's python3)
and, where the served model has a STUDENTS output, Student Parallelism's students (request parameter `students`).

Writes <out>/results.json (every figure, the commands, what was skipped and why), perf_analyzer CSVs, loadgen
outcomes (CSV) and timelines (JSON); then `perf.report` draws the plots and summary.md. The folder's results.json
holds the summary keys of issue 6; `python -m perf.summarize <out>` copies them into perf/results/summary*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from chorus.backends.scheduler import LatencyTable
from chorus.server import TritonServer
from perf import loadgen, pa, repos, workload
from perf.loadgen import LoadGenerator

LOG = logging.getLogger("perf.bench")
ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = (
    "sp_p50_speedup_vs_teacher", "sp_p50_speedup_vs_teacher_perf_analyzer", "sp_p50_speedup_vs_triton_baseline",
    "sp_accuracy_drop_points",
    "burst_p99_ms_with_pruning", "burst_p99_ms_without_pruning", "burst_p99_ms_with_pruning_instances",
    "max_rate_at_slo_vs_triton_baseline",
    "mixed_tasks_speedup_vs_seqs", "mixed_vs_single_task_ratio", "max_tasks_one_gpu", "padding_fraction",
    "scheduler_rate_vs_dynamic_batcher", "served_vs_inprocess_throughput", "model_flops_utilisation",
    "served_vs_floor_throughput", "p50_above_floor_ms",
)
# Students: the config parameter that turns pruning off for the "without pruning" burst (backends/triton_model.py),
# checked at run time: a no-pruning run whose STUDENTS output ever drops below K keeps its key null.
NO_PRUNING_PARAMS = {"pruning": json.dumps({"enabled": False})}
TEACHER_ONLY_PARAMS = {"students": "{}", "pruning": "{}"}  # Triton as deployed today: no students
# Dense fp16/bf16 tensor-core peak (FLOP/s) by GPU name, for model FLOPs utilisation.
PEAK_FLOPS = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.0e12,
              "H200": 989.4e12, "A100": 312.0e12}
# Requests/s one load-generator sender process is given in the phased runs (bursts, overloads); above it they are
# sent from several (LoadGenerator.run(processes=...)). One Python sender fell behind at ~2,900/s on the H100 host
# (the overload's client lag p99 333 ms on an H100 host), and lateness counts as latency.
LOADGEN_RATE_PER_PROCESS = 1000.0
HF_TIMEOUT_S = 150  # the Hugging Face subprocess (~15 s on the GPU: imports, 4 models, 5 repeats)


@dataclass(frozen=True)
class Profile:
    name: str
    slo_ms: float  # p99 latency objective for "highest Poisson rate served"
    pa: pa.Measurement
    concurrency: tuple[int, ...]
    rate_grid: tuple[float, float, float]  # (start, end, step) as fractions of the saturation throughput
    loadgen_point_s: float  # seconds of Poisson arrivals per loadgen rate point
    delays_us: tuple[int, ...]  # Triton dynamic batcher queue delays tried ("tuned")
    overload_s: float  # seconds at 3x saturation (chorus and the dynamic batcher, the same phases)
    recovery_s: float  # seconds at 0.3x saturation after it
    burst_cycles: int  # cycles of (2 s at 0.3x, 1 s at 2x) in chorus's burst timeline (every task)
    per_task_models: int  # tasks given their own Triton model in the per-task baseline
    inprocess_rows: int
    metrics_period_s: float
    budget_s: float  # the whole run; stages that no longer fit are skipped (and said so)
    bin_s: float = 0.5
    per_task_delay_us: int = 2000  # the per-task models' dynamic batcher queue delay (Triton as commonly deployed)
    students_burst_s: float = 10.0  # the students' burst: 10x the base rate for this long (issue 6)
    students_calm_s: tuple[float, float] = (3.0, 5.0)  # ... at the base rate before it, and after it (recovery)
    # >1: the students' burst (with pruning) also runs on the chorus model with this many instances (Python-backend
    # processes, each its own GIL), the same phases: what a deployment gains past one process's serving path
    students_instances: int = 1
    # instances (Python-backend processes, each its own GIL and engine) of chorus, chorus_noprune and the floor model:
    # each execute() runs its batches, so on a GPU several processes keep the device busy while others decode
    instances: int = 1


PROFILES = {
    # 2 shared cores: the server, perf_analyzer and the load generator share them. SLO 300 ms: one row alone takes
    # ~30 ms in the Python backend here and a 64-row batch ~0.4 s, so 300 ms is "a few batches of queueing".
    "cpu": Profile("cpu", slo_ms=300.0, pa=pa.Measurement(2500, 3), concurrency=(1, 4, 16), rate_grid=(0.3, 1.3, 0.25),
                   loadgen_point_s=6.0, delays_us=(5000, 25000), overload_s=15.0, recovery_s=10.0, burst_cycles=3,
                   per_task_models=4, per_task_delay_us=5000, inprocess_rows=32, metrics_period_s=0.25, budget_s=15 * 60),
    # The device tool allows 10 minutes a command; perf/gpu/run.sh's setup took 36 s, the report and tarball seconds.
    # With a 460 s budget one run took 429 s (10,000 tasks 79; in process 115 with the Hugging
    # Face subprocess; chorus 170 with the students' saturation and 10x burst; per-task 57; dynamic batcher 87) and
    # skipped the batcher's loadgen (~60 s) and overload (~38 s): 530 s leaves room for both.
    "gpu": Profile("gpu", slo_ms=20.0, pa=pa.Measurement(1000, 3), concurrency=(1, 8, 32, 64),
                   # low rates: through the Python backend a mixed all-PET bert-base batch is p99 ~ 20 ms already
                   # at ~0.2x saturation on an H100, so the 20 ms SLO is met, if at all, down here
                   rate_grid=(0.05, 0.5, 0.1), loadgen_point_s=3.0, delays_us=(500, 2000), overload_s=10.0,
                   recovery_s=10.0, burst_cycles=2, per_task_models=8, per_task_delay_us=2000, inprocess_rows=64,
                   metrics_period_s=0.1, budget_s=530, students_calm_s=(2.0, 4.0), instances=4),
}


# ------------------------------------------------------------------------------------------------ the run's world
@dataclass
class World:
    """What is served: backbone, tasks, request rows, engine settings, and where the server's files are."""

    backbone: str
    tasks: dict[str, str]  # name -> absolute task directory
    rows: list[workload.Row]
    tokenizer_path: Path
    params: dict[str, str]  # config-parameter overrides for every generated model
    dtype: torch.dtype
    device: str
    description: str
    students: dict[str, int] = field(default_factory=dict)  # task -> K, from model_repository/chorus/students


def cpu_world() -> World:
    from chorus.backends.engine import resolve_backbone
    from chorus.train import DEFAULT_TASKS

    tasks = repos.shipped_tasks()
    datasets = {name: ds for name, ds, _, _ in DEFAULT_TASKS if name in tasks}
    rows = workload.task_rows(datasets, limit=300)
    _, shipped = repos.split_config((repos.SHIPPED / "config.pbtxt").read_text())
    students = {}  # the shipped config's students that exist on disk: task -> K
    for task, path in json.loads(shipped.get("students") or "{}").items():
        meta = repos.SHIPPED / path / "chorus_students.json"
        if task in tasks and meta.is_file():
            students[task] = json.loads(meta.read_text())["config"]["num_students"]
    return World("all-MiniLM-L6-v2", tasks, rows, resolve_backbone("all-MiniLM-L6-v2") / "tokenizer.json",
                 {"device": "cpu"}, torch.float32, "cpu",
                 "all-MiniLM-L6-v2 (real weights, fp32), the 4 default tasks, their real test texts", students)


def gpu_world(bundle: Path, work: Path, n_tasks: int) -> World:
    from perf.gpu_check import make_backbone, make_tasks

    cfg = make_backbone(work / "bert-base", bundle / "tokenizer.json")
    tasks = make_tasks(cfg, work / "tasks", n_tasks)
    texts = json.loads((bundle / "rt_texts.json").read_text())
    rows = workload.text_rows(texts, sorted(tasks))
    student_task = sorted(tasks)[0]
    students = {student_task: str(random_students(cfg, work / "students" / student_task, K=4, layers=2))}
    params = {"backbone": str(work / "bert-base"), "dtype": "float16", "max_length": "128",
              "task_capacity": str(n_tasks + 1), "device": "auto", "students": json.dumps(students),
              "scheduler": json.dumps({"default_deadline_s": 1.0})}
    return World(str(work / "bert-base"), tasks, rows, bundle / "tokenizer.json", params, torch.float16, "cuda",
                 f"bert-base-shaped backbone (random weights, fp16), {n_tasks} random tasks of every PET type, K=4 "
                 f"random two-layer students for {student_task} (latency only: their accuracy means nothing), "
                 "1,000 Rotten Tomatoes test sentences (labels not meaningful: random weights)", {student_task: 4})


def random_students(cfg, out: Path, K: int, layers: int) -> Path:
    """K random students shaped like the backbone's layers (Student Parallelism's latency is weight-independent)."""
    from chorus.backends.students import Student, StudentConfig, StudentFiles, save_students, stack_students

    scfg = StudentConfig(num_students=K, num_layers=layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                         intermediate_size=cfg.intermediate_size, num_labels=2, dropout=0.0)
    torch.manual_seed(0)
    files = StudentFiles(scfg, ["negative", "positive"], stack_students([Student(scfg).eval() for _ in range(K)]),
                         torch.full((K,), 1.0 / K))
    return save_students(files, out)


# ------------------------------------------------------------------------------------------------ the harness
STAGES = ("decode", "queue", "compute", "encode")  # chorus_<stage>_duration_us: inside execute()


def graph_captures(before_text: str, after_text: str) -> dict:
    """CUDA graphs the servers' models captured over a run and the seconds that took (every model of the server:
    chorus_cuda_graph_capture*_total): a students' graph stalls the batch that needed it; the mixed forward's hot
    keys are captured on a capture thread (chorus.backends.graphs)."""
    before, after = loadgen.parse_prometheus(before_text), loadgen.parse_prometheus(after_text)
    return {key: after.get(f"chorus_cuda_graph_{metric}_total", 0) - before.get(f"chorus_cuda_graph_{metric}_total", 0)
            for key, metric in (("captures", "captures"), ("seconds", "capture_seconds"))}


def stage_means(before_text: str, after_text: str) -> dict | None:
    """Mean milliseconds per answered request in each stage of chorus's execute() over a run (the
    chorus_{decode,queue,compute,encode}_duration_us counters), or None where nothing was answered. What the client
    saw beyond their sum is Triton's queue, the IPC into and out of execute() and the client itself."""
    before, after = loadgen.parse_prometheus(before_text), loadgen.parse_prometheus(after_text)
    n = after.get("chorus_answered_total", 0) - before.get("chorus_answered_total", 0)
    if n <= 0:
        return None
    return {stage: (after.get(f"chorus_{stage}_duration_us", 0) - before.get(f"chorus_{stage}_duration_us", 0))
            / n / 1e3 for stage in STAGES} | {"answered": int(n)}


class Bench:
    def __init__(self, profile: Profile, world: World, out: Path, hf_python: str = sys.executable):
        self.p, self.w, self.out = profile, world, out
        self.hf_python = hf_python  # the Python that runs the Hugging Face baseline (`python -m perf.inprocess hf`)
        self.t0 = time.monotonic()
        self.result: dict = {"notes": [], "skipped": [], "systems": {}}
        self.saturation: float | None = None  # infer/s at which the chorus deployment saturates
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(world.tokenizer_path))
        self.tokenizer.no_padding()  # the packaged tokenizer.json pads every text to 128
        self.tokenizer.no_truncation()
        self.lengths = workload.token_lengths(world.rows, self.tokenizer)
        self.pa_input = workload.write_json(out / "raw" / "pa_input_text.json", workload.pa_input_data(world.rows))

    # ---- bookkeeping
    def left_s(self) -> float:
        return self.p.budget_s - (time.monotonic() - self.t0)

    def note(self, text: str) -> None:
        LOG.info("note: %s", text)
        self.result["notes"].append(text)

    def skip(self, what: str, why: str) -> None:
        LOG.warning("skipped %s: %s", what, why)
        self.result["skipped"].append({"what": what, "why": why})

    def fits(self, what: str, need_s: float) -> bool:
        if self.left_s() < need_s:
            self.skip(what, f"time budget: {self.left_s():.0f} s left, needs ~{need_s:.0f} s")
            return False
        return True

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.result, indent=2, default=str))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        LOG.info("=== %s (%.0f s left)", name, self.left_s())
        start = time.monotonic()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one failed comparison is recorded; the others still run
            LOG.error("stage %s failed: %r\n%s", name, e, traceback.format_exc())
            self.skip(name, f"failed: {e!r}"[:1500])
        finally:
            self.result.setdefault("stage_seconds", {})[name] = round(time.monotonic() - start, 1)
            self.save()

    @contextlib.contextmanager
    def server(self, name: str, models: list[str], repo: Path) -> Iterator[TritonServer]:
        log = self.out / "raw" / f"tritonserver-{name}.log"
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, models_to_load=models, log_path=log,
                          ready_timeout_s=240) as server:
            LOG.info("%s ready (models %s)", name, models)
            yield server

    # ---- helpers
    def arrivals(self, offsets: list[float], rows: list[workload.Row] | None = None, seed: int = 0):
        rows = rows or self.w.rows
        k = random.Random(seed).randrange(len(rows))
        return [(t, rows[(k + i) % len(rows)]) for i, t in enumerate(offsets)]

    def probe(self, server: TritonServer, model: str, task: str | None = None, timeout_s: float = 60) -> list[str]:
        """Real requests to `model` (of `task` only, if given); a server whose answer path crashes is caught here.
        Returns the model's outputs."""
        gen = LoadGenerator(server.grpc_url, lambda t: model, timeout_s=timeout_s)
        rows = [r for r in self.w.rows if task is None or r.task == task]
        try:
            outcomes, _ = gen.run(self.arrivals([0.0, 0.01, 0.02], rows=rows))
            if any(o.status != "ok" for o in outcomes):
                raise RuntimeError(f"probe of {model} failed: {[(o.status, o.error) for o in outcomes]}")
            meta = gen.client.get_model_metadata(model, as_json=True)
            return [o["name"] for o in meta["outputs"]]
        finally:
            gen.close()

    def pa_concurrency(self, server: TritonServer, model: str, tag: str) -> list[dict]:
        rows, runs = [], []
        before = loadgen.scrape_text(server.metrics_url)
        for c in self.p.concurrency:
            r = pa.run(model, server.grpc_url, self.pa_input, self.out / "raw" / f"pa-{tag}-c{c}.csv",
                       pa.concurrency_mode(c), self.p.pa,
                       collect_metrics_url=server.metrics_url.removeprefix("http://") if self.p.name == "gpu" else None)
            runs.append({k: v for k, v in r.items() if k != "rows"})
            if r["returncode"] != 0:
                LOG.warning("perf_analyzer %s c=%d failed: %s", tag, c, r["output_tail"][-600:])
            rows += r["rows"]
        time.sleep(0.3)  # the stub publishes its counters every 0.25 s
        self.result["systems"].setdefault(tag, {})["pa_concurrency"] = {
            "rows": rows, "runs": runs, "graph_captures": graph_captures(before, loadgen.scrape_text(server.metrics_url))}
        return rows

    def pa_rates(self, server: TritonServer, model: str, tag: str) -> dict:
        start, end, step = (f * self.saturation for f in self.p.rate_grid)
        before = loadgen.scrape_text(server.metrics_url)
        r = pa.run(model, server.grpc_url, self.pa_input, self.out / "raw" / f"pa-{tag}-poisson.csv",
                   pa.rate_mode(start, end, step), self.p.pa, latency_threshold_ms=2 * self.p.slo_ms)
        time.sleep(0.3)  # the stub publishes its counters every 0.25 s
        after = loadgen.scrape_text(server.metrics_url)
        res = {"rows": r["rows"], "command": r["command"], "returncode": r["returncode"], "seconds": r["seconds"],
               "max_rate_at_slo": pa_max_rate(r["rows"], self.p.slo_ms),
               "padding": self.padding(before, after, model)}
        if r["returncode"] != 0:
            res["output_tail"] = r["output_tail"]
        self.result["systems"].setdefault(tag, {})["pa_poisson"] = res
        return res

    def padding(self, before_text: str, after_text: str, model: str) -> dict:
        """Padded-token fraction over a run: measured by chorus's scheduler metrics where they moved, else estimated
        from Triton's mean batch size (inferences / executions) and the real length distribution."""
        before, after = loadgen.parse_prometheus(before_text), loadgen.parse_prometheus(after_text)
        tokens = after.get("chorus_batch_tokens_total", 0) - before.get("chorus_batch_tokens_total", 0)
        pad = after.get("chorus_padding_tokens_total", 0) - before.get("chorus_padding_tokens_total", 0)
        if tokens > 0:
            return {"fraction": pad / tokens, "tokens": tokens,
                    "how": "measured: chorus_padding_tokens_total / chorus_batch_tokens_total over the Poisson sweep"}
        b4, now = loadgen.parse_prometheus(before_text, model), loadgen.parse_prometheus(after_text, model)
        n = now.get("nv_inference_count", 0) - b4.get("nv_inference_count", 0)
        e = now.get("nv_inference_exec_count", 0) - b4.get("nv_inference_exec_count", 0)
        if e <= 0:
            return {"fraction": None, "how": "no batches executed"}
        return {"fraction": expected_padding(self.lengths, n / e), "mean_batch_rows": n / e,
                "how": "estimated: Triton's mean batch size (nv_inference_count / nv_inference_exec_count) with "
                       "batches drawn from the real length distribution, padded to their longest (the triton "
                       "batching path reports no chorus_* padding metrics)"}

    def loadgen_rates(self, server: TritonServer, model_for: Callable[[str], str], tag: str) -> dict:
        start, end, step = (f * self.saturation for f in self.p.rate_grid)
        gen = LoadGenerator(server.grpc_url, model_for, parameters={"deadline_ms": int(self.p.slo_ms)})
        points = []
        try:
            rate, i = start, 0
            while rate <= end + 1e-9:
                offsets = workload.poisson_offsets(rate, self.p.loadgen_point_s, seed=100 + i)
                outcomes, _ = gen.run(self.arrivals(offsets, seed=i), drain_timeout_s=10 + 4 * self.p.slo_ms / 1000)
                s = loadgen.summarize(outcomes, self.p.loadgen_point_s)
                s["rate"], s["passes_slo"] = rate, loadgen.passes_slo(s, self.p.slo_ms)
                points.append(s)
                write_outcomes(self.out / "raw" / f"loadgen-{tag}-rate{i}.csv", outcomes)
                LOG.info("loadgen %s rate %.1f: p50 %s p99 %s refused %d acc %s", tag, rate, fmt(s["p50_ms"]),
                         fmt(s["p99_ms"]), s["refused"], fmt(s["accuracy"]))
                if not s["passes_slo"] and (s["p99_ms"] or 0) > 2 * self.p.slo_ms:
                    break  # saturated: higher rates only queue more
                rate, i = rate + step, i + 1
                time.sleep(1.0)  # let the queue drain between points
        finally:
            gen.close()
        res = {"points": points, "slo_ms": self.p.slo_ms, "parameters": {"deadline_ms": int(self.p.slo_ms)},
               "max_rate_at_slo": max_rate_at_slo([(x["rate"], x["p99_ms"], x["passes_slo"] or (
                   x["p99_ms"] is not None and x["p99_ms"] > self.p.slo_ms)) for x in points], self.p.slo_ms)}
        self.result["systems"].setdefault(tag, {})["loadgen_poisson"] = res
        return res

    def phased(self, server: TritonServer, model_for: Callable[[str], str], tag: str, kind: str,
               phases: list[tuple[float, float]], parameters: dict | None = None, want_students: bool = False,
               rows: list[workload.Row] | None = None, drain_s: float = 15.0) -> dict:
        """Loadgen through rate phases [(seconds, rate)], with the metrics timeline and a summary of each phase
        (`per_phase`, by scheduled arrival); from 1 sender process per LOADGEN_RATE_PER_PROCESS of the top rate."""
        offsets = workload.phased_offsets(phases, seed=7)
        processes = min(8, max(1, math.ceil(max(r for _, r in phases) / LOADGEN_RATE_PER_PROCESS)))
        gen = LoadGenerator(server.grpc_url, model_for, parameters=parameters, want_students=want_students,
                            timeout_s=drain_s + sum(s for s, _ in phases))
        try:
            outcomes, samples = gen.run(self.arrivals(offsets, rows=rows), metrics_url=server.metrics_url,
                                        period_s=self.p.metrics_period_s, drain_timeout_s=drain_s,
                                        processes=processes)
        finally:
            gen.close()
        duration = sum(s for s, _ in phases)
        bins = loadgen.timeline(outcomes, samples, self.p.bin_s)
        write_outcomes(self.out / "raw" / f"loadgen-{tag}-{kind}.csv", outcomes)
        (self.out / "raw" / f"timeline-{tag}-{kind}.json").write_text(json.dumps(
            {"phases": phases, "bins": bins, "samples": samples}, default=float))
        s = loadgen.summarize(outcomes, duration)
        s.update({"phases": phases, "parameters": parameters, "timeline": f"raw/timeline-{tag}-{kind}.json",
                  "sender_processes": processes, "per_phase": loadgen.per_phase(outcomes, phases)})
        LOG.info("%s %s: p50 %s p99 %s refused %d of %d, client lag p99 %s ms (%d sender processes)", tag, kind,
                 fmt(s["p50_ms"]), fmt(s["p99_ms"]), s["refused"], s["sent"], fmt(s["client_lag_p99_ms"]), processes)
        return s

    def overload_need_s(self) -> float:
        return 3.0 + self.p.overload_s + self.p.recovery_s + 15  # the phases, the senders' start, the drain

    def overload(self, server: TritonServer, model_for: Callable[[str], str], tag: str) -> dict:
        x = self.saturation
        phases = [(3.0, 0.5 * x), (self.p.overload_s, 3.0 * x), (self.p.recovery_s, 0.3 * x)]
        s = self.phased(server, model_for, tag, "overload", phases, parameters={"deadline_ms": int(self.p.slo_ms)},
                        drain_s=2 * self.p.overload_s + 10)
        bins = json.loads((self.out / s["timeline"]).read_text())["bins"]
        end = 3.0 + self.p.overload_s
        during = [b for b in bins if 3.0 <= b["t"] < end]
        s["overload"] = {
            "factor": 3.0, "seconds": self.p.overload_s, "saturation_per_s": x,
            "answered_p99_ms_during": loadgen.percentile([b["p99_ms"] for b in during if b["p99_ms"] is not None], 50),
            "recovery_s": loadgen.recovery_s(bins, end, self.p.slo_ms),
        }
        self.result["systems"].setdefault(tag, {})["overload"] = s
        return s

    def bursts(self, server: TritonServer, model: str, tag: str) -> dict:
        """perf_analyzer with a request-intervals schedule of bursts (2 s at 0.3x, 1 s at 2x saturation)."""
        x = self.saturation
        cycle = [(2.0, 0.3 * x), (1.0, 2.0 * x)]
        offsets = workload.phased_offsets(cycle * self.p.burst_cycles, seed=3)
        path = workload.write_intervals(self.out / "raw" / f"burst-intervals-{tag}.txt", offsets)
        m = pa.Measurement(interval_ms=3000 * self.p.burst_cycles // 3, max_trials=3)
        r = pa.run(model, server.grpc_url, self.pa_input, self.out / "raw" / f"pa-{tag}-burst.csv",
                   pa.intervals_mode(path), m)
        res = {"rows": r["rows"], "command": r["command"], "returncode": r["returncode"],
               "schedule": {"cycle": cycle, "cycles": self.p.burst_cycles}}
        if r["returncode"] != 0:
            res["output_tail"] = r["output_tail"]
        self.result["systems"].setdefault(tag, {})["pa_burst"] = res
        return res

    def hf_baseline(self, spec: dict) -> dict | None:
        """`inprocess.hf_throughput(**spec)` in a subprocess of `self.hf_python` (`python -m perf.inprocess hf`): on
        the GPU machine the harness runs under the numpy-1.26 environment, where transformers does not import, and
        the main environment's Python does. A failure is a skip with the child's stderr, never the run's end."""
        raw = self.out / "raw"
        spec_path, out_path = workload.write_json(raw / "hf_spec.json", spec), raw / "hf_result.json"
        out_path.unlink(missing_ok=True)
        cmd = [self.hf_python, "-m", "perf.inprocess", "hf", str(spec_path), str(out_path)]
        LOG.info("hf_transformers: %s", " ".join(cmd))
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HF_TIMEOUT_S)
            if p.returncode == 0:
                return {**json.loads(out_path.read_text()), "command": " ".join(cmd)}
            why = f"exited with {p.returncode}; stderr: ...{p.stderr[-1500:]}"
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            why = f"timed out after {HF_TIMEOUT_S} s; stderr: ...{err[-1500:]}"
        except (OSError, ValueError) as e:  # no such interpreter; no or unreadable result
            why = repr(e)
        self.skip("hf_transformers", f"`{' '.join(cmd)}` {why}")
        return None

    # ---- stages
    def run_inprocess(self) -> None:
        from chorus.backends.engine import Engine

        from perf import inprocess

        n = self.p.inprocess_rows
        rows = self.w.rows[: n * 4]
        engine = Engine(self.w.backbone, device=self.w.device, dtype=self.w.dtype,
                        capacity=len(self.w.tasks) + 1, max_length=256 if self.p.name == "cpu" else 128)
        for name, path in self.w.tasks.items():
            engine.load_task(name, path)
        ids = engine.tokenize([r.text for r in rows])
        tasks = [r.task for r in rows]
        # The engine's best offline: rows sorted by length into batches of 64 (as little padding as batching allows)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        sorted_ids, sorted_tasks = [ids[i] for i in order], [tasks[i] for i in order]
        res: dict = {"device": str(engine.device), "dtype": str(self.w.dtype)}
        res["mixed_vs_seqs"] = inprocess.mixed_vs_seqs(engine, ids[:n], tasks[:n], repeats=3 if self.p.name == "cpu" else 9)
        res["engine"] = inprocess.engine_throughput(engine, sorted_ids, sorted_tasks, batch=64, repeats=2 if self.p.name == "cpu" else 5)
        # Hugging Face BertModel, one merged model per task, on 4 tasks' rows, with the engine's device and dtype;
        # chorus's engine on the same rows
        hf_tasks = list(dict.fromkeys(tasks))[:4]
        by_task = {t: [r.text for r in self.w.rows if r.task == t][: n // 2] for t in hf_tasks}
        hf = self.hf_baseline({"backbone": str(self.w.backbone), "task_dirs": {t: self.w.tasks[t] for t in hf_tasks},
                               "texts_by_task": by_task, "batch": 64, "device": self.w.device,
                               "dtype": str(self.w.dtype).removeprefix("torch."),
                               "repeats": 2 if self.p.name == "cpu" else 5})
        if hf is not None:
            res["hf_transformers"] = hf
        hf_ids = engine.tokenize([text for texts in by_task.values() for text in texts])
        hf_row_tasks = [t for t, texts in by_task.items() for _ in texts]
        res["engine_same_rows_as_hf"] = inprocess.engine_throughput(
            engine, hf_ids, hf_row_tasks, batch=64, repeats=2 if self.p.name == "cpu" else 5)
        students = None
        if self.w.students:
            from chorus.backends.students.bank import StudentBank

            students = StudentBank(engine)
            dirs = json.loads(self.w.params.get("students") or "{}") or json.loads(
                repos.split_config((repos.SHIPPED / "config.pbtxt").read_text())[1]["students"])
            for task in self.w.students:
                students.load(task, repos.SHIPPED / dirs[task])  # an absolute path stays as it is
        table_path = self.out / "raw" / "latency_table.json"
        if "latency_table" in self.w.params and table_path.is_file():  # --only: the servers of this run used it
            table = LatencyTable.load(table_path)
        else:
            table = inprocess.calibrated_latency_table(engine, students, tries=2 if self.p.name == "cpu" else 3)
            table.save(table_path)
        res["latency_table"] = {"path": "raw/latency_table.json", "alpha_1x16_ms": table.alpha(1, 16) * 1000,
                                "alpha_64x64_ms": table.alpha(64, 64) * 1000}
        self.w.params["latency_table"] = str(table_path.resolve())
        if self.w.device == "cuda":
            from chorus.capacity import capacity_table

            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            backbone_bytes, cap = capacity_table("bert-base", 0.9 * total, "float16")
            res["capacity"] = {"memory_gib": 0.9 * total, "backbone_bytes": backbone_bytes,
                               "rows": [asdict(c) for c in cap]}
        if self.w.device == "cuda" and self.fits("10,000 tasks", 120):  # issue 3: registered, served, removed
            from chorus.backends.task_files import random_task
            from perf.gpu_check import PET_MIX

            cfg = engine.cfg
            templates = [random_task(f"template{i}_{next(iter(pet))}", cfg.hidden_size, cfg.linear_sites(), pet,
                                     seed=1000 + i, scale=0.02) for i, pet in enumerate(PET_MIX)]
            with self.stage("10,000 tasks"):
                res["many_tasks"] = inprocess.many_tasks(engine, templates, 10_000, ids[:64])
        self.result["inprocess"] = res
        LOG.info("in-process: %s", json.dumps({k: v for k, v in res.items() if k != "capacity"}, default=str))
        del engine, students  # the students hold the engine; both hold CUDA graphs (reference cycles: collect)
        gc.collect()
        if self.w.device == "cuda":
            torch.cuda.empty_cache()  # the servers that follow need the memory the 10,000 tasks held
            LOG.info("after the in-process stages: %.1f GiB reserved", torch.cuda.memory_reserved() / 2**30)

    def run_chorus(self) -> None:
        repo = self.out / "repos" / "chorus"
        # One latency table for every model and instance of this server: the calibrated one where the in-process
        # stage made it, else one profile that they share. Models that profiled their own at load did so beside the
        # other models' CUDA-graph captures (they load in parallel), and a table inflated that way made admission
        # refuse up to 94% of a burst on one model and 33% on its twin on an H100).
        params = {"latency_table": str((repo / "latency_table_shared.json").resolve()), **self.w.params}
        instances = self.p.instances if self.p.instances > 1 else None
        name = repos.scheduler_model(repo, self.w.tasks, instances=instances, **params)
        models = [name, repos.floor_model(repo, instances=self.p.instances)]
        if self.w.students:
            no_prune = "chorus_noprune"
            repos.write_model(repo, no_prune, {"batching": "scheduler", "tasks": json.dumps(self.w.tasks),
                                               **params, **NO_PRUNING_PARAMS}, instances=instances)
            models.append(no_prune)
        multi = None
        if self.w.students and self.p.students_instances > 1:
            multi = repos.scheduler_model(repo, self.w.tasks, f"chorus_i{self.p.students_instances}",
                                          instances=self.p.students_instances, **params)
            models.append(multi)
        with self.server("chorus", models, repo) as server:
            outputs = self.probe(server, name)
            sysres = self.result["systems"].setdefault("chorus", {"model": name, "batching": "scheduler"})
            sysres["outputs"] = outputs
            rows = self.pa_concurrency(server, name, "chorus")
            self.saturation = max((r["infer_per_s"] for r in rows), default=None) or self.saturation
            if not self.saturation:
                raise RuntimeError("perf_analyzer measured no throughput for chorus")
            self.result["saturation_per_s"] = self.saturation
            # the do-nothing model in the same server, same load: what the Python backend itself costs here
            self.pa_concurrency(server, repos.FLOOR, "floor")
            self.pa_rates(server, name, "chorus")
            self.bursts(server, name, "chorus")
            if self.fits("chorus loadgen", 60):
                self.loadgen_rates(server, lambda t: name, "chorus")
            has_students = "STUDENTS" in outputs
            if self.fits("chorus burst timeline", 30):  # every task mixed, students as the load allows
                x = self.saturation
                sysres["burst_timeline"] = self.phased(server, lambda t: name, "chorus", "burst",
                                                       [(2.0, 0.3 * x), (1.0, 2.0 * x)] * self.p.burst_cycles,
                                                       want_students=has_students)
            if self.fits("chorus overload", self.overload_need_s()):
                self.overload(server, lambda t: name, "chorus")
            if not has_students:
                self.note("students: the served model has no STUDENTS output yet (metadata outputs: "
                          f"{outputs}); the student comparisons were skipped and their keys are null")
            elif not self.w.students:
                self.note("students: STUDENTS output present, but no students for the served tasks "
                          "(model_repository/chorus/students/<task>/); student comparisons skipped")
            elif self.fits("students", 90):
                self.run_students(server, name, no_prune if self.w.students else None, multi)

    def run_students(self, server: TritonServer, name: str, no_prune: str | None, multi: str | None = None) -> None:
        task, k = next(iter(self.w.students.items()))
        rows = [r for r in self.w.rows if r.task == task]
        rate = 0.4 * self.saturation  # low load: the teacher's and the students' p50 and accuracy
        n = max(50, int(rate * self.p.loadgen_point_s * 2))
        offsets = workload.poisson_offsets(rate, n / rate, seed=11)
        res: dict = {"task": task, "K": k, "rate": rate}
        for label, students in (("teacher", 0), ("students", k)):
            gen = LoadGenerator(server.grpc_url, lambda t: name, parameters={"students": students},
                                want_students=True)
            before = loadgen.scrape_text(server.metrics_url)
            try:
                outcomes, _ = gen.run([(t, rows[i % len(rows)]) for i, t in enumerate(offsets)])
            finally:
                gen.close()
            time.sleep(0.3)  # the stub publishes its counters every 0.25 s
            after = loadgen.scrape_text(server.metrics_url)
            write_outcomes(self.out / "raw" / f"loadgen-students-{label}.csv", outcomes)
            res[label] = loadgen.summarize(outcomes, offsets[-1] if offsets else 1.0)
            res[label]["server_stages_ms"] = stage_means(before, after)
        self.result["students"] = res
        # The same pair through perf_analyzer (C++ client, Poisson at the same rate): what Triton users quote, without
        # the Python load generator's own send and callback time in each latency
        data = workload.write_json(self.out / "raw" / "pa_input_students.json", workload.pa_input_data(rows))
        for label, students in (("teacher", 0), ("students", k)):
            r = pa.run(name, server.grpc_url, data, self.out / "raw" / f"pa-students-low-load-{label}.csv",
                       pa.rate_mode(rate, rate, 1), self.p.pa, parameters={"students": students})
            row = r["rows"][0] if r["rows"] else {}
            res[f"pa_{label}"] = {"p50_ms": row.get("p50_ms"), "p99_ms": row.get("p99_ms"),
                                  "infer_per_s": row.get("infer_per_s"), "command": r["command"],
                                  "returncode": r["returncode"]}
            if r["returncode"] != 0:
                res[f"pa_{label}"]["output_tail"] = r["output_tail"]
        # The burst as issue 6 defines it: the arrival rate steps up 10x for students_burst_s (10 s), between
        # students_calm_s at the base rate (before; after, to show the recovery). The base is the low-load rate
        # above, raised where needed to a fifth of the students' own served saturation with all K, so that 10x the
        # base is at least twice what the K students serve: the burst outruns them and pruning has work to do.
        # (Bursts of 2x the teacher path's saturation stayed within the students' capacity on an H100, mean k 4.0.)
        res["saturation"] = sat = self.students_saturation(server, no_prune or name, k)
        self.result["saturation_students_per_s"] = sat_k = sat["infer_per_s"]
        base = max(rate, sat_k / 5) if sat_k else rate
        if not sat_k:
            self.note("students' saturation not measured (see students.saturation): the burst's base is the low-load "
                      "rate, and 10x it may stay within what the students serve")
        before_s, after_s = self.p.students_calm_s
        phases = [(before_s, base), (self.p.students_burst_s, 10 * base), (after_s, base)]
        res["burst"] = {"base_per_s": base, "burst_per_s": 10 * base, "seconds": self.p.students_burst_s,
                        "phases": phases, "saturation_students_per_s": sat_k,
                        "how": "base = max(the low-load rate (0.4x saturation), saturation_students_per_s / 5); "
                               "10x the base for the burst, the base before and after"}
        LOG.info("students' burst: saturation with K=%d %s/s, base %.0f/s, burst %.0f/s for %g s", k, fmt(sat_k), base,
                 10 * base, self.p.students_burst_s)
        # the burst's requests carry the SLO as their deadline: pruning keeps the queue within it (Student Parallelism)
        burst_params = {"students": k, "deadline_ms": self.p.slo_ms}
        res["burst_with_pruning"] = self.phased(server, lambda t: name, "students", "burst-pruning", phases,
                                                parameters=burst_params, want_students=True, rows=rows)
        if no_prune:
            s = self.phased(server, lambda t: no_prune, "students", "burst-no-pruning", phases,
                            parameters=burst_params, want_students=True, rows=rows)
            times = [int(o["students"]) for o in read_outcomes(self.out / "raw" / "loadgen-students-burst-no-pruning.csv")
                     if o.get("students") not in (None, "")]
            s["switch_effective"] = bool(times) and min(times) == k
            res["burst_without_pruning"] = s
        if multi and self.fits("students' burst on several instances", sum(p[0] for p in phases) + 20):
            res["instances"] = {"model": multi, "instances": self.p.students_instances,
                                "saturation": self.students_saturation(server, multi, k)}
            res["burst_with_pruning_instances"] = self.phased(server, lambda t: multi, "students",
                                                              "burst-pruning-instances", phases,
                                                              parameters=burst_params, want_students=True, rows=rows)
        for key in ("burst_with_pruning", "burst_without_pruning", "burst_with_pruning_instances"):  # the 10 s burst
            if key in res:
                during = res[key]["per_phase"][1]
                res["burst"][key] = {m: during[m] for m in ("students_mean", "accuracy", "checked", "sent", "refused",
                                                            "answered_per_s", "p50_ms", "p99_ms", "client_lag_p99_ms")}
                LOG.info("students' burst, %s: mean k %s, accuracy %s, p99 %s ms", key, fmt(during["students_mean"]),
                         fmt(during["accuracy"]), fmt(during["p99_ms"]))

    def students_saturation(self, server: TritonServer, model: str, k: int) -> dict:
        """Served infer/s of `model` with request parameter students=k on the students' task's rows: one
        perf_analyzer point at the profile's highest concurrency, as the deployment's saturation is measured."""
        c = max(self.p.concurrency)
        data = self.out / "raw" / "pa_input_students.json"  # written by run_students
        r = pa.run(model, server.grpc_url, data, self.out / "raw" / f"pa-students-{model}-k{k}-c{c}.csv",
                   pa.concurrency_mode(c), self.p.pa, parameters={"students": k})
        res = {"model": model, "students": k, "concurrency": c,
               "infer_per_s": max((x["infer_per_s"] for x in r["rows"]), default=None), "rows": r["rows"],
               "command": r["command"], "returncode": r["returncode"], "seconds": r["seconds"]}
        if r["returncode"] != 0:
            res["output_tail"] = r["output_tail"]
            LOG.warning("perf_analyzer students=%d failed: %s", k, r["output_tail"][-600:])
        return res

    def run_dynamic_batcher(self) -> None:
        repo = self.out / "repos" / "dynbatch"
        names = [repos.dynamic_batcher_model(repo, self.w.tasks, d, **self.w.params) for d in self.p.delays_us]
        with self.server("dynbatch", names, repo) as server:
            for name in names:
                self.probe(server, name)
                self.result["systems"].setdefault(name, {"model": name, "batching": "triton"})
                if not self.saturation:  # chorus's scheduler path was not measured: saturate this one instead
                    rows = self.pa_concurrency(server, name, name)
                    self.saturation = max((r["infer_per_s"] for r in rows), default=None)
                    self.result["saturation_per_s"] = self.saturation
                    self.note("saturation taken from the dynamic batcher (chorus's scheduler path was not measured)")
                self.pa_rates(server, name, name)
            best = max(names, key=lambda n: self.result["systems"][n]["pa_poisson"]["max_rate_at_slo"] or 0)
            self.result["dynamic_batcher_best"] = best
            LOG.info("best dynamic-batcher delay: %s", best)
            if "pa_concurrency" not in self.result["systems"][best]:
                self.pa_concurrency(server, best, best)
            self.bursts(server, best, best)
            if self.fits("dynamic batcher loadgen", 60):
                self.loadgen_rates(server, lambda t: best, best)
            if self.fits("dynamic batcher overload", self.overload_need_s()):
                self.overload(server, lambda t: best, best)

    def run_per_task(self) -> None:
        repo = self.out / "repos" / "per_task"
        delay = self.p.per_task_delay_us
        tasks = dict(list(self.w.tasks.items())[: self.p.per_task_models])
        models = repos.per_task_models(repo, tasks, delay, **{**self.w.params, **TEACHER_ONLY_PARAMS})
        rows = [r for r in self.w.rows if r.task in tasks]
        with self.server("per_task", list(models.values()), repo) as server:
            for task, m in models.items():
                self.probe(server, m, task)
            tag = "triton_per_task"
            self.result["systems"][tag] = {"models": models, "batching": "triton", "delay_us": delay,
                                           "tasks": len(tasks)}
            saved_rows, self.w.rows = self.w.rows, rows
            try:
                self.loadgen_rates(server, lambda t: models[t], tag)
                if self.w.students and self.result.get("students"):
                    task = self.result["students"]["task"]
                    if task in models:
                        res = self.result["students"]
                        offsets = workload.poisson_offsets(res["rate"], self.p.loadgen_point_s * 2, seed=11)
                        trows = [r for r in rows if r.task == task]
                        gen = LoadGenerator(server.grpc_url, lambda t: models[t])
                        try:
                            outcomes, _ = gen.run([(t, trows[i % len(trows)]) for i, t in enumerate(offsets)])
                        finally:
                            gen.close()
                        res["triton_per_task_teacher"] = loadgen.summarize(outcomes, self.p.loadgen_point_s * 2)
            finally:
                self.w.rows = saved_rows

    # ---- the summary keys
    def keys(self) -> dict:
        r, systems = self.result, self.result["systems"]
        keys: dict = {k: None for k in SUMMARY_KEYS}
        why: dict[str, str] = {}
        ip = r.get("inprocess", {})
        mv = ip.get("mixed_vs_seqs")
        if mv:
            keys["mixed_tasks_speedup_vs_seqs"] = mv["mixed_speedup_vs_seqs"]
            keys["mixed_vs_single_task_ratio"] = mv["mixed_vs_single_task_ratio"]
        chorus = systems.get("chorus", {})
        best_db = systems.get(r.get("dynamic_batcher_best") or "", {})
        per_task = systems.get("triton_per_task", {})
        pad = chorus.get("pa_poisson", {}).get("padding", {}).get("fraction")
        keys["padding_fraction"] = pad
        a = chorus.get("pa_poisson", {}).get("max_rate_at_slo")
        b = best_db.get("pa_poisson", {}).get("max_rate_at_slo")
        keys["scheduler_rate_vs_dynamic_batcher"] = a / b if a and b else None
        if chorus.get("pa_poisson") and not (a and b):
            if a and not best_db.get("pa_poisson"):
                skipped = [x["why"] for x in r["skipped"] if x["what"] == "dynbatch"]
                why["scheduler_rate_vs_dynamic_batcher"] = (
                    f"the dynamic batcher was not measured ({skipped[0] if skipped else 'no run of it'})")
            else:
                why["scheduler_rate_vs_dynamic_batcher"] = (f"no Poisson rate tried met p99 <= {self.p.slo_ms:g} ms "
                                                            f"for {'chorus' if not a else 'the dynamic batcher'}")
        a = chorus.get("loadgen_poisson", {}).get("max_rate_at_slo")
        b = per_task.get("loadgen_poisson", {}).get("max_rate_at_slo")
        keys["max_rate_at_slo_vs_triton_baseline"] = a / b if a and b else None
        if chorus.get("loadgen_poisson") and per_task.get("loadgen_poisson") and not (a and b):
            why["max_rate_at_slo_vs_triton_baseline"] = (
                f"no loadgen Poisson rate tried (mixed tasks) met p99 <= {self.p.slo_ms:g} ms for "
                + " or ".join(n for n, x in (("chorus", a), ("one Triton model per task", b)) if not x))
        served = max([x["infer_per_s"] for s in (chorus, best_db)
                      for x in s.get("pa_concurrency", {}).get("rows", [])] or [0]) or None
        eng = ip.get("engine", {}).get("rows_per_s")
        keys["served_vs_inprocess_throughput"] = served / eng if served and eng else None
        ours = {r["concurrency"]: r for r in chorus.get("pa_concurrency", {}).get("rows", []) if "concurrency" in r}
        floor = {r["concurrency"]: r for r in systems.get("floor", {}).get("pa_concurrency", {}).get("rows", [])
                 if "concurrency" in r}
        if ours and floor:
            peak = max(r["infer_per_s"] for r in ours.values())
            keys["served_vs_floor_throughput"] = peak / max(r["infer_per_s"] for r in floor.values())
            low = min(set(ours) & set(floor), default=None)
            if low is not None and ours[low].get("p50_ms") is not None and floor[low].get("p50_ms") is not None:
                keys["p50_above_floor_ms"] = ours[low]["p50_ms"] - floor[low]["p50_ms"]
        else:
            why["served_vs_floor_throughput"] = why["p50_above_floor_ms"] = "the floor model was not measured"
        if served and self.w.device == "cuda" and torch.cuda.is_available():  # (rederive elsewhere keeps the run's)
            name = torch.cuda.get_device_name(0)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
            if peak:
                flops = statistics.mean(encoder_flops(self.w, t) for t in self.lengths)
                keys["model_flops_utilisation"] = served * flops / peak
                r["mfu"] = {"gpu": name, "peak_flops": peak, "flops_per_row_mean": flops, "served_rows_per_s": served}
            else:
                why["model_flops_utilisation"] = f"no peak FLOP/s known for {name}"
        else:
            why["model_flops_utilisation"] = "GPU only (a CPU has no comparable tensor-core peak)"
        cap = ip.get("capacity")
        if cap:
            lora = next((c for c in cap["rows"] if c["label"].lower().startswith("lora")), cap["rows"][0])
            keys["max_tasks_one_gpu"] = lora["tasks"]
            r["max_tasks_one_gpu_detail"] = {"pet": lora["label"], "memory_gib": cap["memory_gib"],
                                             "how": "measured bytes per task (chorus.capacity) into 90% of the GPU",
                                             "served": ip.get("many_tasks")}
        else:
            why["max_tasks_one_gpu"] = "GPU only"
        st = r.get("students")
        if st:
            t, s = st["teacher"], st["students"]
            if t["p50_ms"] and s["p50_ms"]:
                keys["sp_p50_speedup_vs_teacher"] = t["p50_ms"] / s["p50_ms"]
            pt, ps = st.get("pa_teacher") or {}, st.get("pa_students") or {}
            if pt.get("p50_ms") and ps.get("p50_ms"):
                keys["sp_p50_speedup_vs_teacher_perf_analyzer"] = pt["p50_ms"] / ps["p50_ms"]
            base = st.get("triton_per_task_teacher", {})
            if base.get("p50_ms") and s["p50_ms"]:
                keys["sp_p50_speedup_vs_triton_baseline"] = base["p50_ms"] / s["p50_ms"]
            if t["accuracy"] is not None and s["accuracy"] is not None and self.w.device != "cuda":
                keys["sp_accuracy_drop_points"] = 100 * (t["accuracy"] - s["accuracy"])
            keys["burst_p99_ms_with_pruning"] = st.get("burst_with_pruning", {}).get("p99_ms")
            keys["burst_p99_ms_with_pruning_instances"] = st.get("burst_with_pruning_instances", {}).get("p99_ms")
            if self.p.students_instances <= 1:
                why["burst_p99_ms_with_pruning_instances"] = (
                    f"no separate several-instance model: chorus itself runs {self.p.instances} instances here"
                    if self.p.instances > 1 else "this profile serves the students from one instance")
            nop = st.get("burst_without_pruning")
            if nop and nop.get("switch_effective"):
                keys["burst_p99_ms_without_pruning"] = nop["p99_ms"]
            else:
                why["burst_p99_ms_without_pruning"] = (f"the no-pruning switch {NO_PRUNING_PARAMS} had no effect "
                                                       "(STUDENTS dropped below K)" if nop else "not measured")
        else:
            for k in SUMMARY_KEYS:
                if k.startswith(("sp_", "burst_")):
                    why[k] = "students are not served yet (no STUDENTS output)"
        minilm = self.out / "minilm" / "results.json"  # the real MiniLM task, same machine (perf/minilm.py)
        drop = json.loads(minilm.read_text()).get("derived", {}).get("served_accuracy_drop_points") \
            if self.w.device == "cuda" and minilm.is_file() else None
        if drop is not None:
            keys["sp_accuracy_drop_points"] = drop
            r["notes"] = [n for n in r.get("notes", []) if not n.startswith("sp_accuracy_drop_points")] + [
                "sp_accuracy_drop_points: from the real all-MiniLM-L6-v2 movie task served on the same GPU "
                "(minilm/summary.md: teacher vs K students through tritonserver on the Rotten Tomatoes test split); "
                "the benchmark itself serves random weights"]
        elif self.w.device == "cuda":
            why.setdefault("sp_accuracy_drop_points", "the GPU run serves random weights (and no minilm/ run beside "
                           "it): accuracy only on CPU")
        for k, v in keys.items():
            if v is None and k not in why:
                why[k] = "not measured in this run (see skipped)"
        return {"values": keys, "null_because": {k: v for k, v in why.items() if keys[k] is None}}


# ------------------------------------------------------------------------------------------------ pure helpers
def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def max_rate_at_slo(points: list[tuple[float, float | None, bool]], slo_ms: float) -> float | None:
    """Highest rate served within the SLO, from (rate, p99 ms, served: throughput kept up / few refusals) points
    in increasing rate: the last passing rate, interpolated linearly in p99 towards the first failing one when that
    one failed on latency alone."""
    points = sorted(points)
    best, prev = None, None
    for rate, p99, served in points:
        ok = served and p99 is not None and p99 <= slo_ms
        if ok:
            best, prev = rate, (rate, p99)
            continue
        if prev is not None and served and p99 is not None and p99 > prev[1]:
            best = prev[0] + (slo_ms - prev[1]) / (p99 - prev[1]) * (rate - prev[0])
        break
    return best


def pa_max_rate(rows: list[dict], slo_ms: float) -> float | None:
    """`max_rate_at_slo` of a perf_analyzer Poisson sweep. perf_analyzer stops at any failed request, so every row
    was answered; a row counts as served when its throughput kept within 30% of the offered rate (a short Poisson
    window measures +-15%; less means the client or server fell behind)."""
    return max_rate_at_slo([(x["request_rate"], x.get("p99_ms"), x["infer_per_s"] >= 0.7 * x["request_rate"])
                            for x in rows if "request_rate" in x], slo_ms)


def rederive(folder: Path) -> dict:
    """Recompute the derived figures (rates at the SLO, summary keys) of a results folder from its raw rows."""
    result = json.loads((folder / "results.json").read_text())
    prof = Profile(**{**result["profile"], "pa": pa.Measurement(**result["profile"]["pa"])})
    world = World("all-MiniLM-L6-v2" if prof.name == "cpu" else "/nonexistent", {}, [], Path("/nonexistent"), {},
                  torch.float32, "cpu" if prof.name == "cpu" else "cuda", result.get("world", ""))
    bench = Bench.__new__(Bench)
    bench.p, bench.w, bench.out, bench.result = prof, world, folder, result
    if prof.name == "cpu":  # the real length distribution again (cheap on the CPU world)
        from tokenizers import Tokenizer

        cpu = cpu_world()
        tok = Tokenizer.from_file(str(cpu.tokenizer_path))
        tok.no_padding()
        tok.no_truncation()
        bench.lengths = workload.token_lengths(cpu.rows, tok)
        result["lengths"] = lengths_summary(bench.lengths)
        for s in result["systems"].values():
            pad = s.get("pa_poisson", {}).get("padding", {})
            if pad.get("mean_batch_rows"):
                pad["fraction"] = expected_padding(bench.lengths, pad["mean_batch_rows"])
    else:
        bench.lengths = [int(result.get("lengths", {}).get("mean", 30))]
    for s in result["systems"].values():
        if "pa_poisson" in s:
            s["pa_poisson"]["max_rate_at_slo"] = pa_max_rate(s["pa_poisson"]["rows"], prof.slo_ms)
        lg = s.get("loadgen_poisson")
        if lg:
            lg["max_rate_at_slo"] = max_rate_at_slo([(x["rate"], x["p99_ms"], x["passes_slo"] or (
                x["p99_ms"] is not None and x["p99_ms"] > prof.slo_ms)) for x in lg["points"]], prof.slo_ms)
    if prof.name == "gpu" and result.get("mfu"):
        pass  # MFU needs the GPU's name and the lengths: kept as measured
    keys = bench.keys()
    if prof.name == "gpu":  # keys() cannot see the GPU from here: keep what the run measured
        for k in ("model_flops_utilisation", "max_tasks_one_gpu"):
            keys["values"][k] = result.get("summary", {}).get("values", {}).get(k)
            if keys["values"][k] is not None:
                keys["null_because"].pop(k, None)
    result["summary"] = keys
    (folder / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return keys


def lengths_summary(lengths: list[int]) -> dict:
    return {"mean": statistics.mean(lengths), "p50": float(np.percentile(lengths, 50)),
            "p99": float(np.percentile(lengths, 99)), "max": max(lengths)}


def expected_padding(lengths: list[int], mean_batch: float, draws: int = 2000, seed: int = 0) -> float:
    """Padded fraction of batches of ~mean_batch rows drawn from `lengths`, each padded to its longest row."""
    rng = random.Random(seed)
    lo = max(1, math.floor(mean_batch))
    frac_hi = mean_batch - lo
    pad = tot = 0
    for _ in range(draws):
        b = lo + (1 if rng.random() < frac_hi else 0)
        batch = [rng.choice(lengths) for _ in range(b)]
        tot += b * max(batch)
        pad += b * max(batch) - sum(batch)
    return pad / tot


def encoder_flops(world: World, tokens: int) -> float:
    """Forward FLOPs of one row of `tokens` real tokens through the BERT encoder (matmuls: 2 FLOPs per MAC)."""
    cfg = json.loads((Path(world.backbone) / "config.json").read_text()) if Path(world.backbone).is_dir() else None
    C = cfg["hidden_size"] if cfg else 384
    inter = cfg["intermediate_size"] if cfg else 1536
    layers = cfg["num_hidden_layers"] if cfg else 6
    T = tokens
    return layers * (2 * T * (4 * C * C + 2 * C * inter) + 4 * T * T * C)


MAX_OUTCOME_ROWS = 40_000  # per CSV: the GPU run's results come back in one tarball of at most 16 MiB


def write_outcomes(path: Path, outcomes) -> None:
    """One CSV line per request; above MAX_OUTCOME_ROWS every k-th request (summaries use all of them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stride = max(1, math.ceil(len(outcomes) / MAX_OUTCOME_ROWS))
    if stride > 1:
        LOG.info("%s: keeping every %d-th of %d requests", path.name, stride, len(outcomes))
        outcomes = outcomes[::stride]
    recs = loadgen.outcome_records(outcomes)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t_sched", "t_send", "t_done", "task", "status", "correct", "students",
                                          "error"])
        w.writeheader()
        w.writerows(recs)


def read_outcomes(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def machine_name(profile: str) -> str:
    if profile == "gpu" and torch.cuda.is_available():
        n = torch.cuda.get_device_name(0).lower()
        return next((g for g in ("h200", "h100", "a100", "l40s", "l4") if g in n), "gpu")
    return f"cpu{_nproc()}"


def _nproc() -> int:
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", type=Path, help="results folder (default perf/results/<machine>-<date>)")
    ap.add_argument("--bundle", type=Path, default=ROOT / ".gpu", help="GPU profile: the carried .gpu/ folder")
    ap.add_argument("--only", nargs="+", choices=["inprocess", "chorus", "dynbatch", "per_task"],
                    help="run only these stages")
    ap.add_argument("--hf-python", default=sys.executable, metavar="PYTHON",
                    help="the Python that runs the Hugging Face transformers baseline in a subprocess (default: this "
                         "one; perf/gpu/perf.sh: python3, the GPU machine's main environment)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--budget-s", type=float, help="seconds for the whole run (default: the profile's); stages that "
                    "no longer fit are skipped")
    ap.add_argument("--rederive", type=Path, metavar="FOLDER",
                    help="recompute the derived figures and summary keys of a results folder from its raw rows")
    args = ap.parse_args(argv)
    if args.rederive:
        print(json.dumps(rederive(args.rederive.resolve()), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    profile = PROFILES[args.profile]
    if args.budget_s is not None:
        profile = dataclasses.replace(profile, budget_s=args.budget_s)
    date = datetime.datetime.now(datetime.timezone.utc)
    out = (args.out or ROOT / "perf" / "results" / f"{machine_name(args.profile)}-{date:%Y-%m-%d}").resolve()
    previous = json.loads((out / "results.json").read_text()) if args.only and (out / "results.json").is_file() else None
    if out.exists() and previous is None:  # a full run starts clean; --only adds to the folder's earlier run
        shutil.rmtree(out / "raw", ignore_errors=True)
    shutil.rmtree(out / "repos", ignore_errors=True)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    if args.profile == "gpu":
        # perf/gpu/perf.sh puts the load generator's gRPC client on PYTHONPATH for this process only: the servers'
        # backend stubs must not import its protobuf ahead of their own environment's
        os.environ.pop("PYTHONPATH", None)
        work = Path("/tmp/chorus-perf")
        shutil.rmtree(work, ignore_errors=True)
        world = gpu_world(args.bundle, work, 64)
    else:
        # One intra-op thread, here and in every server (the stubs inherit OMP_NUM_THREADS): the 2 cores are shared
        # with perf_analyzer, the load generator and other work, and oversubscribed OpenMP threads spin and thrash
        # (a 64-row batch went from 0.4 s to 9 s with 2 threads under a load average of 8).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        world = cpu_world()
    bench = Bench(profile, world, out, hf_python=args.hf_python)
    if previous is not None:
        bench.result = previous
        bench.result["skipped"] = [x for x in previous.get("skipped", []) if x["what"] not in args.only]
        bench.saturation = previous.get("saturation_per_s")
        if (out / "raw" / "latency_table.json").is_file():
            world.params["latency_table"] = str((out / "raw" / "latency_table.json").resolve())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if previous is not None:
        bench.result.setdefault("reruns", []).append({"stages": args.only, "date": date.isoformat(timespec="seconds")})
    bench.result.update({} if previous is not None else {
        "date": date.isoformat(timespec="seconds"), "profile": asdict(profile), "world": world.description,
        "tasks": len(world.tasks), "rows": len(world.rows), "slo_ms": profile.slo_ms,
        "commit": commit.stdout.strip() or None, "command": " ".join(["python -m perf.bench", *(argv or sys.argv[1:])]),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "nproc": _nproc(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "lengths": lengths_summary(bench.lengths),
    })
    stages = [("inprocess", bench.run_inprocess), ("chorus", bench.run_chorus),
              ("per_task", bench.run_per_task), ("dynbatch", bench.run_dynamic_batcher)]
    for name, fn in stages:
        if args.only and name not in args.only:
            continue
        if bench.fits(name, 45):
            with bench.stage(name):
                fn()
    bench.result["collect_metrics"] = (
        "perf_analyzer --collect-metrics runs against this server (tritonserver 2.51 metrics port); it collects only "
        "nv_gpu_* metrics, so on a CPU-only machine it warns 'Unable to parse nv_gpu_utilization' and reports "
        "nothing: the CPU profile leaves it off and the GPU profile uses it on the concurrency sweeps")
    bench.result["summary"] = bench.keys()
    bench.result["total_seconds"] = round(time.monotonic() - bench.t0, 1)
    bench.save()
    shutil.rmtree(out / "repos", ignore_errors=True)
    LOG.info("results in %s (%.0f s)", out, bench.result["total_seconds"])
    if not args.no_plots:
        from perf import report

        report.main([str(out)])
    print(json.dumps(bench.result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
