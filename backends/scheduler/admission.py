"""Admission control: a bounded queue, and a deadline check at arrival against the latency tables and the backlog."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from chorus.backends.scheduler.batching import batch_time, path_of, requests_time, rows_cap
from chorus.backends.scheduler.buffer import Element, LengthBuffer
from chorus.backends.scheduler.config import SchedulerConfig
from chorus.backends.scheduler.latency import LatencyTable
from chorus.backends.scheduler.request import Request
from chorus.errors import Overloaded


@dataclass(frozen=True)
class Refusal:
    """A request refused at once: `reason` is "queue_full" or "deadline"; `message` is for the client."""

    request_id: Hashable
    reason: str
    message: str
    estimated_wait_s: float  # until the request could start
    estimated_service_s: float  # its own run, alone
    deadline_in_s: float  # its deadline, seconds after arrival

    def to_error(self) -> Overloaded:
        """The exception the server turns into UNAVAILABLE."""
        return Overloaded(self.message)


def bins_time(bins: Iterable[tuple[Mapping[str, int], int]], table: LatencyTable, cfg: SchedulerConfig) -> float:
    """Estimated seconds to run what waits, given per bin (PET type -> requests, longest request).

    Semantics: per bin and path, the rows packed into full batches at the bin's longest request:
        nb = ceil(N / rows_cap(L));  time = nb * batch_time({p: ceil(n_p / nb)}, L)
    An estimate for admission, cheap to compute per arrival, not the schedule the DP will form.
    """
    total = 0.0
    for counts, L in bins:
        by_path: dict[str, dict[str, int]] = {}
        for p, c in counts.items():
            if c:
                by_path.setdefault(path_of(p, cfg), {})[p] = c
        for group in by_path.values():
            nb = math.ceil(sum(group.values()) / rows_cap(L, cfg))
            total += nb * batch_time({p: math.ceil(c / nb) for p, c in group.items()}, L, table, cfg)
    return total


def waiting_time(elements: Iterable[Element], table: LatencyTable, cfg: SchedulerConfig) -> float:
    """`bins_time` of the requests in `elements`."""
    per_bin: dict[int, tuple[Counter, int]] = {}
    for e in elements:
        counts, longest = per_bin.get(e.bin, (Counter(), 0))
        counts.update(e.pet_counts)
        per_bin[e.bin] = (counts, max(longest, e.max_tokens))
    return bins_time(per_bin.values(), table, cfg)


def check_admission(request: Request, now: float, buffer: LengthBuffer, inflight_s: float, table: LatencyTable,
                    cfg: SchedulerConfig, overhead_s: float = 0.0) -> Refusal | None:
    """None if `request` (deadline already set) may wait; else the Refusal saying why.

    Semantics:
        queue_len >= max_queue                                       -> refused, "queue_full"
        wait = inflight_s + waiting_time(elements due no later than the request's deadline)
                                   (from per-bin totals, one bin recomputed per arrival, when that is every element,
                                    as with default deadlines; O(elements) when the deadline is tighter than some)
        wait += overhead_s * ceil(queue_len / max_batch_size)    (at least that many batches run before it; overhead_s:
                                   what a served batch costs beyond the tables, as measured: the tables profile
                                   compute only. Not for its own batch: an empty queue is always admitted, so a
                                   high estimate can never refuse everything and stop the batches that correct it)
        now + wait + time([request]) > request.deadline              -> refused, "deadline"
    """
    deadline_in = request.deadline - now
    service = requests_time([request], table, cfg)
    queue_len = len(buffer)
    if queue_len >= cfg.max_queue:
        return Refusal(request.id, "queue_full",
                       f"request {request.id!r} refused: the queue holds {queue_len} requests, its limit "
                       f"(max_queue={cfg.max_queue}); retry later", 0.0, service, deadline_in)
    if request.deadline >= buffer.latest_deadline:
        for b, est in enumerate(buffer.bin_est_s):  # bins unchanged since the last arrival keep their estimate
            if est is None:
                buffer.bin_est_s[b] = bins_time([(buffer.bin_counts[b], buffer.bin_longest[b])], table, cfg)
        waiting = sum(buffer.bin_est_s)
    else:
        waiting = waiting_time([e for e in buffer.elements() if e.earliest_deadline <= request.deadline], table, cfg)
    wait = inflight_s + waiting + overhead_s * math.ceil(queue_len / cfg.max_batch_size)
    if now + wait + service > request.deadline:
        return Refusal(request.id, "deadline",
                       f"request {request.id!r} refused: estimated wait {wait * 1e3:.1f} ms plus its own "
                       f"{service * 1e3:.1f} ms run exceeds its deadline of {deadline_in * 1e3:.1f} ms; retry later "
                       f"or allow a longer deadline", wait, service, deadline_in)
    return None
