"""chorus's own open-loop load generator, for what perf_analyzer cannot do: many tasks (or many models) at once,
answers checked against expected labels, refusals (UNAVAILABLE) counted, request parameters (deadline_ms, students),
and a timeline sampled from the server's metrics port.

Semantics:
    for (t_i, row_i) in arrivals:                 # open loop: sends never wait for answers
        sleep until start + t_i; async_infer(model_for(row_i.task), TEXT=row_i.text, TASK=row_i.task)
    latency_i = answered_i - (start + t_i)        # from the scheduled arrival: a client that falls behind cannot
                                                  # hide queueing (no coordinated omission)
    p50/p99 over answered requests only; refused = UNAVAILABLE; correct = LABEL == row_i.label

A `MetricsSampler` thread scrapes the Prometheus text of the metrics port every `period_s` meanwhile. With `processes`
above 1, the arrivals are dealt round-robin to that many sender processes (`python -m perf.loadgen`, pickles over
pipes) that share the start time (CLOCK_MONOTONIC is one clock for every process): one Python sender keeps its
schedule only up to a few thousand requests/s, and its lateness would count as latency.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from perf.workload import Row

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    t_sched: float  # seconds after the run's start when the request was due
    t_send: float  # when it was sent (>= t_sched)
    t_done: float | None  # when its answer came (None: no answer before the drain timeout)
    task: str
    status: str  # ok | refused | error | timeout
    correct: bool | None = None  # answered and its label known
    students: int | None = None  # STUDENTS output: how many students ran (0 = the teacher)
    error: str | None = None

    @property
    def latency_ms(self) -> float | None:
        return None if self.t_done is None else (self.t_done - self.t_sched) * 1000


# ------------------------------------------------------------------------------------------------ metrics port
def parse_prometheus(text: str, model: str | None = None) -> dict[str, float]:
    """{metric name: value summed over its label sets} from Prometheus exposition text; with `model`, series
    labelled with another model are left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if model is not None and 'model="' in name_labels and f'model="{model}"' not in name_labels:
            continue
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def scrape_text(url: str, timeout: float = 2.0) -> str:
    with _NO_PROXY.open(url, timeout=timeout) as r:
        return r.read().decode()


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    return parse_prometheus(scrape_text(url, timeout))


class MetricsSampler:
    """Scrapes `url` every `period_s` in a thread; `samples` are {t (s since `t0`), metric: value}."""

    KEEP = ("chorus_", "nv_inference_pending_request_count", "nv_inference_count", "nv_inference_exec_count",
            "nv_inference_request_success", "nv_inference_request_failure")

    def __init__(self, url: str, period_s: float = 0.25):
        self.url, self.period_s = url, period_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self.t0 = time.perf_counter()

    def start(self, t0: float) -> MetricsSampler:
        self.t0 = t0
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, float]]:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(5)
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                values = scrape(self.url)
                sample = {"t": round(time.perf_counter() - self.t0, 3)}
                sample.update({k: v for k, v in values.items() if k.startswith(self.KEEP)})
                self.samples.append(sample)
            except OSError:
                pass
            self._stop.wait(self.period_s)


# ------------------------------------------------------------------------------------------------ the generator
class LoadGenerator:
    """Open-loop requests over gRPC; `model_for(task)` names the Triton model a row goes to."""

    def __init__(self, grpc_url: str, model_for: Callable[[str], str], parameters: dict | None = None,
                 want_students: bool = False, timeout_s: float = 60.0):
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.grpc_url, self.want_students = grpc_url, want_students
        self.model_for, self.parameters, self.timeout_s = model_for, parameters or None, timeout_s
        names = ["LABEL"] + (["STUDENTS"] if want_students else [])
        self.outputs = [grpcclient.InferRequestedOutput(n) for n in names]

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _inputs(row: Row) -> list:
        text, task = grpcclient.InferInput("TEXT", [1, 1], "BYTES"), grpcclient.InferInput("TASK", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[row.text.encode()]], dtype=np.object_))
        task.set_data_from_numpy(np.array([[row.task.encode()]], dtype=np.object_))
        return [text, task]

    def run(self, arrivals: Sequence[tuple[float, Row]], metrics_url: str | None = None, period_s: float = 0.25,
            drain_timeout_s: float | None = None, processes: int = 1) -> tuple[list[Outcome], list[dict]]:
        """Send every arrival on time, wait for the answers (at most `drain_timeout_s` after the last send), from this
        process or from `processes` sender processes."""
        drain_s = self.timeout_s if drain_timeout_s is None else drain_timeout_s
        sampler = MetricsSampler(metrics_url, period_s) if metrics_url else None
        try:
            if processes > 1:
                outcomes = self._run_processes(list(arrivals), drain_s, processes, sampler)
            else:
                prepared = self._prepare(arrivals)
                start = time.perf_counter()
                if sampler:
                    sampler.start(start)
                outcomes = self._send(prepared, start, drain_s)
        finally:
            samples = sampler.stop() if sampler else []
        return outcomes, samples

    def _prepare(self, arrivals: Sequence[tuple[float, Row]]) -> list[tuple[float, Row, list]]:
        return [(t, row, self._inputs(row)) for t, row in arrivals]

    def _send(self, prepared: list[tuple[float, Row, list]], start: float, drain_s: float) -> list[Outcome]:
        """Send each request at `start` (time.perf_counter()) + its offset; times of the outcomes are from `start`."""
        outcomes: list[Outcome] = []
        lock, pending = threading.Lock(), [len(prepared)]
        all_done = threading.Event()
        if not prepared:
            all_done.set()

        def callback(outcome: Outcome, row: Row, result, error) -> None:
            outcome.t_done = time.perf_counter() - start
            if error is not None:
                status = str(error.status() or "") if isinstance(error, InferenceServerException) else ""
                outcome.status = "refused" if "UNAVAILABLE" in status else "error"
                outcome.error = f"{status} {error.message() if hasattr(error, 'message') else error}"[:300]
            else:
                outcome.status = "ok"
                label = result.as_numpy("LABEL")
                if row.label is not None and label is not None:
                    outcome.correct = label.reshape(-1)[0].decode() == row.label
                if len(self.outputs) > 1:
                    s = result.as_numpy("STUDENTS")
                    outcome.students = None if s is None else int(s.reshape(-1)[0])
            with lock:
                pending[0] -= 1
                if pending[0] == 0:
                    all_done.set()

        for t, row, inputs in prepared:
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            outcome = Outcome(t, time.perf_counter() - start, None, row.task, "timeout")
            outcomes.append(outcome)
            try:
                self.client.async_infer(self.model_for(row.task), inputs, functools.partial(callback, outcome, row),
                                        outputs=self.outputs, parameters=self.parameters,
                                        client_timeout=self.timeout_s)
            except InferenceServerException as e:
                callback(outcome, row, None, e)
        all_done.wait(drain_s)
        return list(outcomes)

    def _run_processes(self, arrivals: list[tuple[float, Row]], drain_s: float, processes: int,
                       sampler: MetricsSampler | None) -> list[Outcome]:
        """`run` from `processes` children (`_sender_main`): each prepares its share, says ready, gets the common
        start time, sends, and hands back its outcomes. Their stderr is this process's."""
        job = {"grpc_url": self.grpc_url, "models": {row.task: self.model_for(row.task) for _, row in arrivals},
               "parameters": self.parameters, "want_students": self.want_students, "timeout_s": self.timeout_s,
               "drain_s": drain_s}
        # the children import what this process imports, from where it does (perf.bench drops PYTHONPATH from its
        # environment on the GPU machine, where that path holds the gRPC client)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        procs = [subprocess.Popen([sys.executable, "-m", "perf.loadgen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  cwd=ROOT, env=env) for _ in range(processes)]
        ok = False
        try:
            for i, p in enumerate(procs):
                pickle.dump({**job, "arrivals": arrivals[i::processes]}, p.stdin)
                p.stdin.flush()
            for p in procs:
                if pickle.load(p.stdout) != "ready":
                    raise RuntimeError("a load-generator sender process did not start")
            start = time.perf_counter() + 0.05  # time for every child to read it
            for p in procs:
                pickle.dump(start, p.stdin)
                p.stdin.close()
            if sampler:
                sampler.start(start)
            outcomes = [Outcome(**rec) for p in procs for rec in pickle.load(p.stdout)]
            ok = True
        except (EOFError, OSError, pickle.PickleError) as e:
            raise RuntimeError(f"a load-generator sender process failed (its stderr is above): {e!r}") from e
        finally:
            for p in procs:
                if not ok:
                    p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return sorted(outcomes, key=lambda o: o.t_sched)


# ------------------------------------------------------------------------------------------------ summaries
def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> dict:
    """Counts, answered-request latency percentiles, accuracy of answered rows with known labels, lateness."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "refused", "error", "timeout")}
    lat = [o.latency_ms for o in outcomes if o.status == "ok"]
    checked = [o.correct for o in outcomes if o.correct is not None]
    lag = [(o.t_send - o.t_sched) * 1000 for o in outcomes]
    students = [o.students for o in outcomes if o.students is not None]
    sent = len(outcomes)
    return {
        "sent": sent, "offered_per_s": sent / duration_s if duration_s else None, **counts,
        "answered_per_s": counts["ok"] / duration_s if duration_s else None,
        "refused_fraction": counts["refused"] / sent if sent else None,
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None, "mean_ms": float(np.mean(lat)) if lat else None,
        "accuracy": sum(checked) / len(checked) if checked else None, "checked": len(checked),
        "client_lag_p99_ms": percentile(lag, 99),
        "students_mean": float(np.mean(students)) if students else None,
        "errors_sample": sorted({o.error for o in outcomes if o.status == "error" and o.error})[:3],
    }


def per_phase(outcomes: Sequence[Outcome], phases: Sequence[tuple[float, float]]) -> list[dict]:
    """`summarize` of each phase [(seconds, rate)] of a phased run (requests by scheduled arrival), with its start."""
    out, start = [], 0.0
    for seconds, rate in phases:
        here = [o for o in outcomes if start <= o.t_sched < start + seconds]
        out.append({"start_s": start, "seconds": seconds, "rate": rate, **summarize(here, seconds)})
        start += seconds
    return out


def passes_slo(summary: dict, slo_ms: float, max_failed_fraction: float = 0.01) -> bool:
    """Served at this rate: p99 of answered within the SLO, and at most 1% refused, failed or unanswered."""
    if not summary["sent"] or summary["p99_ms"] is None:
        return False
    failed = summary["refused"] + summary["error"] + summary["timeout"]
    return summary["p99_ms"] <= slo_ms and failed <= max_failed_fraction * summary["sent"]


def timeline(outcomes: Sequence[Outcome], samples: Sequence[dict], bin_s: float) -> list[dict]:
    """Per time bin (by scheduled arrival): offered, answered, refused, p50/p99 of answered, students in use, and the
    last metrics sample in the bin (queue depth, pending requests)."""
    if not outcomes:
        return []
    end = max(max(o.t_sched for o in outcomes), max((s["t"] for s in samples), default=0.0))
    bins = []
    for i in range(int(math.ceil(end / bin_s)) + 1):
        lo, hi = i * bin_s, (i + 1) * bin_s
        here = [o for o in outcomes if lo <= o.t_sched < hi]
        lat = [o.latency_ms for o in here if o.status == "ok"]
        st = [o.students for o in here if o.students is not None]
        sample = next((s for s in reversed(samples) if s["t"] < hi), None)
        bins.append({
            "t": lo, "offered_per_s": len(here) / bin_s, "answered": sum(o.status == "ok" for o in here),
            "refused": sum(o.status == "refused" for o in here), "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99), "students_mean": float(np.mean(st)) if st else None,
            "queue_depth": None if sample is None else sample.get("chorus_queue_depth"),
            "pending_requests": None if sample is None else sample.get("nv_inference_pending_request_count"),
        })
    return bins


def recovery_s(bins: Sequence[dict], after_s: float, slo_ms: float) -> float | None:
    """Seconds after `after_s` (the end of an overload) from which every bin with answers has p99 within the SLO;
    None if that never happens before the run ends."""
    later = [b for b in bins if b["t"] >= after_s and b["answered"]]
    for i, b in enumerate(later):
        if all(x["p99_ms"] is not None and x["p99_ms"] <= slo_ms for x in later[i:]):
            return b["t"] - after_s
    return None


def outcome_records(outcomes: Sequence[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def _sender_main() -> None:
    """One sender process of `LoadGenerator.run(..., processes=n)`: pickles in on stdin, out on stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever prints goes to stderr, not into the pickles
    job = pickle.load(sys.stdin.buffer)
    gen = LoadGenerator(job["grpc_url"], job["models"].__getitem__, job["parameters"], job["want_students"],
                        job["timeout_s"])
    prepared = gen._prepare(job["arrivals"])
    pickle.dump("ready", out)
    out.flush()
    outcomes = gen._send(prepared, pickle.load(sys.stdin.buffer), job["drain_s"])
    pickle.dump(outcome_records(outcomes), out)
    out.flush()
    gen.close()


if __name__ == "__main__":
    _sender_main()
