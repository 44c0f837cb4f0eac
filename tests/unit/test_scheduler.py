"""The length-bucket scheduler (chorus.backends.scheduler): pure Python, `now` passed in, so every test is exact."""

import json
import math
import random
import threading

import pytest

from chorus.backends.scheduler import (Batch, LatencyTable, LengthBuffer, Refusal, Request, Scheduler, SchedulerConfig,
                                       brute_force_batches, form_batches, profile_latency_table)
from chorus.backends.scheduler.batching import (brute_force_combine, combine, order_by_deadline, requests_time,
                                                rows_cap, split_task, total_time)
from chorus.errors import InvalidInput, Overloaded

SIZES = (1, 2, 4, 8, 16, 32, 64)
LENS = (8, 16, 32, 64, 128, 256, 512)


def shared_s(n, L):  # launch overhead + work linear in tokens + attention quadratic in length
    return 2e-3 + 4e-6 * n * L + 2e-9 * n * L * L


PET_S = {"lora": lambda n, L: 3e-4 + 8e-7 * n * L, "bitfit": lambda n, L: 1e-4 + 1e-7 * n * L,
         "students": lambda n, L: 5e-4 + 1e-6 * n * L}


def table() -> LatencyTable:
    return LatencyTable(SIZES, LENS, [[shared_s(n, L) for L in LENS] for n in SIZES],
                        {p: [[f(n, L) for L in LENS] for n in SIZES] for p, f in PET_S.items()})


TASKS = {"movie": "lora", "tweet": "lora", "amazon": "bitfit", "news": "bitfit", "distilled": "students"}


def req(i, n, task="movie", arrival=0.0, deadline=None, **kw):
    return Request(i, task, TASKS[task], n, arrival, deadline, **kw)


def lengths(rng, k):
    """A skewed sentence-length mix like Rotten Tomatoes' (median about 26 tokens, p99 about 55): lognormal."""
    sigma = math.log(55 / 26) / 2.326
    return [max(3, min(128, round(rng.lognormvariate(math.log(26), sigma)))) for _ in range(k)]


# -- config ----------------------------------------------------------------------------------------------------------
def test_config_validates_and_from_dict_rejects_unknown_keys_by_name():
    cfg = SchedulerConfig.from_dict({"bin_edges": [16, 32, 64], "element_size": 4, "max_tokens_per_batch": 64})
    assert cfg.bin_edges == (16, 32, 64) and cfg.max_tokens == 64
    with pytest.raises(InvalidInput, match=r"scheduler config: unknown keys \['max_wiat_s'\]; known: .*max_wait_s"):
        SchedulerConfig.from_dict({"max_wiat_s": 0.01})
    with pytest.raises(InvalidInput, match="strictly increasing"):
        SchedulerConfig(bin_edges=(16, 8))
    with pytest.raises(InvalidInput, match=r"element_size \(128\) must be <= max_batch_size \(64\)"):
        SchedulerConfig(element_size=128)
    with pytest.raises(InvalidInput, match="max_tokens_per_batch .* last bin edge"):
        SchedulerConfig(max_tokens_per_batch=100)
    with pytest.raises(InvalidInput, match="max_queue must be an integer >= 1, got 0"):
        SchedulerConfig(max_queue=0)
    with pytest.raises(InvalidInput, match="max_wait_s must be a finite number"):
        SchedulerConfig(max_wait_s=-1.0)


# -- buffer ----------------------------------------------------------------------------------------------------------
def test_buffer_joins_the_last_element_until_full_then_starts_a_new_one_at_the_tail():
    buf = LengthBuffer((8, 16, 32), element_size=3)
    assert [buf.bin_of(n) for n in (1, 8, 9, 16, 17, 32)] == [0, 0, 1, 1, 2, 2]  # edges are inclusive upper bounds
    with pytest.raises(ValueError, match="33 tokens is longer than the last bin edge 32"):
        buf.bin_of(33)
    first = [buf.add(req(i, 10 + i, deadline=1.0), batch_mark=0) for i in range(3)]
    assert first[0] is first[1] is first[2] and first[0].full
    fourth = buf.add(req(3, 12, deadline=1.0), batch_mark=0)
    assert fourth is not first[0] and list(buf.bins[1]) == [first[0], fourth]  # new element at the tail
    other = buf.add(req(4, 5, deadline=1.0), batch_mark=0)
    assert other.bin == 0 and len(buf) == 5
    buf.take([first[0]])
    assert list(buf.bins[1]) == [fourth] and len(buf) == 2
    assert buf.add(req(5, 16, deadline=1.0), batch_mark=0) is fourth  # the tail is partial again: join it
    assert [r.id for r in buf] == [4, 3, 5]


# -- latency tables --------------------------------------------------------------------------------------------------
def test_latency_table_interpolates_extrapolates_and_round_trips_json(tmp_path):
    t = table()
    assert t.alpha(8, 64) == pytest.approx(shared_s(8, 64))
    assert t.beta("lora", 4, 16) == pytest.approx(PET_S["lora"](4, 16))
    mid = t.alpha(8, 48)  # halfway between 32 and 64
    assert mid == pytest.approx((shared_s(8, 32) + shared_s(8, 64)) / 2)
    assert t.alpha(1, 4) == t.alpha(1, 8)  # below the grid: the first value
    assert t.alpha(128, 512) > t.alpha(64, 512)  # above: the last slope
    grid = [t.alpha(n, L) for n in range(1, 70, 3) for L in range(1, 600, 7)]
    assert all(math.isfinite(v) and v > 0 for v in grid)
    assert all(t.alpha(n, L) <= t.alpha(n + 1, L) <= t.alpha(n + 1, L + 5) for n in range(1, 70, 5) for L in LENS)
    with pytest.raises(InvalidInput, match=r"no latency profile for PET type 'prefix'; profiled: \['bitfit'"):
        t.beta("prefix", 1, 8)
    path = tmp_path / "latency.json"
    t.save(path)
    assert json.loads(path.read_text())["format"] == "chorus-latency/1"
    assert LatencyTable.load(path) == t
    with pytest.raises(InvalidInput, match="must be 7 x 7"):
        LatencyTable(SIZES, LENS, [[1.0]], {})


def test_profile_latency_table_measures_alpha_and_beta_through_the_callers_run():
    calls = []

    def run(n, L, pet_type):
        calls.append((n, L, pet_type))
        base = 0.0 if pet_type == "students" else shared_s(n, L)
        return base + (PET_S[pet_type](n, L) if pet_type else 0.0)

    t = profile_latency_table(run, (1, 8), (16, 64), ["lora", "students"], repeats=2)
    assert len(calls) == 2 * 2 * 3 * 2
    assert t.alpha(8, 64) == pytest.approx(shared_s(8, 64))
    assert t.beta("lora", 8, 64) == pytest.approx(PET_S["lora"](8, 64))  # run with PET minus the backbone alone
    assert t.beta("students", 1, 16) == pytest.approx(PET_S["students"](1, 16))  # standalone: measured as is


# -- the two-stage dynamic programme ---------------------------------------------------------------------------------
SMALL = SchedulerConfig(bin_edges=(16, 32, 64, 128), element_size=2, max_batch_size=4, max_tokens_per_batch=192)


@pytest.mark.parametrize("seed", range(8))
def test_stage1_matches_brute_force_over_all_partitions_of_one_task(seed):
    rng = random.Random(seed)
    task = ["movie", "amazon", "distilled"][seed % 3]  # LoRA, BitFit, students (no shared ops)
    reqs = [req(i, rng.choice([rng.randint(4, 30), rng.randint(30, 120)]), task) for i in range(rng.randint(1, 8))]
    best, _ = brute_force_batches(reqs, table(), SMALL)
    mbs = split_task(reqs, table(), SMALL)
    assert sorted(r.id for mb in mbs for r in mb) == sorted(r.id for r in reqs)
    assert all(len(mb) <= 4 and len(mb) * max(r.num_tokens for r in mb) <= 192 for mb in mbs)
    assert total_time(mbs, table(), SMALL) == pytest.approx(best, rel=1e-9)
    assert total_time(form_batches(reqs, table(), SMALL), table(), SMALL) == pytest.approx(best, rel=1e-9)


ROOMY = SchedulerConfig(bin_edges=(16, 32, 64, 128), element_size=2, max_batch_size=8, max_tokens_per_batch=1024)


@pytest.mark.parametrize("seed", range(8))
def test_stage2_matches_brute_force_over_groupings_and_two_stages_match_the_global_optimum(seed):
    rng = random.Random(100 + seed)
    tasks = list(TASKS)
    reqs = [req(i, rng.randint(4, 60), rng.choice(tasks)) for i in range(rng.randint(3, 8))]
    t = table()
    for cfg in (SMALL, ROOMY):
        mbs = [mb for task in tasks for mb in split_task([r for r in reqs if r.task == task], t, cfg) if mb]
        backbone = [mb for mb in mbs if mb[0].pet_type != "students"]
        assert total_time(combine(backbone, t, cfg), t, cfg) == pytest.approx(brute_force_combine(backbone, t, cfg))
    # Across tasks the two stages are PetS's heuristic: with room to merge mini-batches they reach the optimum over
    # every partition; when max_batch_size binds (SMALL: 4 rows), a stage-1 cut can block a merge, never beat it.
    optimum, _ = brute_force_batches(reqs, t, ROOMY)
    assert total_time(form_batches(reqs, t, ROOMY), t, ROOMY) == pytest.approx(optimum, rel=1e-9)
    assert total_time(form_batches(reqs, t, SMALL), t, SMALL) >= brute_force_batches(reqs, t, SMALL)[0] - 1e-12


def test_batches_respect_size_token_and_path_limits_and_cover_every_request():
    rng = random.Random(7)
    reqs = [req(i, n, rng.choice(list(TASKS))) for i, n in enumerate(lengths(rng, 300))]
    cfg = SchedulerConfig(max_batch_size=32, max_tokens_per_batch=1024)
    batches = form_batches(reqs, table(), cfg)
    assert sorted(r.id for b in batches for r in b) == list(range(300))
    for b in batches:
        assert len(b) <= 32 and len(b) * max(r.num_tokens for r in b) <= 1024
        assert [r.num_tokens for r in b] == sorted(r.num_tokens for r in b)
        assert len({r.pet_type == "students" for r in b}) == 1  # students never share a batch with the backbone


# -- the scheduler ---------------------------------------------------------------------------------------------------
def simulate(sched, arrivals, service=None):
    """One executor: submit what has arrived, run the batches schedule() returns, each for its estimated time."""
    batches, refusals, now, i = [], [], 0.0, 0
    while i < len(arrivals) or len(sched):
        while i < len(arrivals) and arrivals[i].arrival <= now:
            if (r := sched.submit(arrivals[i])) is not None:
                refusals.append(r)
            i += 1
        out = sched.schedule(now)
        for b in out:
            now = max(now, b.estimated_start) + (service(b) if service else b.estimated_s)
            sched.complete(b, now)
        batches += out
        if not out:
            due = sched.next_due(now)
            nxt = arrivals[i].arrival if i < len(arrivals) else math.inf
            now = min(nxt, due if due is not None else math.inf)
    return batches, refusals


def poisson(rng, n, rate, tasks=("movie", "tweet", "amazon", "news")):
    t, out = 0.0, []
    for i, length in enumerate(lengths(rng, n)):
        t += rng.expovariate(rate)
        out.append(req(i, length, tasks[i % len(tasks)], arrival=t))
    return out


@pytest.mark.parametrize("rate", [4000.0, 20000.0])  # requests/s: a busy server, and one past saturation
def test_padded_token_fraction_beats_arrival_order_batching_on_a_skewed_length_mix(rate):
    arrivals = poisson(random.Random(0), 2000, rate)
    sched = Scheduler(SchedulerConfig(max_wait_s=0.002), table())
    batches, refusals = simulate(sched, arrivals)
    refused = {r.request_id for r in refusals}
    admitted = [r for r in arrivals if r.id not in refused]
    assert sum(b.size for b in batches) == len(admitted) and sched.metrics.refused == len(refused)
    m = sched.metrics
    assert m.padding_fraction == pytest.approx(sum(b.padding_tokens for b in batches)
                                               / sum(b.size * b.padded_len for b in batches))
    # arrival order (Triton's dynamic batcher): the same batch sizes, rows taken in the order they came
    pad = total = pos = 0
    for b in batches:
        rows = admitted[pos:pos + b.size]
        pos += b.size
        total += b.size * max(r.num_tokens for r in rows)
        pad += b.size * max(r.num_tokens for r in rows) - sum(r.num_tokens for r in rows)
    assert m.padding_fraction < pad / total - 0.05, (m.padding_fraction, pad / total)


def test_deadlines_refuse_at_arrival_with_the_estimated_wait_and_default_or_override():
    cfg = SchedulerConfig(default_deadline_s=0.050, max_wait_s=1.0)
    sched = Scheduler(cfg, table())
    first = [sched.submit(req(i, 200, arrival=0.0)) for i in range(600)]  # default deadline: 50 ms after arrival
    assert first[0] is None and isinstance(first[-1], Refusal)  # the backlog grew past what 50 ms can serve
    accepted = first.count(None)
    late = sched.submit(req("late", 200, arrival=0.0))
    assert isinstance(late, Refusal) and late.reason == "deadline" and late.estimated_wait_s > 0.040
    assert "request 'late' refused: estimated wait" in late.message
    assert "exceeds its deadline of 50.0 ms" in late.message
    assert isinstance(late.to_error(), Overloaded) and str(late.to_error()) == late.message
    # a tighter override is due before the backlog, which therefore does not count against it (EDF)
    assert sched.submit(req("soon", 20, arrival=0.001, deadline=0.021)) is None
    assert sched.submit(req("impossible", 500, arrival=0.001, deadline=0.0011)).reason == "deadline"
    m = sched.metrics
    assert m.refused_deadline == 600 - accepted + 2 and m.queue_depth == accepted + 1
    out = sched.schedule(0.001)
    assert out[0].requests[0].id == "soon"  # due first, run first


def test_bounded_queue_refuses_the_request_past_max_queue():
    sched = Scheduler(SchedulerConfig(max_queue=3, max_wait_s=1.0), table())
    assert [sched.submit(req(i, 10)) for i in range(3)] == [None] * 3
    refusal = sched.submit(req(3, 10))
    assert refusal.reason == "queue_full" and "queue holds 3 requests, its limit (max_queue=3)" in refusal.message
    with pytest.raises(InvalidInput, match="already waiting"):
        sched.submit(req(0, 10))
    with pytest.raises(InvalidInput, match="600 tokens; the scheduler takes 1..512"):
        sched.submit(req(9, 600))
    with pytest.raises(InvalidInput, match="PET type 'prefix'"):
        sched.submit(Request(10, "x", "prefix", 10, 0.0))
    assert len(sched) == 3 and sched.metrics.refused_queue_full == 1
    sched.schedule(2.0)
    assert len(sched) == 0 and sched.submit(req(3, 10, arrival=2.0)) is None


def test_a_batch_that_would_miss_its_earliest_deadline_is_split_and_the_urgent_part_runs_first():
    cfg = SchedulerConfig()
    reqs = [req(i, 60, arrival=0.0, deadline=1.0) for i in range(30)] + [req("urgent", 60, deadline=0.004)]
    whole = requests_time(reqs, table(), cfg)
    assert whole > 0.004  # together they would be late for "urgent"
    plan = order_by_deadline([reqs], 0.0, table(), cfg)
    assert [r.id for r in plan[0][0]] == ["urgent"] and plan[0][2] <= 0.004
    assert sorted(r.id for r in plan[1][0]) == list(range(30)) and plan[1][1] == plan[0][2]
    # through the scheduler: a tight deadline makes its element due before max_wait_s, and it runs first
    sched = Scheduler(SchedulerConfig(max_wait_s=1.0), table())
    for r in reqs:
        sched.submit(r)
    assert sched.next_due(0.0) == 0.0
    out = sched.schedule(0.0)
    assert out[0].requests[0].id == "urgent" and out[0].estimated_finish <= 0.004


def test_no_task_or_length_bin_starves_under_a_flood():
    cfg = SchedulerConfig(max_wait_s=10.0, max_batches_passed=4, element_size=8)
    sched = Scheduler(cfg, table())
    assert sched.submit(req("lonely", 300, "news", arrival=0.0)) is None  # a bin and task nobody else uses
    served_at, formed, i = None, 0, 0
    for step in range(40):  # a full element of short movie reviews arrives between every schedule()
        now = 1e-3 * step
        for _ in range(8):
            sched.submit(req(i, 20, "movie", arrival=now, deadline=now + 100))
            i += 1
        for b in sched.schedule(now):
            formed += 1
            if "lonely" in [r.id for r in b.requests]:
                served_at = formed
        if served_at:
            break
    assert served_at is not None and served_at <= cfg.max_batches_passed + 2, served_at
    assert 1e-3 * step < cfg.max_wait_s  # served on the batch count, long before its wait ran out


def test_oldest_elements_fill_a_capped_schedule_first():
    cfg = SchedulerConfig(max_requests_per_schedule=16, element_size=8, max_wait_s=0.0)
    sched = Scheduler(cfg, table())
    for i in range(40):
        sched.submit(req(i, [10, 40, 100, 200][i % 4], arrival=i * 1e-4, deadline=5.0))
    first = sched.schedule(1.0)
    assert sum(b.size for b in first) <= 16
    assert min(r.arrival for b in first for r in b.requests) == 0.0
    taken = sorted(r.id for b in first for r in b.requests)
    assert all(min(taken) <= r.id for b in sched.schedule(1.0) for r in b.requests) and len(sched) < 40 - 16


def test_students_carry_k_from_choose_k_and_share_the_scheduler_with_pet_tasks():
    seen = []

    def choose_k(queue_depth, arrival_rate, capacity, deadline_slack):
        seen.append((queue_depth, arrival_rate, capacity, deadline_slack))
        return 2 if queue_depth > 3 else 4

    sched = Scheduler(SchedulerConfig(max_wait_s=0.0, element_size=4), table(), choose_k=choose_k)
    for i in range(12):
        sched.submit(req(i, 10 + i, ["distilled", "movie"][i % 2], arrival=i * 1e-4))
    out = sched.schedule(0.01)
    students = [b for b in out if b.pet_types == ("students",)]
    assert students and all(b.k in (2, 4) for b in students)
    assert all(b.k is None for b in out if b not in students) and len(seen) == len(students)
    q, arrival_rate, capacity, slack = seen[0]
    assert q == 0 and arrival_rate == 12 and 0 < slack < 1.0  # 12 arrivals within the window
    assert len(capacity) == 4 and capacity == sorted(capacity, reverse=True) and capacity[-1] > 0  # k = 1..4
    m = sched.metrics
    assert m.student_batches == len(students) and m.students_k_sum == sum(b.k for b in students)
    default = Scheduler(SchedulerConfig(max_wait_s=0.0, max_students=3), table())
    default.submit(req("s", 10, "distilled"))
    assert default.schedule(0.0)[0].k == 3  # default: every student
    bad = Scheduler(SchedulerConfig(max_wait_s=0.0), table(), choose_k=lambda *a: 9)
    bad.submit(req("s", 10, "distilled"))
    with pytest.raises(InvalidInput, match=r"choose_k returned 9; expected an int in 1..4"):
        bad.schedule(0.0)
    assert len(bad) == 1  # nothing was taken: the request still waits


def test_an_idle_executor_takes_what_waits_at_once_a_busy_one_lets_requests_gather():
    sched = Scheduler(SchedulerConfig(max_wait_s=0.005, element_size=4), table())  # idle_dispatch by default
    sched.submit(req(0, 20, arrival=0.0))
    (first,) = sched.schedule(0.0)  # nothing in flight: no waiting for company
    assert [r.id for r in first.requests] == [0]
    for i in range(1, 4):
        sched.submit(req(i, 20 + i, arrival=0.001))
    assert sched.schedule(0.002) == []  # the first batch still runs: the next ones gather
    sched.complete(first, 0.003)
    (second,) = sched.schedule(0.003)
    assert [r.id for r in second.requests] == [1, 2, 3]


def test_schedule_waits_for_a_full_element_or_max_wait_and_next_due_says_when():
    sched = Scheduler(SchedulerConfig(max_wait_s=0.005, element_size=4, idle_dispatch=False), table())
    assert sched.next_due(0.0) is None and sched.schedule(0.0) == []
    for i in range(3):
        sched.submit(req(i, 20, arrival=0.001 * i))
    assert sched.schedule(0.002) == [] and sched.next_due(0.002) == pytest.approx(0.005)
    sched.submit(req(3, 22, arrival=0.003))  # the element is full now
    (b,) = sched.schedule(0.003)
    assert isinstance(b, Batch) and [r.id for r in b.requests] == [0, 1, 2, 3] and b.padded_len == 22
    assert b.tasks == ("movie",) and b.k is None and b.padding_tokens == 6 and b.number == 0
    assert b.estimated_start == 0.003 and b.estimated_finish == pytest.approx(0.003 + b.estimated_s)
    sched.submit(req(4, 9, arrival=0.003))
    assert sched.schedule(0.003) == [] and sched.next_due(0.003) == pytest.approx(0.008)
    (late,) = sched.schedule(0.003, flush=True)  # flush: everything waiting goes now
    assert late.estimated_start == pytest.approx(b.estimated_finish)  # queued behind the batch still running
    sched.complete(b, 0.004)
    sched.complete(late, 0.006)
    sched.submit(req(5, 9, arrival=0.02))
    assert sched.schedule(0.03, flush=False)[0].estimated_start == 0.03  # the executor is idle again
    m = sched.metrics
    assert m.batches == 3 and m.scheduled_requests == 6 and m.batch_sizes == {4: 1, 1: 2}
    assert m.wait_s_max == pytest.approx(0.01) and m.as_dict()["padding_fraction"] == m.padding_fraction


def test_outputs_are_deterministic():
    def run():
        sched = Scheduler(SchedulerConfig(max_wait_s=0.001), table())
        batches, refusals = simulate(sched, poisson(random.Random(3), 500, 8000.0, tuple(TASKS)))
        return ([(b.number, [r.id for r in b.requests], b.padded_len, b.k, b.estimated_start) for b in batches],
                [r.message for r in refusals], sched.metrics.as_dict())

    assert run() == run()


def test_a_request_thread_and_a_worker_thread_share_the_scheduler():
    sched = Scheduler(SchedulerConfig(max_wait_s=0.0, max_queue=10_000), table())
    taken, done = [], threading.Event()

    def worker():
        now = 0.0
        while not done.is_set() or len(sched):
            for b in sched.schedule(now, flush=done.is_set()):
                taken.extend(r.id for r in b.requests)
                sched.complete(b, now)
            now += 1e-4

    t = threading.Thread(target=worker)
    t.start()
    for i in range(2000):
        assert sched.submit(req(i, 5 + i % 100, list(TASKS)[i % 5], arrival=0.0, deadline=1e9)) is None
    done.set()
    t.join(timeout=30)
    assert not t.is_alive() and sorted(taken) == list(range(2000))


def test_an_empty_queue_is_admitted_whatever_overhead_was_measured():
    """The measured overhead counts for the batches ahead of a request, never its own: a high estimate can refuse a
    queue's newcomers but not stop the batches that bring it down."""
    sched = Scheduler(SchedulerConfig(max_wait_s=10.0, idle_dispatch=False, element_size=64), table())
    for _ in range(15):
        sched.observe_service(seconds=10.0, estimated_s=0.0)
    assert sched.overhead_s == 10.0
    assert sched.submit(req(0, 10, "movie", deadline=0.5)) is None  # empty queue: admitted
    refusal = sched.submit(req(1, 10, "tweet", deadline=0.5))  # behind one batch of 10 s overhead
    assert refusal is not None and refusal.reason == "deadline"


def test_pruning_counts_the_measured_per_batch_overhead():
    """The latency tables profile compute only; what the executor measures beyond them per batch (decoding, copies,
    threads) is added to the time of a full batch, so the capacities choose_k sees are what the server really
    sustains, not the compute's, nor one small batch's latency read as a rate."""
    seen = []

    def choose(queue_depth, arrival_rate, capacity, slack):
        seen.append(capacity)
        return 4

    sched = Scheduler(SchedulerConfig(max_wait_s=0.0, max_students=4), table(), choose_k=choose)
    sched.submit(req(0, 10, "distilled"))
    batch = sched.schedule(0.0)[0]
    from_table = seen[-1]
    n = rows_cap(10, sched.cfg)
    full = [n / c for c in from_table]  # the tables' time of a full batch with k = 1..4 students
    sched.observe_service(seconds=batch.estimated_s + 0.5, estimated_s=batch.estimated_s)
    assert sched.overhead_s == pytest.approx(0.5)
    sched.submit(req(1, 10, "distilled", arrival=0.1))
    sched.schedule(0.1)
    assert seen[-1] == pytest.approx([n / (f + 0.5) for f in full])
    sched.observe_service(seconds=0.0, estimated_s=1.0)  # nothing measured: ignored
    assert sched.overhead_s == pytest.approx(0.5)
    for _ in range(20):  # as fast as the tables: the window forgets the slow batch
        sched.observe_service(seconds=1.0, estimated_s=1.0)
    sched.observe_service(seconds=50.0, estimated_s=1.0)  # one outlier (e.g. a graph capture) does not move it
    assert sched.overhead_s == 0.0
    sched.submit(req(3, 10, "distilled", arrival=0.3))
    sched.schedule(0.3)
    assert seen[-1] == pytest.approx(from_table, rel=1e-3)


def test_prefix_times_come_from_the_tables_profile_of_each_prefix():
    """chorus profiles every prefix k of the students (`students:k`); a batch pruned to k is estimated with k's
    time, and a table without prefix profiles falls back to (1 + k) / (1 + K) of all K's."""
    base = table()
    sched = Scheduler(SchedulerConfig(max_wait_s=0.0, max_students=4), base, choose_k=lambda q, a, c, s: 2)
    all_k = base.beta("students", 8, 10)
    assert sched.prefix_time("students", 4, 8, 10) == pytest.approx(all_k)
    assert sched.prefix_time("students", 1, 8, 10) == pytest.approx(all_k * 2 / 5)  # no prefix profiles: the model
    d = base.to_dict()
    d["pet"]["students:2"] = [[0.9 * t for t in row] for row in d["pet"]["students"]]  # measured: 2 cost 0.9 of 4
    sched = Scheduler(SchedulerConfig(max_wait_s=0.0, max_students=4), LatencyTable.from_dict(d),
                      choose_k=lambda q, a, c, s: 2)
    assert sched.prefix_time("students", 2, 8, 10) == pytest.approx(0.9 * all_k)
    sched.submit(req(0, 10, "distilled"))
    batch = sched.schedule(0.0)[0]
    assert batch.k == 2 and batch.estimated_s == pytest.approx(0.9 * base.beta("students", 1, 10))