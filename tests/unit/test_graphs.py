"""The CUDA-graph form of the mixed-task forward (`chorus.backends.graphs`): static bucketed shapes, gathered PET ops,
only the batch's methods. On the CPU the same static forward runs without capture and must equal the fast path; on a
GPU (marked gpu) the captured graphs must, too, also after the bank grows."""

import numpy as np
import pytest
import torch

from chorus.backends.engine import Engine
from chorus.backends.graphs import GraphedForward, bucket
from chorus.backends.pet import fused
from chorus.errors import UnknownTask
from tests.unit.test_export import PETS, TINY, as_rows, mixed_tasks, random_batch, task
from tests.unit.tiny import write_tiny_bert


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = Engine(write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), TINY), capacity=4, max_rank=8)
    for i, name in enumerate(PETS):
        e.add_task(task(name, seed=i))
    return e


def fast_path(engine, ids, mask, tasks):
    with torch.no_grad():
        return engine.model(ids, mask, engine.bank.row_tasks(tasks)).float().cpu().numpy()


def assert_same(got, want):
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "-inf padding differs"
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)


def test_buckets():
    assert [bucket((1, 2, 4, 8), n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, None]
    static = GraphedForward.__new__(GraphedForward)
    static.batch_buckets, static.length_buckets, static.max_tokens = (1, 8, 64), (16, 32), 64 * 16
    assert static.shape(5, 17) == (8, 32) and static.shape(64, 16) == (64, 16)
    assert static.shape(64, 17) is None and static.shape(65, 2) is None  # over max_tokens / every bucket


@pytest.mark.parametrize("hot_after", [1, 8])  # 1: each batch's own graph at once; 8: the bank-wide graph first
@pytest.mark.parametrize("B,T,seed", [(1, 3, 0), (5, 17, 1), (24, 9, 2), (3, 30, 3)])
def test_static_forward_matches_the_fast_path_on_mixed_batches(engine, B, T, seed, hot_after):
    static = GraphedForward(engine.model, capture=False, hot_after=hot_after)
    ids, mask = random_batch(B, T, seed)
    tasks = mixed_tasks(B, seed)
    assert_same(static(ids, mask, tasks), fast_path(engine, ids, mask, tasks))


def test_bank_wide_graphs_serve_every_mix_until_a_key_is_hot(engine):
    """Any batch runs on its shape's bank-wide graph (every method registered tasks use, no subsets) with the
    same logits; its own key gets a graph once seen `hot_after` times; `warm_up` captures every shape's wide graph."""
    static = GraphedForward(engine.model, capture=False, batch_buckets=(1, 8), length_buckets=(16, 32, 64),
                            hot_after=3)
    assert static.warm_up(max_length=20) == 4  # (1, 16), (1, 32), (8, 16), (8, 32): lengths up to 20's bucket
    used = sorted({m for e in engine.bank.tasks.values() for m in e.slots})
    assert sorted(static._graphs) == [(b, t, tuple(used), ()) for b in (1, 8) for t in (16, 32)]
    ids, mask = random_batch(6, 11, 9)
    for tasks in (["lora_r2"] * 6, ["maskbert"] * 6, mixed_tasks(6, 9), ["lora_r2"] * 6):
        assert_same(static(ids, mask, tasks), fast_path(engine, ids, mask, tasks))
    assert static.captures == 4  # nothing captured while serving
    assert_same(static(ids, mask, ["lora_r2"] * 6), fast_path(engine, ids, mask, ["lora_r2"] * 6))  # 3rd sighting
    assert static.captures == 5 and (8, 16, ("lora",), ()) in static._graphs
    assert static.warm_up(max_length=20) == 0


def test_a_hot_key_is_captured_off_the_serving_path(engine):
    """With `background`, the batch that makes a key hot runs on the bank-wide graph like the ones before it and the
    key goes to the capture thread; once captured, its own graph serves it. Logits equal the fast path throughout."""
    static = GraphedForward(engine.model, capture=False, batch_buckets=(1, 8), length_buckets=(16, 32), hot_after=2,
                            background=True)
    static.warm_up(max_length=20)
    ids, mask = random_batch(6, 11, 9)
    want = fast_path(engine, ids, mask, ["lora_r2"] * 6)
    for _ in range(2):
        assert_same(static(ids, mask, ["lora_r2"] * 6), want)
    assert static.wait_captures(timeout=30)
    assert (8, 16, ("lora",), ()) in static._graphs and static.captures == 5
    assert_same(static(ids, mask, ["lora_r2"] * 6), want)
    capturer = static._capturer
    assert static.captures == 5 and capturer.name == "chorus-graph-capture"
    static.close()  # unload: the thread ends
    assert not capturer.is_alive() and static._capturer is None


def test_a_batch_of_one_method_leaves_the_others_out(engine):
    static = GraphedForward(engine.model, capture=False, hot_after=1)
    ids, mask = random_batch(6, 8, 4)
    for name in ("lora_r2", "maskbert", "houlsby_gelu", "lora_ia3_bitfit"):
        assert_same(static(ids, mask, [name] * 6), fast_path(engine, ids, mask, [name] * 6))
    keys = sorted(k[2] for k in static._graphs)
    assert static.captures == len(static._graphs) == 4 and static.capture_s > 0  # one per key, timed
    assert ("lora",) in keys and ("maskbert",) in keys and ("bitfit", "ia3", "lora") in keys


@pytest.mark.parametrize("enabled", [False, True], ids=["torch_ops", "fused_where_served"])
@pytest.mark.parametrize("B", [24, 8])  # 24: padding rows fill the subsets; 8 (= its bucket): a real null-slot row
def test_dense_delta_methods_run_on_their_rows_only(engine, B, enabled, monkeypatch):
    """MaskBERT and Diff-Pruning's gathered forms (torch: a dense ΔW per row; fused: programs per row) run on the
    rows that use them, padded to a power of two, when that fits in a quarter of the batch bucket."""
    monkeypatch.setattr(fused, "ENABLED", enabled)
    static = GraphedForward(engine.model, capture=False, hot_after=1)
    ids, mask = random_batch(B, 11, 7)
    tasks = ["lora_r2", "maskbert", "ia3", "diff_pruning", "diff_pruning", "bitfit", "maskbert", "diff_pruning"]
    tasks = (tasks * 3)[:B]
    if B == 24:
        tasks = ["maskbert"] * 3 + ["lora_r2"] * 20 + ["diff_pruning"]
    assert_same(static(ids, mask, tasks), fast_path(engine, ids, mask, tasks))
    (key,) = static._graphs
    # B=24 (bucket 32, a quarter 8): MaskBERT's 3 rows padded to 4, Diff-Pruning's 1; B=8 (a quarter 2): MaskBERT's
    # 2 rows, Diff-Pruning's 3 (4 > 2) run on every row
    assert dict(key[3]) == ({"maskbert": 4, "diff_pruning": 1} if B == 24 else {"maskbert": 2})
    static(ids, mask, ["maskbert"] * B)  # every row uses it: no subset
    assert ((key[0], key[1], ("maskbert",), ())) in static._graphs


def test_unknown_task_and_oversized_batches(engine):
    static = GraphedForward(engine.model, capture=False, batch_buckets=(1, 2, 4), length_buckets=(8,))
    ids, mask = random_batch(2, 4, 5)
    with pytest.raises(UnknownTask, match="nope"):
        static(ids, mask, ["lora_r2", "nope"])
    big_ids, big_mask = random_batch(5, 4, 6)
    assert static(big_ids, big_mask, ["bitfit"] * 5) is None  # the caller runs it eagerly


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_the_fast_path_and_survive_a_growing_bank(tmp_path):
    e = Engine(write_tiny_bert(tmp_path, TINY), device="cuda", capacity=2, max_rank=8)
    for i, name in enumerate(list(PETS)[:3]):
        e.add_task(task(name, seed=i))
    ids, mask = random_batch(7, 11, 7)
    tasks = [list(PETS)[i % 3] for i in range(7)]
    got = e.run(as_rows(ids, mask), tasks)
    assert e.graphs.captured == 1
    assert_same(got.logits, fast_path(e, ids.cuda(), mask.cuda(), tasks))
    for i, name in enumerate(list(PETS)[3:], start=3):  # banks grow: new addresses, the graphs are re-captured
        e.add_task(task(name, seed=i))
    tasks = mixed_tasks(7, 8)
    assert_same(e.run(as_rows(ids, mask), tasks).logits, fast_path(e, ids.cuda(), mask.cuda(), tasks))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_captured_in_the_background_while_batches_replay(tmp_path):
    """Hot keys captured on the capture thread while the serving thread keeps replaying (and running eagerly):
    every answer equals the fast path, before, during and after the swap."""
    e = Engine(write_tiny_bert(tmp_path, TINY), device="cuda", capacity=len(PETS) + 1, max_rank=8)
    for i, name in enumerate(PETS):
        e.add_task(task(name, seed=i))
    e.graphs.hot_after = 2
    assert e.graphs.background and e.graphs.warm_up(e.max_length) > 0
    batches = [(random_batch(B, T, seed), mixed_tasks(B, seed)) for seed, (B, T) in enumerate(
        [(3, 9), (7, 11), (5, 30), (2, 5), (16, 20), (1, 3)] * 2)]
    want = [fast_path(e, ids.cuda(), mask.cuda(), tasks) for (ids, mask), tasks in batches]
    for _ in range(6):  # keys turn hot and are captured while the later batches replay
        for ((ids, mask), tasks), w in zip(batches, want):
            assert_same(e.run(as_rows(ids, mask), tasks).logits, w)
    assert e.graphs.wait_captures(timeout=120)
    own = [k for k in e.graphs._graphs if k[2] != e.graphs._wide_key(k[:2])[2] or k[3]]
    assert own and not e.graphs._failed
    for ((ids, mask), tasks), w in zip(batches, want):
        assert_same(e.run(as_rows(ids, mask), tasks).logits, w)
