"""In-process baselines (no server): Hugging Face transformers' BertModel with one task merged into its weights (how a
task is run without chorus), chorus's engine on the same rows, PetS's mixed batch vs SeqS vs a single-task batch,
and a latency table for the scheduler measured robustly on a shared machine.

Semantics:
    hf:       for each task: BertModel(merged weights of that task); rows in batches of `batch`, padded to the longest
    engine:   Engine.run(batch ids, batch tasks): mixed-task batches of the same rows
    mixed:    one batch of `rows` rows over all tasks  vs  SeqS: each task's rows as its own batch, one after another
              vs  one single-task batch of the same rows

`python -m perf.inprocess hf SPEC OUT` runs `hf_throughput` alone (perf.bench runs it so, in a subprocess whose Python
may differ from the harness's: on the GPU machine the harness's numpy-1.26 environment cannot import transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from chorus.backends.encoder import read_hf_checkpoint
from chorus.backends.engine import Engine, resolve_backbone
from chorus.backends.graphs import GraphedForward
from chorus.backends.pet import fused
from chorus.backends.reference import merged_state
from chorus.backends.scheduler import LatencyTable
from chorus.backends.executor import profile_engine
from chorus.backends.task_files import load_task


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(fn: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return seconds


def median_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    t = timer(device)
    for _ in range(warmup):
        t(fn)
    return statistics.median(t(fn) for _ in range(repeats))


def batches(seq: Sequence, size: int) -> list[Sequence]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


@torch.inference_mode()
def hf_throughput(backbone: str | Path, task_dirs: dict[str, str], texts_by_task: dict[str, list[str]],
                  batch: int, device: str, dtype: torch.dtype, repeats: int = 3) -> dict:
    """rows/s of transformers.BertModel (+ the task's mean-pooled head), one merged model per task; `missing_keys`:
    the model's weights that the merged state did not set (none expected: they would stay randomly initialised)."""
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    path = resolve_backbone(backbone)
    cfg, state = read_hf_checkpoint(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding()
    tok.enable_truncation(128)
    dev = torch.device(device)
    total_rows, total_s, missing = 0, 0.0, set()
    for task, texts in texts_by_task.items():
        spec = load_task(task_dirs[task], task)
        model = BertModel(BertConfig(**cfg.to_hf()), add_pooling_layer=False)
        missing.update(model.load_state_dict(merged_state(state, spec), strict=False).missing_keys)
        model = model.to(dev, dtype).eval()
        head_w = spec.tensors["classifier.weight"].to(dev, dtype)
        head_b = spec.tensors["classifier.bias"].to(dev, dtype)
        encoded = []
        for chunk in batches(texts, batch):
            enc = tok.encode_batch(list(chunk))
            encoded.append((torch.tensor([e.ids for e in enc], device=dev),
                            torch.tensor([e.attention_mask for e in enc], device=dev)))

        def run_all() -> None:
            for ids, mask in encoded:
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
                w = mask.unsqueeze(-1).to(hidden.dtype)
                _ = ((hidden * w).sum(1) / w.sum(1)) @ head_w.T + head_b

        total_s += median_s(run_all, dev, repeats)
        total_rows += len(texts)
        del model
    return {"rows": total_rows, "batch": batch, "seconds": total_s, "rows_per_s": total_rows / total_s,
            "device": str(dev), "dtype": str(dtype), "missing_keys": sorted(missing)}


@torch.inference_mode()
def engine_throughput(engine: Engine, ids: list[list[int]], tasks: list[str], batch: int, repeats: int = 3) -> dict:
    """rows/s of chorus's engine over the rows in mixed-task batches of `batch` (padded to each batch's longest)."""
    steady_state(engine)
    chunks = list(zip(batches(ids, batch), batches(tasks, batch)))
    s = median_s(lambda: [engine.run(list(i), list(t)) for i, t in chunks], engine.device, repeats)
    return {"rows": len(ids), "batch": batch, "seconds": s, "rows_per_s": len(ids) / s}


def steady_state(engine: Engine) -> None:
    """Every batch on its own CUDA graph from its first run, as a served key is once hot (`GraphedForward.hot_after`;
    serving starts each key on its shape's bank-wide graph)."""
    if engine.graphs is not None:
        engine.graphs.hot_after, engine.graphs.background = 1, False  # captured at once


@contextlib.contextmanager
def torch_pet_ops(engine: Engine):
    """Within: the engine's graphed batches run the torch gathered PET ops (graphs of their own, each key captured
    at once) instead of the fused kernels, to compare both in one process."""
    graphs, enabled = engine.graphs, fused.ENABLED
    fused.ENABLED, engine.graphs = False, GraphedForward(engine.model, hot_after=1, background=False)
    try:
        yield
    finally:
        fused.ENABLED, engine.graphs = enabled, graphs


@torch.inference_mode()
def mixed_vs_seqs(engine: Engine, ids: list[list[int]], tasks: list[str], repeats: int = 5) -> dict:
    """One mixed-task batch vs the same rows one task at a time (SeqS) vs one single-task batch of the same rows."""
    steady_state(engine)
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    dev = engine.device
    mixed = median_s(lambda: engine.run(ids, tasks), dev, repeats)
    seqs = median_s(lambda: [engine.run([ids[i] for i in r], [t] * len(r)) for t, r in by_task.items()], dev,
                    max(1, repeats // 2))
    single = median_s(lambda: engine.run(ids, [tasks[0]] * len(ids)), dev, repeats)
    res = {"rows": len(ids), "tasks_in_mixed_batch": len(by_task), "mixed_ms": mixed * 1000, "seqs_ms": seqs * 1000,
           "single_task_ms": single * 1000, "mixed_speedup_vs_seqs": seqs / mixed,
           "mixed_vs_single_task_ratio": single / mixed, "cuda_graphs": engine.graphs is not None,
           "single_task": tasks[0]}
    # the same rows as a single-task batch of one task of each PET type: which PET ops the mixed batch pays for
    by_type = {"+".join(sorted(engine.bank.tasks[t].pet)): t for t in by_task}
    res["single_task_ms_by_pet_type"] = {
        pet: median_s(lambda t=t: engine.run(ids, [t] * len(ids)), dev, repeats) * 1000 for pet, t in sorted(by_type.items())}
    if engine.graphs is not None and fused.serves(engine.device):  # the torch gathered ops, as before the kernels
        with torch_pet_ops(engine):
            res["mixed_unfused_ms"] = median_s(lambda: engine.run(ids, tasks), dev, repeats) * 1000
            res["single_task_unfused_ms"] = median_s(lambda: engine.run(ids, [tasks[0]] * len(ids)), dev,
                                                     repeats) * 1000
    if engine.graphs is not None:  # the same batches on the eager fast path (row groups, no graphs)
        graphs, engine.graphs = engine.graphs, None
        try:
            res["mixed_eager_ms"] = median_s(lambda: engine.run(ids, tasks), dev, repeats) * 1000
            res["single_task_eager_ms"] = median_s(lambda: engine.run(ids, [tasks[0]] * len(ids)), dev, repeats) * 1000
        finally:
            engine.graphs = graphs
    return res


def calibrated_latency_table(engine: Engine, students=None, tries: int = 3) -> LatencyTable:
    """PetS's latency tables for the scheduler, the cell-wise minimum of `tries` profiles of this engine.

    The entry model profiles once at load; on a shared 2-core machine one profile can be off by 10-40x (a 1-row batch
    measured at 0.5 s), and the scheduler then refuses every request whose deadline is under that. The minimum of
    a few profiles is the engine's cost without the neighbours' load; the harness hands it to the server through the
    config parameter `latency_table`."""
    tables = [profile_engine(engine, students) for _ in range(tries)]
    best = tables[0].to_dict()
    for t in tables[1:]:
        d = t.to_dict()
        best["shared"] = [[min(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(best["shared"], d["shared"])]
        for p in best["pet"]:
            best["pet"][p] = [[min(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(best["pet"][p], d["pet"][p])]
    return LatencyTable.from_dict(best)


def many_tasks(engine: Engine, templates: list, n: int, ids: list[list[int]], batch: int = 64, seed: int = 0,
               repeats: int = 5) -> dict:
    """Issue 3's 10,000 tasks: register `n` tasks (copies of `templates`, TaskSpecs of every PET type, under new
    names) beside what `engine` serves, serve mixed batches of `batch` rows drawn from all of them and check each
    against the same row run through its template task alone, remove half, serve and check again.

    Returns counts, bank memory (CUDA: bytes allocated), the mixed-batch time, and the largest logit difference."""
    import random
    from dataclasses import replace

    rng = random.Random(seed)
    # the copies' tensors on the engine's device once: registering then copies on the device (10,000 tasks of
    # every PET type took 195 s from host tensors on the H100)
    templates = [replace(t, tensors={k: v.to(engine.device) for k, v in t.tensors.items()}) for t in templates]
    for t in templates:
        engine.add_task(t)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    mem = (lambda: torch.cuda.memory_allocated(engine.device)) if engine.device.type == "cuda" else (lambda: 0)
    before = mem()
    start = time.perf_counter()
    names: dict[str, str] = {}  # registered copy -> its template
    for i in range(n):
        t = templates[i % len(templates)]
        name = f"{t.name}-copy{i:05d}"
        engine.add_task(replace(t, name=name))
        names[name] = t.name
    sync()
    add_s = time.perf_counter() - start

    def check(label: str) -> dict:
        pool = sorted(names)
        tasks = [rng.choice(pool) for _ in range(batch)]
        rows = [ids[i % len(ids)] for i in range(batch)]
        got = engine.run(rows, tasks).logits
        want = np.stack([engine.run([r], [names[t]]).logits[0] for r, t in zip(rows, tasks)])
        finite = np.isfinite(want)
        seconds = median_s(lambda: engine.run(rows, tasks), engine.device, repeats)
        return {"registered": len(engine.bank.tasks), "mixed_batch_rows": batch,
                "distinct_tasks_in_batch": len(set(tasks)), "mixed_batch_ms": seconds * 1000,
                "max_abs_diff_vs_template_alone": float(np.abs(got[finite] - want[finite]).max()),
                "same_infinite_padding": bool(np.array_equal(np.isfinite(got), finite)), "when": label}

    served = check(f"after registering {n}")
    start = time.perf_counter()
    for name in sorted(names)[::2]:
        engine.bank.remove(name)
        del names[name]
    remove_s = time.perf_counter() - start
    after_remove = check(f"after removing {n - len(names)}")
    return {"tasks": n, "templates": [{"name": t.name, "pet": t.pet} for t in templates],
            "bank_bytes": mem() - before, "add_s": add_s, "remove_s": remove_s, "served": served,
            "served_after_remove": after_remove}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.inprocess",
                                 description="`hf_throughput` of a JSON spec (its keyword arguments, dtype by name: "
                                             "'float16') into OUT as JSON, with the versions it ran under")
    ap.add_argument("what", choices=["hf"])
    ap.add_argument("spec", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    res = hf_throughput(**{**spec, "dtype": getattr(torch, spec["dtype"])})
    import transformers

    res["ran_under"] = {"python": sys.executable, "transformers": transformers.__version__, "torch": torch.__version__,
                        "numpy": np.__version__}
    args.out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
