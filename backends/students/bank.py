"""The students of served tasks, over the serving backbone's own embeddings: what the entry model runs for a task that
has students (Student Parallelism), instead of backbone + PET.

A task's students answer with the task's labels (checked at load); `run(ids, task, k)` runs the first k of them fused
(`StudentGroup`), on the engine's device and dtype. With `devices` (e.g. ["cuda:0", "cuda:1"]) every task's students
are placed over those devices instead (`PlacedStudents`: contiguous ranges, the boosting sum gathered on the first
device; one copy of the embeddings per device, shared by all tasks); a task with fewer students than devices uses the
first K of them. Without (the default), or with just the serving device, the single-device path runs.

Accuracy budget (Student Parallelism: "pruning reads" the accuracy stored with every prefix): a prefix k is *allowed*
when its validation accuracy is at most `max_accuracy_drop` points below the teacher's (both recorded by `chorus
distill`; validation, never test, decides). `floor(task)` is the smallest allowed k: by default a task is answered by
its students only if some prefix is allowed, and pruning never goes below that floor. A student directory without
accuracy records is taken as allowed from k=1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chorus.backends.students.cuda_graphs import GraphedStudents
from chorus.backends.students.embeddings import SharedEmbeddings
from chorus.backends.students.files import read_students
from chorus.backends.students.group import StudentGroup
from chorus.backends.students.placement import PlacedStudents, as_device
from chorus.errors import InvalidInput, TaskFileError, UnknownTask

log = logging.getLogger(__name__)


@dataclass
class ServedStudents:
    group: StudentGroup | PlacedStudents
    labels: list[str]
    prefixes: list[dict]  # prefixes[k-1]: accuracy / latency of the first k students, as measured at distillation
    # the group as CUDA graphs per (k, shape bucket) on a GPU, the group itself elsewhere; or the placed group
    runner: GraphedStudents | PlacedStudents
    floor: int | None = 1  # the smallest prefix within the accuracy budget; None: no prefix is

    @property
    def num_students(self) -> int:
        return self.group.num_students


class StudentBank:
    """{task: its students}, sharing `engine`'s embedding tables (never copied; with `devices`, copied once to each
    other device and shared there)."""

    def __init__(self, engine, max_accuracy_drop: float = 1.0, devices: list[str | torch.device] | None = None):
        self.engine, self.max_accuracy_drop = engine, max_accuracy_drop
        self.embeddings = SharedEmbeddings.from_encoder(engine.model.encoder)
        self.tasks: dict[str, ServedStudents] = {}
        here = self.embeddings.word.device
        self.devices = None if devices is None else [as_device(d) for d in devices]
        if self.devices is not None and not self.devices:
            raise InvalidInput("StudentBank devices: expected at least one device (or None: the serving device)")
        if self.devices == [here]:
            self.devices = None  # the serving device alone: the single-device path
        self._embeddings_on = {here: self.embeddings}  # {device: the tables there}, for every task's placement

    def load(self, task: str, path: str | Path) -> ServedStudents:
        """Load a task's student directory (chorus-students/1); the task must be served, with the same labels."""
        if task not in self.engine.bank.tasks:
            raise UnknownTask(f"students for {task!r}: the task is not served (served: {sorted(self.engine.bank.tasks)})")
        files = read_students(path)
        want = list(self.engine.bank.tasks[task].labels)
        if list(files.labels) != want:
            raise TaskFileError(f"students in {path} answer with labels {files.labels}, but task {task!r} has {want}")
        param = self.embeddings.word
        if self.devices is None:
            group = files.group(self.embeddings, device=param.device, dtype=param.dtype).eval()
            runner = GraphedStudents(group)
            reserved = torch.cuda.memory_reserved(runner.device) if runner.device.type == "cuda" else 0
            if runner.warm_up(self.engine.max_length):
                log.info("students for %s: %d CUDA graphs captured in %.1f s; GPU memory reserved %.2f -> %.2f GiB",
                         task, runner.captured, runner.capture_s, reserved / 2**30,
                         torch.cuda.memory_reserved(runner.device) / 2**30)
        else:  # built on the CPU (checking the embeddings' fingerprint), sliced onto the devices, then dropped
            source = files.group(self.embeddings, device="cpu", dtype=param.dtype)
            group = runner = PlacedStudents(source, self.devices[: source.num_students],
                                            embeddings=self._embeddings_on)
            log.info("students for %s placed: %s", task,
                     ", ".join(f"{d}: {r.start}..{r.stop - 1}" for d, r in zip(group.devices, group.ranges)))
        floor = self._floor(files.prefixes, files.meta.get("teacher_accuracy", {}).get("validation"))
        self.tasks[task] = ServedStudents(group, list(files.labels), list(files.prefixes), runner, floor)
        log.info("students for %s: K=%d, %d layers each; %s", task, group.num_students, files.config.num_layers,
                 f"answering by default with at least {floor}" if floor else
                 f"no prefix within {self.max_accuracy_drop} points of the teacher's validation accuracy: the teacher "
                 "answers unless a request asks for students")
        return self.tasks[task]

    def _floor(self, prefixes: list[dict], teacher: float | None) -> int | None:
        if teacher is None or not prefixes:
            return 1
        allowed = [p["k"] for p in prefixes
                   if p.get("validation_accuracy") is not None
                   and 100 * (teacher - p["validation_accuracy"]) <= self.max_accuracy_drop]
        return min(allowed, default=None)

    def floor(self, task: str) -> int | None:
        """The smallest k the task's students answer with by default (None: its teacher answers by default)."""
        served = self.tasks.get(task)
        return None if served is None else served.floor

    def remove(self, task: str) -> None:
        self.tasks.pop(task, None)

    def num_students(self, task: str) -> int:
        """K of the task's students; 0 when it has none."""
        served = self.tasks.get(task)
        return 0 if served is None else served.num_students

    @property
    def max_students(self) -> int:
        return max((s.num_students for s in self.tasks.values()), default=0)

    @torch.inference_mode()
    def run(self, ids: list[list[int]], task: str, k: int) -> np.ndarray:
        """float32 logits (n, num_labels) of the first k students' boosting sum, for rows of token ids."""
        served = self.tasks.get(task)
        if served is None:
            raise UnknownTask(f"task {task!r} has no students (tasks with students: {sorted(self.tasks)})")
        if not 1 <= k <= served.num_students:
            raise InvalidInput(f"task {task!r} has {served.num_students} students; cannot run {k}")
        input_ids, mask = self.engine.pad(ids)
        device = served.runner.device  # the serving device; a placement's first device
        logits = served.runner(input_ids.to(device), mask.to(device), k=k)
        return logits.float().cpu().numpy()
