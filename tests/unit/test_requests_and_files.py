"""Request decoding (every bad input names its problem) and the task file format (atomic, validated)."""

import json
import re

import numpy as np
import pytest
import torch

from chorus.backends.engine import Engine
from chorus.backends.requests import MAX_TEXT_CHARS, decode_many, decode_request
from chorus.backends.task_files import load_task, random_task, save_task
from chorus.errors import InvalidInput, TaskFileError


@pytest.fixture(scope="module")
def engine():
    e = Engine(max_length=16)  # the real all-MiniLM-L6-v2 backbone and tokenizer, tasks with random weights
    sites = e.cfg.linear_sites()
    e.add_task(random_task("movie", e.cfg.hidden_size, sites, {"lora": {"r": 4, "alpha": 8}}, seed=1))
    e.add_task(random_task("news", e.cfg.hidden_size, sites, {"bitfit": {}}, ["a", "b", "c"], seed=2))
    return e


def strings(*values):
    return np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=np.object_)


def test_text_rows_tokenize_and_long_texts_are_truncated_only_when_asked(engine):
    text, task = strings("a fine film", "word " * 50), strings("movie", "news")
    with pytest.raises(InvalidInput, match="row 1 is 52 tokens long, more than the 16.*truncate=true"):
        decode_request(engine, text, None, task)
    d = decode_request(engine, text, None, task, truncate=True)
    assert d.tasks == ["movie", "news"]
    assert d.ids[0][0] == 101 and d.ids[0][-1] == 102 and len(d.ids[0]) == 5  # [CLS] a fine film [SEP]
    assert len(d.ids[1]) == 16 and d.ids[1][-1] == 102 and d.truncated == [1]


def test_input_ids_rows_drop_trailing_padding(engine):
    ids = np.array([[101, 2307, 102, 0, 0], [101, 2307, 2307, 2307, 102]], dtype=np.int32)
    d = decode_request(engine, None, ids, strings("movie", "movie"))
    assert d.ids == [[101, 2307, 102], [101, 2307, 2307, 2307, 102]] and d.truncated == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(text=strings("x"), input_ids=None, task=None), "TASK is missing"),
    (dict(text=None, input_ids=None, task=strings("movie")), "neither"),
    (dict(text=strings("x"), input_ids=np.zeros((1, 2), np.int32), task=strings("movie")), "both"),
    (dict(text=strings("   "), input_ids=None, task=strings("movie")), "TEXT row 0 is empty"),
    (dict(text=strings("ok", b"\xff\xfe"), input_ids=None, task=strings("movie", "movie")), "row 1 is not valid UTF-8"),
    (dict(text=strings("x" * (MAX_TEXT_CHARS + 1)), input_ids=None, task=strings("movie")), "characters"),
    (dict(text=strings("x"), input_ids=None, task=strings("nope")), "unknown task 'nope'.*movie"),
    (dict(text=strings("x", "y"), input_ids=None, task=strings("movie")), "TASK has 1 rows but TEXT has 2"),
    (dict(text=np.array([[1.0]]), input_ids=None, task=strings("movie")), "TEXT must be BYTES"),
    (dict(text=strings("x").reshape(1, 1, 1), input_ids=None, task=strings("movie")), r"shape \[batch, 1\]"),
    (dict(text=None, input_ids=np.array([[101, 40000]], np.int32), task=strings("movie")), "outside the vocabulary"),
    (dict(text=None, input_ids=np.zeros((1, 3), np.int32), task=strings("movie")), "INPUT_IDS is empty"),
    (dict(text=None, input_ids=np.ones((1, 600), np.int32), task=strings("movie")), "exceed.*512 positions"),
    (dict(text=None, input_ids=np.ones((1, 3), np.int64), task=strings("movie")), "must be INT32"),
])
def test_bad_requests_name_the_problem(engine, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        decode_request(engine, **kwargs)
    # decoding a whole execute() call: the same error for that request, its neighbours decoded as if alone
    good = dict(text=strings("a fine film", "dull"), input_ids=None, task=strings("movie", "news"))
    ids = dict(text=None, input_ids=np.array([[101, 2307, 102, 0]], np.int32), task=strings("news"))
    out = decode_many(engine, [good, kwargs, ids, {**good, "truncate": True}])
    assert isinstance(out[1], InvalidInput) and re.search(match, str(out[1]))
    for i, request in ((0, good), (2, ids), (3, good)):
        alone = decode_request(engine, **request)
        assert (out[i].ids, out[i].tasks, out[i].truncated) == (alone.ids, alone.tasks, alone.truncated)


def test_a_call_decodes_with_one_tokenizer_call_and_truncates_per_request(engine, monkeypatch):
    calls = []
    real = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda texts, truncate: calls.append(len(texts)) or real(texts, truncate))
    long = dict(text=strings("word " * 50), input_ids=None, task=strings("movie"))
    out = decode_many(engine, [long, {**long, "truncate": True}, dict(text=strings("a", "b"), input_ids=None,
                                                                    task=strings("movie", "news"))])
    assert calls == [4]  # every text of the call in one batch
    assert isinstance(out[0], InvalidInput) and "52 tokens long" in str(out[0])
    assert len(out[1].ids[0]) == 16 and out[1].truncated == [0]
    assert out[2].tasks == ["movie", "news"] and [len(r) for r in out[2].ids] == [3, 3]


def test_task_files_round_trip_and_serve_the_same_logits(engine, tmp_path):
    spec = random_task("saved", engine.cfg.hidden_size, engine.cfg.linear_sites(),
                       {"lora": {"r": 2, "alpha": 4, "target_modules": ["query"]}, "bitfit": {}}, seed=5)
    save_task(spec, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary left behind
    back = load_task(tmp_path / "saved", "saved")
    assert back.labels == spec.labels and back.pet == spec.pet
    assert all(torch.equal(back.tensors[k], spec.tensors[k]) for k in spec.tensors)
    engine.load_task("saved", tmp_path / "saved")
    a = engine.classify(["a fine film"], ["saved"]).logits
    engine.bank.remove("saved")
    engine.add_task(spec)
    b = engine.classify(["a fine film"], ["saved"]).logits
    engine.bank.remove("saved")
    np.testing.assert_allclose(a, b)


def test_saving_over_a_task_replaces_it_whole(tmp_path):
    sites = {"encoder.layer.0.output.dense": (4, 8)}
    save_task(random_task("t", 4, sites, {"bitfit": {}}, seed=1), tmp_path / "t")
    save_task(random_task("t", 4, sites, {"lora": {"r": 1}}, seed=2), tmp_path / "t")
    assert load_task(tmp_path / "t", "t").pet == {"lora": {"r": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


@pytest.mark.parametrize("breakage,match", [
    (lambda d: (d / "task.safetensors").unlink(), "task.safetensors is missing"),
    (lambda d: (d / "chorus_task.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "chorus_task.json").write_text(json.dumps({"format": "other"})), "format"),
    (lambda d: (d / "chorus_task.json").write_text(json.dumps({"format": "chorus-task/1", "labels": "ab"})), "labels"),
    (lambda d: (d / "task.safetensors").write_bytes(b"\x00" * 20), "not a readable safetensors"),
])
def test_malformed_task_files_name_the_file(tmp_path, breakage, match):
    save_task(random_task("t", 4, {"encoder.layer.0.output.dense": (4, 8)}, {"bitfit": {}}), tmp_path / "t")
    breakage(tmp_path / "t")
    with pytest.raises(TaskFileError, match=match):
        load_task(tmp_path / "t", "t")


def test_task_file_shapes_that_do_not_fit_the_backbone_are_refused(engine, tmp_path):
    spec = random_task("wide", 768, {s: (2 * o, 2 * i) for s, (o, i) in engine.cfg.linear_sites().items()},
                       {"bitfit": {}})
    save_task(spec, tmp_path / "wide")
    with pytest.raises(TaskFileError, match=r"classifier.weight.*\(2, 768\).*\(2, 384\)"):
        engine.load_task("wide", tmp_path / "wide")
    assert "wide" not in engine.bank.tasks
