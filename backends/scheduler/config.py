"""`SchedulerConfig`: every knob of the length-bucket scheduler, validated once when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from chorus.errors import InvalidInput, dataclass_from_dict


@dataclass(frozen=True)
class SchedulerConfig:
    # Upper edges (inclusive) of the length bins, in tokens: a request of n tokens goes to the first bin with n <= edge.
    # A request longer than the last edge is refused as invalid input.
    bin_edges: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
    element_size: int = 8  # rows in one buffer element (Student Parallelism's small batch); a full element is ready
    max_batch_size: int = 64  # rows in one formed batch (the Triton model's max_batch_size)
    max_tokens_per_batch: int = 16384  # rows x padded length of one formed batch; must fit one request of the last edge
    max_queue: int = 1024  # waiting requests; one more is refused (UNAVAILABLE)
    default_deadline_s: float = 1.0  # seconds after arrival, for a request that sets no deadline of its own
    max_wait_s: float = 0.005  # a partial element is flushed once its oldest request has waited this long
    # Work-conserving: when no batch is in flight (the executor idles), whatever waits goes at once instead of waiting
    # max_wait_s for company; under load requests pile up while a batch runs and are binned by length meanwhile.
    idle_dispatch: bool = True
    # Fairness: an element whose oldest request has seen this many batches formed without it is flushed at the next
    # schedule(), whatever its wait, so no bin or task starves even with a long max_wait_s.
    max_batches_passed: int = 8
    max_requests_per_schedule: int = 256  # what one schedule() batches at most (oldest elements first); bounds the DP
    max_students: int = 4  # students a student batch may carry; choose_k picks 1..max_students (default: all)
    # PET types that do not run on the shared backbone: their requests form batches of their own type only and pay no
    # shared-op time alpha (Student Parallelism's shallow students replace the backbone).
    standalone_pet_types: tuple[str, ...] = ("students",)

    def __post_init__(self) -> None:
        edges = tuple(self.bin_edges)
        object.__setattr__(self, "bin_edges", edges)
        object.__setattr__(self, "standalone_pet_types", tuple(self.standalone_pet_types))
        if not edges or any(not isinstance(e, int) or e < 1 for e in edges):
            raise InvalidInput(f"bin_edges must be positive integers (token counts), got {list(edges)}")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise InvalidInput(f"bin_edges must be strictly increasing, got {list(edges)}")
        for name in ("element_size", "max_batch_size", "max_tokens_per_batch", "max_queue", "max_batches_passed",
                     "max_requests_per_schedule", "max_students"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput(f"{name} must be an integer >= 1, got {value!r}")
        if self.element_size > self.max_batch_size:
            raise InvalidInput(f"element_size ({self.element_size}) must be <= max_batch_size ({self.max_batch_size}): "
                               "an element is dispatched whole")
        if self.max_tokens_per_batch < edges[-1]:
            raise InvalidInput(f"max_tokens_per_batch ({self.max_tokens_per_batch}) must be >= the last bin edge "
                               f"({edges[-1]}), or a request of that length could never be batched")
        if self.max_requests_per_schedule < self.element_size:
            raise InvalidInput(f"max_requests_per_schedule ({self.max_requests_per_schedule}) must be >= element_size "
                               f"({self.element_size}), or a full element could never be scheduled")
        for name in ("default_deadline_s", "max_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.default_deadline_s == 0:
            raise InvalidInput("default_deadline_s must be > 0: every request would be refused")

    @property
    def max_tokens(self) -> int:
        """The longest request accepted: the last bin edge."""
        return self.bin_edges[-1]

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Build from a plain dict (JSON, a Triton config parameter); an unknown key is an error that names it."""
        return dataclass_from_dict(cls, d, "scheduler config")
