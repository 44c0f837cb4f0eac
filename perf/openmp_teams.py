"""Why the entry model loads on a thread of its own: a small GEMM on a thread that is not the first to have used
OpenMP, timed against the same GEMM on the first such thread (libgomp, torch's CPU wheel).

    python -m perf.openmp_teams

Prints microseconds per (8x64 @ 64x64 + GELU) in three cases: a loader thread that ends, then the worker (what the
stub does now); the main thread, then the worker (what it did before); the main thread itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import torch

CASES = ("loader-thread-then-worker", "main-then-worker", "main-only")


def _gemm_us(n: int = 2000) -> float:
    x, w = torch.randn(8, 64), torch.randn(64, 64)
    for _ in range(100):
        torch.nn.functional.gelu(x @ w)
    start = time.perf_counter()
    for _ in range(n):
        torch.nn.functional.gelu(x @ w)
    return (time.perf_counter() - start) / n * 1e6


def _load() -> None:  # what loading a model does to OpenMP: large parallel regions
    big = torch.randn(2000, 2000)
    big @ big


def _on_thread(fn) -> float | None:
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0] if out else None


def _case(case: str) -> float:
    if case == "loader-thread-then-worker":
        _on_thread(_load)
        return _on_thread(_gemm_us)
    _load()
    return _on_thread(_gemm_us) if case == "main-then-worker" else _gemm_us()


def main() -> int:
    if len(sys.argv) == 2:  # one case per process: OpenMP's state is per process
        print(json.dumps(_case(sys.argv[1])))
        return 0
    results = {c: json.loads(subprocess.run([sys.executable, "-m", "perf.openmp_teams", c], capture_output=True,
                                            text=True, check=True).stdout) for c in CASES}
    print(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "us_per_gemm": {k: round(v, 1) for k, v in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
