"""Student Parallelism's adaptive pruning: how many students a batch runs, from the observed load. Pure Python.

The scheduler calls the policy once per student batch as `choose_k(queue_depth, arrival_rate, capacity,
deadline_slack)` (see `chorus.backends.scheduler.Scheduler`), where `capacity[k-1]` is the requests/s the executor
sustains running the first k students: full batches timed by the latency tables' profile of that prefix on the serving
device, plus the per-batch overhead the scheduler measures. Students are always run as a prefix (the earliest carry
the most of the teacher: boosting), so pruning drops the last ones.

Semantics (K students):
    k_load  = largest k with arrival_rate <= utilisation · capacity[k-1]
    k_queue = largest k with queue_depth / capacity[k-1] <= deadline_slack   (what waits still drains in time)
    k       = clamp(min(k_load, k_queue, previous k + grow_step), min_students, K)
(no k fits: min_students.) A burst (arrivals faster than the executor, or a queue that would miss its deadline) shrinks
k at once; when load falls, k grows back by `grow_step` per batch rather than jumping (no oscillation at the boundary).
Capacities come from measured prefix times (a small batch through fused students costs about the same for any k on a
GPU; a full one scales with k), so pruning shrinks k only as far as the measured times say it gains capacity.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from chorus.errors import InvalidInput


@dataclass
class PruningPolicy:
    num_students: int  # K
    utilisation: float = 0.8  # the share of capacity[k-1] that arrivals may use before k shrinks
    min_students: int = 1
    grow_step: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_students, int) or self.num_students < 1:
            raise InvalidInput(f"num_students must be an integer >= 1, got {self.num_students!r}")
        if not 0 < self.utilisation <= 1:
            raise InvalidInput(f"utilisation must be in (0, 1], got {self.utilisation!r}")
        if not 1 <= self.min_students <= self.num_students:
            raise InvalidInput(f"min_students must be in 1..{self.num_students}, got {self.min_students!r}")
        if self.grow_step < 1:
            raise InvalidInput(f"grow_step must be >= 1, got {self.grow_step!r}")
        self._k = self.num_students
        self._lock = threading.Lock()

    def __call__(self, queue_depth: int, arrival_rate: float, capacity: Sequence[float],
                 deadline_slack: float) -> int:
        K = self.num_students
        if len(capacity) != K:
            raise InvalidInput(f"capacity must hold one rate per prefix k = 1..{K}, got {len(capacity)}")
        if any(c <= 0 or math.isnan(c) for c in capacity):
            k = K  # nothing measured yet: run them all
        else:
            k_load = max((k for k in range(1, K + 1) if arrival_rate <= self.utilisation * capacity[k - 1]),
                         default=1)
            k_queue = max((k for k in range(1, K + 1) if queue_depth / capacity[k - 1] <= max(deadline_slack, 0.0)),
                          default=1)
            k = min(k_load, k_queue)
        with self._lock:
            self._k = max(self.min_students, min(k, self._k + self.grow_step, K))
            return self._k

    @property
    def current(self) -> int:
        """The k of the latest decision."""
        return self._k
