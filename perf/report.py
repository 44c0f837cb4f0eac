"""Plots and the markdown summary of one results folder (written by perf.bench; re-runnable on its raw files).

    python -m perf.report perf/results/<machine>-<date>

Writes latency_throughput.png (perf_analyzer concurrency and Poisson sweeps, loadgen Poisson sweep), burst_timeline.png
(latency, queue depth and students in use through the bursts), overload_timeline.png, padding.png and summary.md.
Plots need matplotlib (requirements.txt); without it only summary.md is written.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def read_json(path: Path):
    """A results file, gzipped (perf.summarize.compress_raw) or not."""
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def plots(folder: Path, r: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written, systems, slo = [], r.get("systems", {}), r.get("slo_ms")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, s in systems.items():
        rows = s.get("pa_concurrency", {}).get("rows", [])
        if rows:
            axes[0].plot([x["infer_per_s"] for x in rows], [x["p99_ms"] for x in rows], "o-", label=f"{name} p99")
            axes[0].plot([x["infer_per_s"] for x in rows], [x["p50_ms"] for x in rows], "x--", alpha=.6,
                         label=f"{name} p50")
        rows = s.get("pa_poisson", {}).get("rows", [])
        if rows:
            axes[1].plot([x["request_rate"] for x in rows], [x["p99_ms"] for x in rows], "o-", label=name)
        pts = s.get("loadgen_poisson", {}).get("points", [])
        if pts:
            axes[2].plot([x["rate"] for x in pts], [x["p99_ms"] for x in pts], "o-", label=name)
    titles = ("perf_analyzer concurrency sweep", "perf_analyzer Poisson rate sweep (p99)",
              "loadgen Poisson, mixed tasks (p99 of answered)")
    xlabels = ("throughput (infer/s)", "offered rate (req/s)", "offered rate (req/s)")
    for ax, t, xl in zip(axes, titles, xlabels):
        if slo:
            ax.axhline(slo, color="k", ls=":", lw=1, label=f"SLO {slo:g} ms")
        ax.set(title=t, xlabel=xl, ylabel="latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=.3)
    fig.suptitle(f"{folder.name}: latency vs throughput ({r.get('world', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "latency_throughput.png", dpi=110)
    plt.close(fig)
    written.append("latency_throughput.png")

    for kind, fname in (("burst", "burst_timeline.png"), ("overload", "overload_timeline.png")):
        runs = sorted([*folder.glob(f"raw/timeline-*-{kind}*.json"), *folder.glob(f"raw/timeline-*-{kind}*.json.gz")])
        if not runs:
            continue
        fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
        for path in runs:
            tag = path.name.split(".")[0].removeprefix("timeline-")
            bins = read_json(path)["bins"]
            t = [b["t"] for b in bins]
            axes[0].plot(t, [b["p99_ms"] for b in bins], label=f"{tag} p99")
            axes[0].plot(t, [b["p50_ms"] for b in bins], ls="--", alpha=.6, label=f"{tag} p50")
            axes[1].plot(t, [b["offered_per_s"] for b in bins], alpha=.5, label=f"{tag} offered/s")
            axes[1].plot(t, [b["refused"] / 0.5 if b["refused"] else 0 for b in bins], ls=":", label=f"{tag} refused/s")
            q = [b["queue_depth"] if b["queue_depth"] is not None else b["pending_requests"] for b in bins]
            axes[1].plot(t, q, lw=2, label=f"{tag} queue depth (rows)")
            axes[2].plot(t, [b["students_mean"] for b in bins], "o-", ms=3, label=f"{tag} students in use")
        if slo:
            axes[0].axhline(slo, color="k", ls=":", lw=1, label=f"SLO {slo:g} ms")
        axes[0].set(ylabel="latency of answered (ms)", yscale="log")
        axes[1].set(ylabel="req/s | queued rows")
        axes[2].set(ylabel="students in use", xlabel="seconds")
        if not any(b.get("students_mean") is not None for p in runs for b in read_json(p)["bins"]):
            axes[2].text(0.5, 0.5, "no STUDENTS output: students not served yet", ha="center",
                         transform=axes[2].transAxes)
        for ax in axes:
            ax.legend(fontsize=7, loc="upper right")
            ax.grid(alpha=.3)
        fig.suptitle(f"{folder.name}: {kind} timeline (server metrics sampled from the metrics port)", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    pads = {n: s["pa_poisson"]["padding"] for n, s in systems.items()
            if s.get("pa_poisson", {}).get("padding", {}).get("fraction") is not None}
    if pads:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = list(pads)
        ax.bar(names, [pads[n]["fraction"] for n in names],
               color=["tab:green" if pads[n]["how"].startswith("measured") else "tab:gray" for n in names])
        for i, n in enumerate(names):
            ax.text(i, pads[n]["fraction"], f"{pads[n]['fraction']:.1%}\n"
                    f"{'measured' if pads[n]['how'].startswith('measured') else 'estimated'}", ha="center",
                    va="bottom", fontsize=8)
        ax.set(ylabel="padded fraction of batch tokens", title="padding under the Poisson sweep")
        fig.tight_layout()
        fig.savefig(folder / "padding.png", dpi=110)
        plt.close(fig)
        written.append("padding.png")
    return written


def markdown(folder: Path, r: dict, pngs: list[str]) -> str:
    m, systems = r.get("machine", {}), r.get("systems", {})
    lines = [f"# Benchmark {folder.name}", "",
             f"- command: `{r.get('command')}` at commit {r.get('commit')}, {r.get('date')}, "
             f"{r.get('total_seconds')} s",
             f"- machine: {m.get('host')}, {m.get('nproc')} CPUs, GPU {m.get('gpu')}, torch {m.get('torch')}",
             f"- served: {r.get('world')}; {r.get('rows')} request rows; token lengths mean "
             f"{_f(r.get('lengths', {}).get('mean'))}, p99 {_f(r.get('lengths', {}).get('p99'))}",
             f"- latency SLO {r.get('slo_ms')} ms (p99 of answered requests; at most 1% refused or failed); "
             f"saturation (perf_analyzer, chorus) {_f(r.get('saturation_per_s'))} infer/s",
             f"- perf_analyzer: {r.get('collect_metrics', '')}", ""]
    if r.get("profile", {}).get("name") == "cpu":
        lines += ["CPU figures: 2 shared cores run the server, perf_analyzer and the load generator together, and "
                  "other work shares the machine: read them as ratios between systems measured in the same run.", ""]
    keys = r.get("summary", {})
    lines += ["## Summary keys", "", "| key | value | null because |", "| --- | ---: | --- |"]
    for k, v in keys.get("values", {}).items():
        lines.append(f"| `{k}` | {_f(v)} | {keys.get('null_because', {}).get(k, '')} |")
    lines += ["", "## Systems", "",
              "| system | max Poisson rate at SLO (perf_analyzer) | max rate at SLO (loadgen, mixed tasks) | "
              "peak infer/s (concurrency sweep) | padding | overload: p99 answered / refused / recovery s |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, s in systems.items():
        peak = max([x["infer_per_s"] for x in s.get("pa_concurrency", {}).get("rows", [])] or [None],
                   key=lambda v: v or 0)
        pad = s.get("pa_poisson", {}).get("padding", {})
        ov = s.get("overload", {})
        ovs = (f"{_f(ov.get('p99_ms'))} ms / {ov.get('refused')} of {ov.get('sent')} / "
               f"{_f(ov.get('overload', {}).get('recovery_s'))}" if ov else "—")
        padtxt = (f"{pad['fraction']:.1%} ({'measured' if pad['how'].startswith('measured') else 'estimated'})"
                  if pad.get("fraction") is not None else "—")
        lines.append(f"| {name} | {_f(s.get('pa_poisson', {}).get('max_rate_at_slo'))} | "
                     f"{_f(s.get('loadgen_poisson', {}).get('max_rate_at_slo'))} | {_f(peak)} | {padtxt} | {ovs} |")
    caught = [(tag, s["pa_concurrency"]["graph_captures"]) for tag, s in r.get("systems", {}).items()
              if (s.get("pa_concurrency") or {}).get("graph_captures", {}).get("captures")]
    if caught:
        lines += ["", "CUDA graphs captured during the concurrency sweeps (the mixed forward's hot keys on a capture "
                  "thread; a students' graph stalls the batch that needs it): "
                  + "; ".join(f"{tag} {g['captures']:.0f} in {g['seconds']:.1f} s" for tag, g in caught)]
    ip = r.get("inprocess", {})
    if ip:
        mv = ip.get("mixed_vs_seqs", {})
        lines += ["", "## In process", "",
                  f"- chorus engine, mixed-task batches of 64 (rows sorted by length): {_f(ip.get('engine', {}).get('rows_per_s'))} rows/s; "
                  f"same rows, chorus engine {_f(ip.get('engine_same_rows_as_hf', {}).get('rows_per_s'))} rows/s vs "
                  f"Hugging Face BertModel (task merged, per task) "
                  f"{_f(ip.get('hf_transformers', {}).get('rows_per_s'))} rows/s",
                  f"- {mv.get('rows')} rows over {mv.get('tasks_in_mixed_batch')} tasks: one mixed batch "
                  f"{_f(mv.get('mixed_ms'))} ms, SeqS {_f(mv.get('seqs_ms'))} ms, single-task batch "
                  f"{_f(mv.get('single_task_ms'))} ms"
                  + (f" (CUDA graphs; eager: mixed {_f(mv.get('mixed_eager_ms'))} ms, single-task "
                     f"{_f(mv.get('single_task_eager_ms'))} ms)" if mv.get("mixed_eager_ms") is not None else "")
                  + (f"; the dense-delta methods' ops on every row instead of their own rows: mixed "
                     f"{_f(mv.get('mixed_every_row_ms'))} ms" if mv.get("mixed_every_row_ms") is not None else "")
                  + (f"; the torch gathered PET ops instead of the fused kernels: mixed {_f(mv.get('mixed_unfused_ms'))}"
                     f" ms, single-task {_f(mv.get('single_task_unfused_ms'))} ms"
                     if mv.get("mixed_unfused_ms") is not None else ""),
                  f"- scheduler latency table (raw/latency_table.json, cell-wise min of 2-3 profiles): α(1 row, 16 tokens) "
                  f"{_f(ip.get('latency_table', {}).get('alpha_1x16_ms'))} ms, α(64, 64) "
                  f"{_f(ip.get('latency_table', {}).get('alpha_64x64_ms'))} ms"]
    st = r.get("students")
    if st:
        lines += ["", "## Students", "", f"Task {st.get('task')}, K = {st.get('K')}; p50/accuracy runs at "
                  f"{_f(st.get('rate'))} req/s (0.4x saturation), same rows for each; bursts: "
                  f"{_f(st.get('burst', {}).get('burst_per_s'))} req/s (10x the base) for "
                  f"{_f(st.get('burst', {}).get('seconds'))} s, the base "
                  f"{_f(st.get('burst', {}).get('base_per_s'))} req/s before and after (students' saturation "
                  f"{_f(st.get('burst', {}).get('saturation_students_per_s'))} infer/s"
                  + (f"; with {st['instances']['instances']} instances "
                     f"{_f(st['instances'].get('saturation', {}).get('infer_per_s'))} infer/s" if st.get("instances") else "")
                  + ").", "",
                  "| run | sent | refused | p50 ms | p99 ms | accuracy | students in use (mean) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for key, label in (("teacher", "chorus, students=0 (teacher)"), ("students", f"chorus, students={st.get('K')}"),
                           ("pa_teacher", "the same, perf_analyzer (Poisson): students=0 (teacher)"),
                           ("pa_students", f"the same, perf_analyzer (Poisson): students={st.get('K')}"),
                           ("triton_per_task_teacher", "the task's own Triton model (teacher)"),
                           ("burst_with_pruning", "bursts, pruning on"), ("burst_without_pruning", "bursts, pruning off"),
                           ("burst_with_pruning_instances",
                            f"bursts, pruning on, {st.get('instances', {}).get('instances')} instances")):
            x = st.get(key)
            if x:
                lines.append(f"| {label} | {_f(x.get('sent'))} | {_f(x.get('refused'))} | {_f(x.get('p50_ms'))} | "
                             f"{_f(x.get('p99_ms'))} | {_f(x.get('accuracy'))} | {_f(x.get('students_mean'))} |")
        staged = [(key, st[key]["server_stages_ms"]) for key in ("teacher", "students")
                  if (st.get(key) or {}).get("server_stages_ms")]
        if staged:
            lines += ["", "Where a request's time went inside execute() (means per answered request, ms; "
                      "chorus_*_duration_us):", "",
                      "| run | decode | queue | compute | encode | client mean - their sum |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for key, g in staged:
                parts = [g.get(k) or 0 for k in ("decode", "queue", "compute", "encode")]
                rest = (st[key].get("mean_ms") or 0) - sum(parts)
                lines.append(f"| {key} | " + " | ".join(_f(x) for x in parts) + " | "
                             f"{_f(rest) if st[key].get('mean_ms') is not None else '—'} |")
    if r.get("notes") or r.get("skipped"):
        lines += ["", "## Notes and skipped", ""] + [f"- {n}" for n in r.get("notes", [])]
        lines += [f"- skipped {s['what']}: {s['why']}" for s in r.get("skipped", [])]
    lines += ["", "## Files", "", "Raw: `results.json` (every figure and command), `raw/pa-*.csv` (perf_analyzer), "
              "`raw/loadgen-*.csv` (one line per request), `raw/timeline-*.json[.gz]` (per-bin latency, queue, metrics "
              "samples), `raw/tritonserver-*.log`.", ""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m perf.report RESULTS_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    r = json.loads((folder / "results.json").read_text())
    pngs = plots(folder, r)
    (folder / "summary.md").write_text(markdown(folder, r, pngs))
    print(f"wrote {folder / 'summary.md'} and {', '.join(pngs) or 'no plots (matplotlib missing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
