"""Functional tests: a real tritonserver serving the default model repository, reached through tritonclient."""

import threading
from pathlib import Path

import pytest

from chorus.client.client import ChorusClient
from chorus.server import TritonServer

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
ADMIN_KEY = "functional-test-key"
DEFAULT_TASKS = ["amazon_review_sentiment", "movie_review_sentiment", "news_editorial_sentiment", "tweet_sentiment"]


class Background:
    """Threads running `self.run(i)` (i = 0..threads-1) from `with` entry until exit, which sets `self.stop` and
    joins them (at most `join_s` each): load and probes beside a test's main line."""

    join_s = 60.0

    def __init__(self, threads: int = 1):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def run(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.join_s)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/functional" in str(item.fspath):
            item.add_marker(pytest.mark.functional)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not (REPOSITORY / "chorus" / "tasks" / ".built").is_file():
        pytest.fail("the default tasks are not built: run `make repository` (or `make test`, which builds them)")
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    # tests add tasks from their tmp_path folders: the session's temporary folder is a task root
    with TritonServer(REPOSITORY, http_port=0, grpc_port=0, metrics_port=0, admin_key=ADMIN_KEY, log_path=log,
                      task_roots=[tmp_path_factory.getbasetemp()]) as s:
        yield s


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    url = server.http_url if request.param == "http" else server.grpc_url
    with ChorusClient(url, protocol=request.param, admin_key=ADMIN_KEY) as c:
        yield c


@pytest.fixture
def http_client(server):
    with ChorusClient(server.http_url, protocol="http", admin_key=ADMIN_KEY) as c:
        yield c
