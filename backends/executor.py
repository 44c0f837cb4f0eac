"""What one Triton `execute()` call does with the requests it was handed: admit them, batch them, run them, and give
each its result before the call returns. Triton-free: the Triton model decodes the requests and encodes the results.

Triton's dynamic batcher (no queue delay) hands `execute()` every request that queued while the previous call ran,
so Triton's queue is the buffer and each call's requests are one scheduling round:

    run(calls, now):
        for each decoded call, each row -> Scheduler.submit (admission: a refused row fails its whole call,
                                                             Overloaded -> UNAVAILABLE)
        batches = Scheduler.schedule(now, flush=True)   (PetS's two-stage DP over the rows of this call by length and
                                                          PET type; students' batches with the pruning policy's k)
        for b in batches (earliest deadline first):
            rows of a call whose own deadline has passed -> that call fails (Overloaded), its rows not run
            classify_rows(b) -> each row's logits, label and students written into its call's arrays
            Scheduler.complete(b, now)
        Scheduler.observe_service(the call's wall time from its start, decoding included, the batches' estimates)
            (the per-batch overhead admission and pruning add to the tables: what the path costs beyond compute)

Answers leave as `execute()`'s return value: one message back to the server for the whole call, the cheapest channel
the Python backend has (a response sender's `send()` is one blocking round trip per response). With `scheduler=None`
(`batching: triton`, the baseline) every row of the call runs as one batch, padded to its longest row.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from chorus.backends.engine import Classified, Engine
from chorus.backends.scheduler import LatencyTable, Request, Scheduler, SchedulerConfig, profile_latency_table
from chorus.backends.students.bank import StudentBank
from chorus.errors import ChorusError, Overloaded

STUDENTS = "students"  # the scheduler's PET type of rows answered by a task's students (a standalone path)


def pet_type(engine: Engine, task: str) -> str:
    """A task's PET type for the latency tables: its methods joined, e.g. "lora" or "bitfit+lora"."""
    return "+".join(sorted(engine.bank.tasks[task].pet)) or "head"


def students_for(students: StudentBank | None, task: str, asked: int | None) -> int:
    """At most how many students answer a row of `task`: 0 (the teacher) when the task has none, the request asked
    for the teacher (`students=0`), or it asked for nothing and no prefix is within the accuracy budget; else K, or
    fewer if the request asked for at most n."""
    K = 0 if students is None else students.num_students(task)
    if asked is None:
        return K if K and students.floor(task) is not None else 0
    return min(asked, K)


def row_students(students: StudentBank | None, task: str, asked: int | None, batch_k: int | None) -> int:
    """Students for one row of a batch: 0 on the backbone path; in a student batch, the batch's k (the pruning
    policy's) capped by what the request allows, and, when the request left it to the server, no fewer than the
    task's accuracy floor."""
    if batch_k is None:
        return 0
    k = min(batch_k, students_for(students, task, asked))
    return k if asked is not None else max(k, students.floor(task))


def classify_rows(engine: Engine, students: StudentBank | None, ids: list[list[int]], tasks: list[str],
                  ks: list[int]) -> Classified:
    """Rows of token ids, each for its task, with `ks[i]` students (0: backbone + PET, all such rows one mixed batch;
    k: the task's first k students, rows grouped by (task, k)). Logits are `engine.bank.max_labels` wide."""
    width = engine.bank.max_labels
    logits = np.full((len(ids), width), -np.inf, dtype=np.float32)
    teacher = [i for i, k in enumerate(ks) if k == 0]
    if len(teacher) == len(ids):
        logits = engine.run(ids, tasks).logits
    elif teacher:
        logits[teacher] = engine.run([ids[i] for i in teacher], [tasks[i] for i in teacher]).logits
    groups: dict[tuple[str, int], list[int]] = {}
    for i, k in enumerate(ks):
        if k:
            groups.setdefault((tasks[i], k), []).append(i)
    for (task, k), rows in groups.items():
        got = students.run([ids[i] for i in rows], task, k)
        logits[rows, : got.shape[1]] = got
    names = [engine.bank.tasks[t].labels for t in tasks]
    labels = [n[int(np.argmax(row[: len(n)]))] for n, row in zip(names, logits)]
    return Classified(logits, labels, names, list(ks))


@torch.inference_mode()
def profile_engine(engine: Engine, students: StudentBank | None = None, batch_sizes=(1, 16, 64), seq_lens=(16, 64),
                   repeats: int = 1) -> LatencyTable:
    """PetS's latency tables for this engine and device: α for the backbone alone, β per served PET type, and, when a
    task has students, β for them: `students` (all K of the task with the most) and `students:k` for each shorter
    prefix k (what pruning reads: `Scheduler.prefix_time`)."""
    by_type: dict[str, str] = {}
    for name in engine.bank.tasks:
        by_type.setdefault(pet_type(engine, name), name)
    student_task = max(students.tasks, key=students.num_students) if students is not None and students.tasks else None
    prefixes: dict[str, int] = {}  # the students' PET types in the tables -> how many students run
    if student_task is not None:
        K = students.num_students(student_task)
        prefixes = {STUDENTS: K} | {f"{STUDENTS}:{k}": k for k in range(1, K)}
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def run(n: int, L: int, p: str | None) -> float:
        ids = torch.randint(engine.cfg.vocab_size // 2, engine.cfg.vocab_size, (n, L), generator=gen).tolist()
        if p in prefixes:
            sync()
            start = time.perf_counter()
            students.run(ids, student_task, prefixes[p])
            sync()
            return time.perf_counter() - start
        task = by_type[p] if p is not None else next(iter(engine.bank.tasks))
        if engine.graphs is not None and engine.graphs.shape(n, L) is not None:  # what serving replays
            x = torch.tensor(ids)
            entry = engine.bank.tasks[task]
            slots = {} if p is None else {m: [s] * n for m, s in entry.slots.items()}  # α: the backbone alone
            engine.graphs.forward(x, torch.ones_like(x), [entry.head_slot] * n, slots, exact=True)  # captures once
            start = time.perf_counter()
            engine.graphs.forward(x, torch.ones_like(x), [entry.head_slot] * n, slots, exact=True)  # on the host
            return time.perf_counter() - start
        rows = engine.bank.row_tasks([task] * n)
        if p is None:  # the backbone alone: every method's null slot
            rows = type(rows).build({m: torch.zeros_like(s) for m, s in rows.slots.items()}, rows.head_slots)
        x = torch.tensor(ids, device=engine.device)
        mask = torch.ones_like(x)
        sync()
        start = time.perf_counter()
        engine.model(x, mask, rows)
        sync()
        return time.perf_counter() - start

    run(max(batch_sizes), max(seq_lens), None)  # warm up
    if student_task is not None:
        run(max(batch_sizes), max(seq_lens), STUDENTS)
    return profile_latency_table(run, batch_sizes, seq_lens, sorted(by_type) + sorted(prefixes),
                                 standalone_pet_types=prefixes, repeats=repeats)


def _batch_error(e: Exception) -> Exception:
    """What a failed batch's requests are answered with: chorus's own errors as they are, anything else wrapped."""
    return e if isinstance(e, ChorusError) else RuntimeError(f"batch failed: {e!r}")


@dataclass
class Call:
    """One inference request as `execute()` learned it, and, after `Executor.run`, its result.

    `ids`/`tasks`: its rows (token ids with [CLS]/[SEP], task names); `error`: why it cannot run (bad input: it is
    answered with that error and nothing else happens to it); `deadline_s`: the request's own deadline (parameter
    `deadline_ms`), hard: its rows are not run once it has passed; `students`: its `students` parameter (0: the
    teacher, n: at most n, None: as many as the load allows); `wanted`: the outputs it asked for (None: all).
    """

    ids: list[list[int]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    error: Exception | None = None
    deadline_s: float | None = None
    students: int | None = None
    wanted: frozenset[str] | None = None
    truncated: list[int] = field(default_factory=list)
    result: Classified | None = None
    batch_start: float = 0.0  # time.perf_counter() when the batch that finished it started
    batch_s: float = 0.0  # that batch's run

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Rows:
    """A call's results as its rows finish."""

    call: Call
    logits: np.ndarray
    labels: list
    ran: list
    left: int


class Executor:
    """Runs the calls of one `execute()` (see the module's docstring). `scheduler_config`/`table` None: `batching:
    triton`, one batch per call. `choose_k` is the students' pruning policy (default: all K). `on_batch(batch, rows
    still to run)` after each scheduled batch. `clock` returns seconds (monotonic); tests may pass their own."""

    def __init__(self, engine: Engine, scheduler_config: SchedulerConfig | None = None,
                 table: LatencyTable | None = None, students: StudentBank | None = None,
                 choose_k: Callable | None = None, on_batch: Callable | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.engine, self.students, self.on_batch, self.clock = engine, students, on_batch, clock
        self.scheduler = (Scheduler(scheduler_config, table, choose_k=choose_k)
                          if scheduler_config is not None else None)
        self._ids = itertools.count()

    def run(self, calls: list[Call], waited_s: float = 0.0, started: float | None = None) -> None:
        """Give every call its `result` or its `error`. `waited_s`: how long the call's requests may have waited
        in Triton's queue before this call (their deadlines count from their arrival); `started`: when the call began
        on `clock` (default: now), so that the service time admission and pruning learn includes decoding."""
        good = [c for c in calls if c.ok]
        if not good:
            return
        if self.scheduler is None:
            self._run_as_one_batch(good)
            return
        start = self.clock()
        pending = self._admit(good, start, waited_s)
        batches = self.scheduler.schedule(start, flush=True)
        estimated = 0.0
        for i, batch in enumerate(batches):
            self._run_batch(batch, pending)
            estimated += batch.estimated_s
            self.scheduler.complete(batch, self.clock())
            if self.on_batch is not None:
                self.on_batch(batch, sum(b.size for b in batches[i + 1:]))
        if batches:
            self.scheduler.observe_service(self.clock() - (start if started is None else started), estimated)
        for rows in pending.values():
            if rows.call.ok:
                rows.call.result = Classified(rows.logits, [lab for lab, _ in rows.labels],
                                              [names for _, names in rows.labels], rows.ran)

    def _admit(self, calls: list[Call], now: float, waited_s: float) -> dict[int, _Rows]:
        width = self.engine.bank.max_labels
        default_s = self.scheduler.cfg.default_deadline_s
        pending: dict[int, _Rows] = {}
        for call in calls:
            rows = _Rows(call, np.full((len(call.ids), width), -np.inf, dtype=np.float32), [None] * len(call.ids),
                         [0] * len(call.ids), len(call.ids))
            pending[id(call)] = rows
            deadline = now - waited_s + (default_s if call.deadline_s is None else call.deadline_s)
            for row, (ids, task) in enumerate(zip(call.ids, call.tasks)):
                path = STUDENTS if students_for(self.students, task, call.students) else pet_type(self.engine, task)
                refusal = self.scheduler.submit(Request(next(self._ids), task, path, len(ids), now, deadline,
                                                        payload=(rows, row)))
                if refusal is not None:
                    call.error = refusal.to_error()  # rows already queued are skipped when their batch runs
                    break
        return pending

    def _run_batch(self, batch, pending: dict[int, _Rows]) -> None:
        now = self.clock()
        live = []
        for r in batch.requests:
            rows, _ = r.payload
            call = rows.call
            if call.ok and call.deadline_s is not None and now > r.deadline:
                # a deadline the client set is hard: its rows no longer run once it has passed
                self.scheduler.note_expired()
                call.error = Overloaded(f"deadline of {call.deadline_s * 1e3:.0f} ms passed before the request's "
                                        "batch could run; the server is overloaded: retry later or allow a longer "
                                        "deadline")
            if call.ok:
                live.append(r)
        if not live:
            return
        ks = [row_students(self.students, r.task, r.payload[0].call.students, batch.k) for r in live]
        start = time.perf_counter()
        try:
            out = classify_rows(self.engine, self.students, [r.payload[0].call.ids[r.payload[1]] for r in live],
                                [r.task for r in live], ks)
        except Exception as e:  # noqa: BLE001 - this batch's calls fail; the others go on
            error = _batch_error(e)
            for r in live:
                r.payload[0].call.error = error
            return
        took = time.perf_counter() - start
        for i, r in enumerate(live):
            rows, row = r.payload
            rows.call.batch_start, rows.call.batch_s = start, took
            rows.logits[row] = out.logits[i]
            rows.labels[row] = (out.labels[i], out.label_names[i])
            rows.ran[row] = ks[i]

    def _run_as_one_batch(self, calls: list[Call]) -> None:
        """`batching: triton`: every row of the call as one batch (students, where a task has them, run all K or what
        the request allows: no load-based pruning without the scheduler)."""
        ids = [r for c in calls for r in c.ids]
        tasks = [t for c in calls for t in c.tasks]
        ks = [students_for(self.students, t, c.students) for c in calls for t in c.tasks]
        begin = time.perf_counter()
        try:
            out = classify_rows(self.engine, self.students, ids, tasks, ks)
        except Exception as e:  # noqa: BLE001 - the batch fails, the server does not
            error = _batch_error(e)
            for c in calls:
                c.error = error
            return
        start = 0
        for c in calls:
            rows = slice(start, start + len(c.ids))
            start += len(c.ids)
            c.batch_start, c.batch_s = begin, time.perf_counter() - begin
            c.result = Classified(out.logits[rows], out.labels[rows], out.label_names[rows], out.students[rows])


class QueueWait:
    """How long the requests of an execute() call may have waited in Triton's queue (the Python backend does not say).

    Semantics:  a call that follows this instance's previous one within IDLE_GAP_S: its requests arrived after this
    instance's latest call that took the whole queue (fewer rows than max_batch_size), so they waited at most since
    that call began; a call after a longer gap: the instance was idle and took its requests as they arrived (0).
    An upper bound while the queue drains at each call; admission (deadlines count from arrival) reads it.
    """

    IDLE_GAP_S = 0.002

    def __init__(self) -> None:
        self._start = self._end = self._drained = None

    def waited(self, now: float) -> float:
        self._start = now
        if self._end is None or now - self._end > self.IDLE_GAP_S:
            return 0.0
        return now - self._drained

    def called(self, full: bool, now: float) -> None:
        """The call begun at the latest `waited()` returns at `now`; `full`: it took max_batch_size rows (more may
        be left in the queue)."""
        if not full or self._drained is None:
            self._drained = self._start
        self._end = now
