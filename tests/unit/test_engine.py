"""The mixed-batch engine against the plain per-task reference (transformers' BertModel with merged weights)."""

import pytest
import torch

from chorus.backends.engine import build_model
from chorus.backends.reference import reference_logits
from chorus.backends.task_files import random_task
from chorus.errors import InvalidInput, TaskFileError, UnknownTask
from tests.unit.tiny import TINY, random_batch


PETS = {
    "lora_qv_r4": {"lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}},
    "lora_all_r8": {"lora": {"r": 8, "alpha": 8}},
    "bitfit": {"bitfit": {}},
    "lora_bitfit": {"lora": {"r": 2, "alpha": 4}, "bitfit": {}},
}


def make_model(capacity=4):
    torch.manual_seed(0)
    model = build_model(config=TINY, capacity=capacity, max_rank=8)
    backbone = {k: v.detach().clone() for k, v in model.encoder.hf_parameter_map().items()}
    return model, backbone


def add_tasks(model, n_labels=(2, 3, 2, 4)):
    specs = []
    for i, ((name, pet), n) in enumerate(zip(PETS.items(), n_labels)):
        spec = random_task(name, TINY.hidden_size, TINY.linear_sites(), pet, [f"l{j}" for j in range(n)], seed=i, scale=0.2)
        model.bank.add(spec)
        specs.append(spec)
    return specs



@pytest.mark.parametrize("B,T,seed", [(1, 5, 0), (7, 13, 1), (16, 32, 2), (33, 9, 3)])
def test_mixed_batch_matches_per_task_reference(B, T, seed):
    model, backbone = make_model()
    specs = add_tasks(model)
    ids, mask = random_batch(B, T, seed)
    g = torch.Generator().manual_seed(seed + 100)
    which = torch.randint(0, len(specs), (B,), generator=g).tolist()
    rows = model.bank.row_tasks([specs[w].name for w in which])
    with torch.no_grad():
        got = model(ids, mask, rows)
    for i, w in enumerate(which):
        n = len(specs[w].labels)
        want = reference_logits(TINY, backbone, specs[w], ids[i : i + 1], mask[i : i + 1])[0]
        torch.testing.assert_close(got[i, :n], want, rtol=1e-4, atol=1e-5)
        assert torch.isinf(got[i, n:]).all() and (got[i, n:] < 0).all()


def test_rows_are_independent_of_their_batch_mates():
    model, _ = make_model()
    specs = add_tasks(model)
    ids, mask = random_batch(12, 10, 7)
    names = [specs[i % len(specs)].name for i in range(12)]
    with torch.no_grad():
        together = model(ids, mask, model.bank.row_tasks(names))
        for i in range(12):
            alone = model(ids[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())],
                          model.bank.row_tasks([names[i]]))
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-5)


def test_bank_grows_and_reuses_slots_and_export_round_trips():
    model, backbone = make_model(capacity=2)
    specs = []
    for i in range(9):  # past capacity: every bank doubles
        spec = random_task(f"t{i}", TINY.hidden_size, TINY.linear_sites(), PETS["lora_bitfit"], seed=i, scale=0.2)
        model.bank.add(spec)
        specs.append(spec)
    for spec in specs:
        back = model.bank.export(spec.name)
        assert back.tensors.keys() == spec.tensors.keys()
        for k in spec.tensors:
            torch.testing.assert_close(back.tensors[k], spec.tensors[k])
    model.bank.remove("t3")
    with pytest.raises(UnknownTask, match="t3"):
        model.bank.row_tasks(["t3"])
    # a new task reuses the freed slots, and the freed slot held zeros in between
    new = random_task("fresh", TINY.hidden_size, TINY.linear_sites(), PETS["lora_bitfit"], seed=99, scale=0.2)
    model.bank.add(new)
    ids, mask = random_batch(3, 6, 5)
    with torch.no_grad():
        got = model(ids, mask, model.bank.row_tasks(["fresh", "t8", "t0"]))
    for i, spec in enumerate([new, specs[8], specs[0]]):
        want = reference_logits(TINY, backbone, spec, ids[i : i + 1], mask[i : i + 1])[0]
        torch.testing.assert_close(got[i, :2], want, rtol=1e-4, atol=1e-5)


def test_replace_swaps_weights_and_frees_old_slots():
    model, backbone = make_model()
    a = random_task("a", TINY.hidden_size, TINY.linear_sites(), PETS["lora_qv_r4"], seed=1, scale=0.2)
    b = random_task("a", TINY.hidden_size, TINY.linear_sites(), PETS["bitfit"], seed=2, scale=0.2)
    model.bank.add(a)
    free_before = len(model.bank.methods["lora"].free)
    with pytest.raises(InvalidInput, match="already registered"):
        model.bank.add(b)
    model.bank.add(b, replace=True)
    assert len(model.bank.methods["lora"].free) == free_before + 1
    ids, mask = random_batch(2, 8, 3)
    with torch.no_grad():
        got = model(ids, mask, model.bank.row_tasks(["a", "a"]))
    torch.testing.assert_close(got[:, :2], reference_logits(TINY, backbone, b, ids, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.tensors.__setitem__("encoder.layer.0.attention.self.query.lora_A", torch.zeros(4, 31)),
     r"lora_A.*shape \(4, 31\).*\(4, 32\)"),
    (lambda s: s.tensors.__setitem__("classifier.weight", torch.zeros(2, 16)), r"classifier.weight.*\(2, 16\)"),
    (lambda s: s.tensors.pop("classifier.bias"), "classifier.bias.*missing"),
    (lambda s: s.tensors.__setitem__("encoder.layer.9.output.dense.lora_A", torch.zeros(4, 64)), "names no linear"),
    (lambda s: s.tensors.pop("encoder.layer.1.attention.self.value.lora_B"), "lacks"),
    (lambda s: s.pet.__setitem__("prefix", {}), "unknown PET method"),
    (lambda s: s.pet["lora"].__setitem__("r", 64), "rank"),
    (lambda s: s.tensors.__setitem__("encoder.layer.0.attention.self.query.lora_A", torch.full((4, 32), float("nan"))),
     "NaN"),
    (lambda s: setattr(s, "labels", ["only"]), "labels"),
])
def test_malformed_tasks_are_refused_and_change_nothing(mutate, match):
    model, _ = make_model()
    good = random_task("good", TINY.hidden_size, TINY.linear_sites(), PETS["bitfit"], seed=1)
    model.bank.add(good)
    spec = random_task("bad", TINY.hidden_size, TINY.linear_sites(), PETS["lora_qv_r4"], seed=2)
    mutate(spec)
    free = {m: list(meth.free) for m, meth in model.bank.methods.items()}
    with pytest.raises(TaskFileError, match=match):
        model.bank.add(spec)
    assert set(model.bank.tasks) == {"good"}
    assert {m: list(meth.free) for m, meth in model.bank.methods.items()} == free


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "x" * 65, ".hidden", "a..b", "sp ace"])
def test_unsafe_task_names_are_refused(name):
    model, _ = make_model()
    spec = random_task(name, TINY.hidden_size, TINY.linear_sites(), PETS["bitfit"])
    with pytest.raises(InvalidInput, match="not a safe name"):
        model.bank.add(spec)
