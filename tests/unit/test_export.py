"""ONNX export: the gathered PET ops against the fast path, onnxruntime against PyTorch over mixed batches of every PET
type and several shapes, a bank that changes under a bound session, students per prefix k, TensorRT's skip, the CLI."""

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from chorus.backends.engine import Engine, build_model
from chorus.backends.pet import GatheredRows
from chorus.backends.students import SharedEmbeddings, Student, StudentConfig, StudentFiles, save_students, stack_students
from chorus.backends.task_files import random_task, save_task
from chorus.errors import InvalidInput, MissingDependency, TaskFileError, UnknownTask
from chorus.export.backbone import ExportedBackbone, save_backbone_export
from chorus.export.ort import OrtBackbone, OrtEngine, providers_for
from chorus.export.students import OrtStudents, export_students
from tests.unit.tiny import TINY, random_batch, write_tiny_bert


# Every PET type, with mixed LoRA ranks, both adapter placements and activations, a task of three methods, and
# per-task LayerNorms (every norm, some norms, and beside an adapter).
PETS = {
    "lora_r2": {"lora": {"r": 2, "alpha": 4}},
    "lora_r8_q": {"lora": {"r": 8, "alpha": 8, "target_modules": ["query"]}},
    "bitfit": {"bitfit": {}},
    "houlsby_gelu": {"adapter": {"bottleneck": 8, "activation": "gelu", "placement": "houlsby"}},
    "pfeiffer_relu": {"adapter": {"bottleneck": 3, "activation": "relu", "placement": "pfeiffer"}},
    "ia3": {"ia3": {}},
    "maskbert": {"maskbert": {"density": 0.1}},
    "diff_pruning": {"diff_pruning": {"density": 0.05}},
    "lora_ia3_bitfit": {"lora": {"r": 4, "alpha": 4}, "ia3": {}, "bitfit": {}},
    "layer_norm": {"layer_norm": {}},
    "layer_norm_some": {"layer_norm": {"target_modules": ["embeddings.LayerNorm", "layer.1.output.LayerNorm"]}},
    "houlsby_layer_norm": {"adapter": {"bottleneck": 4, "activation": "relu", "placement": "houlsby"},
                           "layer_norm": {}},
}
LABELS = {name: [f"l{j}" for j in range(2 + i % 3)] for i, name in enumerate(PETS)}  # 2-4 labels


def task(name, seed=0, pet=None):
    return random_task(name, TINY.hidden_size, TINY.linear_sites(), pet or PETS[name], LABELS.get(name),
                       seed=seed, scale=0.2)



def as_rows(ids, mask):
    return [r[: int(m.sum())].tolist() for r, m in zip(ids, mask)]


def mixed_tasks(B, seed):
    names = list(PETS)
    g = torch.Generator().manual_seed(seed)
    return [names[i] for i in torch.randint(0, len(names), (B,), generator=g).tolist()]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A tiny random BERT directory with a real tokenizer file (its ids are not used: rows come as token ids)."""
    path = write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), TINY)
    return path


@pytest.fixture(scope="module")
def engine(backbone_dir):
    e = OrtEngine(backbone_dir, capacity=4, max_rank=8)
    for i, name in enumerate(PETS):
        e.add_task(task(name, seed=i))
    e.refresh()
    return e


def torch_logits(engine, ids, mask, tasks):
    with torch.no_grad():
        return engine.model(ids, mask, engine.bank.row_tasks(tasks)).numpy()


def assert_same_logits(got, want, msg=""):
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{msg}: -inf padding differs"
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5, err_msg=msg)


# -- the gathered PET ops, in PyTorch -------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,seed", [(1, 4, 0), (9, 13, 1), (24, 7, 2)])
def test_gathered_ops_match_the_fast_path(engine, B, T, seed):
    ids, mask = random_batch(B, T, seed)
    tasks = mixed_tasks(B, seed)
    rows = engine.bank.row_tasks(tasks)
    with torch.no_grad():
        gathered = engine.model(ids, mask, GatheredRows(rows.slots, rows.head_slots, engine.bank.bank_tensors()))
    assert_same_logits(gathered.numpy(), torch_logits(engine, ids, mask, tasks), "gathered vs fast")


# -- onnxruntime against PyTorch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,seed", [(1, 1, 0), (1, 30, 1), (5, 9, 2), (17, 16, 3), (40, 3, 4)])
def test_ort_engine_matches_pytorch_on_mixed_batches(engine, B, T, seed):
    ids, mask = random_batch(B, T, seed)
    tasks = mixed_tasks(B, seed + 50)
    got = engine.run(as_rows(ids, mask), tasks)
    want = torch_logits(engine, ids, mask, tasks)
    assert_same_logits(got.logits, want, f"B={B} T={T}")
    assert got.labels == [LABELS[t][int(np.argmax(w[: len(LABELS[t])]))] for t, w in zip(tasks, want)]
    assert got.label_names == [LABELS[t] for t in tasks]
    assert engine.ort.exports == 1, "a new batch or sequence size re-exported: an axis is not dynamic"


def test_ort_engine_answers_what_the_pytorch_engine_answers(engine, backbone_dir):
    plain = Engine(backbone_dir, capacity=4, max_rank=8)
    for i, name in enumerate(PETS):
        plain.add_task(task(name, seed=i))
    ids, mask = random_batch(12, 11, 9)
    tasks = mixed_tasks(12, 9)
    a, b = engine.run(as_rows(ids, mask), tasks), plain.run(as_rows(ids, mask), tasks)
    assert_same_logits(a.logits, b.logits)
    assert a.labels == b.labels and a.label_names == b.label_names


def test_exported_files_run_in_plain_onnxruntime(engine, tmp_path):
    save_backbone_export(engine.model, tmp_path / "exp")
    exported = ExportedBackbone.read(tmp_path / "exp")
    graph = onnx.load(str(exported.model_path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["slots.lora"] == ["batch"]
    assert dims["slots.layer_norm"] == ["batch"]
    assert dims["layer_norm.embeddings__LayerNorm.weight"] == ["layer_norm_capacity", TINY.hidden_size]
    assert dims["head.weight"][0] == "head_capacity" and dims["lora.scaling"] == ["lora_capacity"]
    assert not graph.graph.initializer or all(not i.name.startswith(("lora.", "head.")) for i in graph.graph.initializer)
    session = ort.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    for B, T, seed in [(3, 5, 0), (11, 21, 1)]:
        ids, mask = random_batch(B, T, seed)
        tasks = mixed_tasks(B, seed)
        got = session.run(["logits"], exported.feeds(ids.numpy(), mask.numpy(), tasks))[0]
        assert_same_logits(got, torch_logits(engine, ids, mask, tasks), f"files B={B} T={T}")
    with pytest.raises(InvalidInput, match="unknown tasks"):
        exported.feeds(ids.numpy(), mask.numpy(), ["nope"] * B)
    with pytest.raises(TaskFileError, match="is missing"):
        ExportedBackbone.read(tmp_path)


# -- a bank that changes under a bound session ----------------------------------------------------------------------
def test_tasks_added_replaced_and_removed_after_binding_are_reflected(backbone_dir):
    e = OrtEngine(backbone_dir, capacity=2, max_rank=8)
    e.add_task(task("lora_r2", seed=0))
    ids, mask = random_batch(6, 8, 0)
    rows = as_rows(ids, mask)
    e.run(rows, ["lora_r2"] * 6)
    assert e.ort.exports == 1

    def check(tasks):
        assert_same_logits(e.run(rows, tasks).logits, torch_logits(e, ids, mask, tasks), str(tasks))

    e.add_task(task("lora_r8_q", seed=1))  # same method, sites already in the graph: bound again, not exported
    e.add_task(task("other", seed=2, pet=PETS["lora_r2"]))  # past capacity 2: the LoRA bank and heads grow
    check(["lora_r2", "lora_r8_q", "other", "lora_r8_q", "lora_r2", "other"])
    assert e.ort.exports == 1, "a task of known sites (and bank growth) must not re-export"

    e.add_task(task("diff_pruning", seed=3))  # a new method: new graph inputs, exported again
    e.add_task(task("maskbert", seed=4))
    check(["diff_pruning", "lora_r2", "maskbert", "other", "diff_pruning", "maskbert"])
    assert e.ort.exports == 2

    e.add_task(task("diff_pruning", seed=5, pet={"diff_pruning": {"density": 0.3}}), replace=True)  # max_nnz grows
    check(["diff_pruning"] * 6)
    assert e.ort.exports == 2, "a wider sparse site must only re-bind"

    e.add_task(task("layer_norm", seed=6))  # LayerNorm overrides: a new method, exported again
    check(["layer_norm", "lora_r2", "diff_pruning", "layer_norm", "other", "maskbert"])
    assert e.ort.exports == 3
    e.add_task(task("houlsby_layer_norm", seed=7))  # its norm sites are in the graph; the adapter's are not
    check(["houlsby_layer_norm", "layer_norm", "other", "houlsby_layer_norm", "lora_r2", "maskbert"])
    assert e.ort.exports == 4

    e.bank.remove("lora_r8_q")
    with pytest.raises(UnknownTask, match="unknown task 'lora_r8_q'"):
        e.run(rows, ["lora_r8_q"] * 6)
    check(["other", "lora_r2", "maskbert", "other", "diff_pruning", "lora_r2"])


def test_bad_input_is_refused_clearly(engine):
    with pytest.raises(InvalidInput, match="2 rows of tokens but 1 task names"):
        engine.run([[1, 2], [3]], ["bitfit"])
    with pytest.raises(UnknownTask, match=r"unknown task 'nope'; served tasks: \['bitfit'"):
        engine.run([[1, 2]], ["nope"])
    with pytest.raises(InvalidInput, match=r"row 1: token id 120 is outside the vocabulary \[0, 120\)"):
        engine.run([[1, 2], [3, 120]], ["bitfit", "ia3"])
    with pytest.raises(InvalidInput, match="no rows"):
        engine.run([], [])
    with pytest.raises(InvalidInput, match="65 token ids exceed the backbone's 64 positions"):
        engine.run([[1] * 65], ["bitfit"])
    half = build_model(config=TINY, capacity=2, dtype=torch.float16)
    with pytest.raises(InvalidInput, match="CPU provider runs float32 only"):
        OrtBackbone(half)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(MissingDependency, match="CUDAExecutionProvider comes with the onnxruntime-gpu package"):
            providers_for(torch.device("cpu"), ["CUDAExecutionProvider"])
        with pytest.raises(MissingDependency, match="install onnxruntime-gpu, or run on device='cpu'"):
            providers_for(torch.device("cuda"))


@pytest.mark.gpu
def test_cuda_provider_matches_pytorch_on_the_gpu():
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu")
    torch.manual_seed(0)
    model = build_model(config=TINY, capacity=4, max_rank=8, device="cuda")
    for i, name in enumerate(PETS):
        model.bank.add(task(name, seed=i))
    runner = OrtBackbone(model)
    assert runner.providers[0] == "CUDAExecutionProvider"
    for B, T, seed in [(1, 3, 0), (19, 12, 1)]:
        ids, mask = random_batch(B, T, seed)
        tasks = mixed_tasks(B, seed)
        rows = model.bank.row_tasks(tasks)
        with torch.no_grad():
            want = model(ids.cuda(), mask.cuda(), rows).cpu().numpy()
        assert_same_logits(runner(ids.cuda(), mask.cuda(), rows), want, f"cuda B={B} T={T}")


# -- students -------------------------------------------------------------------------------------------------------
def student_group(K=3, layers=2, labels=3, seed=0):
    from chorus.backends.students import StudentGroup

    g = torch.Generator().manual_seed(seed)
    C = TINY.hidden_size
    emb = SharedEmbeddings(torch.randn(TINY.vocab_size, C, generator=g), torch.randn(TINY.max_positions, C, generator=g),
                           torch.randn(2, C, generator=g), 1 + 0.1 * torch.randn(C, generator=g),
                           0.1 * torch.randn(C, generator=g), 1e-12)
    cfg = StudentConfig(num_students=K, num_layers=layers, hidden_size=C, num_heads=4, intermediate_size=48,
                        num_labels=labels, dropout=0.0)
    torch.manual_seed(seed)
    students = [Student(cfg).eval() for _ in range(K)]
    alphas = torch.rand(K, generator=g) + 0.5
    return StudentGroup(cfg, emb, stack_students(students), alphas).eval(), stack_students(students), alphas


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    group, _, _ = student_group()
    out = export_students(group, tmp_path_factory.mktemp("students"), ["a", "b", "c"])
    return group, OrtStudents(out)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 9), (13, 33)])
def test_student_prefixes_match_pytorch(students, k, B, T):
    group, runner = students
    ids, mask = random_batch(B, T, seed=B * 10 + T + k)
    with torch.no_grad():
        want = group(ids, mask, k).numpy()
    np.testing.assert_allclose(runner.logits(ids.numpy(), mask.numpy(), k), want, rtol=1e-4, atol=1e-5)
    got = runner.run(as_rows(ids, mask), k)
    np.testing.assert_allclose(got.logits, want, rtol=1e-4, atol=1e-5)
    assert got.labels == [["a", "b", "c"][i] for i in want.argmax(1)] and got.label_names[0] == ["a", "b", "c"]


def test_student_runner_refuses_bad_input(students, tmp_path):
    group, runner = students
    with pytest.raises(InvalidInput, match=r"k=4: this export holds student prefixes k in \[1, 2, 3\]"):
        runner.run([[1, 2]], k=4)
    with pytest.raises(InvalidInput, match="token id 500 is outside the vocabulary"):
        runner.run([[1, 500]])
    with pytest.raises(InvalidInput, match="no empty rows"):
        runner.run([[1], []])
    with pytest.raises(ValueError, match="k=5: a student group of 3 runs a prefix of 1..3"):
        export_students(group, tmp_path / "s", ["a", "b", "c"], ks=[5])
    with pytest.raises(InvalidInput, match="2 labels"):
        export_students(group, tmp_path / "s", ["a", "b"])
    with pytest.raises(TaskFileError, match="not a student export"):
        OrtStudents(tmp_path)


# -- TensorRT -------------------------------------------------------------------------------------------------------
def test_tensorrt_path_says_it_is_not_installed(students, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: its engines are built, not skipped")
    from chorus.export.tensorrt import build_engine, shape_ranges

    _, runner = students
    onnx_path = runner.path / "students_k2.onnx"
    ranges = shape_ranges(onnx_path, {}, max_batch=8, max_sequence=32)
    assert ranges["input_ids"] == ((1, 1), (16, 64), (8, 32))
    with pytest.raises(MissingDependency, match="tensorrt is not installed"):
        build_engine(onnx_path, tmp_path / "students_k2.plan", ranges)


# -- the CLI --------------------------------------------------------------------------------------------------------
def test_chorus_export_writes_a_model_directorys_backbone_and_a_tasks_students(backbone_dir, tmp_path, capsys):
    from chorus.cli import main

    model_dir = tmp_path / "chorus"
    tasks = {"bitfit": "tasks/bitfit", "houlsby_gelu": "tasks/houlsby_gelu", "maskbert": "tasks/maskbert"}
    for i, (name, path) in enumerate(tasks.items()):
        save_task(task(name, seed=i), model_dir / path)
    params = {"backbone": str(backbone_dir), "max_rank": "8", "tasks": json.dumps(tasks)}
    entries = ",\n".join(f'  {{ key: "{k}", value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items())
    (model_dir / "config.pbtxt").write_text(f'name: "chorus"\n# a comment\nparameters [\n{entries}\n]\n')

    assert main(["export", "--model-dir", str(model_dir), "--out", str(tmp_path / "b"), "--tensorrt"]) == 0
    printed = capsys.readouterr().out
    assert "backbone.onnx" in printed and "TensorRT skipped: tensorrt is not installed" in printed
    exported = ExportedBackbone.read(tmp_path / "b")
    assert sorted(exported.manifest["tasks"]) == sorted(tasks)
    ref = Engine(backbone_dir, max_rank=8)
    for name, path in tasks.items():
        ref.load_task(name, model_dir / path)
    ids, mask = random_batch(5, 7, 0)
    names = ["bitfit", "maskbert", "houlsby_gelu", "bitfit", "maskbert"]
    session = ort.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], exported.feeds(ids.numpy(), mask.numpy(), names))[0]
    assert_same_logits(got, ref.run(as_rows(ids, mask), names).logits, "CLI export")

    group, tensors, alphas = student_group(K=2, labels=2)
    group.embeddings = SharedEmbeddings.from_encoder(ref.model.encoder)  # the students read the backbone's tables
    save_students(StudentFiles(group.cfg, ["neg", "pos"], tensors, alphas), model_dir / "students" / "bitfit")
    assert main(["export", "--model-dir", str(model_dir), "--students", "bitfit", "--k", "2",
                 "--out", str(tmp_path / "s")]) == 0
    runner = OrtStudents(tmp_path / "s")
    assert runner.ks == [2]
    with torch.no_grad():
        want = group(ids, mask, 2).numpy()
    np.testing.assert_allclose(runner.logits(ids.numpy(), mask.numpy()), want, rtol=1e-4, atol=1e-5)
    assert main(["export", "--model-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "config.pbtxt is missing" in capsys.readouterr().err
