"""Unit tests of chorus.client: no server. tritonclient's client objects are replaced by fakes that follow the
`chorus` model contract; the config fixtures are what tritonserver 2.51 returned for a `chorus` model over each
protocol (trimmed)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import re

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from chorus.client import AsyncChorusClient, ChorusClient, Prediction, cli
from chorus.client import wire
from chorus.errors import ChorusError, InvalidInput, Overloaded, ServerError, UnknownTask

LABELS = {"sst": ["negative", "positive"], "emo": ["anger", "joy", "sadness", "fear"]}
TASKS_JSON = json.dumps({"sst": "/srv/tasks/sst"})

HTTP_CONFIG = {
    "name": "chorus", "platform": "", "backend": "python", "max_batch_size": 64,
    "version_policy": {"latest": {"num_versions": 1}},
    "input": [
        {"name": "TEXT", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1], "optional": True},
        {"name": "INPUT_IDS", "data_type": "TYPE_INT32", "format": "FORMAT_NONE", "dims": [-1], "optional": True},
        {"name": "TASK", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1], "optional": False},
    ],
    "output": [{"name": "LOGITS", "data_type": "TYPE_FP32", "dims": [-1], "label_filename": ""}],
    "instance_group": [{"name": "chorus_0", "kind": "KIND_CPU", "count": 1, "gpus": []}],
    "parameters": {"tasks": {"string_value": TASKS_JSON}},
}  # fmt: skip
GRPC_CONFIG = {
    "config": {
        "name": "chorus", "backend": "python", "max_batch_size": 64,
        "version_policy": {"latest": {"num_versions": 1}},
        "input": [
            {"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
            {"name": "INPUT_IDS", "data_type": "TYPE_INT32", "dims": ["-1"], "optional": True},
            {"name": "TASK", "data_type": "TYPE_STRING", "dims": ["1"]},
        ],
        "output": [{"name": "LOGITS", "data_type": "TYPE_FP32", "dims": ["-1"]}],
        "instance_group": [{"name": "chorus_0", "count": 1, "kind": "KIND_CPU"}],
        "parameters": {"tasks": {"string_value": TASKS_JSON}},
    }
}  # fmt: skip


# ---------------------------------------------------------------- fakes


def fake_model(tensors: dict[str, np.ndarray], parameters=None) -> dict[str, np.ndarray]:
    """The `chorus` contract on made-up logits: row value v (int(text[1:]) or sum(ids)) gives logit j = v*(j+1)/100."""
    tasks = [t[0].decode() for t in tensors["TASK"]]
    if "TEXT" in tensors:
        values = [int(t[0].decode()[1:]) for t in tensors["TEXT"]]
    else:
        assert len({len(r) for r in tensors["INPUT_IDS"]}) == 1
        values = [int(r.sum()) for r in tensors["INPUT_IDS"]]
    unknown = sorted(set(tasks) - set(LABELS))
    if unknown:
        raise InferenceServerException(f"unknown task {unknown[0]!r}; served: {sorted(LABELS)}", status="400")
    width = max(len(LABELS[t]) for t in tasks)
    logits = np.full((len(tasks), width), -np.inf, dtype=np.float32)  # (B, W)
    names = np.full((len(tasks), width), b"", dtype=np.object_)
    label = np.empty((len(tasks), 1), dtype=np.object_)
    for i, (task, v) in enumerate(zip(tasks, values)):
        n = len(LABELS[task])
        logits[i, :n] = [v * (j + 1) / 100 for j in range(n)]
        names[i, :n] = [s.encode() for s in LABELS[task]]
        label[i, 0] = LABELS[task][int(np.argmax(logits[i, :n]))].encode()
    return {"LOGITS": logits, "LABEL": label, "LABEL_NAMES": names}


def expected(task: str, v: int) -> Prediction:
    logits = [float(np.float32(v * (j + 1) / 100)) for j in range(len(LABELS[task]))]
    z = sum(math.exp(x) for x in logits)
    probs = {name: math.exp(x) / z for name, x in zip(LABELS[task], logits)}
    return Prediction(task, max(probs, key=probs.get), probs, logits)


def assert_same(got: list[Prediction], want: list[Prediction]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.task, g.label, list(g.probabilities)) == (w.task, w.label, list(w.probabilities))
        assert g.logits == pytest.approx(w.logits)
        assert list(g.probabilities.values()) == pytest.approx(list(w.probabilities.values()), rel=1e-9)


class FakeTriton:
    """Records repository calls, answers model-config calls like tritonclient http (dict) or grpc (as_json)."""

    def __init__(self, protocol: str, fail_load: str | None = None):
        self.protocol, self.fail_load = protocol, fail_load
        self.config = copy.deepcopy(HTTP_CONFIG if protocol == "http" else GRPC_CONFIG)
        self.loads: list[tuple[str, dict, dict | None]] = []

    def get_model_config(self, model, headers=None, **kw):
        if self.protocol == "grpc":
            assert kw == {"as_json": True, "client_timeout": 5.0}, kw
        return copy.deepcopy(self.config)

    def load_model(self, model, config=None, headers=None, **kw):
        if self.fail_load:
            raise InferenceServerException(self.fail_load, status="400")
        sent = json.loads(config)
        self.loads.append((model, sent, headers))
        if self.protocol == "grpc":  # what the server would answer next
            self.config["config"]["parameters"] = sent["parameters"]
        else:
            self.config["parameters"] = sent["parameters"]

    def close(self):
        pass


def client_with(fake: FakeTriton, admin_key: str | None = "k") -> ChorusClient:
    c = ChorusClient(protocol=fake.protocol, admin_key=admin_key, timeout=5.0)
    c._t.client = fake
    return c


# ---------------------------------------------------------------- names, urls


@pytest.mark.parametrize("name", ["sst2", "a", "A.b-c_d", "0x", "t" * 64])
def test_valid_task_names(name):
    assert wire.validate_task_name(name) == name


@pytest.mark.parametrize("name", ["", "_x", ".x", "-x", "a b", "a/b", "../x", "t" * 65, "é", None])
def test_invalid_task_names_say_the_rule(name):
    with pytest.raises(InvalidInput, match=r"1 to 64 characters from \[A-Za-z0-9_.-\]"):
        wire.validate_task_name(name)


def test_url_defaults_follow_protocol():
    assert wire.resolve_url(None, "http") == "127.0.0.1:8000"
    assert wire.resolve_url(None, "grpc") == "127.0.0.1:8001"
    assert wire.resolve_url("http://h:9000/", "http") == "h:9000"
    assert ChorusClient(protocol="grpc").url == "127.0.0.1:8001"
    with pytest.raises(InvalidInput, match="TLS"):
        wire.resolve_url("https://h:1", "http")
    with pytest.raises(InvalidInput, match="protocol"):
        ChorusClient(protocol="udp")


# ---------------------------------------------------------------- config round trip


@pytest.mark.parametrize("raw", [HTTP_CONFIG, GRPC_CONFIG], ids=["http", "grpc"])
def test_config_round_trip(raw):
    config = wire.normalize_config(raw)
    assert config["name"] == "chorus" and "config" not in config
    assert [i["dims"] for i in config["input"]] == [[1], [-1], [1]]  # gRPC's int64 strings become ints
    assert wire.tasks_from_config(config) == {"sst": "/srv/tasks/sst"}
    sent = json.loads(wire.config_with(config, tasks={"sst": "/a", "emo": "/b"}))
    assert json.loads(sent["parameters"]["tasks"]["string_value"]) == {"sst": "/a", "emo": "/b"}
    assert {k: v for k, v in sent.items() if k != "parameters"} == {k: v for k, v in config.items() if k != "parameters"}
    assert wire.tasks_from_config(wire.normalize_config(sent)) == {"sst": "/a", "emo": "/b"}
    assert wire.tasks_from_config(raw.get("config", raw)) == {"sst": "/srv/tasks/sst"}  # raw input untouched


def test_config_without_tasks_and_malformed_tasks():
    assert wire.tasks_from_config({"name": "chorus"}) == {}
    with pytest.raises(ChorusError, match="not a JSON object string"):
        wire.tasks_from_config({"parameters": {"tasks": {"string_value": "{oops"}}})
    with pytest.raises(ChorusError, match="must be a JSON object"):
        wire.tasks_from_config({"parameters": {"tasks": {"string_value": "[1]"}}})


def test_plan_add_and_remove(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = wire.normalize_config(HTTP_CONFIG)
    sent, tasks = wire.plan_add(config, "emo", "tasks/emo")
    assert tasks == {"sst": "/srv/tasks/sst", "emo": str(tmp_path / "tasks" / "emo")}
    assert wire.tasks_from_config(json.loads(sent)) == tasks
    with pytest.raises(InvalidInput, match="--replace"):
        wire.plan_add(config, "sst", "/x")
    assert wire.plan_add(config, "sst", "/x", replace=True)[1] == {"sst": "/x"}
    assert wire.plan_remove(config, "sst")[1] == {}
    with pytest.raises(UnknownTask, match="served tasks: sst") as e:
        wire.plan_remove(config, "emo")
    assert str(e.value).startswith("task 'emo' is not served")  # not KeyError's quoted form


def test_plan_students_and_a_removed_or_replaced_task_loses_its_students():
    config = wire.normalize_config(HTTP_CONFIG)
    sent, students = wire.plan_students(config, "sst", "/srv/students/sst")
    assert students == {"sst": "/srv/students/sst"}
    with_students = json.loads(sent)
    assert wire.map_from_config(with_students, "students") == students
    assert wire.tasks_from_config(with_students) == {"sst": "/srv/tasks/sst"}  # the task map is untouched
    assert wire.map_from_config(json.loads(wire.plan_remove(with_students, "sst")[0]), "students") == {}
    replaced = json.loads(wire.plan_add(with_students, "sst", "/x", replace=True)[0])
    assert wire.map_from_config(replaced, "students") == {}  # distilled from the old task: dropped
    assert wire.map_from_config(json.loads(wire.plan_students(with_students, "sst", None)[0]), "students") == {}
    with pytest.raises(UnknownTask, match="'emo' is not served"):
        wire.plan_students(config, "emo", "/x")
    with pytest.raises(InvalidInput, match="'sst' has no students"):
        wire.plan_students(config, "sst", None)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_add_remove_through_client_sends_config_and_admin_key(protocol):
    fake = FakeTriton(protocol)
    with client_with(fake) as c:
        assert c.add_task("emo", "/srv/tasks/emo") == {"sst": "/srv/tasks/sst", "emo": "/srv/tasks/emo"}
        assert c.tasks() == {"sst": "/srv/tasks/sst", "emo": "/srv/tasks/emo"}
        assert c.remove_task("sst") == {"emo": "/srv/tasks/emo"}
    (model, sent, headers), _ = fake.loads
    assert model == "chorus" and sent["input"][0]["dims"] == [1] and sent["max_batch_size"] == 64
    assert headers["admin-key"] == "k"
    assert ("triton-grpc-protocol-admin-key" in headers) == (protocol == "grpc")  # Triton's gRPC restricted header


def test_failed_load_raises_invalid_input_without_backend_traceback():
    msg = "load failed for model 'chorus': Internal: TaskFileError: bad head\n\nAt:\n  /m/model.py(12): initialize\n"
    with client_with(FakeTriton("http", fail_load=msg)) as c, pytest.raises(InvalidInput) as e:
        c.add_task("emo", "/srv/tasks/emo")
    assert str(e.value) == "add task 'emo': load failed for model 'chorus': Internal: TaskFileError: bad head"


# ---------------------------------------------------------------- requests and predictions


def test_softmax_over_padded_logits():
    names = np.array([[b"a", b"b", b"", b""], [b"w", b"x", b"y", b"z"]], dtype=np.object_)
    logits = np.array([[1000.0, 999.0, -np.inf, -np.inf], [0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    labels = np.array([[b"a"], [b"z"]], dtype=np.object_)
    p, q = wire.predictions(["t2", "t4"], logits, labels, names)
    assert p.label == "a" and list(p.probabilities) == ["a", "b"] and p.logits == [1000.0, 999.0]
    assert p.probabilities["a"] == pytest.approx(1 / (1 + math.exp(-1)))  # stable at large logits
    assert sum(q.probabilities.values()) == pytest.approx(1.0)
    assert q.probabilities["z"] / q.probabilities["y"] == pytest.approx(math.e)
    assert wire.softmax([0.0, -math.inf]) == [1.0, 0.0]


def test_chunking_text_rows():
    texts = [f"t{i}" for i in range(150)]
    requests = wire.text_requests(texts, "sst")
    assert [len(r.rows) for r in requests] == [64, 64, 22]
    assert [i for r in requests for i in r.rows] == list(range(150))
    r = requests[2]
    assert r.tensors["TEXT"].shape == (22, 1) and r.tensors["TEXT"][0, 0] == b"t128"
    assert r.tensors["TASK"].dtype == np.object_ and r.tensors["TASK"][0, 0] == b"sst"
    assert wire.text_requests([], "sst") == []


def test_ids_rows_grouped_by_length_then_chunked():
    ids = [[101] * (2 + i % 3) for i in range(200)]  # lengths 2, 3, 4
    requests = wire.ids_requests(ids, "sst", max_batch_size=64)
    for r in requests:
        assert 1 <= len(r.rows) <= 64 and r.tensors["INPUT_IDS"].dtype == np.int32
        assert {len(ids[i]) for i in r.rows} == {r.tensors["INPUT_IDS"].shape[1]}
    assert sorted(i for r in requests for i in r.rows) == list(range(200))
    with pytest.raises(InvalidInput, match="int32"):
        wire.ids_requests([[2**31]], "sst")
    with pytest.raises(InvalidInput, match=r"ids\[1\]"):
        wire.ids_requests([[1], []], "sst")


def test_bad_classify_arguments():
    with pytest.raises(InvalidInput, match="list of str"):
        wire.text_requests("one text", "sst")
    with pytest.raises(InvalidInput, match="2 task names for 3 inputs"):
        wire.text_requests(["a", "b", "c"], ["sst", "emo"])
    with pytest.raises(InvalidInput, match="invalid task name"):
        wire.text_requests(["a"], "bad name")


def test_classify_splits_requests_and_keeps_order():
    c = ChorusClient()
    sizes = []
    c._infer_arrays = lambda t, parameters=None: (sizes.append(len(t["TASK"])), fake_model(t))[1]
    tasks = ["sst" if i % 3 else "emo" for i in range(150)]
    got = c.classify([f"t{i}" for i in range(150)], tasks)
    assert sizes == [64, 64, 22]
    assert_same(got, [expected(t, i) for i, t in enumerate(tasks)])


def test_classify_ids_mixed_lengths_keep_order():
    c = ChorusClient(protocol="grpc")
    calls = []
    c._infer_arrays = lambda t, parameters=None: (calls.append(t["INPUT_IDS"].shape), fake_model(t))[1]
    ids = [[101] + [i] * (i % 4) + [102] for i in range(100)]
    assert_same(c.classify_ids(ids, "emo"), [expected("emo", sum(r)) for r in ids])
    assert sorted(calls) == [(25, 2), (25, 3), (25, 4), (25, 5)]


def test_async_client_matches_sync():
    async def run():
        async with AsyncChorusClient(max_in_flight=2) as c:
            async def infer(t, parameters=None):
                await asyncio.sleep(0.001 * (len(t["TASK"]) % 7))  # finish out of order
                return fake_model(t)

            c._infer_arrays = infer
            return await c.classify([f"t{i}" for i in range(200)], "sst")

    assert_same(asyncio.run(run()), [expected("sst", i) for i in range(200)])
    with pytest.raises(ChorusError, match="running event loop"):
        AsyncChorusClient()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (InferenceServerException("unknown task 'x'; served: sst", status="400"), UnknownTask, "unknown task 'x'"),
        (InferenceServerException("TEXT row 3 is empty", status="StatusCode.INVALID_ARGUMENT"), InvalidInput, "row 3"),
        (InferenceServerException("deadline cannot be met", status="503"), Overloaded, "deadline"),
        (InferenceServerException("This API is restricted, expecting header 'admin-key'", status="403"), ChorusError, "--admin-key"),
        (InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE"), ServerError, "cannot reach"),
        (ConnectionRefusedError(111, "Connection refused"), ServerError, "is it running"),
        (InferenceServerException("boom", status="500"), ChorusError, r"\[500\] boom"),
    ],
)  # fmt: skip
def test_translate_error(exc, kind, text):
    err = wire.translate_error(exc, "classify", "h:1", "http")
    assert type(err) is kind
    assert err.args[0].startswith("classify: ")
    assert re.search(text, str(err)), str(err)


def test_unknown_task_from_server_is_unknown_task():
    c = ChorusClient()
    c._infer_arrays = fake_model
    with pytest.raises(UnknownTask, match="unknown task 'nope'"):
        c.classify(["t1"], "nope")


# ---------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chorus")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_parsing():
    a = parser().parse_args(["classify", "--task", "sst", "--json", "a fine film", "dull"])
    assert (a.func, a.task, a.json, a.texts) == (cli.classify, "sst", True, ["a fine film", "dull"])
    a = parser().parse_args(["task", "add", "emo", "tasks/emo", "--replace", "--protocol", "grpc", "--admin-key", "k"])
    assert (a.func, a.name, a.path, a.replace, a.protocol, a.admin_key) == (cli.task_add, "emo", "tasks/emo", True, "grpc", "k")
    a = parser().parse_args(["task", "remove", "emo", "--url", "h:1"])
    assert (a.func, a.name, a.url) == (cli.task_remove, "emo", "h:1")
    assert parser().parse_args(["tasks"]).func is cli.tasks
    assert parser().parse_args(["health"]).func is cli.health
    for bad in (["classify", "x"], ["classify", "--task", "sst"], ["task"], ["health", "--protocol", "udp"]):
        with pytest.raises(SystemExit) as e:
            parser().parse_args(bad)
        assert e.value.code == 2


def test_cli_env_defaults_and_flag_override(monkeypatch):
    monkeypatch.setenv("CHORUS_URL", "h:9")
    monkeypatch.setenv("CHORUS_PROTOCOL", "grpc")
    monkeypatch.setenv("CHORUS_ADMIN_KEY", "env-key")
    c = cli.client_from_args(parser().parse_args(["tasks"]))
    assert (c.url, c.protocol, c._t.admin["admin-key"]) == ("h:9", "grpc", "env-key")
    c = cli.client_from_args(parser().parse_args(["tasks", "--url", "g:8", "--protocol", "http", "--admin-key", "x"]))
    assert (c.url, c.protocol, c._t.admin) == ("g:8", "http", {"admin-key": "x"})
    monkeypatch.delenv("CHORUS_URL")
    monkeypatch.delenv("CHORUS_PROTOCOL")
    assert cli.client_from_args(parser().parse_args(["tasks"])).url == "127.0.0.1:8000"


def run_cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_unreachable_server_exits_1(protocol, capsys):
    assert run_cli(["tasks", "--url", "127.0.0.1:1", "--protocol", protocol]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "cannot reach tritonserver at 127.0.0.1:1" in err
    assert "Traceback" not in err


def test_cli_bad_env_protocol_exits_1(monkeypatch, capsys):
    monkeypatch.setenv("CHORUS_PROTOCOL", "udp")
    assert run_cli(["health"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown protocol 'udp'")


def test_cli_classify_output(monkeypatch, capsys):
    monkeypatch.setattr(ChorusClient, "_infer_arrays", lambda self, t, parameters=None: fake_model(t))
    assert run_cli(["classify", "--task", "sst", "t1", "t200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    p1, p200 = expected("sst", 1), expected("sst", 200)
    assert lines == [
        f"positive\tnegative={p1.probabilities['negative']:.3f} positive={p1.probabilities['positive']:.3f}\tt1",
        f"positive\tnegative={p200.probabilities['negative']:.3f} positive={p200.probabilities['positive']:.3f}\tt200",
    ]
    assert run_cli(["classify", "--task", "emo", "--json", "t7"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["text"] == "t7" and row["task"] == "emo" and row["label"] == "fear"
    assert row["probabilities"] == pytest.approx(expected("emo", 7).probabilities)


def test_cli_task_commands(monkeypatch, capsys, tmp_path):
    fake = FakeTriton("http")
    monkeypatch.setattr(cli, "client_from_args", lambda args: client_with(fake))
    assert run_cli(["task", "add", "sst", "/x"]) == 1
    assert "use --replace" in capsys.readouterr().err
    assert run_cli(["task", "add", "emo", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"serving task emo from {tmp_path} (tasks: emo, sst)\n"
    assert run_cli(["tasks"]) == 0
    assert capsys.readouterr().out == f"emo\t{tmp_path}\nsst\t/srv/tasks/sst\n"
    assert run_cli(["task", "remove", "nope"]) == 1
    assert capsys.readouterr().err == "error: task 'nope' is not served; served tasks: emo, sst\n"
    assert run_cli(["task", "remove", "emo"]) == 0
    assert capsys.readouterr().out == "removed task emo (tasks: sst)\n"
    assert len(fake.loads) == 2 and os.path.isabs(json.loads(fake.loads[0][1]["parameters"]["tasks"]["string_value"])["emo"])
