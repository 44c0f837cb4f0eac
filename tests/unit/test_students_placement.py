"""Students placed over several devices (PlacedStudents): the split, the per-device partial sums gathered once, and
the same answers as the single-device fused group and the per-student reference for every prefix. On the CPU the
devices are repeated ("cpu", "cpu", ...), so the split and gather run for real; the last test needs 2 GPUs."""

import numpy as np
import pytest
import torch

from chorus.backends.students import (PlacedStudents, ReferenceStudentGroup, StudentConfig, StudentFiles, StudentGroup,
                                      save_students, stack_students)
from chorus.backends.students.bank import StudentBank
from chorus.backends.students.cuda_graphs import GraphedStudents
from chorus.backends.students.placement import balanced_split
from chorus.backends.students.reference import Student
from chorus.errors import InvalidInput
from tests.unit.test_executor import TINY, engine  # noqa: F401 - `engine` is a fixture
from tests.unit.test_students import TOL, embeddings, random_batch, random_students


def test_the_default_split_is_balanced_contiguous_and_larger_slices_first():
    assert balanced_split(4, 2) == [range(0, 2), range(2, 4)]
    assert balanced_split(5, 2) == [range(0, 3), range(3, 5)]
    assert balanced_split(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert balanced_split(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert balanced_split(1, 1) == [range(0, 1)]
    with pytest.raises(InvalidInput, match="2 students cannot be placed on 3 devices.*at most 2 devices"):
        balanced_split(2, 3)
    with pytest.raises(InvalidInput, match="at least one device"):
        balanced_split(2, 0)


def placed(K, devices, sizes=None, dtype=torch.float32, layers=2, seed=0):
    cfg, students, alphas = random_students(K, layers, seed=seed)
    emb = embeddings(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    group = StudentGroup(cfg, emb, stack_students(students), alphas).to(dtype).eval()
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = ReferenceStudentGroup(emb, [s.to(ref_dtype) for s in students], alphas).to(ref_dtype)
    return group, ref, PlacedStudents(group, devices, sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("K,devices,sizes", [
    (4, 2, None),  # even
    (5, 2, None),  # uneven: 3 + 2
    (5, 3, None),  # 2 + 2 + 1
    (3, 3, None),  # one student per device
    (6, 3, [1, 2, 3]),  # explicit sizes
    (2, 1, None),  # one device: no gather
])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 9), (17, 4)])
def test_placed_matches_the_single_device_group_and_the_reference_for_every_prefix(dtype, K, devices, sizes, B, T):
    group, ref, place = placed(K, ["cpu"] * devices, sizes, dtype, seed=K * 10 + devices)
    assert [len(r) for r in place.ranges] == (sizes or [len(r) for r in balanced_split(K, devices)])
    ids, mask = random_batch(B, T, seed=B * 100 + T)
    with torch.no_grad():
        for k in range(1, K + 1):
            got = place(ids, mask, k=k)
            assert got.dtype == dtype and got.shape == (B, group.cfg.num_labels) and got.device == place.device
            torch.testing.assert_close(got, group(ids, mask, k=k), **TOL[dtype])
            torch.testing.assert_close(got, ref(ids, mask, k=k).to(dtype), **TOL[dtype])
    torch.testing.assert_close(place(ids, mask), group(ids, mask), **TOL[dtype])  # k defaults to all K


class Spy:
    """Wraps a device's runner, recording the k it was asked for."""

    def __init__(self, runner, log, i):
        self.runner, self.log, self.i = runner, log, i

    def __call__(self, ids, mask, k):
        self.log.append((self.i, k))
        return self.runner(ids, mask, k=k)


def test_a_prefix_runs_only_the_devices_holding_its_students_the_last_on_part_of_its_slice():
    _, _, place = placed(5, ["cpu", "cpu"])  # students 0..2 | 3..4
    calls = []
    place.runners = [Spy(r, calls, i) for i, r in enumerate(place.runners)]
    ids, mask = random_batch(3, 6, seed=4)
    expect = {1: [(0, 1)], 2: [(0, 2)], 3: [(0, 3)], 4: [(0, 3), (1, 1)], 5: [(0, 3), (1, 2)]}
    for k, want in expect.items():
        calls.clear()
        place(ids, mask, k=k)
        assert calls == want, f"k={k}: ran {calls}, expected {want}"
        assert place.active(k) == want


def test_each_device_holds_only_its_slice_and_the_embeddings_once():
    group, _, _ = placed(5, ["cpu"])
    shared = {}
    place = PlacedStudents(group, ["cpu", "cpu", "cpu"], embeddings=shared)
    assert [g.num_students for g in place.groups] == [2, 2, 1]
    assert [tuple(g.head_w.shape[:1]) for g in place.groups] == [(2,), (2,), (1,)]
    for g, r in zip(place.groups, place.ranges):
        torch.testing.assert_close(g.boosting_weights, group.boosting_weights[r.start : r.stop])
        key = "layers.1.key.weight"
        torch.testing.assert_close(g.tensors()[key], group.tensors()[key][r.start : r.stop])
    # the embeddings already on the device are used by reference, and one dict shares them between tasks
    assert all(g.embeddings is group.embeddings for g in place.groups)
    assert shared == {torch.device("cpu"): group.embeddings}
    other = PlacedStudents(placed(2, ["cpu"], seed=1)[0], ["cpu", "cpu"], embeddings=shared)
    assert all(g.embeddings is group.embeddings for g in other.groups)
    # the slices are copies: the source group may be dropped
    before = place(*random_batch(2, 5, seed=5))
    group.head_w.zero_()
    group._tensors["classifier.weight"].zero_()
    torch.testing.assert_close(place(*random_batch(2, 5, seed=5)), before)


def test_bad_sizes_and_prefixes_are_refused_by_name():
    group, _, place = placed(4, ["cpu", "cpu"])
    for sizes in ([4], [2, 1], [4, 0], [5, -1]):
        with pytest.raises(InvalidInput, match="expected 2 positive counts .* summing to the group's 4 students"):
            PlacedStudents(group, ["cpu", "cpu"], sizes)
    with pytest.raises(InvalidInput, match="4 students cannot be placed on 5 devices"):
        PlacedStudents(group, ["cpu"] * 5)
    ids, mask = random_batch(2, 3, seed=6)
    for bad in (0, 5, 1.5):
        with pytest.raises(ValueError, match="prefix of 1..4"):
            place(ids, mask, k=bad)


# ---- in the student bank --------------------------------------------------------------------------------------------
def save_students_for(engine, tmp_path, K, seed=0):  # noqa: F811
    labels = list(engine.bank.tasks["t0"].labels)
    cfg = StudentConfig(num_students=K, num_layers=2, hidden_size=TINY.hidden_size, num_heads=4, intermediate_size=48,
                        num_labels=len(labels), dropout=0.0)
    torch.manual_seed(seed)
    files = StudentFiles(cfg, labels, stack_students([Student(cfg).eval() for _ in range(K)]),
                         torch.linspace(1.0, 0.2, K))
    return save_students(files, tmp_path / f"students-{K}")


def test_a_bank_with_devices_places_every_task_and_answers_as_the_single_device_bank(engine, tmp_path):  # noqa: F811
    path5, path2 = save_students_for(engine, tmp_path, 5), save_students_for(engine, tmp_path, 2, seed=1)
    single = StudentBank(engine)
    single.load("t0", path5)
    single.load("t1", path2)
    assert isinstance(single.tasks["t0"].runner, GraphedStudents)  # the default: the single-device path
    bank = StudentBank(engine, devices=["cpu", "cpu", "cpu"])
    bank.load("t0", path5)
    bank.load("t1", path2)  # 2 students on the first 2 of the 3 devices
    five, two = bank.tasks["t0"].runner, bank.tasks["t1"].runner
    assert isinstance(five, PlacedStudents) and bank.tasks["t0"].group is five
    assert [len(r) for r in five.ranges] == [2, 2, 1] and [len(r) for r in two.ranges] == [1, 1]
    assert bank.num_students("t0") == 5 and bank.num_students("t1") == 2 and bank.max_students == 5
    # the serving backbone's tables, by reference, for every task on every (here: the same) device
    assert all(g.embeddings is bank.embeddings for p in (five, two) for g in p.groups)
    ids = [[101, 7, 8, 9, 102], [101, 5, 102], [101, 9, 9, 9, 9, 9, 102]]
    for task, K in (("t0", 5), ("t1", 2)):
        for k in range(1, K + 1):
            got = bank.run(ids, task, k)
            assert got.dtype == np.float32 and got.shape == (3, 2)
            np.testing.assert_allclose(got, single.run(ids, task, k), rtol=1e-4, atol=1e-5)
    # just the serving device: the single-device path
    assert isinstance(StudentBank(engine, devices=["cpu"]).load("t0", path5).runner, GraphedStudents)
    with pytest.raises(InvalidInput, match="at least one device"):
        StudentBank(engine, devices=[])


# ---- on two GPUs ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_placed_over_two_gpus_matches_one_gpu_for_every_prefix_and_shape(dtype):
    K = 5
    cfg, students, alphas = random_students(K, 2, seed=3)
    emb = embeddings()
    emb = type(emb)(*(t.cuda(0) for t in (emb.word, emb.position, emb.token_type, emb.norm_weight, emb.norm_bias)),
                    emb.eps)
    one = StudentGroup(cfg, emb, {n: t.cuda(0) for n, t in stack_students(students).items()}, alphas.cuda(0))
    one = one.to(dtype).eval()
    place = PlacedStudents(one, ["cuda:0", "cuda:1"])
    assert [g.head_w.device for g in place.groups] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert place.groups[0].embeddings is emb and place.groups[1].embeddings.word.device == torch.device("cuda", 1)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    g = torch.Generator().manual_seed(0)
    for B, T in [(1, 5), (3, 17), (8, 16), (33, 40), (70, 9)]:  # graphed buckets, and beyond them (eager)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 50, (B, T), generator=g) * mask
        for k in range(1, K + 1):
            for _ in range(2):  # the second time replays the captured graphs
                got = place(ids.cuda(0), mask.cuda(0), k=k)
                assert got.device == torch.device("cuda", 0) and got.dtype == dtype
                torch.testing.assert_close(got, one(ids.cuda(0), mask.cuda(0), k=k), **tol)
    # the first device ran every k (3 of its students at most), the second only k=4, 5; 4 graphed shapes each
    assert place.runners[0].captured == 4 * 3 and place.runners[1].captured == 4 * 2
