"""Every PET method's fast mixed-batch path against its plain per-task reference (Hugging Face BertModel with the
task merged into its weights, or with adapter hooks), plus slot bookkeeping and refusal of malformed tensors; the
per-task LayerNorm op alone against its plain per-row form, over dtypes and batch mixes."""

import pytest
import torch
import torch.nn.functional as F

from chorus.backends.engine import build_model
from chorus.backends.pet import GatheredRows
from chorus.backends.reference import layer_norm_rows, reference_logits
from chorus.backends.task_files import load_task, random_task, save_task
from chorus.errors import TaskFileError
from tests.unit.tiny import TINY, random_batch


PETS = {
    "lora_r2": {"lora": {"r": 2, "alpha": 4}},
    "lora_r8_q": {"lora": {"r": 8, "alpha": 8, "target_modules": ["query"]}},
    "bitfit": {"bitfit": {}},
    "houlsby_m8_gelu": {"adapter": {"bottleneck": 8, "activation": "gelu", "placement": "houlsby"}},
    "houlsby_m3_relu": {"adapter": {"bottleneck": 3, "activation": "relu", "placement": "houlsby"}},
    "pfeiffer_m16": {"adapter": {"bottleneck": 16, "placement": "pfeiffer"}},
    "ia3": {"ia3": {}},
    "ia3_every_linear": {"ia3": {"target_modules": ["query", "key", "value", "dense"]}},
    "maskbert_1pct": {"maskbert": {"density": 0.01}},
    "maskbert_30pct": {"maskbert": {"density": 0.3}},
    "diff_2pct": {"diff_pruning": {"density": 0.02}},
    "diff_50pct": {"diff_pruning": {"density": 0.5}},
    "lora_ia3_bitfit": {"lora": {"r": 4, "alpha": 4}, "ia3": {}, "bitfit": {}},
    "layer_norm": {"layer_norm": {}},
    "layer_norm_some": {"layer_norm": {"target_modules": ["embeddings.LayerNorm", "layer.1.output.LayerNorm"]}},
    "houlsby_layer_norm": {"adapter": {"bottleneck": 4, "activation": "gelu", "placement": "houlsby"},
                           "layer_norm": {}},
}


def make_model(capacity=4, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model(config=TINY, capacity=capacity, max_rank=8, dtype=dtype)
    backbone = {k: v.detach().float().clone() for k, v in model.encoder.hf_parameter_map().items()}
    return model, backbone


def task(name, seed=0, pets=PETS):
    return random_task(name, TINY.hidden_size, TINY.linear_sites(), pets[name], seed=seed, scale=0.2)



def check_against_reference(model, backbone, specs, names, ids, mask, rtol, atol, grad=False):
    with torch.set_grad_enabled(grad):
        got = model(ids, mask, model.bank.row_tasks(names)).detach().float()
    by_name = {s.name: s for s in specs}
    for i, n in enumerate(names):
        want = reference_logits(TINY, backbone, by_name[n], ids[i : i + 1], mask[i : i + 1])[0]
        torch.testing.assert_close(got[i, :2], want, rtol=rtol, atol=atol, msg=lambda m: f"row {i} ({n}): {m}")


@pytest.mark.parametrize("name", list(PETS))
def test_each_method_matches_its_reference(name):
    model, backbone = make_model()
    spec = task(name, seed=3)
    model.bank.add(spec)
    ids, mask = random_batch(5, 11, 1)
    check_against_reference(model, backbone, [spec], [name] * 5, ids, mask, 1e-4, 1e-5)


@pytest.mark.parametrize("B,T,seed", [(1, 4, 0), (13, 9, 1), (40, 17, 2)])
@pytest.mark.parametrize("grad", [False, True], ids=["serving", "autograd"])
def test_batches_mixing_every_method_match_the_references(B, T, seed, grad):
    """Every type and size at once, rows in random order; `autograd` runs the training path (dense sparse deltas)."""
    model, backbone = make_model(capacity=2)  # grows on the way
    specs = [task(n, seed=i) for i, n in enumerate(PETS)]
    for s in specs:
        model.bank.add(s)
    ids, mask = random_batch(B, T, seed)
    g = torch.Generator().manual_seed(seed)
    names = [specs[int(i)].name for i in torch.randint(0, len(specs), (B,), generator=g)]
    check_against_reference(model, backbone, specs, names, ids, mask, 1e-4, 1e-5, grad=grad)


def test_bfloat16_mixed_batch_is_close_to_the_float32_reference():
    model, backbone = make_model(capacity=16, dtype=torch.bfloat16)
    specs = [task(n, seed=i) for i, n in enumerate(PETS)]
    for s in specs:
        model.bank.add(s)
    names = [s.name for s in specs] * 2
    ids, mask = random_batch(len(names), 10, 4)
    with torch.no_grad():
        got = model(ids, mask, model.bank.row_tasks(names)).float()
    # the bf16 backbone itself differs from fp32 by ~1e-2 on these logits: compare with a loose tolerance
    for i, n in enumerate(names):
        want = reference_logits(TINY, backbone, specs[i % len(specs)], ids[i : i + 1], mask[i : i + 1])[0]
        torch.testing.assert_close(got[i, :2], want, rtol=0.1, atol=0.1, msg=lambda m: f"row {i} ({n}): {m}")


def test_rows_of_one_task_do_not_depend_on_their_batch_mates():
    model, _ = make_model()
    specs = [task(n, seed=i) for i, n in enumerate(PETS)]
    for s in specs:
        model.bank.add(s)
    ids, mask = random_batch(len(specs), 8, 5)
    names = [s.name for s in specs]
    with torch.no_grad():
        together = model(ids, mask, model.bank.row_tasks(names))
        for i, n in enumerate(names):
            alone = model(ids[i : i + 1], mask[i : i + 1], model.bank.row_tasks([n]))
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-5)


def test_lora_rows_of_different_ranks_run_in_one_group_per_rank():
    model, _ = make_model()
    for name in ("lora_r2", "lora_r8_q", "lora_ia3_bitfit"):
        model.bank.add(task(name))
    rows = model.bank.row_tasks(["lora_r2", "bitfit", "lora_r8_q", "lora_r2", "lora_ia3_bitfit"]
                                if "bitfit" in model.bank.tasks else ["lora_r2", "lora_r8_q", "lora_r2", "lora_ia3_bitfit"])
    groups = model.bank.methods["lora"].row_groups(rows)
    assert sorted(g.key for g in groups) == [2, 4, 8]
    assert sorted(g.rows.tolist() for g in groups) == [[0, 2], [1], [3]]
    assert model.bank.methods["lora"].row_groups(rows) is groups  # computed once per batch


def test_export_round_trips_every_method_through_files(tmp_path):
    model, backbone = make_model()
    for name in PETS:
        spec = task(name, seed=7)
        model.bank.add(spec)
        back = model.bank.export(name)
        assert back.tensors.keys() == spec.tensors.keys(), name
        for k in spec.tensors:
            torch.testing.assert_close(back.tensors[k], spec.tensors[k], msg=lambda m: f"{name} {k}: {m}")
        loaded = load_task(save_task(back, tmp_path / name), name)
        model.bank.add(loaded, replace=True)
        ids, mask = random_batch(3, 6, 2)
        check_against_reference(model, backbone, [spec], [name] * 3, ids, mask, 1e-4, 1e-5)


def test_removing_a_task_zeroes_and_frees_its_slots_and_growth_keeps_contents():
    model, backbone = make_model(capacity=2)
    specs = [task(n, seed=i) for i, n in enumerate(PETS)]
    for s in specs:
        model.bank.add(s)
    entry = model.bank.tasks["diff_50pct"]
    slot = entry.slots["diff_pruning"]
    model.bank.remove("diff_50pct")
    diff = model.bank.methods["diff_pruning"]
    assert slot in diff.free
    assert all(not p[slot].any() for bank in diff.banks.values() for p in bank.values())
    assert all(not idx.index[slot].any() and idx.nnz[slot] == 0 for idx in diff.indices.values())
    for name in ("houlsby_m8_gelu", "ia3", "maskbert_1pct"):
        e = model.bank.tasks[name]
        model.bank.remove(name)
        for m, s in e.slots.items():
            meth = model.bank.methods[m]
            assert s in meth.free and all(not p[s].any() for bank in meth.banks.values() for p in bank.values())
    # more tasks than the banks hold: every bank grows; earlier tasks still answer as before
    extra = [random_task(f"more{i}", TINY.hidden_size, TINY.linear_sites(), {"diff_pruning": {"density": 0.9},
             "adapter": {"bottleneck": 40 % 33 + 1}}, seed=50 + i, scale=0.2) for i in range(5)]
    for s in extra:
        model.bank.add(s)
    kept = [s for s in specs if s.name in model.bank.tasks] + extra
    ids, mask = random_batch(len(kept), 7, 9)
    check_against_reference(model, backbone, kept, [s.name for s in kept], ids, mask, 1e-4, 1e-5)


def test_diff_pruning_finish_training_keeps_the_largest_deltas():
    model, backbone = make_model()
    spec = task("diff_50pct", seed=1)
    model.bank.add(spec)
    entry = model.bank.tasks["diff_50pct"]
    model.bank.methods["diff_pruning"].finish_training(entry.slots["diff_pruning"], {"density": 0.05})
    back = model.bank.export("diff_50pct")
    values = torch.cat([t for k, t in back.tensors.items() if k.endswith("diff_value")])
    all_values = torch.cat([t for k, t in spec.tensors.items() if k.endswith("diff_value")])
    total = sum(o * i for o, i in TINY.linear_sites().values())
    assert len(values) == round(0.05 * total)
    assert values.abs().min() >= all_values.abs().topk(len(values)).values[-1]
    ids, mask = random_batch(3, 6, 2)
    check_against_reference(model, backbone, [back], ["diff_50pct"] * 3, ids, mask, 1e-4, 1e-5)


def test_maskbert_scores_train_through_the_straight_through_estimator():
    model, _ = make_model()
    site = "encoder.layer.0.attention.self.query"
    n = 32 * 32
    spec = random_task("m", TINY.hidden_size, TINY.linear_sites(), {"maskbert": {}}, seed=0)
    spec.tensors = {k: v for k, v in spec.tensors.items() if k.startswith("classifier")}
    spec.tensors[f"{site}.mask_index"] = torch.arange(n, dtype=torch.float32)
    spec.tensors[f"{site}.mask_score"] = torch.full((n,), 0.01).index_fill(0, torch.arange(0, n, 2), -0.01)
    model.bank.add(spec)
    assert model.bank.export("m").tensors[f"{site}.mask_index"].tolist() == list(range(0, n, 2))  # pruned only
    meth = model.bank.methods["maskbert"]
    meth.requires_grad_(True)
    ids, mask = random_batch(2, 5, 0)
    model(ids, mask, model.bank.row_tasks(["m", "m"])).nan_to_num(neginf=0).sum().backward()
    grad = meth.banks[meth._key(site)]["value"].grad
    assert grad is not None and grad[1, :n].abs().sum() > 0  # the binary mask passes gradients to the scores


def _spec_with(name, key, value):
    spec = task(name, seed=1)
    spec.tensors[key] = value
    return spec


Q = "encoder.layer.0.attention.self.query"
AO = "encoder.layer.0.attention.output.dense"
FO = "encoder.layer.1.output.dense"


@pytest.mark.parametrize("name,key,value,match", [
    ("houlsby_m8_gelu", f"{AO}.adapter_down", torch.zeros(8, 31), r"adapter_down.*shape \(8, 31\).*\(8, 32\)"),
    ("houlsby_m8_gelu", f"{FO}.adapter_up_bias", torch.zeros(64), r"adapter_up_bias.*\(64,\).*\(32,\)"),
    ("pfeiffer_m16", f"{AO}.adapter_down", torch.zeros(16, 32), "pfeiffer adapters sit only after"),
    ("ia3", f"{FO}.ia3_l", torch.zeros(32), r"ia3_l.*shape \(32,\).*\(64,\)"),
    ("ia3", f"{Q}.ia3_l", torch.zeros(32, 1), r"ia3_l.*shape \(32, 1\).*\(32,\)"),
    ("maskbert_1pct", f"{Q}.mask_index", torch.tensor([0.0, 1024.0]), r"mask_index.*outside \[0, 1024\)"),
    ("maskbert_1pct", f"{Q}.mask_index", torch.tensor([3.0, 3.5]), "non-integer"),
    ("maskbert_1pct", f"{Q}.mask_index", torch.tensor([3.0, 3.0]), "twice"),
    ("maskbert_1pct", f"{Q}.mask_score", torch.zeros(3), r"mask_score.*shape \(3,\).*one value per position"),
    ("diff_2pct", f"{Q}.diff_value", torch.zeros(2), r"diff_value.*shape \(2,\)"),
    ("diff_2pct", f"{Q}.diff_bias", torch.zeros(31), r"diff_bias.*\(31,\).*\(32,\)"),
    ("diff_2pct", f"{Q}.diff_index", torch.zeros(2, 2), r"diff_index.*shape \(2, 2\).*\(nnz,\)"),
    ("diff_2pct", "encoder.layer.7.output.dense.diff_index", torch.zeros(2), "names no linear"),
    ("layer_norm", "embeddings.LayerNorm.weight", torch.ones(31),
     r"'embeddings.LayerNorm.weight' has shape \(31,\), but the backbone needs \(32,\) for layer_norm"),
    ("layer_norm", "encoder.layer.1.output.LayerNorm.bias", torch.zeros(1, 32), r"LayerNorm.bias.*\(1, 32\).*\(32,\)"),
    ("layer_norm", "encoder.layer.7.output.LayerNorm.bias", torch.zeros(32), "names no LayerNorm of the backbone"),
    ("layer_norm", "encoder.layer.0.attention.LayerNorm.weight", torch.ones(32), "names no LayerNorm of the backbone"),
    ("layer_norm_some", "encoder.layer.0.output.LayerNorm.weight", torch.ones(32),
     r"site 'encoder.layer.0.output.LayerNorm' has \['weight'\] but lacks \['bias'\]"),
    ("layer_norm", "embeddings.LayerNorm.bias", torch.full((32,), float("nan")), "NaN"),
])
def test_malformed_tensors_are_refused_naming_tensor_and_shapes(name, key, value, match):
    model, _ = make_model()
    free = {m: list(meth.free) for m, meth in model.bank.methods.items()}
    with pytest.raises(TaskFileError, match=match):
        model.bank.add(_spec_with(name, key, value))
    assert not model.bank.tasks
    assert {m: list(meth.free) for m, meth in model.bank.methods.items()} == free


@pytest.mark.parametrize("options,match", [
    ({"bottleneck": 65}, "bottleneck=65"), ({"bottleneck": 8, "activation": "tanh"}, "activation 'tanh'"),
    ({"bottleneck": 8, "placement": "parallel"}, "placement 'parallel'"),
])
def test_bad_adapter_options_are_refused(options, match):
    model, _ = make_model()
    spec = task("houlsby_m8_gelu")
    spec.pet["adapter"] = options
    with pytest.raises(TaskFileError, match=match):
        model.bank.add(spec)


def test_a_diff_pruning_site_without_positions_is_refused():
    model, _ = make_model()
    spec = task("diff_2pct")
    del spec.tensors[f"{Q}.diff_index"]
    with pytest.raises(TaskFileError, match="lacks 'diff_index'"):
        model.bank.add(spec)


# -- the per-task LayerNorm op alone ----------------------------------------------------------------------------------
LN_TASKS = ("layer_norm", "layer_norm_some", "houlsby_layer_norm", "bitfit", "lora_r2")
LN_MIXES = {  # rows of tasks with and without overrides, several LayerNorm tasks, other PET methods beside them
    "some_rows": ["bitfit", "layer_norm", "lora_r2", "layer_norm_some", "houlsby_layer_norm", "bitfit", "layer_norm"],
    "one_row": ["lora_r2", "bitfit", "houlsby_layer_norm"],
    "every_row": ["layer_norm", "layer_norm_some", "houlsby_layer_norm", "layer_norm"],
    "no_row": ["bitfit", "lora_r2", "bitfit"],
}
LN_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def ln_bank(dtype):
    model, backbone = make_model(capacity=2, dtype=dtype)  # grows on the way
    specs = {n: task(n, seed=i) for i, n in enumerate(LN_TASKS)}
    for spec in specs.values():
        model.bank.add(spec)
    return model, backbone, specs


def ln_reference(site, norm, backbone, specs, names, x):
    """Each row's LayerNorm with its task's weight and bias at `site` (the backbone's where it tunes none), float64."""
    pick = lambda n, p: specs[n].tensors.get(f"{site}.{p}", backbone[f"{site}.{p}"])  # noqa: E731
    return layer_norm_rows(x, [pick(n, "weight") for n in names], [pick(n, "bias") for n in names], norm.eps)


@pytest.mark.parametrize("dtype", list(LN_TOLERANCE), ids=str)
@pytest.mark.parametrize("mix", list(LN_MIXES))
def test_layer_norm_op_fast_and_gathered_forms_match_the_plain_reference(dtype, mix):
    model, backbone, specs = ln_bank(dtype)
    names = LN_MIXES[mix]
    rows = model.bank.row_tasks(names)
    gathered_rows = GatheredRows(rows.slots, rows.head_slots, model.bank.bank_tensors())
    rtol, atol = LN_TOLERANCE[dtype]
    g = torch.Generator().manual_seed(0)
    plain_rows = [i for i, n in enumerate(names) if "layer_norm" not in specs[n].pet]
    for site, norm in model.encoder.pet_norms().items():
        x = (torch.randn(len(names), 9, TINY.hidden_size, generator=g) * 3 + 0.5).to(dtype)
        want = ln_reference(site, norm, backbone, specs, names, x)
        with torch.no_grad():
            fast, gathered = norm(x, rows), norm(x, gathered_rows)
        assert fast.dtype == gathered.dtype == dtype
        for got, form in ((fast, "fast"), (gathered, "gathered")):
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{site} {form}: {m}")
        # rows of tasks that tune no LayerNorm are bit for bit the backbone's LayerNorm, whatever shares their batch
        plain = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        assert all(torch.equal(fast[i], plain[i]) for i in plain_rows), site
        if mix == "no_row":
            assert model.bank.methods["layer_norm"].make_op(site)(x, rows) is None  # the plain LayerNorm runs


@pytest.mark.parametrize("mix", ["some_rows", "every_row"])
def test_layer_norm_op_gradients_match_the_plain_reference(mix):
    """Training reads gradients through the op: to its input and to the task's slot (the bank keeps deltas)."""
    model, backbone, specs = ln_bank(torch.float32)
    names = LN_MIXES[mix]
    method = model.bank.methods["layer_norm"]
    method.requires_grad_(True)
    site = "encoder.layer.1.attention.output.LayerNorm"
    norm = model.encoder.pet_norms()[site]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(len(names), 7, TINY.hidden_size, generator=g) * 2).requires_grad_(True)
    upstream = torch.randn(len(names), 7, TINY.hidden_size, generator=g)
    (norm(x, model.bank.row_tasks(names)) * upstream).sum().backward()

    slot = model.bank.tasks["layer_norm"].slots["layer_norm"]
    x64 = x.detach().double().requires_grad_(True)
    w64 = specs["layer_norm"].tensors[f"{site}.weight"].double().requires_grad_(True)
    pick = lambda n, p: specs[n].tensors.get(f"{site}.{p}", backbone[f"{site}.{p}"])  # noqa: E731
    weights = [w64 if n == "layer_norm" else pick(n, "weight") for n in names]
    (layer_norm_rows(x64, weights, [pick(n, "bias") for n in names], norm.eps) * upstream).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.tensor(site, "weight").grad[slot].double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert not method.tensor(site, "weight").grad[0].any()  # the null slot is the backbone's: never trained
