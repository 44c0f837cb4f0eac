"""Task and student directories stay inside the server's task roots.

A load request (`chorus task add`, `ChorusClient.set_students`) or a config names directories the server then reads.
Each must resolve, with `..` collapsed and symlinks followed, inside one of the task roots, and no symlink beneath it
may lead out of them; otherwise loading stops with `TaskPathError` naming the task, the path and the roots.

The roots are
- the model's own directory (`model_repository/chorus/`; relative task paths are under it);
- `CHORUS_TASK_ROOTS` in the server's environment (`os.pathsep`-separated; `chorus serve --task-root DIR` adds to it);
- the `task_roots` parameter (a JSON list) of the `config.pbtxt` in the model's directory, read from that file: a
  load request's config cannot widen the roots.
A relative root is under the model's directory. The check runs when the model loads; a root's contents are trusted
from then on, so a root should be writable only by those trusted to add tasks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from chorus.errors import TaskPathError

TASK_ROOTS_ENV = "CHORUS_TASK_ROOTS"
CONFIG_PARAMETER = "task_roots"
MAX_ENTRIES = 100_000  # the most entries a task or student directory may hold (its symlinks are checked)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _shown(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none)"


def _resolve(path: Path | str) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise TaskPathError(f"cannot resolve {path}: {exc}") from None


def _outside(message: str, where: Path) -> TaskPathError:
    error = TaskPathError(message)
    error.outside = where  # the resolved place outside the roots
    return error


def confine(path: Path | str, roots: Sequence[Path | str]) -> Path:
    """`path` resolved (symlinks followed, `..` collapsed) if it lies inside one of `roots` (resolved too) and, for a
    directory, no symlink beneath it leads outside them. Raises TaskPathError otherwise (its `outside` attribute:
    the resolved place that is out)."""
    real_roots = [_resolve(r) for r in roots]
    resolved = _resolve(path)
    if not _inside(resolved, real_roots):
        via = "" if resolved == Path(path).absolute() else f" (it resolves to {resolved})"
        raise _outside(f"{path}{via} is outside the allowed task roots: {_shown(real_roots)}", resolved)
    if resolved.is_dir():
        _check_links(resolved, real_roots)
    return resolved


def _check_links(top: Path, roots: Sequence[Path]) -> None:
    """Every symlink under `top` (following those that stay inside `roots`) leads inside `roots`."""
    seen: set[Path] = set()
    pending, count = [top], 0
    while pending:
        folder = pending.pop()
        real = _resolve(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                if count > MAX_ENTRIES:
                    raise TaskPathError(f"{top} holds more than {MAX_ENTRIES} entries: not a task or student "
                                        "directory")
                if entry.is_symlink():
                    target = _resolve(entry.path)
                    if not _inside(target, roots):
                        raise _outside(f"{entry.path} is a symlink to {target}, outside the allowed task roots: "
                                       f"{_shown(roots)}", target)
                if entry.is_dir(follow_symlinks=True):
                    pending.append(Path(entry.path))


_PARAMETER = re.compile(r'\{\s*key\s*:\s*"([^"]*)"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}')


def _without_comments(pbtxt: str) -> str:
    """`pbtxt` with its `#` comments removed (a `#` inside a quoted string stays): a parameter shown in a comment is
    not set."""
    out: list[str] = []
    quote, escaped, comment = "", False, False
    for ch in pbtxt:
        if comment:
            comment = ch != "\n"
        elif escaped:
            escaped = False
        elif quote:
            escaped, quote = ch == "\\", "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            comment = True
        if not comment:
            out.append(ch)
    return "".join(out)


def _string_parameter(pbtxt: str, key: str) -> str | None:
    """The string value of the parameter `key` in a config.pbtxt's text, or None. Read with a pattern for the
    `{ key: "...", value: { string_value: "..." } }` entries, not protobuf: the backend stub's Python need not have
    Triton's client packages. Quotes and backslashes inside the value are escaped as in JSON."""
    found = None
    for name, value in _PARAMETER.findall(_without_comments(pbtxt)):
        if name == key:
            found = json.loads(f'"{value}"'.replace("\\'", "'"))
    return found


def config_roots(config_file: Path) -> list[str]:
    """The `task_roots` parameter (JSON list of folders) of a Triton `config.pbtxt`; [] if the file or the
    parameter is absent."""
    if not config_file.is_file():
        return []
    try:
        text = _string_parameter(config_file.read_text(), CONFIG_PARAMETER)
    except (UnicodeDecodeError, OSError, ValueError) as exc:
        raise TaskPathError(f"cannot read the parameter {CONFIG_PARAMETER} from {config_file}: {exc}") from None
    if text is None:
        return []
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        value = exc
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TaskPathError(f"parameter {CONFIG_PARAMETER} in {config_file} must be a JSON list of folders, e.g. "
                            f'["/srv/tasks"]; got {text!r}')
    return value


def task_roots(model_dir: Path | str, env: Mapping[str, str] | None = None) -> list[Path]:
    """The folders task and student directories may come from: the model's directory, `CHORUS_TASK_ROOTS`, and the
    `task_roots` parameter of `model_dir/config.pbtxt` (relative ones under `model_dir`), resolved."""
    model_dir = _resolve(model_dir)
    env = os.environ if env is None else env
    named = [r for r in env.get(TASK_ROOTS_ENV, "").split(os.pathsep) if r]
    named += config_roots(model_dir / "config.pbtxt")
    return list(dict.fromkeys([model_dir] + [_resolve(model_dir / Path(r).expanduser()) for r in named]))


def task_dir(model_dir: Path | str, name: str, path: str, kind: str = "task",
             env: Mapping[str, str] | None = None) -> Path:
    """The directory of `kind` `name` given as `path` in a config (relative: under `model_dir`), resolved and
    confined to the task roots; TaskPathError names the task, the path, the roots and how to allow a folder."""
    roots = task_roots(model_dir, env)
    try:
        return confine(Path(model_dir) / path, roots)
    except TaskPathError as exc:
        outside = getattr(exc, "outside", None)
        if outside is None:
            raise TaskPathError(f"{kind} {name!r}: {exc}") from None
        folder = outside.parent if outside.parent != outside.parent.parent else Path("DIR")
        raise TaskPathError(
            f"{kind} {name!r}: {exc}. Fix: put it under one of those folders, or add the folder holding it to the "
            f"server's task roots (a folder only trusted users can write): `chorus serve --task-root {folder}`, env "
            f"{TASK_ROOTS_ENV}={folder} for tritonserver, or the parameter {CONFIG_PARAMETER} "
            f'(["{folder}"]) in {Path(model_dir) / "config.pbtxt"}') from None
