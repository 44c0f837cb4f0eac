"""Classification through the real tritonserver: HTTP and gRPC, sync and asyncio, mixed-task batches, the CLI."""

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from chorus.client.client import AsyncChorusClient
from tests.functional.conftest import ADMIN_KEY, DEFAULT_TASKS

POSITIVE = [
    "An absolute masterpiece: moving, funny and brilliantly acted.",
    "One of the most beautiful and heartfelt films of the year.",
    "A delightful, charming comedy that left me smiling for days.",
]
NEGATIVE = [
    "A dull, lifeless mess; I was bored from start to finish.",
    "Terrible script, wooden acting and a plot that makes no sense.",
    "An ugly, tedious waste of two hours.",
]


def cli(server, *args, protocol="http"):
    url = server.http_url if protocol == "http" else server.grpc_url
    return subprocess.run([sys.executable, "-m", "chorus.cli", *args, "--url", url, "--protocol", protocol,
                           "--admin-key", ADMIN_KEY], capture_output=True, text=True, timeout=300)


def test_obvious_movie_reviews_are_told_apart(client):
    got = client.classify(POSITIVE + NEGATIVE, "movie_review_sentiment")
    assert [p.label for p in got] == ["positive"] * 3 + ["negative"] * 3
    for p in got:
        assert set(p.probabilities) == {"negative", "positive"}
        assert abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert p.probabilities[p.label] > 0.5


def test_one_request_mixes_tasks_and_matches_rows_sent_alone(client):
    texts = POSITIVE + NEGATIVE + ["ok I guess", "the service was slow but the food was great"]
    tasks = [DEFAULT_TASKS[i % 4] for i in range(len(texts))]
    mixed = client.classify(texts, tasks)
    assert [p.task for p in mixed] == tasks
    for text, task, p in zip(texts, tasks, mixed):
        alone = client.classify([text], task, students=p.students)[0]  # as many students as answered under load
        assert alone.label == p.label and alone.students == p.students
        np.testing.assert_allclose(alone.logits, p.logits, rtol=1e-4, atol=1e-4)


def test_token_ids_give_the_same_answer_as_text(client):
    from chorus.backends.engine import Engine

    ids = Engine().tokenize(POSITIVE[:2])
    by_ids = client.classify_ids(ids, "movie_review_sentiment", students=0)
    by_text = client.classify(POSITIVE[:2], "movie_review_sentiment", students=0)
    for a, b in zip(by_ids, by_text):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client(server, protocol):
    async def go():
        url = server.http_url if protocol == "http" else server.grpc_url
        async with AsyncChorusClient(url, protocol=protocol, admin_key=ADMIN_KEY) as c:
            return await asyncio.gather(c.classify(POSITIVE[:1], "movie_review_sentiment"),
                                        c.classify(NEGATIVE[:1], "movie_review_sentiment"), c.tasks())

    pos, neg, tasks = asyncio.run(go())
    assert pos[0].label == "positive" and neg[0].label == "negative"
    assert sorted(tasks) == DEFAULT_TASKS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_tasks_classify_and_health(server, protocol):
    tasks = cli(server, "tasks", protocol=protocol)
    assert tasks.returncode == 0, tasks.stderr
    assert sorted(line.split()[0] for line in tasks.stdout.splitlines()) == DEFAULT_TASKS
    out = cli(server, "classify", "--task", "movie_review_sentiment", POSITIVE[0], NEGATIVE[0], protocol=protocol)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] == "positive" and lines[1].split()[0] == "negative"
    assert "positive=" in lines[0] and "negative=" in lines[0]
    health = cli(server, "health", protocol=protocol)
    assert health.returncode == 0, health.stderr
    assert "ready" in health.stdout


def test_cli_reports_errors_without_traceback(server):
    out = cli(server, "classify", "--task", "no_such_task", "hello")
    assert out.returncode == 1
    assert out.stderr.startswith("error:") and "no_such_task" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_for_some_outputs_gets_exactly_those(server, protocol):
    """The scheduler answers from its worker; outputs the client did not ask for are never built (the 24.10 stub
    would prune them in send() without the GIL: that crashed the stub on the H100)."""
    if protocol == "http":
        import tritonclient.http as tc

        client = tc.InferenceServerClient(server.http_url)
    else:
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(server.grpc_url)
    text = tc.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[POSITIVE[0].encode()], [NEGATIVE[0].encode()]], dtype=np.object_))
    task = tc.InferInput("TASK", [2, 1], "BYTES")
    task.set_data_from_numpy(np.array([[b"movie_review_sentiment"]] * 2, dtype=np.object_))
    for wanted in (["LOGITS"], ["LABEL"], ["LABEL_NAMES", "LOGITS"]):
        result = client.infer("chorus", [text, task], outputs=[tc.InferRequestedOutput(n) for n in wanted])
        response = result.get_response()
        got = {o["name"] for o in response["outputs"]} if protocol == "http" else {o.name for o in response.outputs}
        assert got == set(wanted)
        if "LABEL" in wanted:
            assert [s.decode() for s in result.as_numpy("LABEL").ravel()] == ["positive", "negative"]
        if "LOGITS" in wanted:
            logits = result.as_numpy("LOGITS")
            assert logits.shape == (2, 2) and logits[0, 1] > logits[0, 0] and logits[1, 0] > logits[1, 1]
    client.close()
