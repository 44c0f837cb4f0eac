"""What goes into the scheduler (`Request`) and what comes out of it (`Batch`)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    """One row to classify. Times are float seconds on the caller's clock (the scheduler never reads a clock).

    `deadline` is absolute; None takes `arrival + SchedulerConfig.default_deadline_s` when submitted.
    `payload` is carried to the `Batch` untouched (token ids, a Triton response sender, ...).
    """

    id: Hashable
    task: str
    pet_type: str  # the task's PET method: "lora", "bitfit", "students", ...
    num_tokens: int  # with [CLS]/[SEP]
    arrival: float
    deadline: float | None = None
    payload: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Batch:
    """One batch to run: requests sorted by length, padded to the longest.

    `k` is the number of students for a student batch (None when it runs on the backbone). `estimated_start` /
    `estimated_finish` are the scheduler's latency-table estimates, assuming one executor runs batches in the order
    `schedule` returned them.
    """

    number: int  # 0, 1, 2, ... in the order batches were formed; pass the batch back to `Scheduler.complete`
    requests: tuple[Request, ...]
    padded_len: int
    tasks: tuple[str, ...]  # sorted, distinct
    pet_types: tuple[str, ...]  # sorted, distinct
    k: int | None
    estimated_s: float
    estimated_start: float
    estimated_finish: float

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def real_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)

    @property
    def padding_tokens(self) -> int:
        return self.size * self.padded_len - self.real_tokens

    @property
    def earliest_deadline(self) -> float:
        return min(r.deadline for r in self.requests)
