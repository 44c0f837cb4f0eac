"""CUDA graphs of a `StudentGroup`: one captured forward per (k, batch bucket, length bucket).

Shallow students are launch-bound on a GPU (a 2-layer student at batch 1 is ~1.3 ms eager, ~0.2 ms as a graph on an
an H100), so replaying a captured graph is most of Student Parallelism's latency gain there.

Semantics (what `GraphedStudents(ids, mask, k)` returns, the same as `group(ids, mask, k=k)`):
    B, T = ids.shape;  b, t = the smallest buckets >= B, T    (larger than every bucket: run eagerly)
    static_ids[:b, :t] = pad(ids to (b, t) with pad id 0);  static_mask = pad(mask with 0), every padding row keeps
                         one real position so its softmax / mean stays finite (its result is dropped)
    replay graph[(k, b, t)];  return static_out[:B].clone()
Rows never interact in a student (attention is within a row), so padding rows and positions change nothing for the
real rows. On the CPU, or for any tensor not on the group's CUDA device, the eager group runs.
"""

from __future__ import annotations

import time

import torch

from chorus.backends.graphs import bucket, capture_stream
from chorus.backends.students.group import StudentGroup

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_BUCKETS = (16, 32, 64, 128, 256)


class GraphedStudents:
    def __init__(self, group: StudentGroup, batch_buckets=BATCH_BUCKETS, length_buckets=LENGTH_BUCKETS):
        self.group = group
        self.batch_buckets, self.length_buckets = tuple(batch_buckets), tuple(length_buckets)
        self.device = group.boosting_weights.device
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.capture_s = 0.0  # the time every capture took

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def _capture(self, k: int, b: int, t: int):
        start = time.perf_counter()
        try:
            return self._capture_graph(k, b, t)
        finally:
            self.capture_s += time.perf_counter() - start

    def _capture_graph(self, k: int, b: int, t: int):
        ids = torch.zeros((b, t), dtype=torch.long, device=self.device)
        mask = torch.zeros((b, t), dtype=torch.long, device=self.device)
        mask[:, 0] = 1
        stream = capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # On the group's own device, with a capture stream there: torch.cuda.graph's default capture stream is one
        # for the whole process, made on whichever device was current first (a group on another GPU would then
        # launch outside the capture; see placement.py).
        with torch.cuda.device(self.device):
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm up kernels / allocator outside the graph
                    self.group(ids, mask, k=k)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream), torch.inference_mode():
                out = self.group(ids, mask, k=k)
        self._graphs[(k, b, t)] = (graph, ids, mask, out)
        return self._graphs[(k, b, t)]

    def warm_up(self, max_length: int, max_tokens: int = 64 * 128) -> int:
        """Capture every (k, batch bucket, length bucket) up to `max_length` tokens and `max_tokens` per batch now
        (at load), so that no request waits for a capture: pruning moves k under bursts, the worst time to stall
        a batch for one. Returns the graphs captured (none off a CUDA device)."""
        if self.device.type != "cuda":
            return 0
        top = bucket(self.length_buckets, max_length) or self.length_buckets[-1]
        for k in range(1, self.group.num_students + 1):
            for b in self.batch_buckets:
                for t in self.length_buckets:
                    if t <= top and b * t <= max_tokens and (k, b, t) not in self._graphs:
                        self._capture(k, b, t)
        return self.captured

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
        k = self.group.num_students if k is None else k
        B, T = input_ids.shape
        b, t = bucket(self.batch_buckets, B), bucket(self.length_buckets, T)
        if self.device.type != "cuda" or b is None or t is None or input_ids.device != self.device:
            return self.group(input_ids, attention_mask, k=k)
        graph, ids, mask, out = self._graphs.get((k, b, t)) or self._capture(k, b, t)
        ids.zero_()
        mask.zero_()
        mask[:, 0] = 1
        ids[:B, :T].copy_(input_ids)
        mask[:B, :T].copy_(attention_mask)
        graph.replay()
        return out[:B].clone()
