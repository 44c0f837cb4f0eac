"""The entry model with `runtime: onnxruntime`: the backbone and its PET operators exported to ONNX at load and run
by onnxruntime, through a second real tritonserver; its answers equal the PyTorch runtime's."""

import json
import re
import shutil

import numpy as np

from chorus.client.client import ChorusClient
from chorus.server import TritonServer
from tests.functional.conftest import DEFAULT_TASKS, REPOSITORY
from tests.functional.test_serving import NEGATIVE, POSITIVE


def test_onnxruntime_runtime_answers_as_the_torch_runtime(client, tmp_path):
    model = tmp_path / "repo" / "chorus"
    (model / "1").mkdir(parents=True)
    shutil.copy(REPOSITORY / "chorus" / "1" / "model.py", model / "1" / "model.py")
    tasks = {name: str(REPOSITORY / "chorus" / "tasks" / name) for name in DEFAULT_TASKS}
    config = (REPOSITORY / "chorus" / "config.pbtxt").read_text()
    config = config.replace('{ key: "runtime", value: { string_value: "torch" } }',
                            '{ key: "runtime", value: { string_value: "onnxruntime" } }')
    config = re.sub(r'\{ key: "tasks", value: \{ string_value: ".*" \} \}',
                    lambda _: '{ key: "tasks", value: { string_value: %s } }' % json.dumps(json.dumps(tasks)), config)
    config = re.sub(r'\{ key: "students", value: \{ string_value: ".*" \} \}',
                    '{ key: "students", value: { string_value: "{}" } }', config)
    assert '"onnxruntime"' in config
    (model / "config.pbtxt").write_text(config)
    texts = POSITIVE + NEGATIVE
    rows = [DEFAULT_TASKS[i % len(DEFAULT_TASKS)] for i in range(len(texts))]
    with TritonServer(tmp_path / "repo", http_port=0, grpc_port=0, metrics_port=0, log_path=tmp_path / "triton.log",
                      task_roots=[REPOSITORY / "chorus" / "tasks"]) as server, ChorusClient(server.http_url) as ort:
        got = ort.classify(texts, rows)
    want = client.classify(texts, rows, students=0)
    assert [p.label for p in got] == [p.label for p in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-3, atol=1e-3)
