"""Through the real tritonserver: a task served by its students (Student Parallelism), the `students` request parameter,
the STUDENTS output and metrics; and concurrent mixed-task load where every answer equals the same input sent alone."""

import json
import random
import time
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chorus.client.client import ChorusClient
from chorus.data import load_dataset
from tests.functional.conftest import ADMIN_KEY, DEFAULT_TASKS, REPOSITORY
from tests.functional.test_serving import NEGATIVE, POSITIVE

STUDENT_TASK = "movie_review_sentiment"  # the default repository ships students for it


def default_floor() -> int | None:
    """What the server answers the student task with by default: its students from this k up, or (None) its teacher
    when no prefix is within the accuracy budget (1 point of validation accuracy; `chorus.backends.students.bank`)."""
    meta = json.loads((REPOSITORY / "chorus" / "students" / STUDENT_TASK / "chorus_students.json").read_text())
    teacher = meta["meta"]["teacher_accuracy"]["validation"]
    return min((p["k"] for p in meta["prefixes"] if 100 * (teacher - p["validation_accuracy"]) <= 1.0), default=None)


def test_a_task_with_students_is_answered_by_them_and_a_request_may_ask_for_fewer_or_the_teacher(client):
    texts = POSITIVE + NEGATIVE
    default, floor = client.classify(texts, STUDENT_TASK), default_floor()
    assert all(p.students == 0 if floor is None else floor <= p.students <= 4 for p in default)
    assert [p.label for p in default] == ["positive"] * 3 + ["negative"] * 3
    teacher = client.classify(texts, STUDENT_TASK, students=0)
    assert [p.students for p in teacher] == [0] * 6
    assert [p.label for p in teacher] == ["positive"] * 3 + ["negative"] * 3
    one = client.classify(texts, STUDENT_TASK, students=1)
    assert [p.students for p in one] == [1] * 6
    assert not np.allclose(one[0].logits, teacher[0].logits)  # a different model answered
    others = client.classify(texts[:2], "tweet_sentiment", students=3)  # no students: the teacher, and it says so
    assert [p.students for p in others] == [0, 0]


def test_metrics_show_students_in_use(server, http_client):
    http_client.classify(POSITIVE, STUDENT_TASK, students=4)
    http_client.classify(POSITIVE, STUDENT_TASK, students=0)
    deadline = time.monotonic() + 10  # the model publishes its metrics every 0.25 s, not per response
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            text = r.read().decode()
        rows = {}  # k -> rows, summed over the model's instances
        for labels, v in re.findall(r'^chorus_student_rows_total\{([^}]*)\} ([\d.e+]+)$', text, re.M):
            assert 'model="chorus"' in labels and 'instance="' in labels, labels
            k = int(re.search(r'\bk="(\d+)"', labels).group(1))
            rows[k] = rows.get(k, 0) + float(v)
        if (rows.get(0, 0) >= 3 and sum(v for k, v in rows.items() if k > 0) >= 3) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows.get(0, 0) >= 3 and sum(v for k, v in rows.items() if k > 0) >= 3
    in_use = re.search(r'^chorus_students_in_use\{instance="chorus_0_0",model="chorus"\} ([\d.e+]+)$', text, re.M)
    assert in_use and 1 <= float(in_use.group(1)) <= 4
    # the stub's garbage collections (every thread waits during one) are timed per instance: at least the one that
    # ends loading (before gc.freeze()) has been published by now
    gcs = re.search(r'^chorus_gc_collections_total\{instance="chorus_0_0",model="chorus"\} ([\d.e+]+)$', text, re.M)
    assert gcs and float(gcs.group(1)) >= 1
    assert re.search(r'^chorus_gc_pause_seconds_total\{instance="chorus_0_0",model="chorus"\} [\d.e+-]+$', text, re.M)


def test_concurrent_mixed_task_load_answers_every_request_as_if_alone(server):
    """Issue 5's functional test: 8 clients x 12 requests of 1-4 rows, real review texts, every default task mixed;
    each answer must equal the same rows sent alone, with as many students as answered under load."""
    texts = [e.text for e in load_dataset("rotten_tomatoes").test[:200]]
    rng = random.Random(0)
    jobs = []
    for _ in range(96):
        n = rng.randint(1, 4)
        jobs.append(([rng.choice(texts) for _ in range(n)], [rng.choice(DEFAULT_TASKS) for _ in range(n)],
                     rng.choice([None, 4])))  # students: as the server decides, or (at most) all four

    def send(job):
        rows, tasks, students = job
        with ChorusClient(server.http_url, admin_key=ADMIN_KEY) as c:
            # deadline: correctness, not admission, is tested here, on a machine of any speed
            return c.classify(rows, tasks, students=students, deadline_ms=600_000)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    def alone(client, text, task, k):
        """The row sent alone with `students=k` (at most k). Just after the load the pruning policy may still run
        fewer: it grows back by one student per batch, so a few light requests get exactly k."""
        for _ in range(8):
            p = client.classify([text], task, students=k)[0]
            if p.students == k:
                return p
        raise AssertionError(f"{task}: asked for {k} students, the server keeps answering with {p.students}")

    ran = set()
    with ChorusClient(server.grpc_url, protocol="grpc", admin_key=ADMIN_KEY) as client:
        for (rows, tasks, _), got in zip(jobs, answers):
            assert [p.task for p in got] == tasks
            for text, task, p in zip(rows, tasks, got):
                ran.add(p.students)
                want = alone(client, text, task, p.students)
                assert want.label == p.label
                np.testing.assert_allclose(p.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert 0 in ran and ran - {0}  # both teachers and students answered
