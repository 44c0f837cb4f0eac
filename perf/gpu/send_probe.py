"""Bisect the scheduler path's crash on the GPU machine: Python-backend models that answer from a worker thread, each
adding one thing chorus's worker does before `sender.send()` (perf/results/h100-2026-11-22: the stub segfaults there).

A model's name lists its features, joined by `-`:
- cuda / cpu: where the worker computes (torch);
- delay:   the worker sleeps 5 ms before answering (the scheduler's batching wait);
- bytes2d: outputs shaped like chorus's (LOGITS fp32 [n, 2], LABEL BYTES [n, 1], LABEL_NAMES BYTES [n, 2]);
- metric:  a custom metric (pb_utils.MetricFamily made in initialize) incremented from the worker;
- log:     pb_utils.Logger.log_info called from the worker;
- pylog:   Python logging routed to pb_utils.Logger (as chorus does), from the worker.

Run on the GPU machine after perf/gpu/run.sh's set-up: `/tmp/np1env/bin/python3 perf/gpu/send_probe.py OUT`.
Prints one line per model: answered or FAILED.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from chorus.server import TritonServer

MODEL = '''
import json, logging, queue, threading, time
import numpy as np, torch
import triton_python_backend_utils as pb_utils
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

class ToTriton(logging.Handler):
    def emit(self, record):
        pb_utils.Logger.log_info(self.format(record))

class TritonPythonModel:
    def initialize(self, args):
        self.features = set(json.loads(args["model_config"])["name"].split("-"))
        self.device = "cuda" if "cuda" in self.features and torch.cuda.is_available() else "cpu"
        torch.zeros(1, device=self.device)
        self.family = pb_utils.MetricFamily("probe_total", "probe", pb_utils.MetricFamily.COUNTER)
        self.metric = self.family.Metric(labels={})
        self.log = logging.getLogger("probe")
        self.log.addHandler(ToTriton())
        self.log.setLevel(logging.INFO)
        self.q = queue.Queue()
        threading.Thread(target=self.worker, daemon=True).start()

    def worker(self):
        while True:
            sender, n = self.q.get()
            if "delay" in self.features:
                time.sleep(0.005)
            x = torch.ones(n, 2, device=self.device)
            logits = (x @ torch.ones(2, 2, device=self.device)).float().cpu().numpy()
            if "metric" in self.features:
                self.metric.increment(1)
            if "log" in self.features:
                pb_utils.Logger.log_info("probe: answering")
            if "pylog" in self.features:
                self.log.info("probe: answering via logging")
            if "bytes2d" in self.features:
                outputs = [pb_utils.Tensor("LOGITS", np.ascontiguousarray(logits, dtype=np.float32)),
                           pb_utils.Tensor("LABEL", np.array([[b"positive"]] * n, dtype=np.object_)),
                           pb_utils.Tensor("LABEL_NAMES", np.array([[b"negative", b"positive"]] * n, dtype=np.object_))]
            else:
                outputs = [pb_utils.Tensor("LOGITS", logits[:, :1].copy())]
            sender.send(pb_utils.InferenceResponse(outputs), flags=FINAL)

    def execute(self, requests):
        for r in requests:
            n = pb_utils.get_input_tensor_by_name(r, "X").as_numpy().shape[0]
            self.q.put((r.get_response_sender(), n))
        return None
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 1 ] }} ]
output [ {{ name: "LOGITS", data_type: TYPE_FP32, dims: [ -1 ] }},
         {{ name: "LABEL", data_type: TYPE_STRING, dims: [ 1 ] }},
         {{ name: "LABEL_NAMES", data_type: TYPE_STRING, dims: [ -1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
'''

MODELS = ("cuda", "cuda-delay", "cuda-bytes2d", "cuda-metric", "cuda-log", "cuda-pylog",
          "cuda-delay-bytes2d-metric-log-pylog", "cpu-delay-bytes2d-metric-log-pylog")


def main() -> int:
    repo = Path("/tmp/send-probe")
    for name in MODELS:
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.py").write_text(MODEL)
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp")
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, models_to_load=MODELS,
                      log_path=out / "send_probe.log") as server:
        for name in MODELS:
            body = {"inputs": [{"name": "X", "shape": [2, 1], "datatype": "FP32", "data": [1.0, 2.0]}]}
            req = urllib.request.Request(f"http://{server.http_url}/v2/models/{name}/infer",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=15) as r:
                    print(f"{name}: answered {[o['name'] for o in json.loads(r.read())['outputs']]}", flush=True)
            except Exception as e:  # noqa: BLE001 - the probe's point is which of these fail
                print(f"{name}: FAILED {e!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
