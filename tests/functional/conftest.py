"""Functional tests: a real tritonserver serving the default model repository, reached through tritonclient."""

from pathlib import Path

import pytest

from chorus.client.client import ChorusClient
from chorus.server import TritonServer

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
ADMIN_KEY = "functional-test-key"
DEFAULT_TASKS = ["amazon_review_sentiment", "movie_review_sentiment", "news_editorial_sentiment", "tweet_sentiment"]


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
