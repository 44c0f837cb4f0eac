"""The executor of one execute() call (admission, the length-bucket scheduler, the engine) answers every request
exactly as the engine does alone."""

import json

import numpy as np
import pytest

from chorus.backends.engine import Engine
from chorus.backends.requests import DecodedRequest
from chorus.backends.scheduler import LatencyTable, SchedulerConfig
from chorus.backends.executor import Call, Executor, profile_engine
from chorus.backends.task_files import random_task
from chorus.errors import InvalidInput, Overloaded
from tests.unit.tiny import TINY, write_tiny_bert


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), TINY)
    e = Engine(path, max_length=64)
    pets = [{"lora": {"r": 4, "alpha": 8}}, {"bitfit": {}}, {"lora": {"r": 2}, "bitfit": {}}]
    for i in range(6):
        e.add_task(random_task(f"t{i}", TINY.hidden_size, TINY.linear_sites(), pets[i % 3], seed=i, scale=0.2))
    return e


def flat_table(seconds: float = 1e-3) -> LatencyTable:
    """Latency tables where a batch costs `seconds` at any size or length: deterministic, unlike a profile taken on a
    busy machine, and the scheduler never gains by splitting a batch."""
    grid = [[seconds, seconds], [seconds, seconds]]
    return LatencyTable((1, 8), (8, 32), grid, {p: [[0.0, 0.0], [0.0, 0.0]] for p in ("lora", "bitfit", "bitfit+lora")})


def requests(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = int(rng.integers(1, 6))
        ids = [[101] + rng.integers(1000 % 120, 119, int(rng.integers(1, 40))).tolist() + [102] for _ in range(rows)]
        out.append(DecodedRequest(ids, [f"t{int(rng.integers(0, 6))}" for _ in range(rows)], []))
    return out


def calls(n, seed, **options):
    return [Call(r.ids, r.tasks, **options) for r in requests(n, seed)]


def test_every_request_is_answered_as_the_engine_answers_it_alone(engine):
    table = profile_engine(engine, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    executor = Executor(engine, SchedulerConfig(default_deadline_s=60.0), table)
    for seed in range(3):  # three execute() calls of 20 requests, each with rows of many tasks and lengths
        these = calls(20, seed=seed)
        executor.run(these)
        for call in these:
            alone = engine.run(call.ids, call.tasks)
            assert call.error is None and call.result is not None
            assert call.result.labels == alone.labels
            np.testing.assert_allclose(call.result.logits[:, :2], alone.logits[:, :2], rtol=1e-4, atol=1e-5)
            assert call.batch_s > 0 and call.batch_start > 0  # the stage timers of the batch that finished it
    assert executor.scheduler.metrics.batches >= 3


def test_the_scheduler_splits_a_call_by_length_when_padding_costs_more():
    """Rows of one call go into batches by length (PetS's DP over the latency tables): with a table where time grows
    with the padded length, short rows do not ride with a long one; with a flat table one batch is cheapest."""
    from chorus.backends.scheduler import form_batches

    steep = LatencyTable((1, 64), (8, 256), [[1e-3, 3e-2], [2e-3, 6e-2]], {"lora": [[0.0, 0.0], [0.0, 0.0]]})
    table_cfg = SchedulerConfig(default_deadline_s=60.0)
    from chorus.backends.scheduler import Request
    reqs = [Request(i, "t0", "lora", 8, 0.0, 60.0) for i in range(8)] + [Request(8, "t0", "lora", 250, 0.0, 60.0)]
    assert sorted(len(b) for b in form_batches(reqs, steep, table_cfg)) == [1, 8]
    assert [len(b) for b in form_batches(reqs, flat_table(), table_cfg)] == [9]


def test_bad_calls_are_left_alone_and_their_neighbours_are_answered(engine):
    executor = Executor(engine, SchedulerConfig(default_deadline_s=60.0), flat_table())
    bad = Call(error=InvalidInput("input TEXT row 0 is empty"))
    good = calls(3, seed=12)
    executor.run([good[0], bad, *good[1:]])
    assert bad.result is None and "empty" in str(bad.error)
    assert all(c.result is not None and c.error is None for c in good)


def test_a_request_that_cannot_meet_its_deadline_is_refused_and_others_are_served(engine):
    table = profile_engine(engine, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    executor = Executor(engine, SchedulerConfig(default_deadline_s=60.0), table)
    hopeless, fine = calls(1, seed=2, deadline_s=1e-9)[0], calls(1, seed=3)[0]  # nothing runs in a nanosecond
    executor.run([hopeless, fine])
    assert isinstance(hopeless.error, Overloaded) and "deadline" in str(hopeless.error) and hopeless.result is None
    assert fine.error is None and fine.result is not None


def test_a_request_whose_own_deadline_passes_before_its_batch_is_refused_not_run(engine):
    """Admitted by the estimate, then its batch starts after the deadline its client set (a hand-driven clock stands
    in for slow batches ahead of it): refused, not run; a request with the default deadline still runs."""
    now = [0.0]

    def clock():
        now[0] += 10.0  # every look at the clock: 10 s later
        return now[0]

    executor = Executor(engine, SchedulerConfig(default_deadline_s=600.0), flat_table(), clock=clock)
    late, patient = calls(1, seed=6, deadline_s=5.0)[0], calls(1, seed=7)[0]
    executor.run([late, patient])
    assert isinstance(late.error, Overloaded) and "deadline of 5000 ms passed" in str(late.error)
    assert patient.error is None and patient.result is not None
    assert executor.scheduler.metrics.expired == 1


def test_admission_counts_the_measured_overhead(engine):
    """The latency tables profile compute; once the executor measured that a call costs more than they promise,
    admission adds that overhead to every batch ahead and refuses what it could not answer in time."""
    executor = Executor(engine, SchedulerConfig(default_deadline_s=600.0, max_batch_size=8), flat_table(),
                        clock=lambda: 0.0)  # a still clock: admission alone decides, whatever this machine's speed
    first = calls(20, seed=8, deadline_s=0.5)
    executor.run(first)
    assert all(c.error is None for c in first)  # the tables say 20 requests drain well within 0.5 s
    for _ in range(20):  # measured: a batch costs 1 s beyond its estimate (the median of the latest batches)
        executor.scheduler.observe_service(seconds=1.0, estimated_s=0.0)
    assert executor.scheduler.overhead_s == pytest.approx(1.0, rel=0.02)
    crowd = [Call([[101, 7, 102]], ["t0"], deadline_s=0.5), *calls(19, seed=9, deadline_s=0.5)]
    executor.run(crowd)
    refused = [c for c in crowd if c.error is not None]
    assert refused and all(isinstance(c.error, Overloaded) and "estimated wait" in str(c.error) for c in refused)
    assert crowd[0].error is None  # a call's first row is always admitted: an empty queue never refuses


def test_the_triton_baseline_runs_a_call_as_one_batch(engine):
    executor = Executor(engine)  # batching: triton
    these = calls(5, seed=4)
    executor.run(these)
    for call in these:
        alone = engine.run(call.ids, call.tasks)
        assert call.result.labels == alone.labels
        np.testing.assert_allclose(call.result.logits[:, :2], alone.logits[:, :2], rtol=1e-4, atol=1e-5)


def test_chorus_profile_writes_the_tables_the_entry_model_reads(engine, tmp_path):
    from chorus.backends.scheduler import LatencyTable
    from chorus.backends.task_files import save_task
    from chorus.cli import main

    model = tmp_path / "chorus"
    tasks = {}
    for i, pet in enumerate([{"lora": {"r": 4}}, {"bitfit": {}}]):
        save_task(random_task(f"p{i}", TINY.hidden_size, TINY.linear_sites(), pet, seed=i), model / "tasks" / f"p{i}")
        tasks[f"p{i}"] = f"tasks/p{i}"
    (model / "config.pbtxt").write_text(
        'name: "chorus"\nparameters [\n'
        f'  {{ key: "backbone", value: {{ string_value: "{engine.backbone_path}" }} }},\n'
        f'  {{ key: "tasks", value: {{ string_value: {json.dumps(json.dumps(tasks))} }} }}\n]\n')
    out = tmp_path / "latency.json"
    assert main(["profile", "--model-dir", str(model), "--out", str(out), "--device", "cpu", "--batch-sizes", "1",
                 "4", "--seq-lens", "8", "16", "--repeats", "1"]) == 0
    table = LatencyTable.load(out)
    assert table.batch_sizes == (1, 4) and table.seq_lens == (8, 16)
    assert set(table.pet) == {"lora", "bitfit"} and all(t > 0 for row in table.shared for t in row)


def test_queue_wait_bounds_what_a_call_waited_in_tritons_queue():
    from chorus.backends.executor import QueueWait

    q = QueueWait()
    assert q.waited(10.0) == 0.0  # the first call
    q.called(full=False, now=10.005)  # returned 5 ms later
    assert q.waited(10.006) == pytest.approx(0.006)  # straight on: its requests arrived after the 10.0 call began
    q.called(full=True, now=10.010)  # a full call: requests may be left in the queue
    assert q.waited(10.011) == pytest.approx(0.011)  # still bounded by the last call that drained the queue
    q.called(full=False, now=10.015)
    assert q.waited(11.0) == 0.0  # after an idle gap its requests were taken as they came
