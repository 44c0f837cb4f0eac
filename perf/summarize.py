"""Keep perf/results/summary.json (GPU keys) and summary-cpu.json (CPU keys) current, and the README's results table.

    python -m perf.summarize --latest cpu|gpu          # the newest results folder of that profile
    python -m perf.summarize perf/results/h100-...     # a given folder (its profile decides which summary)
    python -m perf.summarize --import results.tar.gz   # unpack what `bash perf/gpu/run.sh perf` brought back, then as above
    python -m perf.summarize --readme                  # only rewrite README.md's results section from the summaries

Every summary key is a number from its run, or null with the reason; each summary names the run's folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tarfile
from pathlib import Path

from perf.bench import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "perf" / "results"
SUMMARY = {"gpu": RESULTS / "summary.json", "cpu": RESULTS / "summary-cpu.json"}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DESCRIPTIONS = {
    "sp_p50_speedup_vs_teacher": "p50 latency, chorus teacher (students=0) / students, same server and load",
    "sp_p50_speedup_vs_teacher_perf_analyzer": "the same ratio measured by perf_analyzer (Poisson, same rate and rows)",
    "sp_p50_speedup_vs_triton_baseline": "p50, the task's own Triton model (dynamic batcher) / chorus students",
    "sp_accuracy_drop_points": "accuracy points lost by students vs the teacher, answered under load",
    "burst_p99_ms_with_pruning": "p99 of answered, students' burst (10x the base for 10 s, over their saturation), pruning on",
    "burst_p99_ms_without_pruning": "the same bursts with pruning off (all K students always)",
    "burst_p99_ms_with_pruning_instances": "the same bursts, pruning on, the model with several instances (processes)",
    "max_rate_at_slo_vs_triton_baseline": "highest Poisson rate within the SLO, chorus / one Triton model per task",
    "mixed_tasks_speedup_vs_seqs": "one mixed-task batch vs the same rows one task at a time (in process)",
    "mixed_vs_single_task_ratio": "single-task batch time / mixed-task batch time (1.0 = mixing is free)",
    "max_tasks_one_gpu": "LoRA r=8 tasks that fit beside the backbone in 90% of the GPU (measured bytes/task)",
    "padding_fraction": "padded fraction of batch tokens under chorus's scheduler (metrics port)",
    "scheduler_rate_vs_dynamic_batcher": "highest Poisson rate within the SLO, scheduler / best dynamic batcher",
    "served_vs_inprocess_throughput": "peak served infer/s / the same engine in process (rows/s)",
    "model_flops_utilisation": "served useful FLOP/s / the GPU's dense fp16 peak",
    "served_vs_floor_throughput": "peak served infer/s / the do-nothing Python-backend model's, same server and load",
    "p50_above_floor_ms": "p50 at the lowest concurrency, chorus minus the do-nothing model (ms)",
}


def profile_of(folder: Path) -> str:
    return json.loads((folder / "results.json").read_text())["profile"]["name"]


def latest(profile: str) -> Path:
    runs = [p.parent for p in RESULTS.glob("*/results.json") if profile_of(p.parent) == profile]
    if not runs:
        raise SystemExit(f"no {profile} results under {RESULTS}: run `make perf` (cpu) or `bash perf/gpu/run.sh perf`")
    return max(runs, key=lambda p: json.loads((p / "results.json").read_text())["date"])


def summary_of(folder: Path) -> dict:
    r = json.loads((folder / "results.json").read_text())
    s = r.get("summary", {})
    values = {k: s.get("values", {}).get(k) for k in SUMMARY_KEYS}
    return {**values, "run": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "date": r.get("date"), "commit": r.get("commit"), "machine": r.get("machine"), "slo_ms": r.get("slo_ms"),
            "null_because": {k: v for k, v in s.get("null_because", {}).items() if values.get(k) is None},
            "notes": r.get("notes", [])}


def empty_summary(profile: str) -> dict:
    """Every key null: no run of this profile yet."""
    how = "make perf" if profile == "cpu" else "make perf-gpu-bundle, then bash perf/gpu/run.sh perf (device tool)"
    return {**{k: None for k in SUMMARY_KEYS}, "run": None, "date": None, "commit": None, "machine": None,
            "slo_ms": None, "null_because": {k: f"no {profile} run of the harness yet ({how})" for k in SUMMARY_KEYS},
            "notes": []}


def write_summary(folder: Path) -> Path:
    profile = profile_of(folder)
    path = SUMMARY[profile]
    path.write_text(json.dumps(summary_of(folder), indent=2) + "\n")
    return path


def _cell(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, int):
        return f"{v:,}"
    if 0 < abs(v) < 0.1:  # two significant digits, not 0.00 (e.g. a model FLOPs utilisation of 0.0048)
        return f"{v:.2g}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:,.0f}"


def readme_section() -> str:
    """The README's results table from summary.json (GPU) and summary-cpu.json."""
    sums = {p: json.loads(f.read_text()) for p, f in SUMMARY.items() if f.is_file()}
    lines = [BEGIN, "", "Generated by `python -m perf.summarize` from `perf/results/summary.json` (GPU, "
             "`bash perf/gpu/run.sh perf` on the device machine, then `make perf-import TARBALL=...`) and "
             "`perf/results/summary-cpu.json` (`make perf`, 2 shared CPU cores: read as ratios). Do not edit by hand.",
             ""]
    runs = []
    for p in ("gpu", "cpu"):
        s = sums.get(p)
        runs.append(f"{p.upper()}: " + (f"`{s['run']}` ({s['date']}, commit {s['commit']}, SLO {s['slo_ms']} ms)"
                                       if s and s.get("run") else "no run yet"))
    lines += ["Runs — " + "; ".join(runs) + ".", "", "| key | GPU | CPU | what |", "| --- | ---: | ---: | --- |"]
    for k in SUMMARY_KEYS:
        lines.append(f"| `{k}` | {_cell(sums.get('gpu', {}).get(k))} | {_cell(sums.get('cpu', {}).get(k))} | "
                     f"{DESCRIPTIONS[k]} |")
    nulls = {}
    for p, s in sums.items():
        reasons = s.get("null_because", {})
        if len(reasons) == len(SUMMARY_KEYS) and len(set(reasons.values())) == 1:
            nulls.setdefault(next(iter(reasons.values())), []).append(f"every {p.upper()} key")
            continue
        for k, why in reasons.items():
            nulls.setdefault(why, []).append(f"`{k}` ({p.upper()})")
    if nulls:
        lines += ["", "Null: " + "; ".join(f"{', '.join(ks)}: {why}" for why, ks in nulls.items()) + "."]
    lines += ["", "Reproduce: `make perf` (CPU, ~15 min) or `bash perf/gpu/run.sh perf` on a GPU machine; plots and "
              "the full write-up are in each run's folder (`summary.md`).", "", END]
    return "\n".join(lines)


def update_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    section = readme_section()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Benchmark results\n\n" + section + "\n"
    readme.write_text(text)


def import_tarball(tarball: Path) -> Path:
    """Unpack a results tarball (one top folder <machine>-<date>/) under perf/results; returns that folder."""
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1 or any(n.startswith("/") or ".." in Path(n).parts for n in names):
            raise SystemExit(f"{tarball}: expected one top folder and relative paths, got {sorted(tops)[:5]}")
        tar.extractall(RESULTS, filter="data")
    return RESULTS / tops.pop()


BIG_RAW_BYTES = 50_000


def compress_raw(folder: Path) -> None:
    """gzip the per-request CSVs, timelines and perf_analyzer input files over BIG_RAW_BYTES under folder/raw (every summarized
    run, CPU or imported): the GPU machine takes the working tree and .gpu/ only within 64 MiB, and the results are
    part of the tree."""
    raw = folder / "raw"
    for csv in sorted([*raw.glob("*.csv"), *raw.glob("pa_input*.json"), *raw.glob("timeline-*.json")]):
        if csv.stat().st_size > BIG_RAW_BYTES:
            with csv.open("rb") as src, gzip.open(csv.with_name(csv.name + ".gz"), "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
            csv.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.summarize", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--latest", choices=sorted(SUMMARY))
    ap.add_argument("--import", dest="tarball", type=Path)
    ap.add_argument("--readme", action="store_true", help="only rewrite the README section")
    args = ap.parse_args(argv)
    folder = None
    if args.tarball:
        folder = import_tarball(args.tarball)
        from perf import report

        report.main([str(folder)])
    elif args.latest:
        folder = latest(args.latest)
    elif args.folder:
        folder = args.folder.resolve()
    elif not args.readme:
        ap.error("give a results folder, --latest cpu|gpu, --import TARBALL or --readme")
    if folder is not None:
        compress_raw(folder)
        print(f"{write_summary(folder)} <- {folder}")
    for profile, path in SUMMARY.items():
        if not path.is_file():
            path.write_text(json.dumps(empty_summary(profile), indent=2) + "\n")
    update_readme()
    print("README.md results section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
