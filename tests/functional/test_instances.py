"""The entry model with two instances (`instance_group [ { count: 2 ...`: two Python-backend processes, each with its
own GIL, as a GPU deployment runs several): both answer as one instance does, they share one latency table (loading
in turn, one profiles it and the other reads it), and each publishes its own labelled metrics."""

import json
import os
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chorus.client.client import ChorusClient
from chorus.server import TritonServer
from perf import repos
from tests.functional.conftest import DEFAULT_TASKS
from tests.functional.test_serving import NEGATIVE, POSITIVE


def test_two_instances_answer_as_one_and_share_a_latency_table(client, tmp_path):
    table = tmp_path / "latency_table.json"
    repos.scheduler_model(tmp_path / "repo", repos.shipped_tasks(), latency_table=str(table), instances=2,
                          task_roots=json.dumps([str(repos.SHIPPED)]))  # the shipped tasks, by absolute path
    config = (tmp_path / "repo" / "chorus" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 2, kind: KIND_CPU } ]" in config
    texts = POSITIVE + NEGATIVE
    rows = [DEFAULT_TASKS[i % len(DEFAULT_TASKS)] for i in range(len(texts))]
    log = tmp_path / "triton.log"
    with TritonServer(tmp_path / "repo", http_port=0, grpc_port=0, metrics_port=0, log_path=log) as server:
        def one(i: int):  # a client per thread (tritonclient's HTTP client is not thread-safe)
            with ChorusClient(server.http_url) as c:
                return c.classify([texts[i]], rows[i], students=0)[0]

        with ThreadPoolExecutor(4) as pool:  # concurrent requests: both instances busy
            got = list(pool.map(one, range(len(texts))))
            deadline = time.monotonic() + 10  # metrics are published every 0.25 s, not per response
            while True:
                with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
                    metrics = r.read().decode()
                answered = sum(float(v) for v in re.findall(
                    r'^chorus_answered_total\{instance="chorus_0_[01]",model="chorus"\} ([\d.e+]+)$', metrics, re.M))
                if answered >= len(texts) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    assert answered == len(texts), metrics[:3000]
    want = client.classify(texts, rows, students=0)
    assert [p.label for p in got] == [p.label for p in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    text = log.read_text()
    assert text.count("chorus: latency table profiled, saved to") == 1, "both instances profiled"
    assert text.count("chorus: latency table read from") == 1
    threads = max(1, (os.cpu_count() or 1) // 2)  # the cores shared between the two instances' torch pools
    assert text.count(f"chorus: 2 instances share {os.cpu_count()} cores: {threads} torch threads each") == 2
    assert json.loads(table.read_text())["format"].startswith("chorus-latency")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency_table.json", "repo", "triton.log"]  # no temporaries
    gauges = set(re.findall(r'^chorus_queue_depth\{instance="([^"]+)",model="chorus"\}', metrics, re.M))
    assert gauges == {"chorus_0_0", "chorus_0_1"}, metrics[:3000]
