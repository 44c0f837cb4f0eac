"""`chorus serve` started the default way (no key given) against a real tritonserver: the repository API needs the
key it wrote to its key file (loads carrying model files included), inference needs none, `chorus task add` finds the
key by itself, and a task directory outside the task roots fails its load while the old model keeps serving."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from chorus.client.client import ChorusClient
from chorus.client.wire import config_with, normalize_config
from chorus.errors import ChorusError
from tests.functional.conftest import REPOSITORY
from tests.functional.test_serving import NEGATIVE, POSITIVE

pytestmark = pytest.mark.functional

TASKS_DIR = REPOSITORY / "chorus" / "tasks"
FIRST, SECOND = "movie_review_sentiment", "tweet_sentiment"
# What an attacker would upload as the model's code: it leaves a mark if it ever runs.
EVIL_MODEL = """import pathlib
pathlib.Path({marker!r}).write_text("uploaded code ran")


class TritonPythonModel:
    def execute(self, requests):
        return []
"""


@dataclass
class Served:
    http_url: str
    grpc_url: str
    key_file: Path
    banner: str
    model_dir: Path
    outside: Path  # a valid task directory outside every task root
    marker: Path  # written only if uploaded model code runs


def lean_model(model: Path) -> None:
    """The shipped chorus model serving one task from its own `tasks/` folder, with no students."""
    (model / "1").mkdir(parents=True)
    shutil.copy(REPOSITORY / "chorus" / "1" / "model.py", model / "1" / "model.py")
    for name in (FIRST, SECOND):
        shutil.copytree(TASKS_DIR / name, model / "tasks" / name)
    config = (REPOSITORY / "chorus" / "config.pbtxt").read_text()
    params = {"tasks": json.dumps({FIRST: f"tasks/{FIRST}"}), "students": "{}"}
    for key, value in params.items():
        config, n = re.subn(r'\{ key: "%s", value: \{ string_value: ".*" \} \}' % key,
                            lambda _: '{ key: "%s", value: { string_value: %s } }' % (key, json.dumps(value)), config)
        assert n == 1, f"the shipped config has no one-line parameter {key}"
    (model / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    if not (TASKS_DIR / ".built").is_file():
        pytest.fail("the default tasks are not built: run `make repository` (or `make test`, which builds them)")
    work = tmp_path_factory.mktemp("security")
    lean_model(work / "repo" / "chorus")
    shutil.copytree(TASKS_DIR / SECOND, work / "outside" / SECOND)
    key_file = work / "state" / "chorus" / "admin-key"
    with pytest.MonkeyPatch.context() as env:  # this module's server and clients share one key file, as a user's do
        env.setenv("CHORUS_ADMIN_KEY_FILE", str(key_file))
        env.delenv("CHORUS_ADMIN_KEY", raising=False)
        env.delenv("CHORUS_TASK_ROOTS", raising=False)
        proc = subprocess.Popen(
            [sys.executable, "-m", "chorus.cli", "serve", "--repository", str(work / "repo"), "--http-port", "0",
             "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(work / "triton.log")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "Press Ctrl-C" in line:
                    break
            banner = "".join(lines)
            http, grpc = re.search(r"HTTP\s+http://(\S+)", banner), re.search(r"gRPC\s+(\S+)", banner)
            assert http and grpc, banner + (work / "triton.log").read_text()[-3000:]
            yield Served(http.group(1), grpc.group(1), key_file, banner, work / "repo" / "chorus",
                         work / "outside" / SECOND, work / "uploaded-code-ran")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def classify_first(served: Served) -> str:
    """Inference with no key at all: plain tritonclient, no headers."""
    client = httpclient.InferenceServerClient(served.http_url)
    text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[POSITIVE[0].encode()]], dtype=np.object_))
    task = httpclient.InferInput("TASK", [1, 1], "BYTES")
    task.set_data_from_numpy(np.array([[FIRST.encode()]], dtype=np.object_))
    result = client.infer("chorus", [text, task], outputs=[httpclient.InferRequestedOutput("LABEL")])
    return result.as_numpy("LABEL").reshape(-1)[0].decode()


def test_the_default_start_writes_a_private_key_and_says_where(served):
    assert stat.S_IMODE(served.key_file.stat().st_mode) == 0o600
    key = served.key_file.read_text().strip()
    assert len(key) >= 43
    assert f"the key in {served.key_file} (new)" in served.banner
    assert key not in served.banner
    assert str(served.model_dir) in served.banner  # the task roots: the model's own directory only


def test_inference_and_health_need_no_key(served):
    assert classify_first(served) == "positive"
    client = httpclient.InferenceServerClient(served.http_url)
    assert client.is_server_ready() and client.is_model_ready("chorus")


def test_the_other_admin_surfaces_need_the_key_and_reads_stay_open(served):
    base = f"http://{served.http_url}/v2"
    for url, body in ((f"{base}/logging", {"log_verbose_level": 1}), (f"{base}/trace/setting", {"trace_rate": "1"}),
                      (f"{base}/systemsharedmemory/region/r/register", {"key": "/r", "offset": 0, "byte_size": 8}),
                      (f"{base}/repository/index", {})):
        status, text = post(url, body)
        assert (status, "restricted" in text) == (403, True), (url, status, text)
    status, text = post(f"{base}/logging", {"log_verbose_level": 0},
                        {"admin-key": served.key_file.read_text().strip()})
    assert status == 200, text
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for path in ("models/chorus/config", "models/chorus/stats", "models/chorus", ""):
        with opener.open(f"{base}/{path}".rstrip("/"), timeout=30) as response:
            assert response.status == 200, path


@pytest.mark.parametrize("model", ["chorus", "uploaded"])
def test_loads_without_the_key_are_refused_even_with_model_files(served, model):
    config = {"name": model, "backend": "python", "max_batch_size": 0,
              "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]}
    code = EVIL_MODEL.format(marker=str(served.marker)).encode()
    body = {"parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(code).decode()}}
    for headers in (None, {"admin-key": "wrong"}, {"triton-grpc-protocol-admin-key": "wrong"}):
        status, text = post(f"http://{served.http_url}/v2/repository/models/{model}/load", body, headers)
        assert (status, "restricted" in text) == (403, True), (status, text)
        status, text = post(f"http://{served.http_url}/v2/repository/models/chorus/unload", {}, headers)
        assert status == 403, (status, text)
    grpc = grpcclient.InferenceServerClient(served.grpc_url)
    for headers in (None, {"admin-key": served.key_file.read_text().strip()}):  # gRPC wants the prefixed header
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.load_model(model, headers=headers, config=json.dumps(config), files={"file:1/model.py": code})
    assert not served.marker.exists()
    assert classify_first(served) == "positive"  # the old model serves on


def test_chorus_task_add_and_remove_find_the_key_by_themselves(served):
    env = {k: v for k, v in os.environ.items() if k != "CHORUS_ADMIN_KEY"}
    cli = [sys.executable, "-m", "chorus.cli", "task"]
    added = subprocess.run(cli + ["add", SECOND, str(served.model_dir / "tasks" / SECOND), "--url", served.http_url],
                           capture_output=True, text=True, timeout=300, env=env)
    assert added.returncode == 0, added.stderr
    assert f"serving task {SECOND}" in added.stdout
    with ChorusClient(served.grpc_url, protocol="grpc") as client:  # no key given: found in the key file
        got = client.classify(["best day ever, love it :)"], SECOND)[0]
        assert (got.task, got.label) == (SECOND, "positive")
        assert sorted(client.remove_task(SECOND)) == [FIRST]
    with ChorusClient(served.http_url) as client:
        assert sorted(client.tasks()) == [FIRST]


def test_task_paths_outside_the_roots_fail_the_load_and_the_old_model_serves_on(served):
    escape = served.model_dir / "tasks" / "escape"
    escape.symlink_to(served.outside, target_is_directory=True)
    with ChorusClient(served.http_url) as client:
        before = client.tasks()
        cases = [("outsider", served.outside, str(served.outside)),
                 ("escape", escape, f"{escape} (it resolves to {served.outside})")]
        for name, path, shown in cases:
            with pytest.raises(ChorusError) as refused:
                client.add_task(name, path)
            message = str(refused.value)
            for part in (f"task {name!r}", shown, "outside the allowed task roots", str(served.model_dir),
                         "--task-root"):
                assert part in message, (part, message)
        # a relative path climbing out with `..`, sent as the config names it (the CLI would make it absolute)
        config = normalize_config(httpclient.InferenceServerClient(served.http_url).get_model_config("chorus"))
        climbing = f"../../outside/{SECOND}"
        load = config_with(config, tasks={**before, "climber": climbing})
        headers = {"admin-key": served.key_file.read_text().strip()}
        with pytest.raises(InferenceServerException, match=re.escape(f"task 'climber': {served.model_dir}/{climbing}")):
            httpclient.InferenceServerClient(served.http_url).load_model("chorus", config=load, headers=headers)
        assert client.tasks() == before
        assert [p.label for p in client.classify(POSITIVE[:1] + NEGATIVE[:1], FIRST)] == ["positive", "negative"]
