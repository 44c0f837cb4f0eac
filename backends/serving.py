"""The serving loop that replaces Triton's dynamic batcher: request rows go into the length-bucket scheduler, one
worker thread forms mixed-task batches and runs them on the engine, and each request is answered when its last row
is done. Triton-free: the Triton model passes a `done` callback per request (it sends the response).

Semantics:
    submit(request rows, done):  every row -> Scheduler.submit (refused: no row of the request runs, done(Overloaded))
    worker:  loop { batches = scheduler.schedule(now); for b in batches: rows whose request set its own deadline
                    and missed it -> answers queue (Overloaded), not run; engine.run(rest) -> rows' results;
                    a request whose rows are all done -> answered: by the worker itself when the batch answers
                    <= INLINE_ANSWERS requests and nothing waits, neither in the scheduler nor in this schedule's
                    later batches (a hand-off to a thread costs a lone request up to a GIL switch interval), else
                    through the answers queue;
                    scheduler.observe_service(wall time, the batch's estimate): the measured per-batch overhead
                    admission and pruning add to the latency tables }
    answerers (ANSWER_THREADS): loop { done(result); on_answered(queue_s, compute_s, send_s) }  (sending a response
              is a blocking IPC round trip in Triton's Python backend that releases the GIL: on their own threads
              sends overlap each other and the next batch). A request's stages: queue = submit -> its last batch
              starts, compute = that batch's run, send = the batch's end -> done() returned.
    Not answered on Triton's execute() thread: running an idle worker's batch there and sending its responses before
    execute() returns (9a62727, reverted) made Triton's Python backend stall now and then for 0.5 s (perf_analyzer,
    one request at a time on the CPU: 18.6 infer/s, p99 535 ms, against 533 infer/s, p99 4.6 ms through the worker;
    `python -m perf.overhead --concurrency 1 --seconds 8 --variants scheduler-students`), as answering from execute()
    did in session 5.
    close(): stop taking requests, run what waits (flush), stop the worker, then the answerers once all is sent.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from chorus.backends.engine import Classified, Engine
from chorus.backends.requests import DecodedRequest
from chorus.backends.scheduler import LatencyTable, Request, Scheduler, SchedulerConfig, profile_latency_table
from chorus.backends.students.bank import StudentBank
from chorus.errors import ChorusError, Overloaded

log = logging.getLogger(__name__)

Done = Callable[[Classified | Exception], None]
Answered = Callable[[float, float, float], None]  # on_answered(queue_s, compute_s, send_s) of an answered request
ANSWER_THREADS = 4  # threads sending responses (Triton's backend takes sends from several threads at once)
# A batch that answers at most this many requests while nothing waits is answered by the worker itself: waking an
# answerer costs a thread hand-off (the GIL: up to a switch interval) that a lone request pays in full.
INLINE_ANSWERS = 2
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
    if teacher:
        out = engine.run([ids[i] for i in teacher], [tasks[i] for i in teacher])
        logits[teacher] = out.logits
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


@dataclass
class _Pending:
    """One request in flight: its rows' token ids and tasks, and the results as rows finish."""

    decoded: DecodedRequest
    done: Done
    left: int
    students: int | None = None  # the request's `students` parameter: at most this many (0: the teacher)
    hard_deadline: float | None = None  # the request's own deadline (s); rows still waiting past it are refused
    submitted: float = 0.0  # time.perf_counter() at submit (stage timing)
    logits: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    ran: list = field(default_factory=list)  # students per row (0: the teacher)
    failed: bool = False

    def __post_init__(self) -> None:
        n = len(self.decoded.ids)
        self.logits, self.labels, self.ran = [None] * n, [None] * n, [0] * n


class ServingLoop:
    """Scheduler + engine (+ students) + one worker thread. `clock` returns seconds (monotonic); tests may pass their
    own. `choose_k` is the students' pruning policy (`chorus.backends.students.PruningPolicy`; default: all K).
    `on_batch(batch, queue depth)` after each batch; `on_answered(queue_s, compute_s, send_s)` after each answer."""

    def __init__(self, engine: Engine, config: SchedulerConfig, table: LatencyTable,
                 clock: Callable[[], float] = time.monotonic, on_batch: Callable | None = None,
                 students: StudentBank | None = None, choose_k: Callable | None = None,
                 on_answered: Answered | None = None):
        self.engine, self.clock, self.on_batch, self.students = engine, clock, on_batch, students
        self.on_answered = on_answered
        self.scheduler = Scheduler(config, table, choose_k=choose_k)
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._kicked = False  # a submit since the worker last looked: it must not sleep (a notify it missed)
        self._closing = False
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # (done, result, stages); None stops an answerer
        self._answerers = [threading.Thread(target=self._answer_loop, name=f"chorus-answers-{i}", daemon=True)
                           for i in range(ANSWER_THREADS)]
        for t in self._answerers:
            t.start()
        self._worker = threading.Thread(target=self._run, name="chorus-serving", daemon=True)
        self._worker.start()

    def submit(self, decoded: DecodedRequest, done: Done, deadline_s: float | None = None,
               students: int | None = None) -> None:
        """Queue a request's rows; `done` is called once, from the worker (or here, if refused). `students`: at most
        this many of a task's students answer (0: the teacher; None: as many as the pruning policy allows)."""
        if self._closing:
            done(Overloaded("the model is unloading; retry"))
            return
        now = self.clock()
        pending = _Pending(decoded, done, len(decoded.ids), students, deadline_s, time.perf_counter())
        for row, (ids, task) in enumerate(zip(decoded.ids, decoded.tasks)):
            path = STUDENTS if students_for(self.students, task, students) else pet_type(self.engine, task)
            refusal = self.scheduler.submit(Request(next(self._ids), task, path, len(ids), now,
                                                    None if deadline_s is None else now + deadline_s,
                                                    payload=(pending, row)))
            if refusal is not None:
                pending.failed = True  # rows already queued are skipped when their batch runs
                done(refusal.to_error())
                break
        with self._wake:
            self._kicked = True
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Run everything waiting, then stop the worker (Triton calls finalize on unload)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout)
        for _ in self._answerers:
            self._answers.put(None)
        for t in self._answerers:
            t.join(timeout)

    def _answer_loop(self) -> None:
        while (item := self._answers.get()) is not None:
            self._answer(*item)

    def _answer(self, done: Done, result, stages: tuple[float, float, float] | None) -> None:
        try:
            done(result)
            if stages is not None and self.on_answered is not None:
                queue_s, compute_s, ready = stages
                self.on_answered(queue_s, compute_s, time.perf_counter() - ready)
        except Exception:  # noqa: BLE001 - one failed send must not stop the others
            log.exception("answering a request failed")

    # -- the worker --------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the serving worker stopped")
            raise

    def _loop(self) -> None:
        log.info("serving worker started")
        if os.environ.get("CHORUS_STACKS_AFTER_S"):  # diagnosing hangs: dump every thread's stack once
            import faulthandler

            self._stacks = open(os.environ.get("CHORUS_STACKS_FILE", "/tmp/chorus-stacks.txt"), "w")  # noqa: SIM115
            faulthandler.enable(file=self._stacks, all_threads=True)  # a crash writes its stacks too
            faulthandler.dump_traceback_later(float(os.environ["CHORUS_STACKS_AFTER_S"]), file=self._stacks)
        while True:
            closing = self._closing
            with self._wake:
                self._kicked = False
            now = self.clock()
            try:
                batches = self.scheduler.schedule(now, flush=closing)
            except Exception:  # noqa: BLE001 - a scheduler bug must not stop the worker; requests would hang
                log.exception("schedule() failed; flushing what waits")
                batches = self.scheduler.schedule(now, flush=True)
            for i, batch in enumerate(batches):
                self._execute(batch, last=i == len(batches) - 1)
                self.scheduler.complete(batch, self.clock())
            if batches:
                continue
            if closing and len(self.scheduler) == 0:
                return
            due = self.scheduler.next_due(now)
            with self._wake:
                if not self._closing and not self._kicked:
                    self._wake.wait(timeout=0.05 if due is None else max(0.0, min(due - now, 0.05)))

    def _execute(self, batch, last: bool = True) -> None:
        """Run one batch and answer the requests it completes (`last`: no other batch of this schedule follows)."""
        if batch.number < 3:
            log.info("batch %d: %d rows of %d tasks, padded length %d", batch.number, batch.size, len(batch.tasks),
                     batch.padded_len)
        live = [r for r in batch.requests if not r.payload[0].failed]
        now = self.clock()
        for r in live:  # a deadline the client set is hard: it no longer waits for an answer past it
            pending = r.payload[0]
            if pending.hard_deadline and now > r.deadline and not pending.failed:
                pending.failed = True
                self.scheduler.note_expired()
                self._answers.put((pending.done, Overloaded(
                    f"deadline of {pending.hard_deadline * 1e3:.0f} ms passed while the request waited; "
                    "the server is overloaded: retry later or allow a longer deadline"), None))
        live = [r for r in live if not r.payload[0].failed]
        if not live:
            return
        ks = [row_students(self.students, r.task, r.payload[0].students, batch.k) for r in live]
        start = time.perf_counter()
        try:
            out = classify_rows(self.engine, self.students, [r.payload[0].decoded.ids[r.payload[1]] for r in live],
                                [r.task for r in live], ks)
            finished = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - this batch's requests fail; the loop goes on
            log.exception("batch %d failed", batch.number)
            for pending in {id(r.payload[0]): r.payload[0] for r in live}.values():
                if not pending.failed:
                    pending.failed = True
                    error = e if isinstance(e, ChorusError) else RuntimeError(f"batch failed: {e}")
                    self._answers.put((pending.done, error, None))
            return
        answers = []
        for i, r in enumerate(live):
            pending, row = r.payload
            if pending.failed:
                continue
            pending.logits[row] = out.logits[i]
            pending.labels[row] = (out.labels[i], out.label_names[i])
            pending.ran[row] = ks[i]
            pending.left -= 1
            if pending.left == 0:
                result = Classified(np.stack(pending.logits), [lab for lab, _ in pending.labels],
                                    [names for _, names in pending.labels], pending.ran)
                answers.append((pending.done, result, (start - pending.submitted, finished - start, finished)))
        if last and len(answers) <= INLINE_ANSWERS and len(self.scheduler) == 0:
            for answer in answers:  # nothing waits: sending here saves a hand-off to an answerer thread
                self._answer(*answer)
        else:
            for answer in answers:
                self._answers.put(answer)
        if self.on_batch is not None:
            try:
                self.on_batch(batch, len(self.scheduler))
            except Exception:  # noqa: BLE001 - metrics must not fail requests
                log.exception("on_batch failed")
        self.scheduler.observe_service(finished - start, batch.estimated_s)

