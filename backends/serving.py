"""The serving loop that replaces Triton's dynamic batcher: request rows go into the length-bucket scheduler, one
worker thread forms mixed-task batches and runs them on the engine, and each request is answered when its last row
is done. Triton-free: the Triton model passes a `done` callback per request (it sends the response).

Semantics:
    submit(request rows, done):  every row -> Scheduler.submit (refused: no row of the request runs, done(Overloaded))
    worker:  loop { batches = scheduler.schedule(now); for b in batches: engine.run(b) -> rows' results;
                    a request whose rows are all done -> answers queue }
    answerer: loop { done(result) }  (sending a response is a blocking IPC round trip in Triton's Python backend:
              on its own thread it overlaps the next batch's compute)
    close(): stop taking requests, run what waits (flush), stop the worker, then the answerer once it has sent all.
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
from chorus.errors import ChorusError, Overloaded

log = logging.getLogger(__name__)

Done = Callable[[Classified | Exception], None]


def pet_type(engine: Engine, task: str) -> str:
    """A task's PET type for the latency tables: its methods joined, e.g. "lora" or "bitfit+lora"."""
    return "+".join(sorted(engine.bank.tasks[task].pet)) or "head"


@torch.inference_mode()
def profile_engine(engine: Engine, batch_sizes=(1, 16, 64), seq_lens=(16, 64), repeats: int = 1) -> LatencyTable:
    """PetS's latency tables for this engine and device: α for the backbone alone, β per served PET type."""
    by_type: dict[str, str] = {}
    for name in engine.bank.tasks:
        by_type.setdefault(pet_type(engine, name), name)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def run(n: int, L: int, p: str | None) -> float:
        ids = torch.randint(engine.cfg.vocab_size // 2, engine.cfg.vocab_size, (n, L), generator=gen).tolist()
        task = by_type[p] if p is not None else next(iter(engine.bank.tasks))
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
    return profile_latency_table(run, batch_sizes, seq_lens, sorted(by_type), repeats=repeats)


@dataclass
class _Pending:
    """One request in flight: its rows' token ids and tasks, and the results as rows finish."""

    decoded: DecodedRequest
    done: Done
    left: int
    logits: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    failed: bool = False

    def __post_init__(self) -> None:
        n = len(self.decoded.ids)
        self.logits, self.labels = [None] * n, [None] * n


class ServingLoop:
    """Scheduler + engine + one worker thread. `clock` returns seconds (monotonic); tests may pass their own."""

    def __init__(self, engine: Engine, config: SchedulerConfig, table: LatencyTable,
                 clock: Callable[[], float] = time.monotonic, on_batch: Callable | None = None):
        self.engine, self.clock, self.on_batch = engine, clock, on_batch
        self.scheduler = Scheduler(config, table)
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._closing = False
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # (done, result); None stops the answerer
        self._answerer = threading.Thread(target=self._answer_loop, name="chorus-answers", daemon=True)
        self._answerer.start()
        self._worker = threading.Thread(target=self._run, name="chorus-serving", daemon=True)
        self._worker.start()

    def submit(self, decoded: DecodedRequest, done: Done, deadline_s: float | None = None) -> None:
        """Queue a request's rows; `done` is called once, from the worker (or here, if refused)."""
        if self._closing:
            done(Overloaded("the model is unloading; retry"))
            return
        now = self.clock()
        pending = _Pending(decoded, done, len(decoded.ids))
        for row, (ids, task) in enumerate(zip(decoded.ids, decoded.tasks)):
            refusal = self.scheduler.submit(Request(next(self._ids), task, pet_type(self.engine, task), len(ids), now,
                                                    None if deadline_s is None else now + deadline_s,
                                                    payload=(pending, row)))
            if refusal is not None:
                pending.failed = True  # rows already queued are skipped when their batch runs
                done(refusal.to_error())
                break
        with self._wake:
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Run everything waiting, then stop the worker (Triton calls finalize on unload)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout)
        self._answers.put(None)
        self._answerer.join(timeout)

    def _answer_loop(self) -> None:
        while (item := self._answers.get()) is not None:
            done, result = item
            try:
                done(result)
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
            now = self.clock()
            try:
                batches = self.scheduler.schedule(now, flush=closing)
            except Exception:  # noqa: BLE001 - a scheduler bug must not stop the worker; requests would hang
                log.exception("schedule() failed; flushing what waits")
                batches = self.scheduler.schedule(now, flush=True)
            for batch in batches:
                self._execute(batch)
                self.scheduler.complete(batch, self.clock())
            if batches:
                continue
            if closing and len(self.scheduler) == 0:
                return
            due = self.scheduler.next_due(now)
            with self._wake:
                if not self._closing:
                    self._wake.wait(timeout=0.05 if due is None else max(0.0, min(due - now, 0.05)))

    def _execute(self, batch) -> None:
        if batch.number < 3:
            log.info("batch %d: %d rows of %d tasks, padded length %d", batch.number, batch.size, len(batch.tasks),
                     batch.padded_len)
        live = [r for r in batch.requests if not r.payload[0].failed]
        if not live:
            return
        try:
            out = self.engine.run([r.payload[0].decoded.ids[r.payload[1]] for r in live], [r.task for r in live])
        except Exception as e:  # noqa: BLE001 - this batch's requests fail; the loop goes on
            log.exception("batch %d failed", batch.number)
            for pending in {id(r.payload[0]): r.payload[0] for r in live}.values():
                if not pending.failed:
                    pending.failed = True
                    error = e if isinstance(e, ChorusError) else RuntimeError(f"batch failed: {e}")
                    self._answers.put((pending.done, error))
            return
        if self.on_batch is not None:
            try:
                self.on_batch(batch, len(self.scheduler))
            except Exception:  # noqa: BLE001 - metrics must not fail requests
                log.exception("on_batch failed")
        for i, r in enumerate(live):
            pending, row = r.payload
            if pending.failed:
                continue
            pending.logits[row] = out.logits[i]
            pending.labels[row] = (out.labels[i], out.label_names[i])
            pending.left -= 1
            if pending.left == 0:
                result = Classified(np.stack(pending.logits), [lab for lab, _ in pending.labels],
                                    [names for _, names in pending.labels])
                self._answers.put((pending.done, result))

