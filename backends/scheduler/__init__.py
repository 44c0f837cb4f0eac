"""The length-bucket scheduler (issue 5): pure Python, no clock, tensor or socket; `now` is always passed in.

Files, one concept each: config (SchedulerConfig), request (Request in, Batch out), buffer (length-aware buffer),
latency (alpha/beta latency tables, profiling), batching (two-stage DP, brute-force reference, deadline order),
admission (bounded queue, deadline check, Refusal), metrics (exported counters), scheduler (Scheduler).
"""

from chorus.backends.scheduler.admission import Refusal
from chorus.backends.scheduler.batching import brute_force_batches, form_batches
from chorus.backends.scheduler.buffer import Element, LengthBuffer
from chorus.backends.scheduler.config import SchedulerConfig
from chorus.backends.scheduler.latency import LatencyTable, profile_latency_table
from chorus.backends.scheduler.metrics import SchedulerMetrics
from chorus.backends.scheduler.request import Batch, Request
from chorus.backends.scheduler.scheduler import ChooseK, Scheduler

__all__ = ["Batch", "ChooseK", "Element", "LatencyTable", "LengthBuffer", "Refusal", "Request", "Scheduler",
           "SchedulerConfig", "SchedulerMetrics", "brute_force_batches", "form_batches", "profile_latency_table"]
