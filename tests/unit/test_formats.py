"""PEFT and AdapterHub checkpoints loaded into chorus: mixed-batch logits against the checkpoints' own models."""

import json

import pytest
import torch
import torch.nn.functional as F

from chorus.backends.engine import build_model
from chorus.backends.formats import TaskHead, detect_format, load_any, write_head
from chorus.backends.reference import reference_logits
from chorus.backends.task_files import random_task, save_task
from chorus.errors import TaskFileError
from tests.unit.tiny import TINY, random_batch

peft = pytest.importorskip("peft")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

SITES = TINY.linear_sites()
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    model = build_model(config=TINY, capacity=4, max_rank=8)
    return {k: v.detach().clone() for k, v in model.encoder.hf_parameter_map().items()}


def hf_bert(backbone):
    model = BertModel(BertConfig(**TINY.to_hf()), add_pooling_layer=False)
    missing, _ = model.load_state_dict(backbone, strict=False)
    assert not [m for m in missing if "position_ids" not in m]
    return model.eval()


def randomize(model, names, seed, scale=0.3, offset=0.0):
    """PEFT initialises lora_B / ia3_l to the identity: give the adapter's tensors random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(offset + scale * torch.randn(p.shape, generator=g))


def random_head(seed, n=len(LABELS)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY.hidden_size, generator=g) * 0.5, torch.randn(n, generator=g) * 0.1


def mean_pooled_logits(model, ids, mask, W, b):
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
    w = mask.unsqueeze(-1).float()
    return ((hidden * w).sum(1) / w.sum(1)) @ W.T + b


def check_mixed_batch(backbone, spec, own_logits, seed):
    """`spec` served in a batch mixed with other tasks: its rows match `own_logits(ids, mask)` (the checkpoint's own
    model), the other rows match chorus's reference."""
    model = build_model(config=TINY, capacity=4, max_rank=8)
    model.encoder.load_hf_state_dict(backbone)
    others = [random_task("other_lora", TINY.hidden_size, SITES, {"lora": {"r": 2, "alpha": 4}}, seed=7, scale=0.2),
              random_task("other_bitfit", TINY.hidden_size, SITES, {"bitfit": {}}, seed=8, scale=0.2)]
    for s in [spec, *others]:
        model.bank.add(s)
    ids, mask = random_batch(9, 12, seed, shortest=2)
    which = [spec, others[0], spec, others[1], spec, spec, others[0], others[1], spec]
    with torch.no_grad():
        got = model(ids, mask, model.bank.row_tasks([s.name for s in which]))
    want = own_logits(ids, mask)
    for i, s in enumerate(which):
        n = len(s.labels)
        if s is spec:
            torch.testing.assert_close(got[i, :n], want[i], rtol=1e-4, atol=1e-5)
        else:
            ref = reference_logits(TINY, backbone, s, ids[i : i + 1], mask[i : i + 1])[0]
            torch.testing.assert_close(got[i, :n], ref, rtol=1e-4, atol=1e-5)


# -- PEFT ---------------------------------------------------------------------------------------------------------
LORA_CONFIGS = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["query", "key", "output.dense"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                     rank_pattern={"value": 2}, alpha_pattern={"intermediate.dense": 3}),
}


@pytest.mark.parametrize("which,merged", [("qv_r4", False), ("rslora", False), ("patterns", False), ("patterns", True)])
def test_peft_lora_matches_peft_model(tmp_path, backbone, which, merged):
    model = peft.get_peft_model(hf_bert(backbone), peft.LoraConfig(**LORA_CONFIGS[which]))
    randomize(model, ["lora_A", "lora_B"], seed=1)
    model.save_pretrained(tmp_path)
    W, b = random_head(2)
    write_head(tmp_path, LABELS, W, b)
    assert detect_format(tmp_path) == "peft"
    spec = load_any(tmp_path, "peft_lora", sites=SITES)
    assert spec.pet["lora"]["r"] == (4 if which != "rslora" else 8)
    own = model.merge_and_unload() if merged else model
    check_mixed_batch(backbone, spec, lambda ids, mask: mean_pooled_logits(own.eval(), ids, mask, W, b), seed=3)


def test_peft_ia3_matches_peft_model(tmp_path, backbone):
    config = peft.IA3Config(target_modules=r".*\.(key|value|layer\.\d+\.output\.dense)",
                            feedforward_modules=r".*layer\.\d+\.output\.dense")
    model = peft.get_peft_model(hf_bert(backbone), config)
    randomize(model, ["ia3_l"], seed=4, offset=1.0)
    model.save_pretrained(tmp_path)
    W, b = random_head(5)
    write_head(tmp_path, LABELS, W, b)
    spec = load_any(tmp_path, "peft_ia3", sites=SITES)
    assert spec.pet == {"ia3": {"target_modules": ["attention.self.key", "attention.self.value", "output.dense"]}}
    check_mixed_batch(backbone, spec, lambda ids, mask: mean_pooled_logits(model.eval(), ids, mask, W, b), seed=6)


@pytest.mark.parametrize("targets,sites", [
    (["LayerNorm"], 1 + 2 * TINY.num_layers),  # every LayerNorm: LN-tuning as its paper does it
    (["attention.output.LayerNorm"], TINY.num_layers),  # some: the rest stay the backbone's for its rows
])
def test_peft_ln_tuning_matches_peft_model(tmp_path, backbone, targets, sites):
    model = peft.get_peft_model(hf_bert(backbone), peft.LNTuningConfig(target_modules=targets))
    randomize(model, ["ln_tuning_layers.default.weight"], seed=11, offset=1.0)
    randomize(model, ["ln_tuning_layers.default.bias"], seed=12)
    model.save_pretrained(tmp_path)
    W, b = random_head(13)
    write_head(tmp_path, LABELS, W, b)
    spec = load_any(tmp_path, "peft_ln", sites=SITES)
    assert list(spec.pet) == ["layer_norm"]
    assert len([k for k in spec.tensors if k.endswith("LayerNorm.weight")]) == sites
    check_mixed_batch(backbone, spec, lambda ids, mask: mean_pooled_logits(model.eval(), ids, mask, W, b), seed=14)


@pytest.fixture
def peft_ln_dir(tmp_path, backbone):
    model = peft.get_peft_model(hf_bert(backbone), peft.LNTuningConfig(target_modules=["LayerNorm"]))
    model.save_pretrained(tmp_path)
    write_head(tmp_path, LABELS, *random_head(0))
    return tmp_path


LN = "base_model.model.encoder.layer.1.output.LayerNorm.ln_tuning_layers"


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.__setitem__(f"{LN}.weight", torch.ones(31)),
     r"adapter_model.safetensors tensor '.*layer.1.output.LayerNorm.ln_tuning_layers.weight' \(as chorus's weight: "
     r"shape \(31,\)\).*LayerNorm of 32 features.*needs \(32,\)"),
    (lambda s: s.__setitem__(f"{LN}.bias", torch.zeros(1, 32)), r"ln_tuning_layers.bias.*shape \(1, 32\).*\(32,\)"),
    (lambda s: s.pop(f"{LN}.bias"), r"layer.1.output.LayerNorm.ln_tuning_layers.weight' but lacks the bias"),
    (lambda s: s.update({k.replace("layer.1", "layer.4"): v.clone() for k, v in s.items() if "layer.1.output" in k}),
     r"layer.4.output.LayerNorm.ln_tuning_layers.*adapts 'encoder.layer.4.output.LayerNorm'.*backbone has 2 layers"),
    (lambda s: s.update({"base_model.model.encoder.layer.0.attention.self.query.ln_tuning_layers.weight":
                         torch.ones(32, 32)}), r"LN tuning of 'encoder.layer.0.attention.self.query'.*not one of"),
    (lambda s: s.update({"base_model.model.encoder.layer.0.intermediate.LayerNorm.ln_tuning_layers.weight":
                         torch.ones(32)}), r"LN tuning of 'encoder.layer.0.intermediate.LayerNorm'"),
    (lambda s: s.update({f"{Q}.lora_A.weight": torch.zeros(4, 32)}), r"lora_A.weight.*not a LN_TUNING tensor"),
])
def test_malformed_peft_ln_tuning_checkpoints_are_refused(peft_ln_dir, mutate, match):
    edit_tensors(peft_ln_dir, mutate)
    with pytest.raises(TaskFileError, match=match):
        load_any(peft_ln_dir, "bad", sites=SITES)


def test_peft_ln_tuning_shapes_are_checked_by_the_bank_without_sites(peft_ln_dir, backbone):
    edit_tensors(peft_ln_dir, lambda s: s.__setitem__(f"{LN}.weight", torch.ones(31)))
    spec = load_any(peft_ln_dir, "bad")  # no backbone given: the bank checks when the task is added
    model = build_model(config=TINY, capacity=2)
    with pytest.raises(TaskFileError, match=r"'encoder.layer.1.output.LayerNorm.weight' has shape \(31,\).*\(32,\)"):
        model.bank.add(spec)


def test_peft_default_ia3_for_bert_is_refused_by_site(tmp_path, backbone):
    model = peft.get_peft_model(hf_bert(backbone), peft.IA3Config())  # also scales attention.output.dense's input
    model.save_pretrained(tmp_path)
    write_head(tmp_path, LABELS, *random_head(0))
    with pytest.raises(TaskFileError, match=r"adapter_model.safetensors.*attention\.output\.dense\.ia3_l.*input"):
        load_any(tmp_path, "ia3_default")


def test_peft_sequence_classifier_needs_a_statement_of_pooling(tmp_path, backbone):
    hf = BertForSequenceClassification(BertConfig(**TINY.to_hf(), num_labels=3))
    model = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"))
    randomize(model, ["lora_B"], seed=1)
    model.save_pretrained(tmp_path)
    with pytest.raises(TaskFileError, match=r"classifier.*pooler output.*mean-pooled"):
        load_any(tmp_path, "seq_cls")
    write_head(tmp_path, LABELS)  # "this classifier was trained on mean-pooled tokens": take it from the checkpoint
    spec = load_any(tmp_path, "seq_cls", sites=SITES)
    torch.testing.assert_close(spec.tensors["classifier.weight"], hf.classifier.weight.detach())
    # a head given directly wins, and its labels with it
    W, b = random_head(3, n=2)
    spec = load_any(tmp_path, "seq_cls", head=TaskHead(["a", "b"], W, b))
    assert spec.labels == ["a", "b"] and torch.equal(spec.tensors["classifier.weight"], W)


# -- AdapterHub -------------------------------------------------------------------------------------------------------
def bn_config(**over):
    """The `config` AdapterHub 1.3.0 saves for a double_seq_bn (Houlsby) adapter, with changes."""
    cfg = {"architecture": None, "mh_adapter": True, "output_adapter": True, "reduction_factor": 4,
           "non_linearity": "relu", "original_ln_before": False, "original_ln_after": True, "ln_before": False,
           "ln_after": False, "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0,
           "use_gating": False, "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
           "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
           "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False,
           "shared_phm_rule": True, "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001,
           "learn_phm": True, "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True,
           "stochastic_depth": 0.0}
    return {**cfg, **over}


def write_adapterhub(path, config, m=8, seed=0, binary=False, name="sst"):
    """An AdapterHub checkpoint as `model.save_adapter` writes it for a BertAdapterModel (`bert.` prefix)."""
    from safetensors.torch import save_file

    path.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    where = ["attention.output", "output"] if config.get("mh_adapter", True) else ["output"]
    state = {}
    for layer in range(TINY.num_layers):
        for w in where:
            p = f"bert.encoder.layer.{layer}.{w}.adapters.{name}"
            state.update({f"{p}.adapter_down.0.weight": rand(m, TINY.hidden_size), f"{p}.adapter_down.0.bias": rand(m),
                          f"{p}.adapter_up.weight": rand(TINY.hidden_size, m),
                          f"{p}.adapter_up.bias": rand(TINY.hidden_size)})
    meta = {"model_type": "bert", "hidden_size": TINY.hidden_size, "name": name, "model_name": "tiny-bert",
            "model_class": "BertAdapterModel", "config": config, "version": "adapters.1.3.0"}
    (path / "adapter_config.json").write_text(json.dumps(meta))
    if binary:
        torch.save(state, path / "pytorch_adapter.bin")
    else:
        save_file(state, path / "adapter.safetensors")
    return state


def adapterhub_logits(backbone, config, state, ids, mask, W, b, name="sst"):
    """AdapterHub's bottleneck layer (`Adapter.pre_forward`, `forward`, `post_forward`) on a plain BertModel."""
    model = hf_bert(backbone)
    act = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}[config["non_linearity"]]

    def hook_for(prefix):
        def hook(module, args, kwargs, output):
            hidden, input_tensor = (list(args) + [kwargs.get("hidden_states"), kwargs.get("input_tensor")])[:2]
            h = module.dense(hidden)
            residual = h  # residual_before_ln=True
            x = module.LayerNorm(h + input_tensor) if config["original_ln_before"] else h
            t = {k: state[f"{prefix}.adapters.{name}.{k}"] for k in
                 ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")}
            up = act(x @ t["adapter_down.0.weight"].T + t["adapter_down.0.bias"]) @ t["adapter_up.weight"].T
            out = (up + t["adapter_up.bias"]) * config["scaling"] + residual
            return module.LayerNorm(out + input_tensor)  # original_ln_after=True

        return hook

    for layer in range(TINY.num_layers):
        for w in (["attention.output", "output"] if config["mh_adapter"] else ["output"]):
            model.get_submodule(f"encoder.layer.{layer}.{w}").register_forward_hook(
                hook_for(f"bert.encoder.layer.{layer}.{w}"), with_kwargs=True)
    return mean_pooled_logits(model, ids, mask, W, b)


@pytest.mark.parametrize("config,binary", [
    (bn_config(), False),  # Houlsby placement, relu
    (bn_config(scaling=0.5, non_linearity="gelu"), True),  # scaling folded into up; pytorch_adapter.bin
    (bn_config(mh_adapter=False, reduction_factor=16), False),  # a seq_bn after the FFN only, original_ln_before=False
])
def test_adapterhub_bottleneck_matches_adapterhub_semantics(tmp_path, backbone, config, binary):
    state = write_adapterhub(tmp_path, config, binary=binary)
    W, b = random_head(9)
    write_head(tmp_path, LABELS, W, b)
    assert detect_format(tmp_path) == "adapterhub"
    spec = load_any(tmp_path, "hub", sites=SITES)
    assert spec.pet["adapter"] == {"bottleneck": 8, "activation": config["non_linearity"],
                                   "placement": "houlsby" if config["mh_adapter"] else "pfeiffer"}
    check_mixed_batch(backbone, spec, lambda ids, mask: adapterhub_logits(backbone, config, state, ids, mask, W, b),
                      seed=10)


# -- chorus-task/1 through load_any ------------------------------------------------------------------------------------
def test_load_any_reads_chorus_tasks(tmp_path):
    spec = random_task("native", TINY.hidden_size, SITES, {"lora": {"r": 2, "alpha": 4}}, seed=1)
    save_task(spec, tmp_path / "native")
    assert detect_format(tmp_path / "native") == "chorus-task/1"
    back = load_any(tmp_path / "native", "native")
    assert back.pet == spec.pet and all(torch.equal(back.tensors[k], spec.tensors[k]) for k in spec.tensors)


# -- malformed files ---------------------------------------------------------------------------------------------------
@pytest.fixture
def peft_dir(tmp_path, backbone):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(hf_bert(backbone), config)
    model.save_pretrained(tmp_path)
    write_head(tmp_path, LABELS, *random_head(0))
    return tmp_path


def edit_config(path, **changes):
    f = path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def edit_tensors(path, change, file="adapter_model.safetensors"):
    from safetensors.torch import load_file, save_file

    state = load_file(path / file)
    change(state)
    save_file(state, path / file)


Q = "base_model.model.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("mutate,match", [
    (lambda p: edit_tensors(p, lambda s: s.__setitem__(f"{Q}.lora_A.weight", torch.zeros(3, 32))),
     r"adapter_model.safetensors.*do not pair|adapter_model.safetensors.*\(3, 32\)"),
    (lambda p: edit_tensors(p, lambda s: s.update({f"{Q}.lora_A.weight": torch.zeros(3, 32),
                                                    f"{Q}.lora_B.weight": torch.zeros(32, 3)})),
     r"adapter_model.safetensors.*lora_A.weight.*shape \(3, 32\).*rank 4"),
    (lambda p: edit_tensors(p, lambda s: s.pop(f"{Q}.lora_B.weight")), r"lora_A.weight.*lacks its lora_B"),
    (lambda p: edit_tensors(p, lambda s: s.update({f"{Q}.lora_A.weight": torch.zeros(4, 48)})),
     r"adapter_model.safetensors.*query.lora_A.weight.*\(4, 48\).*needs \(4, 32\)"),
    (lambda p: edit_tensors(p, lambda s: s.update({
        "base_model.model.encoder.layer.5.attention.self.query.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.encoder.layer.5.attention.self.query.lora_B.weight": torch.zeros(32, 4)})),
     r"layer.5.*backbone has 2 layers"),
    (lambda p: edit_tensors(p, lambda s: s.update({
        "base_model.model.embeddings.word_embeddings.lora_embedding_A": torch.zeros(4, 120)})),
     r"lora_embedding_A.*not a LORA tensor"),
    (lambda p: edit_tensors(p, lambda s: s.update({"base_model.model.pooler.dense.lora_A.weight": torch.zeros(4, 32)})),
     r"pooler.*encoder's linears"),
    (lambda p: edit_config(p, use_dora=True), "DoRA"),
    (lambda p: edit_config(p, bias="all"), r"bias='all'.*BitFit"),
    (lambda p: edit_config(p, init_lora_weights="pissa"), "pissa.*base model"),
    (lambda p: edit_config(p, some_new_option=3), "some_new_option.*does not know"),
    (lambda p: edit_config(p, peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING'"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors"),
    (lambda p: (p / "adapter_config.json").write_text("{"), "adapter_config.json is not valid JSON"),
    (lambda p: [(p / f).unlink() for f in ("chorus_head.json", "chorus_head.safetensors")], "no labels or classifier"),
    (lambda p: (p / "chorus_head.json").write_text('{"labels": ["a", "b"], "pooling": "cls"}'),
     "pooling 'cls'.*mean-pooled"),
    (lambda p: (p / "chorus_head.json").write_text('{"labels": ["a", "b"], "pooling": "mean"}'),
     r"chorus_head.safetensors.*classifier.weight.*\(3, 32\), expected \(2, 32\)"),
])
def test_malformed_peft_checkpoints_are_refused(peft_dir, mutate, match):
    mutate(peft_dir)
    with pytest.raises(TaskFileError, match=match):
        load_any(peft_dir, "bad", sites=SITES)


def narrowed(state, prefix, m):
    """One site's adapter with bottleneck m."""
    return {f"{prefix}.adapter_down.0.weight": state[f"{prefix}.adapter_down.0.weight"][:m],
            f"{prefix}.adapter_down.0.bias": state[f"{prefix}.adapter_down.0.bias"][:m],
            f"{prefix}.adapter_up.weight": state[f"{prefix}.adapter_up.weight"][:, :m].contiguous()}


@pytest.mark.parametrize("config,mutate,match", [
    (bn_config(original_ln_before=True, mh_adapter=False), None, "original_ln_before=True.*Pfeiffer"),
    (bn_config(non_linearity="swish"), None, "non_linearity 'swish'"),
    (bn_config(use_gating=True), None, "use_gating=True.*gate"),
    (bn_config(phm_layer=True), None, "phm_layer=True.*Compacter"),
    (bn_config(ln_after=True), None, "ln_after=True"),
    ({"architecture": "lora", "r": 8}, None, "'lora' adapter"),
    (bn_config(mh_adapter=True, output_adapter=False), None, "after attention only"),
    (bn_config(), lambda s: s.pop("bert.encoder.layer.1.output.adapters.sst.adapter_up.bias"),
     r"adapter.safetensors.*layer.1.output.dense.*lacks.*adapter_up.bias"),
    (bn_config(), lambda s: s.__setitem__("bert.encoder.layer.0.output.adapters.sst.adapter_up.weight",
                                          torch.zeros(32, 5)),
     r"adapter.safetensors.*adapter_up.weight.*\(32, 5\), expected \(32, 8\)"),
    (bn_config(), lambda s: s.update(narrowed(s, "bert.encoder.layer.1.output.adapters.sst", 4)),
     r"bottleneck sizes \[4, 8\]"),
    (bn_config(), lambda s: s.__setitem__("bert.encoder.layer.0.output.adapters.other.adapter_up.bias",
                                          torch.zeros(32)), "belongs to adapter 'other'"),
])
def test_malformed_adapterhub_checkpoints_are_refused(tmp_path, config, mutate, match):
    write_adapterhub(tmp_path, config)
    write_head(tmp_path, LABELS, *random_head(0))
    if mutate:
        edit_tensors(tmp_path, mutate, "adapter.safetensors")
    with pytest.raises(TaskFileError, match=match):
        load_any(tmp_path, "bad", sites=SITES)


class NotATensor:  # a pickle whose loading would run this module's code
    pass


def test_adapterhub_bin_is_read_without_unpickling_code(tmp_path):
    write_adapterhub(tmp_path, bn_config(), binary=True)
    write_head(tmp_path, LABELS, *random_head(0))
    torch.save({"x": NotATensor()}, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(TaskFileError, match="pytorch_adapter.bin.*weights_only=True"):
        load_any(tmp_path, "evil")


def test_adapterhub_prediction_head_is_not_taken(tmp_path):
    write_adapterhub(tmp_path, bn_config())
    (tmp_path / "head_config.json").write_text("{}")
    with pytest.raises(TaskFileError, match=r"head_config.json.*\[CLS\]"):
        load_any(tmp_path, "hub")


@pytest.mark.parametrize("files,match", [({}, "holds neither"), ({"adapter_config.json": "{}"}, "neither PEFT")])
def test_unknown_directories_are_refused(tmp_path, files, match):
    for f, text in files.items():
        (tmp_path / f).write_text(text)
    with pytest.raises(TaskFileError, match=match):
        load_any(tmp_path, "x")
