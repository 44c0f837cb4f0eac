"""Run the real perf_analyzer (tritonclient 2.51 wheel) and read its CSV.

Modes (one invocation each): a concurrency sweep (`--concurrency-range a:b:step` or a list run one by one), a Poisson
request-rate sweep (`--request-rate-range a:b:step --request-distribution poisson`), or a schedule of request
intervals (`--request-intervals FILE`, bursts). Always `-b 1`, gRPC, `--async`, time windows; `--percentile 99` makes
p99 the figure that stability and `--latency-threshold` (stop the sweep once p99 exceeds it) look at.
"""

from __future__ import annotations

import csv
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from chorus.server import perf_analyzer_env, perf_analyzer_path


@dataclass(frozen=True)
class Measurement:
    interval_ms: int = 3000  # one time window
    max_trials: int = 3  # windows per point; with stability 999% the point is taken after these
    stability_percentage: int = 999


def binary() -> str:
    return os.environ.get("PERF_ANALYZER") or str(perf_analyzer_path())


def run(model: str, url: str, input_data: Path, csv_path: Path, mode: list[str], m: Measurement,
        latency_threshold_ms: float | None = None, collect_metrics_url: str | None = None,
        parameters: dict[str, int] | None = None, timeout_s: float = 300) -> dict:
    """One perf_analyzer invocation. Returns {command, returncode, seconds, rows (CSV, latencies in ms), output_tail}."""
    cmd = [binary(), "-m", model, "-u", url, "-i", "grpc", "--async", "-b", "1", "--input-data", str(input_data),
           *mode, "--measurement-mode", "time_windows", "--measurement-interval", str(m.interval_ms),
           "--max-trials", str(m.max_trials), "--stability-percentage", str(m.stability_percentage),
           "--percentile", "99", "-f", str(csv_path), "--verbose-csv"]
    if latency_threshold_ms is not None:
        cmd += ["--latency-threshold", str(int(latency_threshold_ms))]
    if collect_metrics_url:
        cmd += ["--collect-metrics", "--metrics-url", collect_metrics_url, "--metrics-interval", "1000"]
    for k, v in (parameters or {}).items():
        cmd += ["--request-parameter", f"{k}:{v}:int"]
    env = perf_analyzer_env() if "PERF_ANALYZER" not in os.environ else dict(os.environ)
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -1, f"timed out after {timeout_s} s\n" + ((e.stdout or b"").decode(errors="replace")
                                                              if isinstance(e.stdout, bytes) else (e.stdout or ""))
    rows = read_csv(csv_path) if csv_path.exists() else []
    return {"command": " ".join(cmd), "returncode": code, "seconds": round(time.monotonic() - start, 1),
            "rows": rows, "output_tail": out[-2500:]}


def read_csv(path: Path) -> list[dict]:
    """perf_analyzer's CSV with latencies converted to ms (`p50_ms`, `p99_ms`, ...) and throughput `infer_per_s`."""
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            row: dict = {}
            for key in ("Concurrency", "Request Rate"):
                if rec.get(key):
                    row[key.lower().replace(" ", "_")] = float(rec[key])
            row["infer_per_s"] = float(rec["Inferences/Second"])
            for p in ("p50", "p90", "p95", "p99"):
                if rec.get(f"{p} latency"):
                    row[f"{p}_ms"] = float(rec[f"{p} latency"]) / 1000
            for key in ("Avg GPU Utilization", "Avg GPU Power Usage", "Max GPU Memory Usage"):
                if rec.get(key):
                    row[key.lower().replace(" ", "_")] = gpu_metric(rec[key])
            out.append(row)
    return out


def gpu_metric(value: str) -> float:
    """`--collect-metrics` columns: a number, or `GPU-<uuid>:<number>;` per GPU (the mean over GPUs)."""
    try:
        return float(value)
    except ValueError:
        per_gpu = [float(part.rsplit(":", 1)[1]) for part in value.split(";") if ":" in part]
        return sum(per_gpu) / len(per_gpu) if per_gpu else float("nan")


def concurrency_mode(level: int) -> list[str]:
    return ["--concurrency-range", str(level)]


def rate_mode(start: float, end: float, step: float) -> list[str]:
    return ["--request-rate-range", f"{start:.2f}:{end:.2f}:{step:.2f}", "--request-distribution", "poisson"]


def intervals_mode(path: Path) -> list[str]:
    return ["--request-intervals", str(path)]
