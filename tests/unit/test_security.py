"""The admin key of `chorus serve` (chorus.admin_key) and the task roots (chorus.backends.paths): no server."""

from __future__ import annotations

import argparse
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chorus import admin_key as keys
from chorus.backends.paths import TASK_ROOTS_ENV, confine, task_dir, task_roots
from chorus.client import ChorusClient
from chorus.errors import ChorusError, ServerError, TaskPathError
from chorus.server import TritonServer, register

TOY_CONFIG = 'name: "chorus"\nbackend: "python"\nmax_batch_size: 0\n'


@pytest.fixture
def key_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state" / "chorus" / "admin-key"
    monkeypatch.setenv(keys.KEY_FILE_ENV, str(path))
    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    return path


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chorus")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


# ------------------------------------------------------------------------------------------ the key file
def test_key_file_location_follows_env_then_xdg_then_home():
    assert keys.key_file({keys.KEY_FILE_ENV: "/run/k", "XDG_STATE_HOME": "/x"}) == Path("/run/k")
    assert keys.key_file({"XDG_STATE_HOME": "/x/state"}) == Path("/x/state/chorus/admin-key")
    home = Path.home() / ".local" / "state" / "chorus" / "admin-key"
    assert keys.key_file({"XDG_STATE_HOME": "relative/ignored"}) == home  # the XDG spec: only absolute paths count
    assert keys.key_file({}) == home


def test_first_start_writes_a_0600_key_and_later_starts_reuse_it(key_path):
    first = keys.server_key(None, "127.0.0.1")
    assert (first.file, first.created) == (key_path, True)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert key_path.read_text().strip() == first.value and len(first.value) >= 43  # token_urlsafe(32)
    assert first.value not in repr(first)
    again = keys.server_key(None, "localhost")
    assert (again.value, again.created) == (first.value, False)
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["admin-key"]  # no temporaries left


def test_concurrent_first_starts_agree_on_one_key(key_path):
    start = threading.Barrier(8)

    def one(_: int) -> keys.ServerKey:
        start.wait()
        return keys.server_key(None, "127.0.0.1")

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert len({k.value for k in got}) == 1
    assert sum(k.created for k in got) == 1
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["admin-key"]


def test_the_key_file_env_var_moves_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert keys.server_key(None, "::1").file == tmp_path / "xdg" / "chorus" / "admin-key"
    monkeypatch.setenv(keys.KEY_FILE_ENV, str(tmp_path / "elsewhere" / "key"))
    made = keys.server_key(None, "127.0.0.1")
    assert made.file == tmp_path / "elsewhere" / "key" and made.created
    assert (tmp_path / "elsewhere" / "key").read_text().strip() == made.value


def test_a_given_key_wins_and_writes_no_file(key_path):
    given = keys.server_key("my-key_1", "0.0.0.0")
    assert (given.value, given.file) == ("my-key_1", None)
    assert not key_path.exists()


@pytest.mark.parametrize("bad", ["two words", "tab\tkey", "clé", "line\nbreak"])
def test_keys_that_cannot_be_a_header_are_refused(bad):
    with pytest.raises(ChorusError, match="admin key from --admin-key / CHORUS_ADMIN_KEY .* HTTP header"):
        keys.server_key(bad, "127.0.0.1")
    with pytest.raises(ChorusError, match="empty"):
        keys.check_key("", "test")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST."])
def test_loopback_hosts(host):
    assert keys.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.1", "example.com", "::ffff:10.0.0.1"])
def test_a_host_beyond_loopback_without_a_given_key_is_refused(host, key_path):
    assert not keys.is_loopback(host)
    with pytest.raises(ChorusError, match="--admin-key KEY.*CHORUS_ADMIN_KEY=KEY"):
        keys.server_key(None, host)
    assert not key_path.exists()


def test_a_key_file_others_can_read_is_refused(key_path):
    value = keys.server_key(None, "127.0.0.1").value
    key_path.chmod(0o644)
    with pytest.raises(ChorusError, match=f"chmod 600 {key_path}"):
        keys.server_key(None, "127.0.0.1")
    key_path.chmod(0o600)
    assert keys.server_key(None, "127.0.0.1").value == value


def test_a_key_file_that_is_a_symlink_is_refused(key_path, tmp_path):
    target = tmp_path / "planted"
    target.write_text("planted-key\n")
    target.chmod(0o600)
    key_path.parent.mkdir(parents=True)
    key_path.symlink_to(target)
    with pytest.raises(ChorusError, match=str(key_path)):
        keys.server_key(None, "127.0.0.1")


# ------------------------------------------------------------------------------------------ chorus serve
def test_chorus_serve_beyond_loopback_without_a_key_exits_with_how_to_set_one(tmp_path, key_path, capsys):
    (tmp_path / "repo" / "chorus").mkdir(parents=True)
    (tmp_path / "repo" / "chorus" / "config.pbtxt").write_text(TOY_CONFIG)
    args = serve_args("--repository", str(tmp_path / "repo"), "--host", "0.0.0.0", "--log-file",
                      str(tmp_path / "server.log"))
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0'" in err and "--admin-key" in err and "CHORUS_ADMIN_KEY" in err
    assert not (tmp_path / "server.log").exists()  # tritonserver was not started
    assert not key_path.exists()


def test_triton_server_refuses_an_open_repository_api_beyond_loopback(tmp_path):
    with pytest.raises(ServerError, match="admin_key"):
        TritonServer(tmp_path, host="0.0.0.0", http_port=1, grpc_port=2, metrics_port=3).start()
    cmd = TritonServer(tmp_path, host="0.0.0.0", admin_key="k").command(Path("/x/tritonserver"), None)
    assert "--http-restricted-api=model-repository,shared-memory,trace,logging:admin-key=k" in cmd


def test_serve_takes_task_roots(monkeypatch):
    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    args = serve_args("--task-root", "/srv/tasks", "--task-root", "/data/students")
    assert args.task_roots == [Path("/srv/tasks"), Path("/data/students")] and args.admin_key is None
    assert TritonServer(task_roots=args.task_roots).task_roots == (Path("/srv/tasks"), Path("/data/students"))


# ------------------------------------------------------------------------------------------ clients
class RecordingTriton:
    """Stands in for tritonclient's client object: answers the config read, records the load's headers."""

    def __init__(self) -> None:
        self.headers: list[dict | None] = []

    def get_model_config(self, model, headers=None, **kw):
        return {"name": "chorus", "parameters": {"tasks": {"string_value": "{}"}}}

    def load_model(self, model, config=None, headers=None, **kw):
        self.headers.append(headers)

    def close(self) -> None:
        pass


def load_headers(url: str, protocol: str = "http", admin_key: str | None = None) -> dict | None:
    fake = RecordingTriton()
    with ChorusClient(url, protocol=protocol, admin_key=admin_key) as client:
        client._t.client = fake
        client.add_task("t", "/srv/tasks/t")
    return fake.headers[0]


def test_clients_find_the_local_servers_key_file(key_path):
    value = keys.server_key(None, "127.0.0.1").value
    assert load_headers("127.0.0.1:8000") == {"admin-key": value}
    assert load_headers("localhost:8001", "grpc") == {"admin-key": value, "triton-grpc-protocol-admin-key": value}
    assert load_headers("[::1]:8000") == {"admin-key": value}


def test_a_given_key_beats_env_beats_the_file(key_path, monkeypatch):
    keys.server_key(None, "127.0.0.1")
    monkeypatch.setenv(keys.KEY_ENV, "from-env")
    assert load_headers("127.0.0.1:8000") == {"admin-key": "from-env"}
    assert load_headers("127.0.0.1:8000", admin_key="given") == {"admin-key": "given"}


def test_the_local_key_is_never_sent_to_another_host(key_path):
    keys.server_key(None, "127.0.0.1")
    assert load_headers("10.0.0.7:8000") is None
    assert load_headers("inference.example.com:8000") is None
    assert keys.client_key("10.0.0.7:8000") is None


def test_no_key_file_means_no_header(key_path):
    assert load_headers("127.0.0.1:8000") is None


def test_a_bad_key_file_fails_a_load_with_its_fix_but_not_a_read(key_path):
    keys.server_key(None, "127.0.0.1")
    key_path.chmod(0o640)
    fake = RecordingTriton()
    with ChorusClient("127.0.0.1:8000") as client:
        client._t.client = fake
        assert client.tasks() == {}  # reading the config needs no key
        with pytest.raises(ChorusError, match="chmod 600"):
            client.add_task("t", "/srv/tasks/t")
    assert fake.headers == []


def test_the_refusal_message_says_where_the_key_is(key_path):
    from tritonclient.utils import InferenceServerException

    from chorus.client import wire

    err = wire.translate_error(InferenceServerException("This API is restricted, expecting header 'admin-key'",
                                                        status="403"), "add task 't'", "127.0.0.1:8000", "http")
    assert "--admin-key" in str(err) and str(key_path) in str(err)


# ------------------------------------------------------------------------------------------ task roots
@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(TASK_ROOTS_ENV, raising=False)
    model = tmp_path / "repo" / "chorus"
    (model / "tasks" / "inside").mkdir(parents=True)
    (model / "tasks" / "inside" / "task.json").write_text("{}")
    (tmp_path / "outside" / "task").mkdir(parents=True)
    (tmp_path / "outside" / "task" / "task.json").write_text("{}")
    return model


def test_a_directory_inside_the_model_directory_is_allowed(model_dir):
    assert confine(model_dir / "tasks" / "inside", [model_dir]) == (model_dir / "tasks" / "inside").resolve()
    assert task_dir(model_dir, "t", "tasks/inside") == (model_dir / "tasks" / "inside").resolve()
    assert task_dir(model_dir, "t", "tasks/not_there_yet") == (model_dir / "tasks" / "not_there_yet").resolve()


def test_dot_dot_out_of_the_roots_is_refused(model_dir):
    with pytest.raises(TaskPathError, match=r"task 'sneaky': .*\.\./\.\./outside/task \(it resolves to .*outside/task\)"
                                            r" is outside the allowed task roots: .*repo/chorus"):
        task_dir(model_dir, "sneaky", "../../outside/task")
    with pytest.raises(TaskPathError, match="outside the allowed task roots"):
        confine(model_dir / "tasks" / ".." / "..", [model_dir])


def test_a_symlink_out_of_the_roots_is_refused(model_dir, tmp_path):
    (model_dir / "tasks" / "link").symlink_to(tmp_path / "outside" / "task", target_is_directory=True)
    with pytest.raises(TaskPathError, match=r"task 'linked': .*tasks/link \(it resolves to .*outside/task\)"):
        task_dir(model_dir, "linked", "tasks/link")


def test_a_symlink_inside_a_task_directory_leading_out_is_refused(model_dir, tmp_path):
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.write_bytes(b"x")
    (model_dir / "tasks" / "inside" / "adapter.safetensors").symlink_to(secret)
    with pytest.raises(TaskPathError, match=r"students of task 'inner': .*adapter.safetensors is a symlink to "
                                            r".*outside/secret.safetensors, outside the allowed task roots"):
        task_dir(model_dir, "inner", "tasks/inside", kind="students of task")


def test_a_symlink_loop_is_refused_by_name(model_dir):
    (model_dir / "tasks" / "inside" / "a").symlink_to(model_dir / "tasks" / "inside" / "b")
    (model_dir / "tasks" / "inside" / "b").symlink_to(model_dir / "tasks" / "inside" / "a")
    with pytest.raises(TaskPathError, match=r"task 'looped': cannot resolve .*inside/[ab]"):
        task_dir(model_dir, "looped", "tasks/inside")
    with pytest.raises(TaskPathError, match=r"task 'looped': cannot resolve .*inside/a"):
        task_dir(model_dir, "looped", "tasks/inside/a")


def test_symlinks_that_stay_inside_are_allowed(model_dir):
    (model_dir / "tasks" / "alias").symlink_to(model_dir / "tasks" / "inside", target_is_directory=True)
    (model_dir / "tasks" / "inside" / "again").symlink_to(model_dir / "tasks" / "inside", target_is_directory=True)
    assert task_dir(model_dir, "t", "tasks/alias") == (model_dir / "tasks" / "inside").resolve()


def test_an_absolute_path_in_an_allowed_root_is_allowed(model_dir, tmp_path, monkeypatch):
    outside = str(tmp_path / "outside" / "task")
    with pytest.raises(TaskPathError, match=f"--task-root {tmp_path / 'outside'}"):
        task_dir(model_dir, "t", outside)
    monkeypatch.setenv(TASK_ROOTS_ENV, os.pathsep.join(["/nonexistent/root", str(tmp_path / "outside")]))
    assert task_dir(model_dir, "t", outside) == Path(outside).resolve()
    assert confine(outside, [tmp_path / "outside"]) == Path(outside).resolve()


def test_a_root_is_a_folder_not_a_name_prefix(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks_evil" / "t").mkdir(parents=True)
    with pytest.raises(TaskPathError):
        confine(tmp_path / "tasks_evil" / "t", [tmp_path / "tasks"])


def test_a_root_reached_through_a_symlink_is_the_folder_it_names(tmp_path):
    (tmp_path / "real" / "t").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert confine(tmp_path / "alias" / "t", [tmp_path / "alias"]) == (tmp_path / "real" / "t").resolve()


def test_roots_come_from_the_env_and_the_config_file_on_disk(model_dir, tmp_path):
    (model_dir / "config.pbtxt").write_text(
        TOY_CONFIG + 'parameters [\n  { key: "task_roots", value: { string_value: "[\\"/srv/tasks\\", \\"shared\\"]" '
                     '} }\n]\n')
    roots = task_roots(model_dir, {TASK_ROOTS_ENV: f"/data/a{os.pathsep}{os.pathsep}rel"})
    assert roots == [model_dir.resolve(), Path("/data/a"), (model_dir / "rel").resolve(), Path("/srv/tasks"),
                     (model_dir / "shared").resolve()]
    (model_dir / "config.pbtxt").write_text(  # a parameter shown in a comment is not set; a '#' in a string is text
        TOY_CONFIG + '# e.g. { key: "task_roots", value: { string_value: "[\\"/\\"]" } }\n'
        'parameters [ { key: "note", value: { string_value: "a # b" } },\n'
        '  { key: "task_roots", value: { string_value: "[\\"/srv/#tasks\\"]" } } ] # "quoted" \'\n')
    assert task_roots(model_dir, {}) == [model_dir.resolve(), Path("/srv/#tasks")]
    (model_dir / "config.pbtxt").write_text(
        TOY_CONFIG + '# { key: "task_roots", value: { string_value: "[\\"/\\"]" } }\n')
    assert task_roots(model_dir, {}) == [model_dir.resolve()]
    (model_dir / "config.pbtxt").write_text(
        TOY_CONFIG + 'parameters { key: "task_roots" value { string_value: "/srv/tasks" } }\n')
    with pytest.raises(TaskPathError, match=r"task_roots in .*config.pbtxt must be a JSON list"):
        task_roots(model_dir, {})


def test_the_error_names_the_task_path_roots_and_fix(model_dir, tmp_path):
    with pytest.raises(TaskPathError) as info:
        task_dir(model_dir, "imdb_like", str(tmp_path / "outside" / "task"))
    message = str(info.value)
    for part in ("task 'imdb_like'", str(tmp_path / "outside" / "task"), str(model_dir.resolve()),
                 f"--task-root {tmp_path / 'outside'}", TASK_ROOTS_ENV, "task_roots", "config.pbtxt"):
        assert part in message, (part, message)
    assert json.dumps(str(tmp_path / "outside")) in message
