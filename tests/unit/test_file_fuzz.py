"""Malformed and hostile task and student files: every reader refuses them with a chorus error naming the file, and a
refused task leaves the task bank as it was.

The fuzz tests start from real directories written by chorus (`save_task`, `save_students`), PEFT (`save_pretrained`)
and in AdapterHub's layout, and mutate one file each: truncation, byte flips, a rewritten safetensors header (dtypes,
shapes, offsets, names, the header's length) or JSON header (any value anywhere, non-objects, non-UTF-8 bytes). The
only outcomes allowed are a load that works or a `ChorusError`. The default run draws the same 40 examples per test
every time (under a minute on 2 cores); `CHORUS_FUZZ_EXAMPLES=2000` draws that many new ones.
"""

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes, save_file

from chorus.backends.engine import Engine
from chorus.backends.formats import load_any, write_head
from chorus.backends.students import (SharedEmbeddings, Student, StudentConfig, StudentFiles, read_students,
                                      save_students, stack_students)
from chorus.backends.task_files import load_task, random_task, save_task
from chorus.errors import ChorusError, InvalidInput, TaskFileError
from tests.unit.tiny import TINY, write_tiny_bert

SITES = TINY.linear_sites()
EXAMPLES = int(os.environ.get("CHORUS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="CHORUS_FUZZ_EXAMPLES" not in os.environ,  # the default run is the same every time
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TASK_PETS = {
    "lora_bitfit": {"lora": {"r": 4, "alpha": 8}, "bitfit": {}},
    "adapter_ia3": {"adapter": {"bottleneck": 4, "activation": "gelu"}, "ia3": {}},
    "sparse_norms": {"diff_pruning": {"density": 0.1}, "maskbert": {"density": 0.1}, "layer_norm": {}},
}
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                      "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64", "X9", ""]


# ---- the pristine directories ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An Engine on a tiny random backbone: what the Triton model loads task directories with."""
    return Engine(write_tiny_bert(tmp_path_factory.mktemp("backbone"), TINY), capacity=4, max_rank=8,
                  cuda_graphs=False)


@pytest.fixture(scope="module")
def pristine(engine, tmp_path_factory):
    """{kind: a directory as its writer leaves it}."""
    root = tmp_path_factory.mktemp("pristine")
    dirs = {}
    for i, (kind, pet) in enumerate(TASK_PETS.items()):
        dirs[kind] = save_task(random_task("t", TINY.hidden_size, SITES, pet, seed=i), root / kind)
    dirs["peft"] = _peft_dir(engine.model, root / "peft")
    dirs["adapterhub"] = _adapterhub_dir(root / "adapterhub")
    dirs["students"] = _students_dir(engine.model, root / "students")
    return dirs


def _head(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    write_head(path, ["neg", "pos"], torch.randn(2, TINY.hidden_size, generator=g), torch.randn(2, generator=g))


def _peft_dir(model, path: Path) -> Path:
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(**TINY.to_hf()), add_pooling_layer=False)
    bert.load_state_dict(model.encoder.hf_parameter_map(), strict=False)
    peft.get_peft_model(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
                        ).save_pretrained(path)
    _head(path, 1)
    return path


def _adapterhub_dir(path: Path) -> Path:
    """A Houlsby (double_seq_bn) bottleneck adapter as AdapterHub's `save_adapter` lays it out."""
    path.mkdir()
    g = torch.Generator().manual_seed(2)
    state = {}
    for layer in range(TINY.num_layers):
        for where in ("attention.output", "output"):
            p = f"bert.encoder.layer.{layer}.{where}.adapters.sst"
            state.update({f"{p}.adapter_down.0.weight": torch.randn(4, TINY.hidden_size, generator=g),
                          f"{p}.adapter_down.0.bias": torch.randn(4, generator=g),
                          f"{p}.adapter_up.weight": torch.randn(TINY.hidden_size, 4, generator=g),
                          f"{p}.adapter_up.bias": torch.randn(TINY.hidden_size, generator=g)})
    save_file(state, path / "adapter.safetensors")
    config = {"architecture": "bottleneck", "mh_adapter": True, "output_adapter": True, "reduction_factor": 8,
              "non_linearity": "relu", "original_ln_before": False, "original_ln_after": True, "scaling": 1.0}
    (path / "adapter_config.json").write_text(json.dumps({"name": "sst", "config": config,
                                                          "version": "adapters.1.3.0"}))
    _head(path, 3)
    return path


def _students_dir(model, path: Path) -> Path:
    cfg = StudentConfig(num_students=2, num_layers=1, hidden_size=TINY.hidden_size, num_heads=4,
                        intermediate_size=48, num_labels=2, dropout=0.0)
    torch.manual_seed(4)
    students = [Student(cfg).eval() for _ in range(cfg.num_students)]
    emb = SharedEmbeddings.from_encoder(model.encoder)
    prefixes = [{"k": k, "validation_accuracy": 0.8, "test_accuracy": 0.8} for k in (1, 2)]
    files = StudentFiles(cfg, ["neg", "pos"], stack_students(students), torch.tensor([1.0, 0.7]),
                         {"backbone": "tiny", "fingerprint": emb.fingerprint()}, prefixes,
                         {"teacher_accuracy": {"validation": 0.85}})
    return save_students(files, path)


# ---- loading, and the bank's state -----------------------------------------------------------------------------------
def bank_state(engine) -> tuple:
    bank = engine.bank
    return (sorted(bank.tasks), bank.version, sorted(bank.free_heads),
            {name: sorted(m.free) for name, m in bank.methods.items()})


def load(kind: str, path: Path, engine) -> None:
    """What serving does with such a directory: `Engine.load_task` (students: read them and build their group on the
    backbone's embeddings)."""
    if kind == "students":
        read_students(path).group(SharedEmbeddings.from_encoder(engine.model.encoder))
        return
    engine.load_task("t", path)
    engine.bank.remove("t")


def assert_broken_copy_refused(source: Path, target: Path, kind: str, breakage, what: str, match: str, engine) -> None:
    """A copy of `source` broken by `breakage` is refused with a TaskFileError matching `match`, the bank unchanged."""
    shutil.copytree(source, target)
    breakage(target)
    error = assert_refused_cleanly(kind, target, engine)
    assert isinstance(error, TaskFileError), f"{what}: loaded, or refused with {error!r}"
    assert re.search(match, str(error), re.S), f"{what}: {error}"


def assert_refused_cleanly(kind: str, path: Path, engine) -> ChorusError | None:
    """Loading works, or raises a ChorusError; either way the bank holds what it held before."""
    before = bank_state(engine)
    try:
        load(kind, path, engine)
        error = None
    except ChorusError as e:
        error = e
    after = bank_state(engine)
    assert after[0] == before[0] and after[2:] == before[2:], f"{kind}: the bank changed ({before} -> {after})"
    return error


def files_of(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file())


# ---- mutations -------------------------------------------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: object, body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                         st.sampled_from(["../../etc/passwd", "/dev/zero", "\ud800", "a\x00b", "C:\\x", "lora",
                                          "relu", "houlsby", "double_seq_bn", "LORA", "encoder.layer.0"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4)), max_leaves=12)


def _paths(node: object, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, at + (i,))
    return out


def _replace(node: object, at: tuple, value: object) -> object:
    if not at:
        return value
    node[at[0]] = _replace(node[at[0]], at[1:], value)
    return node


@st.composite
def mutations(draw, path: Path):
    """(file name, its new bytes): one file of the directory at `path`, mutated."""
    name = draw(st.sampled_from(files_of(path)))
    data = (path / name).read_bytes()
    structured = {".safetensors": ["header"], ".json": ["json"]}.get(Path(name).suffix, [])
    how = draw(st.sampled_from(["truncate", "flip", "replace", *structured]))
    if how == "truncate":
        return name, data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        return name, bytes(out)
    if how == "replace":  # the whole file: random bytes, other JSON, or a pickle where safetensors belongs
        kind = draw(st.sampled_from(["bytes", "json", "pickle"]))
        if kind == "bytes":
            return name, draw(st.binary(max_size=64))
        if kind == "json":
            return name, json.dumps(draw(json_values)).encode()
        with tempfile.TemporaryFile() as f:
            torch.save({"x": torch.zeros(2)}, f)
            f.seek(0)
            return name, f.read()
    if how == "json":
        doc = json.loads(data)
        at = draw(st.sampled_from(_paths(doc)))
        return name, json.dumps(_replace(doc, at, draw(json_values))).encode("utf-8", "surrogatepass")
    header, body = split_safetensors(data)
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[key]
    change = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "length", "metadata"]))
    if change == "dtype":
        entry["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES))
    elif change == "shape":
        entry["shape"] = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 32, 2**31, 2**40, 2**63 - 1]), max_size=4))
    elif change == "offsets":
        entry["data_offsets"] = [draw(st.sampled_from([0, 4, 8, len(body), 2**40, 2**64 - 1])) for _ in range(2)]
    elif change == "rename":
        header[draw(st.sampled_from(["../../etc/passwd", "classifier.weight", "", "encoder.layer.9.output.dense.x",
                                     key + ".lora_A", "\u00e9"]))] = header.pop(key)
    elif change == "drop":
        del header[key]
    elif change == "metadata":
        header["__metadata__"] = draw(json_values)
    if change == "length":
        return name, join_safetensors(header, body, draw(st.sampled_from([0, 1, 7, 2**20, 2**63, 2**64 - 1])))
    return name, join_safetensors(header, body)


def mutated_copy(pristine_dir: Path, work: Path, name: str, data: bytes) -> Path:
    target = work / pristine_dir.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine_dir, target)
    (target / name).write_bytes(data)
    return target


# ---- fuzz ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*TASK_PETS, "peft", "adapterhub", "students"])
def test_fuzzed_files_load_or_are_refused_with_a_chorus_error(kind, pristine, engine):
    source = pristine[kind]
    assert assert_refused_cleanly(kind, source, engine) is None  # the pristine directory loads

    @FUZZ
    @given(mutation=mutations(source))
    def check(mutation):
        name, data = mutation
        with tempfile.TemporaryDirectory() as work:
            target = mutated_copy(source, Path(work), name, data)
            error = assert_refused_cleanly(kind, target, engine)
            if isinstance(error, TaskFileError):
                assert str(target) in str(error), f"the message does not name the directory or file: {error}"

    check()


# ---- explicit cases --------------------------------------------------------------------------------------------------
def edit_header(path: Path, change) -> None:
    header, body = split_safetensors(path.read_bytes())
    path.write_bytes(change(header, body))


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read into memory (a memory-mapped file must not be rewritten while mapped)."""
    return load_bytes(path.read_bytes())


def edit_tensor(path: Path, name: str, value: torch.Tensor) -> None:
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path)


def with_nan(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


LORA_A = "encoder.layer.0.attention.self.query.lora_A"
TASK = "task.safetensors"
META = "chorus_task.json"


def _set_offsets(header, body, offsets):
    header[LORA_A]["data_offsets"] = offsets
    return join_safetensors(header, body)


def _set_shape(header, body, shape):
    header[LORA_A]["shape"] = shape
    return join_safetensors(header, body)


CHORUS_TASK_CASES = [
    ("truncated safetensors", lambda d: (d / TASK).write_bytes((d / TASK).read_bytes()[:-100]),
     rf"{TASK} is not a readable safetensors file"),
    ("truncated header", lambda d: (d / TASK).write_bytes((d / TASK).read_bytes()[:40]),
     rf"{TASK} is not a readable safetensors file"),
    ("empty file", lambda d: (d / TASK).write_bytes(b""), rf"{TASK} is not a readable safetensors file"),
    ("header longer than the file", lambda d: edit_header(d / TASK, lambda h, b: join_safetensors(h, b, 2**63)),
     rf"{TASK} is not a readable safetensors file.*header too large"),
    ("huge declared shape", lambda d: edit_header(d / TASK, lambda h, b: _set_shape(h, b, [2**40, 2**40])),
     rf"{TASK} is not a readable safetensors file"),
    ("huge declared offsets", lambda d: edit_header(d / TASK, lambda h, b: _set_offsets(h, b, [0, 2**62])),
     rf"{TASK} is not a readable safetensors file"),
    ("a pickle as safetensors", lambda d: torch.save({LORA_A: torch.zeros(4, 32)}, d / TASK),
     rf"{TASK} is not a readable safetensors file.*looks like a PyTorch torch.save\(\) archive"),
    ("wrong shape", lambda d: edit_tensor(d / TASK, LORA_A, torch.zeros(4, 48)),
     rf"tensor '{LORA_A}' has shape \(4, 48\), but the backbone needs \(4, 32\)"),
    ("NaN weight", lambda d: edit_tensor(d / TASK, LORA_A, with_nan(load_file(d / TASK)[LORA_A])),
     rf"{TASK} tensor '{LORA_A}' holds 1 NaN or infinite value"),
    ("infinite head", lambda d: edit_tensor(d / TASK, "classifier.bias", torch.tensor([0.0, float("inf")])),
     rf"{TASK} tensor 'classifier.bias' holds 1 NaN or infinite value"),
    ("complex tensor", lambda d: edit_tensor(d / TASK, LORA_A, torch.zeros(4, 32, dtype=torch.complex64)),
     rf"{TASK} tensor '{LORA_A}' is complex"),
    ("packed float4 tensor", lambda d: edit_tensor(d / TASK, LORA_A, torch.zeros(4, 32, dtype=torch.uint8).view(
        torch.float4_e2m1fn_x2)), rf"{TASK} is not a readable safetensors file: tensor type 'F4' is not one"),
    ("path-like tensor name", lambda d: edit_tensor(d / TASK, "../../etc/passwd", torch.zeros(2)),
     r"tensors \['../../etc/passwd'\] belong to no declared PET method"),
    ("header not UTF-8", lambda d: (d / META).write_bytes(b'{"format": "chorus-task/1", "labels": ["\xff"]}'),
     rf"{META} is not UTF-8 text"),
    ("header a list", lambda d: (d / META).write_text("[1, 2]"), rf"{META} must hold a JSON object.*not a JSON list"),
    ("header a string", lambda d: (d / META).write_text('"x"'), rf"{META} must hold a JSON object"),
    ("header NaN", lambda d: edit_json(d / META, meta=float("nan")), rf"{META} is not valid JSON: NaN"),
    ("header overflowing number", lambda d: (d / META).write_text(
        (d / META).read_text().replace('"alpha": 8', '"alpha": 1e400')), rf"{META} is not valid JSON.*1e400"),
    ("header nested too deeply", lambda d: (d / META).write_text("[" * 100000 + "]" * 100000),
     rf"{META} is not valid JSON: it nests too deeply"),
    ("lone surrogate label", lambda d: (d / META).write_text(
        (d / META).read_text().replace('"negative"', '"\\ud800"')), r"label '\\ud800' is not valid Unicode"),
    ("control character label", lambda d: edit_json(d / META, labels=["neg\x00", "pos"]), r"holds control characters"),
    ("labels not a list", lambda d: edit_json(d / META, labels={"a": 1}), r"\"labels\" must be a list"),
    ("meta not an object", lambda d: edit_json(d / META, meta=[1]), r"\"meta\" must be a JSON object"),
    ("pet not an object", lambda d: edit_json(d / META, pet=["lora"]), r"\"pet\" must map method names"),
    ("LoRA alpha a string", lambda d: edit_json(d / META, pet={"lora": {"r": 4, "alpha": "x"}, "bitfit": {}}),
     r"LoRA alpha='x' must be a number"),
    ("LoRA rank a bool", lambda d: edit_json(d / META, pet={"lora": {"r": True}, "bitfit": {}}),
     r"LoRA rank r=True must be an integer"),
    ("unknown method", lambda d: edit_json(d / META, pet={"lora": {"r": 4}, "bitfit": {}, "prefix": {}}),
     r"unknown PET method\(s\) \['prefix'\]"),
    ("missing tensors", lambda d: (d / TASK).unlink(), rf"{TASK} is missing"),
    ("missing header", lambda d: (d / META).unlink(), "holds neither chorus_task.json"),
    ("header is a directory", lambda d: ((d / META).unlink(), (d / META).mkdir()), "holds neither chorus_task.json"),
    ("tensors a directory", lambda d: ((d / TASK).unlink(), (d / TASK).mkdir()), rf"{TASK} is missing"),
]


@pytest.mark.parametrize("what,breakage,match", CHORUS_TASK_CASES, ids=[c[0] for c in CHORUS_TASK_CASES])
def test_bad_chorus_task_files_are_refused_by_name(what, breakage, match, pristine, engine, tmp_path):
    assert_broken_copy_refused(pristine["lora_bitfit"], tmp_path / "task", "lora_bitfit", breakage, what, match, engine)


def test_task_names_that_are_paths_are_refused(pristine):
    for name in ("../escape", "a/b", "/abs", "..", ""):
        with pytest.raises(InvalidInput, match="not a safe name"):
            load_any(pristine["lora_bitfit"], name)


STUDENTS = "students.safetensors"
SMETA = "chorus_students.json"
Q0 = "layers.0.query.weight"

STUDENT_CASES = [
    ("truncated", lambda d: (d / STUDENTS).write_bytes((d / STUDENTS).read_bytes()[:1000]),
     rf"{STUDENTS} is not a readable safetensors file"),
    ("infinite weight", lambda d: edit_tensor(d / STUDENTS, Q0, with_nan(load_file(d / STUDENTS)[Q0], float("-inf"))),
     rf"{STUDENTS} tensor '{Q0}' holds 1 NaN or infinite value"),
    ("wrong shape", lambda d: edit_tensor(d / STUDENTS, Q0, torch.zeros(2, 32, 16)),
     rf"{STUDENTS} tensor '{Q0}' has shape \(2, 32, 16\).*needs \(2, 32, 32\)"),
    ("a scalar tensor", lambda d: edit_tensor(d / STUDENTS, Q0, torch.zeros(())),
     rf"{STUDENTS} tensor '{Q0}' has shape \(\)"),
    ("stray tensor", lambda d: edit_tensor(d / STUDENTS, "layers.9.query.weight", torch.zeros(2, 32, 32)),
     rf"{STUDENTS} holds 19 tensors, but 1-layer students have 18"),
    ("more layers than tensors", lambda d: edit_json(d / SMETA, config={
        **json.loads((d / SMETA).read_text())["config"], "num_layers": 10**9}), r"1000000000-layer students have"),
    ("config not an object", lambda d: edit_json(d / SMETA, config=[1]), r"\"config\" must be a StudentConfig"),
    ("config value wrong", lambda d: edit_json(d / SMETA, config={
        **json.loads((d / SMETA).read_text())["config"], "num_heads": "4"}),
     r"\"config\" is not a valid StudentConfig"),
    ("boosting weight a string", lambda d: edit_json(d / SMETA, boosting_weights=[1.0, "x"]),
     r"\"boosting_weights\" entry must be a finite number, got x"),
    ("labels path-like and few", lambda d: edit_json(d / SMETA, labels=["../../etc/passwd"]), r"needs 2 \"labels\""),
    ("embeddings not an object", lambda d: edit_json(d / SMETA, embeddings="tiny"), r"\"embeddings\" must be"),
    ("fingerprint strings", lambda d: edit_json(d / SMETA, embeddings={"fingerprint": ["a"]}), r"fingerprint"),
    ("prefixes out of order", lambda d: edit_json(d / SMETA, prefixes=[{"k": 2}, {"k": 1}]),
     r"\"prefixes\"\[0\] must be a JSON object with \"k\": 1"),
    ("teacher accuracy a list", lambda d: edit_json(d / SMETA, meta={"teacher_accuracy": [1]}), r"teacher_accuracy"),
    ("header not an object", lambda d: (d / SMETA).write_text("null"), rf"{SMETA} must hold a JSON object"),
    ("header missing", lambda d: (d / SMETA).unlink(), rf"{SMETA} is missing"),
]


@pytest.mark.parametrize("what,breakage,match", STUDENT_CASES, ids=[c[0] for c in STUDENT_CASES])
def test_bad_student_files_are_refused_by_name(what, breakage, match, pristine, engine, tmp_path):
    assert_broken_copy_refused(pristine["students"], tmp_path / "students", "students", breakage, what, match, engine)


ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_Q = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"


def _peft_bin_with_nan(d: Path) -> None:
    tensors = load_file(d / ADAPTER_WEIGHTS)
    tensors[PEFT_Q] = with_nan(tensors[PEFT_Q])
    (d / ADAPTER_WEIGHTS).unlink()
    torch.save(tensors, d / "adapter_model.bin")


CHECKPOINT_CASES = [
    ("peft", "NaN in safetensors", lambda d: edit_tensor(d / ADAPTER_WEIGHTS, PEFT_Q, with_nan(
        load_file(d / ADAPTER_WEIGHTS)[PEFT_Q])), rf"{ADAPTER_WEIGHTS} tensor '{PEFT_Q}' holds 1 NaN"),
    ("peft", "NaN in a .bin", _peft_bin_with_nan, rf"adapter_model.bin tensor '{PEFT_Q}' holds 1 NaN"),
    ("peft", "a .bin that is no state dict", lambda d: ((d / ADAPTER_WEIGHTS).unlink(),
                                                        torch.save([1, 2], d / "adapter_model.bin")),
     "adapter_model.bin must hold a dict of tensors"),
    ("peft", "alpha too large for a float", lambda d: edit_json(d / "adapter_config.json", lora_alpha=10**400),
     "needs an integer r >= 1 and a number lora_alpha"),
    ("peft", "huge alpha", lambda d: edit_json(d / "adapter_config.json", lora_alpha=1e300),
     r"LoRA alpha=1e\+300 must be a number of magnitude below 2\^64"),
    ("peft", "alpha overflowing once scaled", lambda d: edit_json(d / "adapter_config.json",
                                                                  alpha_pattern={"query": 1e308}),
     rf"{ADAPTER_WEIGHTS} tensor .*query.lora_B.weight' overflows to NaN or infinity"),
    ("peft", "peft_type a list", lambda d: edit_json(d / "adapter_config.json", peft_type=["LORA"]),
     r"peft_type \['LORA'\]"),
    ("peft", "rank_pattern a list", lambda d: edit_json(d / "adapter_config.json", rank_pattern=["q"]),
     "rank_pattern must map module patterns"),
    ("peft", "rank_pattern a bad regex", lambda d: edit_json(d / "adapter_config.json", rank_pattern={"(": 4}),
     r"pattern '\(' is not a regular expression"),
    ("peft", "weights missing", lambda d: (d / ADAPTER_WEIGHTS).unlink(), "has adapter_config.json but neither"),
    ("peft", "head labels not UTF-8", lambda d: (d / "chorus_head.json").write_bytes(
        b'{"labels": ["\xfe", "b"], "pooling": "mean"}'), "chorus_head.json is not UTF-8"),
    ("peft", "head NaN", lambda d: edit_tensor(d / "chorus_head.safetensors", "classifier.weight",
                                               with_nan(torch.zeros(2, 32))),
     "chorus_head.safetensors tensor 'classifier.weight' holds 1 NaN"),
    ("adapterhub", "scalar adapter_down", lambda d: edit_tensor(
        d / "adapter.safetensors", "bert.encoder.layer.0.output.adapters.sst.adapter_down.0.weight", torch.zeros(())),
     r"adapter_down.0.weight' has shape \(\), expected \(bottleneck, hidden\)"),
    ("adapterhub", "huge scaling", lambda d: (d / "adapter_config.json").write_text(
        (d / "adapter_config.json").read_text().replace('"scaling": 1.0', '"scaling": ' + "9" * 400)),
     "scaling=9999"),
    ("adapterhub", "config a number", lambda d: edit_json(d / "adapter_config.json", config=3),
     r"needs \"config\""),
    ("adapterhub", "pickle as safetensors", lambda d: torch.save({}, d / "adapter.safetensors"),
     "adapter.safetensors is not a readable safetensors file.*torch.save"),
]


@pytest.mark.parametrize("kind,what,breakage,match", CHECKPOINT_CASES, ids=[f"{c[0]}-{c[1]}" for c in CHECKPOINT_CASES])
def test_bad_peft_and_adapterhub_files_are_refused_by_name(kind, what, breakage, match, pristine, engine, tmp_path):
    assert_broken_copy_refused(pristine[kind], tmp_path / kind, kind, breakage, what, match, engine)


def test_a_task_whose_write_fails_midway_leaves_the_bank_as_it_was(pristine, engine, monkeypatch):
    """The bank writes a task's methods one by one: if a later one fails, the earlier slots are given back."""
    spec = load_task(pristine["lora_bitfit"], "t")
    before = bank_state(engine)
    bitfit = engine.bank.methods["bitfit"]
    original = type(bitfit).slot_options

    def failing(self, slot, options):
        raise RuntimeError("device out of memory")

    monkeypatch.setattr(type(bitfit), "slot_options", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.bank.add(spec)
    monkeypatch.setattr(type(bitfit), "slot_options", original)
    assert bank_state(engine) == before
    engine.bank.add(spec)  # and the same task loads once the failure is gone
    assert "t" in engine.bank.tasks
    engine.bank.remove("t")


def test_files_rewritten_in_place_after_reading_do_not_touch_what_was_read(pristine, engine, tmp_path):
    """What a reader returns owns its memory: a file truncated in place afterwards (a non-atomic copy over it) cannot
    fault the serving process, as a memory-mapped read would (SIGBUS)."""
    task = shutil.copytree(pristine["lora_bitfit"], tmp_path / "task")
    students = shutil.copytree(pristine["students"], tmp_path / "students")
    spec = load_task(task, "t")
    files = read_students(students)
    for f in (task / TASK, students / STUDENTS):
        with open(f, "r+b") as handle:
            handle.truncate(0)
    assert all(torch.isfinite(t).all() for t in spec.tensors.values())
    assert sum(float(t.abs().sum()) for t in files.tensors.values()) > 0
    files.group(SharedEmbeddings.from_encoder(engine.model.encoder))


def test_students_of_another_width_are_refused_for_this_backbone(engine, tmp_path):
    cfg = StudentConfig(num_students=1, num_layers=1, hidden_size=16, num_heads=4, intermediate_size=24,
                        num_labels=2, dropout=0.0)
    save_students(StudentFiles(cfg, ["neg", "pos"], stack_students([Student(cfg)]), torch.ones(1)), tmp_path / "s")
    with pytest.raises(TaskFileError, match=f"students are 16 wide, but the backbone's embeddings are "
                                            f"{TINY.hidden_size} wide"):
        read_students(tmp_path / "s").group(SharedEmbeddings.from_encoder(engine.model.encoder))
