"""`chorus capacity` numbers, and a bank that stays correct with 10,000 registered tasks."""

import argparse
import time

import pytest
import torch

from chorus import capacity
from chorus.backends.engine import build_model
from chorus.backends.reference import reference_logits
from chorus.backends.task_files import random_task
from tests.unit.tiny import TINY

SITES = TINY.linear_sites()


def test_measured_bytes_agree_with_the_slot_shapes():
    cfg = capacity.BACKBONES["all-MiniLM-L6-v2"]
    h, L = cfg.hidden_size, cfg.num_layers
    lora = next(s for s in capacity.SETTINGS if s.label.startswith("LoRA"))
    backbone, pet, head = capacity.measure(cfg, torch.float16, lora)
    assert pet == L * 2 * (8 * h + h * 8) * 2 + 2  # A and B at query and value, fp16, plus the slot's scaling
    assert head == 8 * (h + 1) * 2 + 8  # 8 labels x (hidden + bias), fp16, plus num_labels (int64)
    assert backbone == 2 * (22_713_216 - 384 * 385)  # all-MiniLM-L6-v2's 22.7M parameters less its pooler
    houlsby = next(s for s in capacity.SETTINGS if s.label.startswith("Houlsby"))
    _, pet, _ = capacity.measure(cfg, torch.float32, houlsby)
    assert pet == 2_380_800 + 1  # the table in chorus.backends.pet, plus the slot's activation flag (bool)
    layer_norm = next(s for s in capacity.SETTINGS if s.label.startswith("LayerNorm"))
    _, pet, _ = capacity.measure(cfg, torch.float32, layer_norm)
    assert pet == (1 + 2 * L) * 2 * h * 4 == 39_936  # weight and bias of every LayerNorm, fp32: the same table


def test_capacity_command(capsys):
    parser = argparse.ArgumentParser()
    capacity.register(parser.add_subparsers())
    args = parser.parse_args(["capacity", "--memory-gb", "1", "--dtype", "float32"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2 (float32)" in out and "Diff-Pruning" in out
    backbone, rows = capacity.capacity_table("all-MiniLM-L6-v2", 1, "float32")
    lora = rows[0]
    assert lora.tasks == (2**30 - backbone) // lora.task_bytes and f"{lora.tasks:,}" in out


# -- 10,000 tasks -----------------------------------------------------------------------------------------------------
PETS = [{"lora": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]}}, {"bitfit": {}}, {"ia3": {}},
        {"adapter": {"bottleneck": 4, "placement": "pfeiffer"}}, {"lora": {"r": 4, "alpha": 4}, "bitfit": {}},
        {"diff_pruning": {"density": 0.01}}, {"maskbert": {"density": 0.01}}, {"layer_norm": {}},
        {"adapter": {"bottleneck": 4, "placement": "houlsby"}, "layer_norm": {"target_modules": ["output.LayerNorm"]}}]


def spec(i: int, generation: int = 0):
    labels = [f"l{j}" for j in range(2 + i % 3)]
    return random_task(f"t{i:05d}", TINY.hidden_size, SITES, PETS[i % len(PETS)], labels,
                       seed=i + generation * 100_003, scale=0.2)


# 10,000 tasks take ~45 s on 2 cores (15,000 adds at ~2.7 ms, mostly the bank's validation): slow; 1,000 by default.
@pytest.mark.parametrize("N", [1_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_many_tasks_register_serve_remove_and_reuse_slots(N):
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(config=TINY, capacity=16, max_rank=4)
    backbone = {k: v.detach().clone() for k, v in model.encoder.hf_parameter_map().items()}
    bank = model.bank
    for i in range(N):
        bank.add(spec(i))
    assert len(bank.tasks) == N

    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, N, (28,), generator=g).tolist() + [0, N - 1, 1, N - 2]  # every method, both ends
    names = [f"t{i:05d}" for i in rows]
    ids = torch.randint(1, TINY.vocab_size, (len(rows), 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    ids = ids * mask
    with torch.no_grad():
        before = model(ids, mask, bank.row_tasks(names))
    for k in [0, 9, 18, 28, 29]:  # a few rows against the per-task reference
        s, n = spec(rows[k]), 2 + rows[k] % 3
        want = reference_logits(TINY, backbone, s, ids[k : k + 1], mask[k : k + 1])[0]
        torch.testing.assert_close(before[k, :n], want, rtol=1e-4, atol=1e-5)

    capacities = {m: meth.capacity for m, meth in bank.methods.items()} | {"head": bank.head_capacity}
    slots = {name: (e.head_slot, dict(e.slots)) for name, e in bank.tasks.items()}
    removed = [f"t{i:05d}" for i in range(0, N, 2)]
    for name in removed:
        bank.remove(name)
    assert len(bank.tasks) == N // 2
    for i in range(0, N, 2):  # re-add the removed names with new weights
        bank.add(spec(i, generation=1))
    assert {m: meth.capacity for m, meth in bank.methods.items()} | {"head": bank.head_capacity} == capacities
    assert sorted(e.head_slot for e in bank.tasks.values()) == sorted(h for h, _ in slots.values())  # slots reused
    for name, (head, by_method) in slots.items():
        if name not in removed:
            assert (bank.tasks[name].head_slot, bank.tasks[name].slots) == (head, by_method)

    with torch.no_grad():
        after = model(ids, mask, bank.row_tasks(names))
    for k, i in enumerate(rows):
        n = 2 + i % 3
        if i % 2:  # kept: unchanged
            torch.testing.assert_close(after[k, :n], before[k, :n], rtol=1e-4, atol=1e-5)
        elif k % 6 == 0:  # re-added: its new weights (a few rows)
            want = reference_logits(TINY, backbone, spec(i, generation=1), ids[k : k + 1], mask[k : k + 1])[0]
            torch.testing.assert_close(after[k, :n], want, rtol=1e-4, atol=1e-5)
    print(f"{N:,} tasks: {time.perf_counter() - start:.1f} s")
