"""The `chorus` client commands: classify, tasks, task add/remove, health.

`chorus.cli` (the console script) calls `register(subparsers)`; each command's parser sets `func(args) -> exit code`.
Connection flags default to the environment: --url CHORUS_URL, --protocol CHORUS_PROTOCOL, --admin-key
CHORUS_ADMIN_KEY; with neither key given, a server on 127.0.0.1 gets the key that this machine's `chorus serve` keeps
in its key file (`chorus.admin_key`). A failure prints `error: <message>` to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable

from chorus.errors import ChorusError

from .client import ChorusClient

Command = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--url", help="tritonserver host:port (env CHORUS_URL; default 127.0.0.1:8000 http, :8001 grpc)")
    group.add_argument("--protocol", choices=["http", "grpc"], help="env CHORUS_PROTOCOL; default http")
    group.add_argument("--admin-key", help="key for Triton's restricted model-repository API (env CHORUS_ADMIN_KEY; "
                                            "default for a server on 127.0.0.1: the key file of `chorus serve`)")

    p = subparsers.add_parser("classify", parents=[common], help="classify texts with one task")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--truncate", action="store_true",
                   help="classify the first tokens of texts longer than the model reads (default: refuse them)")
    p.add_argument("--students", type=int, metavar="N",
                   help="for a task with students: at most N of them (0 = the teacher); default: as load allows")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.set_defaults(func=classify)

    p = subparsers.add_parser("tasks", parents=[common], help="list served tasks (name, then path on the server)")
    p.set_defaults(func=tasks)

    task = subparsers.add_parser("task", help="add or remove a served task (hot reload)")
    task_sub = task.add_subparsers(dest="task_command", metavar="{add,remove}", required=True)
    p = task_sub.add_parser("add", parents=[common], help="serve a task from a task folder the server can read")
    p.add_argument("name", metavar="NAME")
    p.add_argument("path", metavar="PATH", help="task folder; made absolute, must exist on the server's filesystem")
    p.add_argument("--replace", action="store_true", help="replace a task of that name that is already served")
    p.set_defaults(func=task_add)
    p = task_sub.add_parser("remove", parents=[common], help="stop serving a task")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=task_remove)

    p = subparsers.add_parser("health", parents=[common], help="server and model readiness; exit 1 unless all ready")
    p.set_defaults(func=health)


def client_from_args(args: argparse.Namespace) -> ChorusClient:
    """A ChorusClient from --url/--protocol/--admin-key, falling back to CHORUS_URL/CHORUS_PROTOCOL/CHORUS_ADMIN_KEY
    (and, for the key, to the local `chorus serve`'s key file: ChorusClient looks it up)."""
    return ChorusClient(
        url=args.url or os.environ.get("CHORUS_URL") or None,
        protocol=args.protocol or os.environ.get("CHORUS_PROTOCOL") or "http",
        admin_key=args.admin_key or os.environ.get("CHORUS_ADMIN_KEY") or None,
    )


def _command(fn: Callable[[argparse.Namespace, ChorusClient], int]) -> Command:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            with client_from_args(args) as client:
                return fn(args, client)
        except ChorusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _one_line(text: str) -> str:
    return " ".join(text.split())


@_command
def classify(args: argparse.Namespace, client: ChorusClient) -> int:
    for text, p in zip(args.texts, client.classify(args.texts, args.task, truncate=args.truncate,
                                                   students=args.students)):
        if args.json:
            print(json.dumps({"text": text, **dataclasses.asdict(p)}, ensure_ascii=False))
        else:
            probs = " ".join(f"{label}={prob:.3f}" for label, prob in p.probabilities.items())
            by = f"\tstudents={p.students}" if p.students else ""
            print(f"{p.label}\t{probs}{by}\t{_one_line(text)}")
    return 0


@_command
def tasks(args: argparse.Namespace, client: ChorusClient) -> int:
    for name, path in sorted(client.tasks().items()):
        print(f"{name}\t{path}")
    return 0


@_command
def task_add(args: argparse.Namespace, client: ChorusClient) -> int:
    served = client.add_task(args.name, args.path, replace=args.replace)
    print(f"serving task {args.name} from {served[args.name]} (tasks: {', '.join(sorted(served))})")
    return 0


@_command
def task_remove(args: argparse.Namespace, client: ChorusClient) -> int:
    served = client.remove_task(args.name)
    print(f"removed task {args.name} (tasks: {', '.join(sorted(served)) or 'none'})")
    return 0


@_command
def health(args: argparse.Namespace, client: ChorusClient) -> int:
    report = client.health()
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0 if report["server_live"] and report["server_ready"] and report["model_ready"] else 1
