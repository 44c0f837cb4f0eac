"""Model repositories for the comparisons, written from the shipped `model_repository/chorus/` so every variant runs
chorus's own entry-model code (`1/model.py`) with the shipped parameters, changed only where a variant says:

    chorus (scheduler)      the shipped config, `batching: scheduler`, every task in one model (its dynamic_batching
                            block, no delay, only hands execute() what queued meanwhile)
    chorus_db<us>           the same with `batching: triton` + `dynamic_batching { max_queue_delay_microseconds: us }`
                            (chorus's scheduler off: Triton's dynamic batcher pads each batch to its longest request)
    teacher_<task>          Triton as people deploy it today: one model per task, one task in its `tasks` map,
                            `batching: triton` + the dynamic batcher

The shipped model directory's `tasks/` and `students/` are linked into each generated model directory, so relative
paths in parameters (tasks, students) resolve as they do in the shipped repository.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "model_repository" / "chorus"
# the shipped dynamic_batching block: one line, or a block closed by a `}` line
DYNAMIC_BATCHING = re.compile(r"^dynamic_batching \{(?:[^\n]*\}\n|.*?^\}\n)", flags=re.M | re.S)
_PARAM = re.compile(r'\{\s*key:\s*"([^"]+)"\s*,\s*value:\s*\{\s*string_value:\s*("(?:[^"\\]|\\.)*")\s*\}\s*\}')


def split_config(text: str) -> tuple[str, dict[str, str]]:
    """(everything before `parameters [`, the parameters as {key: string value}) of a chorus config.pbtxt."""
    at = text.index("parameters [")
    return text[:at], {k: json.loads(v) for k, v in _PARAM.findall(text[at:])}


def render_config(head: str, name: str, params: dict[str, str], dynamic_batching_us: int | None = None,
                  instances: int | None = None) -> str:
    head = re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', head, count=1, flags=re.M)
    if instances is not None:  # the shipped instance_group's count: Python-backend instances, each a process
        head, n = re.subn(r"^(instance_group \[ \{ count: )\d+", rf"\g<1>{int(instances)}", head, flags=re.M)
        if n != 1:
            raise ValueError("the shipped config has no `instance_group [ { count: N, ...` line to change")
    head = "\n".join(line for line in head.splitlines() if not line.lstrip().startswith("#")) + "\n"
    if dynamic_batching_us is not None:  # replaces the shipped block
        head = DYNAMIC_BATCHING.sub("", head)
        head += f"dynamic_batching {{ max_queue_delay_microseconds: {int(dynamic_batching_us)} }}\n"
    body = ",\n".join(f'  {{ key: "{k}", value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items())
    return head + "parameters [\n" + body + "\n]\n"


def write_model(repo: Path, name: str, overrides: dict[str, str], dynamic_batching_us: int | None = None,
                shipped: Path = SHIPPED, instances: int | None = None) -> Path:
    """One model directory `repo/name` from the shipped config with `overrides` (and Triton's batcher if asked)."""
    head, params = split_config((shipped / "config.pbtxt").read_text())
    params.update(overrides)
    linked = [str((shipped / sub).resolve()) for sub in ("tasks", "students") if (shipped / sub).exists()]
    params.setdefault("task_roots", json.dumps(sorted(set(_roots(params) + linked))))
    config = render_config(head, name, params, dynamic_batching_us, instances)  # may refuse: before any file
    model = repo / name
    shutil.rmtree(model, ignore_errors=True)
    (model / "1").mkdir(parents=True)
    shutil.copy(shipped / "1" / "model.py", model / "1" / "model.py")
    for sub in ("tasks", "students"):
        if (shipped / sub).exists():
            (model / sub).symlink_to((shipped / sub).resolve(), target_is_directory=True)
    (model / "config.pbtxt").write_text(config)
    return model


def _roots(params: dict[str, str]) -> list[str]:
    """Task roots for a benchmark's model: the folders holding the absolute task and student paths it serves (the
    harness writes them; a served model only reads directories inside its roots, `chorus.backends.paths`), beside
    the shipped tasks/ and students/ that each generated model links."""
    paths = [p for key in ("tasks", "students") for p in json.loads(params.get(key) or "{}").values()]
    return sorted({str(Path(p).parent) for p in paths if Path(p).is_absolute()})


def scheduler_model(repo: Path, tasks: dict[str, str], name: str = "chorus", instances: int | None = None,
                    **params: str) -> str:
    write_model(repo, name, {"batching": "scheduler", "tasks": json.dumps(tasks), **params}, instances=instances)
    return name


def dynamic_batcher_model(repo: Path, tasks: dict[str, str], delay_us: int, **params: str) -> str:
    name = f"chorus_db{delay_us}"
    write_model(repo, name, {"batching": "triton", "tasks": json.dumps(tasks), **params}, dynamic_batching_us=delay_us)
    return name


def per_task_models(repo: Path, tasks: dict[str, str], delay_us: int, **params: str) -> dict[str, str]:
    """{task: model name}: one Triton model per task, each with its own copy of the backbone."""
    out = {}
    for task, path in tasks.items():
        out[task] = f"teacher_{task}"
        write_model(repo, out[task], {"batching": "triton", "tasks": json.dumps({task: path}),
                                      "task_capacity": "2", **params}, dynamic_batching_us=delay_us)
    return out


def shipped_tasks(shipped: Path = SHIPPED) -> dict[str, str]:
    """The shipped task map with absolute paths."""
    _, params = split_config((shipped / "config.pbtxt").read_text())
    return {k: str((shipped / v).resolve()) for k, v in json.loads(params.get("tasks", "{}")).items()}


FLOOR = "floor"  # the do-nothing model served beside chorus (perf/floor_model.py)


def floor_model(repo: Path, name: str = FLOOR, instances: int = 1, shipped: Path = SHIPPED) -> str:
    """A model with the shipped model's inputs, outputs and batching that does no work: what the Python backend
    itself costs, the floor every served figure is read against."""
    head, _ = split_config((shipped / "config.pbtxt").read_text())
    config = render_config(head, name, {}, instances=instances).replace("parameters [\n\n]\n", "")
    model = repo / name
    shutil.rmtree(model, ignore_errors=True)
    (model / "1").mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("floor_model.py"), model / "1" / "model.py")
    (model / "config.pbtxt").write_text(config)
    return name
