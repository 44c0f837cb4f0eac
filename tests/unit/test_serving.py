"""The serving loop (scheduler + engine + worker thread) answers every request exactly as the engine does alone."""

import json
import threading

import numpy as np
import pytest

from chorus.backends.engine import Engine
from chorus.backends.requests import DecodedRequest
from chorus.backends.scheduler import LatencyTable, SchedulerConfig
from chorus.backends.serving import ServingLoop, profile_engine
from chorus.backends.task_files import random_task
from chorus.errors import Overloaded
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


def test_every_request_is_answered_as_the_engine_answers_it_alone(engine):
    table = profile_engine(engine, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    stages = []
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=60.0), table,
                       on_answered=lambda *s: stages.append(s))
    reqs = requests(60, seed=1)
    results: dict[int, object] = {}
    done_all = threading.Event()

    def done(i):
        def record(result):
            results[i] = result
            if len(results) == len(reqs):
                done_all.set()
        return record

    threads = [threading.Thread(target=lambda part: [loop.submit(reqs[i], done(i)) for i in part],
                                args=(range(k, len(reqs), 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done_all.wait(60), f"{len(results)} of {len(reqs)} answered"
    loop.close()
    assert loop.scheduler.metrics.batches >= 1
    assert len(stages) == len(reqs)  # one (queue, compute, send) per answer, measured, never negative
    assert all(q >= 0 and c > 0 and s >= 0 for q, c, s in stages)
    for i, req in enumerate(reqs):
        alone = engine.run(req.ids, req.tasks)
        got = results[i]
        assert not isinstance(got, Exception), got
        assert got.labels == alone.labels
        np.testing.assert_allclose(got.logits[:, :2], alone.logits[:, :2], rtol=1e-4, atol=1e-5)


def test_a_lone_request_is_answered_by_the_worker_and_a_crowd_by_the_answerers(engine):
    """Nothing else waiting: the worker sends the answer itself (no hand-off); a batch that answers many requests hands
    them to the answer threads so that sends overlap."""
    table = flat_table()  # the scheduler never splits the crowd
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=60.0, max_wait_s=10.0, idle_dispatch=False,
                                               element_size=8), table)
    lone, crowd = [], []
    done = threading.Event()
    loop.submit(requests(1, seed=11)[0], lambda r: (lone.append(threading.current_thread().name), done.set()))
    loop.close()  # flushes the one waiting request as a batch of one
    assert done.is_set() and lone == ["chorus-serving"]
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=60.0, max_wait_s=10.0, idle_dispatch=False,
                                               element_size=8), table)
    for i in range(8):  # one task, one length: a full element, one batch answering 8 requests
        loop.submit(DecodedRequest([[101, 5 + i, 6, 7, 102]], ["t0"], []),
                    lambda _: crowd.append(threading.current_thread().name))
    loop.close()
    assert len(crowd) == 8 and all(name.startswith("chorus-answers-") for name in crowd)


def test_a_request_that_cannot_meet_its_deadline_is_refused_and_others_are_served(engine):
    table = profile_engine(engine, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=60.0), table)
    got = []
    loop.submit(requests(1, seed=2)[0], got.append, deadline_s=1e-9)  # nothing runs in a nanosecond
    assert len(got) == 1 and isinstance(got[0], Overloaded) and "deadline" in str(got[0])
    ok = []
    loop.submit(requests(1, seed=3)[0], ok.append)
    loop.close()
    assert len(ok) == 1 and not isinstance(ok[0], Exception)


def test_a_request_whose_own_deadline_passes_while_it_waits_is_refused_not_run(engine):
    """Admitted by the estimate, then kept waiting past the deadline its client set (a hand-driven clock stands in
    for a slow executor): refused at dispatch; a request with the default deadline still runs."""
    table = profile_engine(engine, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    now = [0.0]
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=600.0, max_wait_s=1.0, idle_dispatch=False,
                                               element_size=64), table, clock=lambda: now[0])
    late, patient = [], []
    loop.submit(requests(1, seed=6)[0], late.append, deadline_s=5.0)
    loop.submit(requests(1, seed=7)[0], patient.append)
    now[0] = 10.0  # both are due now; the first one's deadline passed
    loop.close()
    assert len(late) == 1 and isinstance(late[0], Overloaded) and "deadline of 5000 ms passed" in str(late[0])
    assert len(patient) == 1 and not isinstance(patient[0], Exception)
    assert loop.scheduler.metrics.expired == 1


def test_admission_counts_the_measured_overhead(engine):
    """The latency tables profile compute; once the executor measured that a served batch costs more than they
    promise, admission adds that overhead to every batch ahead and refuses what it could not answer in time."""
    table = flat_table()
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=600.0, max_wait_s=10.0, idle_dispatch=False,
                                               element_size=64), table, clock=lambda: 0.0)
    got = []
    for r in requests(20, seed=8):
        loop.submit(r, got.append, deadline_s=0.5)
    assert not got  # the tables say 20 requests drain well within 0.5 s
    loop.scheduler.observe_service(seconds=0.0, estimated_s=0.0)  # nothing measured: ignored
    loop.submit(requests(1, seed=9)[0], got.append, deadline_s=0.5)
    assert not got
    for _ in range(20):  # measured: a batch costs 1 s beyond its estimate (the median of the latest batches)
        loop.scheduler.observe_service(seconds=1.0, estimated_s=0.0)
    assert loop.scheduler.overhead_s == pytest.approx(1.0, rel=0.02)
    loop.submit(requests(1, seed=9)[0], got.append, deadline_s=0.5)
    assert len(got) == 1 and isinstance(got[0], Overloaded) and "estimated wait" in str(got[0])
    loop.close()


def test_close_answers_what_waits_and_then_refuses(engine):
    table = profile_engine(engine, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    loop = ServingLoop(engine, SchedulerConfig(default_deadline_s=60.0, max_wait_s=10.0), table)  # nothing due soon
    got = []
    for r in requests(5, seed=4):
        loop.submit(r, got.append)
    loop.close()
    assert len(got) == 5 and not any(isinstance(g, Exception) for g in got)
    late = []
    loop.submit(requests(1, seed=5)[0], late.append)
    assert isinstance(late[0], Overloaded)


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
