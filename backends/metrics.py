"""chorus's metric families on Triton's metrics port (`pb_utils.MetricFamily`), published by a thread of their own,
and the backend process's garbage-collection pauses. Imported inside the Python-backend stub only."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import Counter

import triton_python_backend_utils as pb_utils


class GcPauses:
    """Times the stub's garbage collections (`gc.callbacks`): while one runs every thread of the process waits (the
    GIL), so a long one is a stall of the whole instance. No locks in the callback (a collection can start inside any
    locked section); a rare lost update of these running totals is harmless."""

    def __init__(self) -> None:
        self.collections, self.seconds, self.longest = 0, 0.0, 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.collections += 1
            self.seconds += pause
            self.longest = max(self.longest, pause)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)


class Metrics:
    """Custom metric families on Triton's metrics port: what the scheduler batches, how padded, what it refuses, how
    many students answer. Each update of a `pb_utils` metric is an IPC round trip to the server, so execute() only
    adds to plain counters here and one thread publishes them every FLUSH_S seconds (and at unload)."""

    FLUSH_S = 0.25

    def __init__(self, labels: dict[str, str], graph_stats=None) -> None:
        """`labels`: what every series carries (the model and its instance, as Triton labels its own metrics: a model
        with several instances publishes each instance's gauges apart, and counters sum over them);
        `graph_stats()` -> (CUDA graphs captured so far, seconds those captures took), or None. The stub's garbage
        collections are timed from here on (`GcPauses`)."""
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.families = []  # a family must outlive its metrics
        self.labels = labels

        def family(name: str, kind, text: str):
            self.families.append(pb_utils.MetricFamily(name, text, kind))
            return self.families[-1].Metric(labels=labels)

        self.counters = {  # name -> (metric, value not yet published)
            "batches": family("chorus_batches_total", counter, "mixed-task batches run by the chorus scheduler"),
            "rows": family("chorus_batch_rows_total", counter, "rows in those batches"),
            "tokens": family("chorus_batch_tokens_total", counter, "rows x padded length of those batches"),
            "padding": family("chorus_padding_tokens_total", counter, "padding tokens in those batches"),
            "refused": family("chorus_refused_total", counter, "requests refused (UNAVAILABLE): queue full or deadline"),
            # where an answered request's time goes inside execute() (Triton's nv_inference_queue_duration_us and
            # nv_inference_compute_infer_duration_us hold the time before execute() and the whole call)
            "answered": family("chorus_answered_total", counter, "requests answered"),
            "decode_us": family("chorus_decode_duration_us", counter,
                                "microseconds answered requests spent in their execute() call's decoding (reading "
                                "inputs and parameters, one tokenizer call for the call's texts)"),
            "queue_us": family("chorus_queue_duration_us", counter,
                               "microseconds from decoding's end to the start of their last batch (admission, "
                               "scheduling, earlier batches of the call)"),
            "compute_us": family("chorus_compute_duration_us", counter,
                                 "microseconds of the batch that finished them (padding, host copies, the engine)"),
            "encode_us": family("chorus_encode_duration_us", counter,
                                "microseconds building their call's responses"),
            # a batch whose shape (and PET methods) has no CUDA graph yet waits for one to be captured
            "captures": family("chorus_cuda_graph_captures_total", counter,
                               "CUDA graphs captured (backbone + PET and students; at load and while serving)"),
            "capture_s": family("chorus_cuda_graph_capture_seconds_total", counter, "seconds those captures took"),
            "gc": family("chorus_gc_collections_total", counter, "garbage collections in this instance's process"),
            "gc_s": family("chorus_gc_pause_seconds_total", counter,
                           "seconds those collections paused every thread of the process"),
        }
        self.gc, self.graph_stats = GcPauses(), graph_stats
        self._published: dict[str, float] = {}  # running totals (collections, captures) as last published
        self.gauges = {
            "queue": family("chorus_queue_depth", gauge, "rows waiting in the scheduler"),
            "last_rows": family("chorus_last_batch_rows", gauge, "rows of the latest batch"),
            "last_len": family("chorus_last_batch_padded_length", gauge, "padded length of the latest batch"),
            "students_in_use": family("chorus_students_in_use", gauge,
                                      "students run by the latest student batch (Student Parallelism pruning)"),
            "gc_longest_s": family("chorus_gc_longest_pause_seconds", gauge,
                                   "the longest garbage-collection pause of this instance's process so far"),
        }
        self.student_family = pb_utils.MetricFamily("chorus_student_rows_total",
                                                    "rows answered by k students (k=0: the teacher)", counter)
        self.families.append(self.student_family)
        self.student_rows: dict[int, object] = {}
        self._pending: Counter = Counter()  # counter name or ("k", k) -> increments not yet published
        self._values: dict[str, float] = {}  # gauge name -> latest value not yet published
        self._lock = threading.Lock()  # execute() counts, the publisher thread takes the counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="chorus-metrics", daemon=True)
        self._thread.start()

    def answered(self, ks: list[int]) -> None:
        with self._lock:
            self._pending.update(("k", k) for k in ks)

    def stages(self, n: int, decode_s: float, queue_us: float, compute_us: float, encode_s: float) -> None:
        """`n` answered requests of one execute() call: the call's decode and encode seconds (each request waits for
        all of them) and the sums of the requests' queue and compute microseconds."""
        with self._lock:
            self._pending.update({"answered": n, "decode_us": n * decode_s * 1e6, "queue_us": queue_us,
                                  "compute_us": compute_us, "encode_us": n * encode_s * 1e6})

    def refused(self) -> None:
        with self._lock:
            self._pending["refused"] += 1

    def observe(self, batch, queue_depth: int) -> None:
        with self._lock:
            self._pending.update({"batches": 1, "rows": batch.size, "tokens": batch.size * batch.padded_len,
                                  "padding": batch.padding_tokens})
            self._values.update(queue=queue_depth, last_rows=batch.size, last_len=batch.padded_len)
            if batch.k is not None:
                self._values["students_in_use"] = batch.k

    def publish(self) -> None:
        totals = {"gc": self.gc.collections, "gc_s": self.gc.seconds}
        if self.graph_stats is not None:
            totals["captures"], totals["capture_s"] = self.graph_stats()
        with self._lock:
            for key, total in totals.items():  # counters grow by what the running totals gained since last time
                if total != self._published.get(key, 0):
                    self._pending[key] += total - self._published.get(key, 0)
                    self._published[key] = total
            if "gc" in self._pending:
                self._values["gc_longest_s"] = self.gc.longest
            pending, values = self._pending, self._values
            self._pending, self._values = Counter(), {}
        for key, n in pending.items():
            if isinstance(key, tuple):
                if key[1] not in self.student_rows:
                    self.student_rows[key[1]] = self.student_family.Metric(labels={**self.labels, "k": str(key[1])})
                self.student_rows[key[1]].increment(n)
            else:
                self.counters[key].increment(n)
        for key, value in values.items():
            self.gauges[key].set(value)

    def _publish_loop(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            try:
                self.publish()
            except Exception as e:  # noqa: BLE001 - metrics must never stop serving
                pb_utils.Logger.log_warn(f"chorus: publishing metrics failed: {e!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.publish()
        self.gc.close()
