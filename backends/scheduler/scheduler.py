"""`Scheduler`: the length-bucket scheduler that forms chorus's batches instead of Triton's dynamic batcher; engine-
and clock-free.

The serving path (`chorus.backends.executor`) calls, per `execute()` call: `submit` per row (a `Refusal` becomes
UNAVAILABLE), `schedule(now, flush=True)` for the call's batches, and `complete(batch, now)` after running each. A
caller that keeps rows across calls may instead `schedule(now)` only what is due and sleep until `next_due(now)`.
Every method takes the lock, so several threads may call it.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from chorus.backends.scheduler.admission import Refusal, check_admission, waiting_time
from chorus.backends.scheduler.batching import form_batches, order_by_deadline, path_of, rows_cap
from chorus.backends.scheduler.buffer import Element, LengthBuffer
from chorus.backends.scheduler.config import SchedulerConfig
from chorus.backends.scheduler.latency import LatencyTable
from chorus.backends.scheduler.metrics import SchedulerMetrics
from chorus.backends.scheduler.request import Batch, Request
from chorus.errors import InvalidInput

log = logging.getLogger(__name__)

# choose_k(queue_depth, arrival_rate [requests/s], capacity [requests/s with k = 1..K students], deadline_slack [s])
# -> students to run
ChooseK = Callable[[int, float, Sequence[float], float], int]
RATE_WINDOW_S = 1.0  # the arrival rate counts the arrivals of this many seconds
OVERHEAD_WINDOW = 15  # the measured per-batch overhead is the median of this many latest batches


class Scheduler:
    """Length-aware buffer (Student Parallelism) + coordinated batching (PetS) + admission control + fairness.

    Semantics of schedule(now):
        ready   = every element when no batch is in flight (idle_dispatch), else
                  elements that are full, or whose oldest request waited >= max_wait_s, or have seen
                  >= max_batches_passed batches formed without them, or whose deadline slack is <= max_wait_s
                  (every element when flush=True)
        pool    = ready elements, oldest first, up to max_requests_per_schedule requests
        batches = order_by_deadline(form_batches(pool), start=max(now, executor busy until))
    """

    def __init__(self, config: SchedulerConfig, latency: LatencyTable, choose_k: ChooseK | None = None):
        self.cfg, self.table = config, latency
        self.choose_k = choose_k
        self._buffer = LengthBuffer(config.bin_edges, config.element_size)
        self._ids: set = set()
        self._lock = threading.Lock()
        self._metrics = SchedulerMetrics()
        self._formed = 0  # batches formed so far
        self._inflight: deque[tuple[int, float]] = deque(maxlen=4096)  # (batch number, estimated s), not completed
        self._busy_until = -math.inf  # when the executor finishes what it was given, by estimate
        self._arrivals: deque[float] = deque()  # arrival times within RATE_WINDOW_S of the latest
        self._overheads: deque[float] = deque(maxlen=OVERHEAD_WINDOW)  # latest batches' cost beyond the tables'
        self._overhead_s = 0.0  # their median

    # -- the request thread ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Refusal | None:
        """Admit `request` at `request.arrival`, or refuse it at once (see admission.check_admission).

        Raises InvalidInput for a request no load could admit: too long, unknown PET type, duplicate id.
        A request without a deadline is admitted as a copy with `arrival + default_deadline_s`; batches carry that copy.
        """
        if not isinstance(request.num_tokens, int) or not 1 <= request.num_tokens <= self.cfg.max_tokens:
            raise InvalidInput(f"request {request.id!r} has {request.num_tokens!r} tokens; the scheduler takes "
                               f"1..{self.cfg.max_tokens} (the last bin edge)")
        if request.pet_type not in self.table.pet:
            raise InvalidInput(f"request {request.id!r} has PET type {request.pet_type!r}; the latency table "
                               f"profiles {list(self.table.pet_types)}")
        if request.deadline is None:
            request = replace(request, deadline=request.arrival + self.cfg.default_deadline_s)
        now = request.arrival
        with self._lock:
            if request.id in self._ids:
                raise InvalidInput(f"request id {request.id!r} is already waiting; ids must be unique")
            self._metrics.submitted += 1
            self._note_arrival(now)
            refusal = check_admission(request, now, self._buffer, max(0.0, self._busy_until - now), self.table,
                                      self.cfg, self._overhead_s)
            if refusal is not None:
                if refusal.reason == "queue_full":
                    self._metrics.refused_queue_full += 1
                else:
                    self._metrics.refused_deadline += 1
                log.debug("%s", refusal.message)
                return refusal
            self._buffer.add(request, self._formed)
            self._ids.add(request.id)
            self._metrics.queue_depth = len(self._buffer)
        return None

    # -- the executor -----------------------------------------------------------------------------------------------
    def schedule(self, now: float, flush: bool = False) -> list[Batch]:
        """The batches to run now, in run order (empty: nothing is ready). `flush=True` takes everything waiting, up
        to max_requests_per_schedule a call (e.g. to drain when the model unloads)."""
        with self._lock:
            ready = sorted((e for e in self._buffer.elements() if flush or self._ready(e, now)),
                           key=lambda e: e.oldest_arrival)  # stable: bin order breaks ties
            pool: list[Element] = []
            n = 0
            for e in ready:
                if n + len(e.requests) > self.cfg.max_requests_per_schedule:
                    break
                pool.append(e)
                n += len(e.requests)
            if not pool:
                return []
            groups = form_batches([r for e in pool for r in e.requests], self.table, self.cfg)
            planned = order_by_deadline(groups, max(now, self._busy_until), self.table, self.cfg)
            depth = len(self._buffer) - n
            # choose_k may raise: ask it before any request leaves the buffer
            ks = [self._choose_k(reqs, now, finish, depth) for reqs, _, finish in planned]
            self._buffer.take(pool)
            self._metrics.deadline_splits += len(planned) - len(groups)
            batches = [self._make_batch(reqs, start, finish, now, k)
                       for (reqs, start, finish), k in zip(planned, ks)]
            self._busy_until = planned[-1][2]
            self._metrics.queue_depth = len(self._buffer)
        return batches

    def complete(self, batch: Batch, now: float) -> None:
        """The executor finished `batch` at `now` (batches run in order): the backlog estimate restarts from now."""
        with self._lock:
            while self._inflight and self._inflight[0][0] <= batch.number:
                self._inflight.popleft()
            self._busy_until = now + sum(s for _, s in self._inflight)

    def observe_service(self, seconds: float, estimated_s: float) -> None:
        """The executor served a batch that the tables estimate at `estimated_s` (`Batch.estimated_s`, for the k
        students it ran) in `seconds` of wall time. The tables profile compute only; what a served batch costs beyond
        it (scheduling, padding, copies, threads contending for the GIL) is a per-batch overhead, the median of the
        latest OVERHEAD_WINDOW batches (a batch that captured CUDA graphs, 10x slower once, does not move it), that
        admission adds to every batch ahead of a request and pruning to a full batch. (A rate in rows/s measured
        from the batches themselves would read a one-row batch's latency as the server's capacity.)"""
        if seconds <= 0:
            return
        with self._lock:
            self._overheads.append(max(0.0, seconds - estimated_s))
            self._overhead_s = statistics.median(self._overheads)

    @property
    def overhead_s(self) -> float:
        """The measured per-batch overhead (seconds) beyond the tables' estimate."""
        return self._overhead_s

    def note_expired(self) -> None:
        """The executor refused an admitted request whose own deadline passed while it waited."""
        with self._lock:
            self._metrics.expired += 1

    def next_due(self, now: float) -> float | None:
        """When `schedule` will next have something to do if nothing arrives (now: already); None: nothing waits.

        An executor may sleep until then (or until a submit wakes it); a batch formed elsewhere can make an element due
        earlier through the fairness rule, which `schedule` checks on each call.
        """
        with self._lock:
            due = None
            for e in self._buffer.elements():
                t = now if self._ready(e, now) else self._due(e)
                due = t if due is None else min(due, t)
            return None if due is None else max(due, now)

    # -- state for exporters -----------------------------------------------------------------------------------------
    @property
    def metrics(self) -> SchedulerMetrics:
        """A snapshot of the counters."""
        with self._lock:
            return self._metrics.snapshot()

    def __len__(self) -> int:
        """Requests waiting."""
        return len(self._buffer)

    # -- internals ---------------------------------------------------------------------------------------------------
    def _time(self, e: Element) -> float:
        if e.est_s is None:
            e.est_s = waiting_time([e], self.table, self.cfg)
        return e.est_s

    def _due(self, e: Element) -> float:
        """When a partial element must go: its oldest request has waited max_wait_s, or its slack fell to max_wait_s."""
        return min(e.oldest_arrival + self.cfg.max_wait_s, e.earliest_deadline - self._time(e) - self.cfg.max_wait_s)

    def _ready(self, e: Element, now: float) -> bool:
        return (e.full or (self.cfg.idle_dispatch and not self._inflight)
                or self._formed - e.batch_mark >= self.cfg.max_batches_passed or now >= self._due(e))

    def _note_arrival(self, now: float) -> None:
        self._arrivals.append(now)
        self._forget_arrivals(now)

    def _forget_arrivals(self, now: float) -> None:
        while self._arrivals and self._arrivals[0] <= now - RATE_WINDOW_S:
            self._arrivals.popleft()

    def arrival_rate(self, now: float) -> float:
        """Requests (rows) per second: the arrivals of the last RATE_WINDOW_S seconds."""
        self._forget_arrivals(now)
        return len(self._arrivals) / RATE_WINDOW_S

    def _choose_k(self, reqs: list[Request], now: float, finish: float, queue_depth: int) -> int | None:
        """Students for a student batch (choose_k, default all of them); None for a batch on the backbone.
        choose_k sees the path's capacity with each prefix k of the students, with full batches of this length
        (requests/s): the tables' time of such a batch through k students plus the measured per-batch overhead
        (`observe_service`)."""
        if path_of(reqs[0].pet_type, self.cfg) == "backbone":
            return None
        if self.choose_k is None:
            return self.cfg.max_students
        L = max(r.num_tokens for r in reqs)
        n = rows_cap(L, self.cfg)
        capacity = [n / max(self.prefix_time(reqs[0].pet_type, k, n, L) + self._overhead_s, 1e-12)
                    for k in range(1, self.cfg.max_students + 1)]
        k = self.choose_k(queue_depth, self.arrival_rate(now), capacity, min(r.deadline for r in reqs) - finish)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.cfg.max_students:
            raise InvalidInput(f"choose_k returned {k!r}; expected an int in 1..{self.cfg.max_students} "
                               "(max_students)")
        return k

    def prefix_time(self, pet_type: str, k: int, n: int, padded_len: int) -> float:
        """Seconds of n rows through the first k of `pet_type`'s students (a standalone path): the tables'
        `{pet_type}:{k}` profile where they have one (chorus profiles every prefix on the serving device), else the
        time of all K scaled by (1 + k) / (1 + K) (the embedding lookup once, then k students)."""
        K = self.cfg.max_students
        prefix = f"{pet_type}:{k}"
        if k < K and prefix in self.table.pet:
            return self.table.beta(prefix, n, padded_len)
        every = self.table.beta(pet_type, n, padded_len)
        return every if k >= K else every * (1 + k) / (1 + K)

    def _make_batch(self, reqs: list[Request], start: float, finish: float, now: float, k: int | None) -> Batch:
        m = self._metrics
        pet_types = tuple(sorted({r.pet_type for r in reqs}))
        L = max(r.num_tokens for r in reqs)
        # planned with all K students; a pruned student batch is estimated with its k
        estimated = finish - start if k is None else self.prefix_time(pet_types[0], k, len(reqs), L)
        if k is not None:
            m.student_batches += 1
            m.students_k_sum += k
            m.students_in_use = k
        batch = Batch(self._formed, tuple(sorted(reqs, key=lambda r: r.num_tokens)), L, tuple(sorted({r.task for r in reqs})), pet_types, k,
                      estimated, start, finish)
        self._formed += 1
        self._inflight.append((batch.number, estimated))
        self._ids.difference_update(r.id for r in reqs)
        m.batches += 1
        m.scheduled_requests += batch.size
        m.real_tokens += batch.real_tokens
        m.batch_tokens += batch.size * batch.padded_len
        m.batch_sizes[batch.size] += 1
        m.padded_lengths[batch.padded_len] += 1
        waits = [now - r.arrival for r in reqs]
        m.wait_s_sum += sum(waits)
        m.wait_s_max = max(m.wait_s_max, *waits)
        m.expected_late += sum(r.deadline < finish for r in reqs)
        return batch
