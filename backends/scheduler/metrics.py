"""Counters the server exports (Triton custom metrics): what was batched, how padded, how long requests waited."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class SchedulerMetrics:
    submitted: int = 0
    refused_queue_full: int = 0
    refused_deadline: int = 0
    expired: int = 0  # admitted requests refused at dispatch: their own deadline passed while they waited
    batches: int = 0
    scheduled_requests: int = 0
    real_tokens: int = 0  # tokens of the requests in formed batches
    batch_tokens: int = 0  # rows x padded length of formed batches
    batch_sizes: Counter = field(default_factory=Counter)  # rows -> batches
    padded_lengths: Counter = field(default_factory=Counter)  # padded length -> batches
    queue_depth: int = 0  # requests waiting after the last submit or schedule
    wait_s_sum: float = 0.0  # arrival -> schedule, over scheduled requests
    wait_s_max: float = 0.0
    expected_late: int = 0  # requests in batches estimated to finish after their deadline
    deadline_splits: int = 0  # batches split so their most urgent requests run first
    student_batches: int = 0
    students_k_sum: int = 0
    students_in_use: int = 0  # k of the latest student batch

    @property
    def padding_fraction(self) -> float:
        """Padding tokens / all tokens (rows x padded length) of formed batches."""
        return 1.0 - self.real_tokens / self.batch_tokens if self.batch_tokens else 0.0

    @property
    def refused(self) -> int:
        return self.refused_queue_full + self.refused_deadline + self.expired

    @property
    def mean_wait_s(self) -> float:
        return self.wait_s_sum / self.scheduled_requests if self.scheduled_requests else 0.0

    def snapshot(self) -> SchedulerMetrics:
        return copy.deepcopy(self)

    def as_dict(self) -> dict:
        """Plain values for an exporter, derived ratios included."""
        d = asdict(self)
        d["batch_sizes"], d["padded_lengths"] = dict(self.batch_sizes), dict(self.padded_lengths)
        d.update(padding_fraction=self.padding_fraction, refused=self.refused, mean_wait_s=self.mean_wait_s)
        return d
