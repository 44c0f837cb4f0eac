"""What the benchmarks send: real texts with their expected labels, perf_analyzer input-data files, arrival schedules.

Everything is seeded and pure (no clock, no socket): the same seed gives the same requests and the same arrival times.

Semantics:
    rows      = round-robin over tasks of (task, text, expected label) from each task's test split
    poisson   = arrival offsets t_i = Σ_{j<=i} Exp(rate), until `duration_s`
    bursts    = piecewise-constant rate phases [(seconds, rate), ...], Poisson within each phase
    pa_input  = {"data": [{"TEXT": {"content": [text], "shape": [1]}, "TASK": {...}}, ...]}   (perf_analyzer -b 1)
    intervals = one line per request: microseconds since the previous one (perf_analyzer --request-intervals)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    task: str
    text: str
    label: str | None  # the expected label name, None where it is not known (random benchmark tasks)


def task_rows(task_datasets: dict[str, str], split: str = "test", limit: int | None = None, seed: int = 0) -> list[Row]:
    """Rows from each task's real data set (`chorus.data`), interleaved round-robin so any prefix mixes every task.

    `task_datasets` maps a served task to the data set it was trained on (chorus.train.DEFAULT_TASKS)."""
    from chorus.data import load_dataset

    per_task: list[list[Row]] = []
    for task, dataset in task_datasets.items():
        splits = load_dataset(dataset)
        rows = [Row(task, e.text, splits.labels[e.label]) for e in getattr(splits, split)]
        random.Random(seed).shuffle(rows)
        per_task.append(rows[:limit] if limit else rows)
    return interleave(per_task)


def interleave(groups: Sequence[Sequence[Row]]) -> list[Row]:
    out: list[Row] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def text_rows(texts: Sequence[str], tasks: Sequence[str]) -> list[Row]:
    """Texts without labels (the GPU machine's Rotten Tomatoes sentences), tasks round-robin."""
    return [Row(tasks[i % len(tasks)], t, None) for i, t in enumerate(texts)]


def pa_input_data(rows: Sequence[Row], tokenizer=None, limit: int = 1000) -> dict:
    """perf_analyzer `--input-data` JSON for `-b 1`: one entry per request, TEXT (or INPUT_IDS when a `tokenizers`
    tokenizer is given: its real per-entry shape, so padding in the server follows the real length distribution;
    call its `no_padding()` first, as the packaged tokenizer.json pads to 128)."""
    data = []
    for row in rows[:limit]:
        entry = {"TASK": {"content": [row.task], "shape": [1]}}
        if tokenizer is None:
            entry["TEXT"] = {"content": [row.text], "shape": [1]}
        else:
            ids = tokenizer.encode(row.text).ids
            entry["INPUT_IDS"] = {"content": ids, "shape": [len(ids)]}
        data.append(entry)
    return {"data": data}


def poisson_offsets(rate: float, duration_s: float, seed: int = 0, start_s: float = 0.0) -> list[float]:
    """Arrival times (seconds) of a Poisson process of `rate` per second in [start_s, start_s + duration_s)."""
    if rate <= 0:
        return []
    rng, t, out = random.Random(seed), start_s, []
    while True:
        t += rng.expovariate(rate)
        if t >= start_s + duration_s:
            return out
        out.append(t)


def phased_offsets(phases: Sequence[tuple[float, float]], seed: int = 0) -> list[float]:
    """Poisson arrivals through phases [(seconds, rate per second), ...] one after another (bursts, overload)."""
    out, start = [], 0.0
    for i, (seconds, rate) in enumerate(phases):
        out += poisson_offsets(rate, seconds, seed=seed + i, start_s=start)
        start += seconds
    return out


def intervals_us(offsets: Sequence[float]) -> list[int]:
    """perf_analyzer `--request-intervals` lines: microseconds between consecutive requests (the first from 0)."""
    previous, out = 0.0, []
    for t in offsets:
        out.append(max(1, round((t - previous) * 1e6)))
        previous = t
    return out


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_intervals(path: Path, offsets: Sequence[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(str(us) for us in intervals_us(offsets)) + "\n")
    return path


def token_lengths(rows: Sequence[Row], tokenizer) -> list[int]:
    return [len(tokenizer.encode(r.text).ids) for r in rows]
