"""Students in serving: the pruning policy (pure), the student bank over the serving backbone's embeddings, and the
executor choosing between a task's students and its teacher."""


import numpy as np
import pytest
import torch

from chorus.backends.scheduler import SchedulerConfig
from chorus.backends.executor import Call, Executor, classify_rows, profile_engine
from chorus.backends.students import StudentConfig, StudentFiles, StudentGroup, save_students, stack_students
from chorus.backends.students.bank import StudentBank
from chorus.backends.students.pruning import PruningPolicy
from chorus.backends.students.reference import Student
from chorus.errors import InvalidInput, TaskFileError, UnknownTask
from tests.unit.test_executor import TINY, engine, requests  # noqa: F401 - `engine` is a fixture

K = 3


# ---- the pruning policy ---------------------------------------------------------------------------------------------
def test_light_load_runs_every_student():
    policy = PruningPolicy(4)
    assert policy(queue_depth=0, arrival_rate=10.0, capacity=[2500, 1667, 1250, 1000], deadline_slack=1.0) == 4


CAPACITY = [2500.0, 1667.0, 1250.0, 1000.0]  # requests/s with the first 1, 2, 3, 4 students


def test_a_burst_prunes_at_once_and_recovery_grows_back_one_student_per_batch():
    policy = PruningPolicy(4, utilisation=0.8)  # 80% of capacity[k-1] may arrive
    assert policy(0, 1900.0, CAPACITY, 1.0) == 1  # only k=1 sustains 1900/s (0.8 x 2500 = 2000)
    assert policy(0, 1100.0, CAPACITY, 1.0) == 2  # k=2 sustains 1333/s, k=3 only 1000/s
    assert policy(0, 10.0, CAPACITY, 1.0) == 3  # load fell: one more student per batch, not a jump to 4
    assert policy(0, 10.0, CAPACITY, 1.0) == 4
    assert policy.current == 4


def test_pruning_reads_the_measured_prefix_capacities_not_a_cost_model():
    # a GPU running the students fused: one student is barely cheaper than four, so a burst over them all cannot be
    # served by pruning, and one within 80% of k=3's capacity keeps 3
    flat = [1050.0, 1040.0, 1030.0, 1000.0]
    assert PruningPolicy(4)(0, 820.0, flat, 1.0) == 3
    assert PruningPolicy(4)(0, 900.0, flat, 1.0) == 1  # nothing sustains it: the fewest allowed
    with pytest.raises(InvalidInput, match="one rate per prefix k = 1..4, got 3"):
        PruningPolicy(4)(0, 1.0, flat[:3], 1.0)


def test_a_queue_that_would_miss_its_deadline_prunes():
    policy = PruningPolicy(4)
    # 100 waiting rows take 0.1 s with all 4 (1000/s), 0.04 s with 1 student (2500/s)
    assert policy(queue_depth=100, arrival_rate=0.0, capacity=CAPACITY, deadline_slack=0.05) == 1
    assert policy(queue_depth=100, arrival_rate=0.0, capacity=CAPACITY, deadline_slack=-1.0) == 1  # already late
    assert PruningPolicy(4, min_students=2)(100, 0.0, CAPACITY, 0.05) == 2  # never below min_students


def test_nothing_measured_yet_runs_all_and_bad_knobs_are_refused_by_name():
    assert PruningPolicy(3)(5, float("inf"), [0.0, 0.0, 0.0], 1.0) == 3
    for kwargs, word in [({"num_students": 0}, "num_students"), ({"num_students": 2, "utilisation": 0},
                                                                  "utilisation"),
                         ({"num_students": 2, "min_students": 3}, "min_students")]:
        with pytest.raises(InvalidInput, match=word):
            PruningPolicy(**kwargs)


# ---- the student bank -----------------------------------------------------------------------------------------------
def save_random_students(path, labels, seed=0):
    cfg = StudentConfig(num_students=K, num_layers=2, hidden_size=TINY.hidden_size, num_heads=4, intermediate_size=48,
                        num_labels=len(labels), dropout=0.0)
    torch.manual_seed(seed)
    students = [Student(cfg).eval() for _ in range(K)]
    files = StudentFiles(cfg, list(labels), stack_students(students), torch.tensor([1.0, 0.6, 0.3]))
    return save_students(files, path)


@pytest.fixture(scope="module")
def bank(engine, tmp_path_factory):  # noqa: F811
    bank = StudentBank(engine)
    bank.load("t0", save_random_students(tmp_path_factory.mktemp("students") / "t0", engine.bank.tasks["t0"].labels))
    return bank


def test_student_rows_match_the_group_and_teacher_rows_match_the_engine(engine, bank):  # noqa: F811
    ids = [[101, 7, 8, 9, 102], [101, 5, 102], [101, 9, 9, 9, 9, 9, 102], [101, 11, 102]]
    tasks, ks = ["t0", "t0", "t1", "t0"], [3, 1, 0, 0]
    out = classify_rows(engine, bank, ids, tasks, ks)
    assert out.students == ks and out.logits.shape == (4, engine.bank.max_labels)
    group: StudentGroup = bank.tasks["t0"].group
    for i in (0, 1):
        x, mask = engine.pad([ids[i]])
        want = group(x, mask, k=ks[i]).numpy()[0]
        np.testing.assert_allclose(out.logits[i, :2], want, rtol=1e-5, atol=1e-6)
        assert np.all(np.isneginf(out.logits[i, 2:]))
    alone = engine.run([ids[2], ids[3]], ["t1", "t0"])
    np.testing.assert_allclose(out.logits[2:, :2], alone.logits[:, :2], rtol=1e-5, atol=1e-6)
    assert out.labels[2:] == alone.labels


def test_students_must_match_a_served_task_and_its_labels(engine, bank, tmp_path):  # noqa: F811
    with pytest.raises(UnknownTask, match="no_such_task"):
        StudentBank(engine).load("no_such_task", tmp_path)
    wrong = save_random_students(tmp_path / "wrong", ["a", "b", "c"])
    with pytest.raises(TaskFileError, match=r"labels \['a', 'b', 'c'\].*'t1'"):
        StudentBank(engine).load("t1", wrong)
    with pytest.raises(InvalidInput, match="has 3 students; cannot run 4"):
        bank.run([[101, 102]], "t0", 4)
    with pytest.raises(UnknownTask, match="'t1' has no students"):
        bank.run([[101, 102]], "t1", 1)
    assert bank.num_students("t0") == K and bank.num_students("t1") == 0 and bank.max_students == K


# ---- serving: the executor of an execute() call -------------------------------------------------------------------
def serve(executor, reqs, students=None):
    """The requests as one execute() call; each one's result (or error)."""
    calls = [Call(r.ids, r.tasks, students=students) for r in reqs]
    executor.run(calls)
    return [c.result if c.error is None else c.error for c in calls]


def test_a_task_with_students_is_answered_by_them_unless_the_request_asks_for_the_teacher(engine, bank):  # noqa: F811
    table = profile_engine(engine, bank, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    assert "students" in table.pet
    executor = Executor(engine, SchedulerConfig(default_deadline_s=60.0, max_students=K), table, students=bank)
    reqs = requests(20, seed=7)
    for students, expect in ((None, K), (0, 0), (2, 2)):
        for req, got in zip(reqs, serve(executor, reqs, students)):
            assert not isinstance(got, Exception), got
            ks = [expect if t == "t0" else 0 for t in req.tasks]
            assert got.students == ks
            want = classify_rows(engine, bank, req.ids, req.tasks, ks)
            np.testing.assert_allclose(got.logits[:, :2], want.logits[:, :2], rtol=1e-4, atol=1e-5)
            assert got.labels == want.labels


def test_under_a_burst_the_policy_prunes_student_batches(engine, bank):  # noqa: F811
    table = profile_engine(engine, bank, batch_sizes=(1, 8), seq_lens=(8, 32), repeats=1)
    # plan as if the students were 200x slower than measured: the burst below then exceeds their capacity by far,
    # whatever this machine's speed (the policy reads the table, not a clock)
    assert sorted(p for p in table.pet if p.startswith("students")) == ["students"] + [f"students:{k}" for k in range(1, K)]
    for p in table.pet:
        if p.startswith("students"):
            table.pet[p] = [[200 * t for t in row] for row in table.pet[p]]
    policy = PruningPolicy(K)
    executor = Executor(engine, SchedulerConfig(default_deadline_s=3600.0, max_students=K), table, students=bank,
                        choose_k=policy)
    burst = requests(80, seed=8)
    for r in burst:
        r.tasks[:] = ["t0"] * len(r.tasks)
    got = serve(executor, burst)  # one call: arrivals far faster than the students' service rate
    ran = [k for g in got for k in g.students]
    assert min(ran) < K and all(1 <= k <= K for k in ran)
    assert executor.scheduler.metrics.student_batches >= 1


# ---- CUDA graphs ----------------------------------------------------------------------------------------------------
def test_graphed_students_fall_back_to_the_group_off_the_gpu(bank):
    from chorus.backends.students.cuda_graphs import GraphedStudents

    group = bank.tasks["t0"].group
    graphed = GraphedStudents(group)
    ids = torch.tensor([[101, 5, 6, 102], [101, 7, 102, 0]])
    mask = (ids != 0).long()
    assert torch.equal(graphed(ids, mask, k=2), group(ids, mask, k=2)) and graphed.captured == 0
    assert graphed.warm_up(128) == 0  # nothing to capture off a CUDA device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_students_match_the_eager_group_for_every_k_and_shape(bank, dtype):
    from chorus.backends.students.cuda_graphs import GraphedStudents

    from chorus.backends.students import SharedEmbeddings

    group, e = bank.tasks["t0"].group, bank.embeddings
    embeddings = SharedEmbeddings(*(t.to("cuda", dtype) for t in (e.word, e.position, e.token_type, e.norm_weight,
                                                                  e.norm_bias)), e.eps)
    cuda = StudentGroup(group.cfg, embeddings, {k: v.cuda() for k, v in group.tensors().items()},
                        group.boosting_weights.cuda()).to(dtype=dtype)
    graphed = GraphedStudents(cuda)
    g = torch.Generator().manual_seed(0)
    for B, T in [(1, 5), (3, 17), (8, 16), (33, 40)]:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = (torch.randint(1, 100, (B, T), generator=g) * mask).cuda()
        for k in range(1, K + 1):
            torch.testing.assert_close(graphed(ids, mask.cuda(), k=k), cuda(ids, mask.cuda(), k=k),
                                       **({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32
                                          else {"rtol": 2e-2, "atol": 2e-2}))
    assert graphed.captured == 4 * K
    warm = GraphedStudents(cuda)  # at load: every (k, batch, length) bucket up to max_length, none captured later
    n = warm.warm_up(40)
    assert n == K * len([(b, t) for b in warm.batch_buckets for t in (16, 32, 64) if b * t <= 64 * 128])
    for k in range(1, K + 1):
        warm(ids, mask.cuda(), k=k)
    assert warm.captured == n


def test_the_accuracy_budget_sets_the_default_and_the_floor_of_pruning(engine, tmp_path):  # noqa: F811
    from chorus.backends.executor import row_students, students_for

    def load(name, val_accuracies):
        cfg = StudentConfig(num_students=K, num_layers=1, hidden_size=TINY.hidden_size, num_heads=4,
                            intermediate_size=48, num_labels=2, dropout=0.0)
        files = StudentFiles(cfg, list(engine.bank.tasks[name].labels),
                             stack_students([Student(cfg).eval() for _ in range(K)]), torch.ones(K),
                             prefixes=[{"k": k + 1, "validation_accuracy": a} for k, a in enumerate(val_accuracies)],
                             meta={"teacher_accuracy": {"validation": 0.80}})
        bank.load(name, save_students(files, tmp_path / name))

    bank = StudentBank(engine, max_accuracy_drop=1.0)
    load("t0", [0.75, 0.795, 0.80])  # k=1 is 5 points below the teacher: k >= 2 only
    load("t1", [0.70, 0.71, 0.72])  # no prefix within 1 point: the teacher answers unless asked
    assert bank.floor("t0") == 2 and bank.floor("t1") is None
    assert students_for(bank, "t0", None) == K and students_for(bank, "t1", None) == 0
    assert students_for(bank, "t1", 2) == 2  # a request may still ask for them
    assert row_students(bank, "t0", None, batch_k=1) == 2  # pruning stops at the floor
    assert row_students(bank, "t0", 1, batch_k=3) == 1  # the request's own cap wins
    assert row_students(bank, "t0", None, batch_k=None) == 0  # a backbone batch
