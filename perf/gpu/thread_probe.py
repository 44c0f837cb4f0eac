"""Which part of "answer from a worker thread" breaks on the GPU machine? Three tiny Python-backend models, each
answering through the response sender after a worker thread did the work:

- thread_cpu:  the worker computes on the CPU and sends;
- thread_cuda: the worker computes on the GPU and sends;
- main_cuda:   the worker computes on the GPU, execute() waits for it and sends from the stub's main thread.

Run on the GPU machine after perf/gpu/run.sh's set-up (TRITONSERVER, LD_LIBRARY_PATH, the numpy-1.26 venv):
`/tmp/np1env/bin/python3 perf/gpu/thread_probe.py`. Prints one line per model.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from chorus.server import TritonServer

MODEL = '''
import json, queue, threading
import numpy as np, torch
import triton_python_backend_utils as pb_utils
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

class TritonPythonModel:
    def initialize(self, args):
        self.mode = json.loads(args["model_config"])["parameters"]["mode"]["string_value"]
        self.device = "cuda" if self.mode.endswith("cuda") else "cpu"
        torch.zeros(1, device=self.device)
        self.q = queue.Queue()
        threading.Thread(target=self.worker, daemon=True).start()

    def worker(self):
        while True:
            sender, done, box = self.q.get()
            x = torch.ones(4, 4, device=self.device)
            y = float((x @ x).sum())
            out = pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.array([[y]], dtype=np.float32)),
                                              pb_utils.Tensor("S", np.array([[b"ok"]], dtype=np.object_))])
            if self.mode.startswith("main"):
                box.append(out)
                done.set()
            else:
                sender.send(out, flags=FINAL)

    def execute(self, requests):
        for r in requests:
            sender, done, box = r.get_response_sender(), threading.Event(), []
            self.q.put((sender, done, box))
            if self.mode.startswith("main"):
                done.wait()
                sender.send(box[0], flags=FINAL)
        return None
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 1 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ 1 ] }}, {{ name: "S", data_type: TYPE_STRING, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters [ {{ key: "mode", value: {{ string_value: "{name}" }} }} ]
'''

MODES = ("thread_cpu", "thread_cuda", "main_cuda")


def main() -> int:
    repo = Path("/tmp/thread-probe")
    for name in MODES:
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.py").write_text(MODEL)
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp")
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, models_to_load=MODES,
                      log_path=out / "thread_probe.log") as server:
        for name in MODES:
            body = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
            req = urllib.request.Request(f"http://{server.http_url}/v2/models/{name}/infer",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=20) as r:
                    print(f"{name}: answered {[o['data'] for o in json.loads(r.read())['outputs']]}", flush=True)
            except Exception as e:  # noqa: BLE001 - the probe's point is which of these fail
                print(f"{name}: FAILED {e!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
