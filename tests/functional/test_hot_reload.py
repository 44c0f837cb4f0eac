"""Tasks are added, replaced and removed while other tasks are under load: nothing fails, the server is not restarted."""

import shutil
import time

import pytest

from chorus.backends.task_files import load_task, save_task
from chorus.client.client import ChorusClient
from chorus.errors import ChorusError, InvalidInput, UnknownTask
from tests.functional.conftest import ADMIN_KEY, DEFAULT_TASKS, REPOSITORY, Background

TASKS_DIR = REPOSITORY / "chorus" / "tasks"


class Load(Background):
    """Background clients classifying with the default tasks until stopped; every failure is kept."""

    def __init__(self, server, threads=3):
        super().__init__(threads)
        self.server, self.ok, self.failures = server, 0, []

    def run(self, i):
        protocol = "grpc" if i % 2 else "http"
        with ChorusClient(self.server.grpc_url if i % 2 else self.server.http_url, protocol=protocol) as c:
            while not self.stop.is_set():
                try:
                    got = c.classify(["a wonderful, moving film", "a dreadful bore"], DEFAULT_TASKS[i % 2])
                    assert len(got) == 2
                    self.ok += 1
                except Exception as e:  # noqa: BLE001 - every failure is a test failure, kept for the report
                    self.failures.append(repr(e))


def test_add_replace_remove_under_load(server, http_client, tmp_path):
    pid = server.pid
    # the new task: the movie task's files under a new name; its replacement: the tweet task's
    shutil.copytree(TASKS_DIR / "movie_review_sentiment", tmp_path / "v1")
    shutil.copytree(TASKS_DIR / "tweet_sentiment", tmp_path / "v2")
    text = ["What a terrific, heartwarming story."]
    try:
        with Load(server) as load:
            time.sleep(1)
            http_client.add_task("film_copy", tmp_path / "v1")
            assert "film_copy" in http_client.tasks()
            v1 = http_client.classify(text, "film_copy")[0]
            teacher = http_client.classify(text, "movie_review_sentiment", students=0)[0]  # film_copy has no students
            assert v1.logits == pytest.approx(teacher.logits, abs=1e-4)

            with pytest.raises(InvalidInput, match="replace"):
                http_client.add_task("film_copy", tmp_path / "v2")
            http_client.add_task("film_copy", tmp_path / "v2", replace=True)
            v2 = http_client.classify(text, "film_copy")[0]
            assert v2.logits == pytest.approx(http_client.classify(text, "tweet_sentiment")[0].logits, abs=1e-4)
            assert v2.logits != pytest.approx(v1.logits, abs=1e-4)

            http_client.remove_task("film_copy")
            with pytest.raises(ChorusError, match="unknown task 'film_copy'"):
                http_client.classify(text, "film_copy")
            time.sleep(1)
        assert load.failures == [] and load.ok > 0
    finally:
        if "film_copy" in http_client.tasks():
            http_client.remove_task("film_copy")
    assert server.pid == pid and server.running
    assert sorted(http_client.tasks()) == DEFAULT_TASKS


def test_malformed_task_file_is_refused_and_serving_goes_on(server, http_client, tmp_path):
    spec = load_task(TASKS_DIR / "movie_review_sentiment", "movie_review_sentiment")
    site = "encoder.layer.0.attention.self.query.lora_A"
    spec.tensors[site] = spec.tensors[site][:, :100]  # a LoRA A that does not fit the 384-wide backbone
    save_task(spec, tmp_path / "bad")
    with pytest.raises(ChorusError, match=rf"{site}.*shape \(8, 100\).*\(8, 384\)"):
        http_client.add_task("bad_task", tmp_path / "bad")
    with pytest.raises(ChorusError, match="not a directory"):
        http_client.add_task("missing_task", tmp_path / "nowhere")
    assert sorted(http_client.tasks()) == DEFAULT_TASKS
    assert http_client.classify(["a wonderful film"], "movie_review_sentiment")[0].label == "positive"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 65])
def test_unsafe_task_names_are_refused(http_client, name, tmp_path):
    with pytest.raises(InvalidInput, match="task name"):
        http_client.add_task(name, tmp_path)


def test_removing_an_unknown_task_names_the_served_ones(http_client):
    with pytest.raises(UnknownTask, match="movie_review_sentiment"):
        http_client.remove_task("never_added")


def test_repository_api_needs_the_admin_key(server, tmp_path):
    shutil.copytree(TASKS_DIR / "movie_review_sentiment", tmp_path / "t")
    with ChorusClient(server.http_url, protocol="http") as anonymous:
        with pytest.raises(ChorusError, match="(?i)admin|restricted|unauthori|denied"):
            anonymous.add_task("sneaky", tmp_path / "t")
        assert "sneaky" not in anonymous.tasks()
        assert anonymous.classify(["a wonderful film"], "movie_review_sentiment")[0].label == "positive"
    with ChorusClient(server.grpc_url, protocol="grpc") as anonymous:
        with pytest.raises(ChorusError, match="(?i)admin|restricted|unauthori|denied"):
            anonymous.add_task("sneaky", tmp_path / "t")
    with ChorusClient(server.grpc_url, protocol="grpc", admin_key=ADMIN_KEY) as admin:
        admin.add_task("sneaky", tmp_path / "t")
        assert "sneaky" in admin.tasks()
        admin.remove_task("sneaky")
        assert sorted(admin.tasks()) == DEFAULT_TASKS
