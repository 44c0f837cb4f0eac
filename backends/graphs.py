"""CUDA graphs of the mixed-task forward: one captured graph per (batch bucket, length bucket, PET methods present).

A bert-base forward over a small mixed batch is launch-bound on a GPU: 12 layers x 6 linears x (shared op + every
PET method's ops) are hundreds of small kernels (on an H100: 6.0 ms eager vs 1.15 ms as a graph for
the plain backbone at batch 1). The fast path (`RowTasks`) groups rows on the host and launches per-group kernels,
which a graph cannot hold (its shapes change with every batch's mix). This path runs each method's *gathered* op
instead (`GatheredRows`: every row gathers its own slot, rows of other tasks read the null slot whose zeros add
nothing — the same form the ONNX export traces), so shapes depend only on the padded batch, and captures it.

Semantics (what `GraphedForward(ids, tasks)` returns, the same logits as `MultiTaskModel` on the fast path):
    B, T = rows, longest row;  b, t = the smallest buckets >= B, T     (none: return None, the caller runs eagerly)
    methods = the PET methods of the batch's tasks (gathered ops of other methods are left out of the graph)
    subsets = for each method with `row_subset` (a per-row cost close to the shared op's: MaskBERT, Diff-Pruning)
              used by n rows, n <= b/4: its op runs on those rows only, padded to the next power of two with a row
              that reads its null slot (`GatheredRows.subsets`; the torch form computes on them only, the fused
              kernel launches programs for them only); the graph's key holds (method, that size) (each size is
              another key: hot ones are captured off the serving path, below)
    static_ids[:b, :t] = ids padded with the pad id; static_mask likewise, every padding row keeping one real position
    static_slots[m][:B] = each row's slot in method m (0: the null slot), padding rows 0; static_heads likewise
    replay graph[(b, t, methods, subsets)];  return static_logits[:B]
Rows never interact (attention and LayerNorm are within a row), so padding rows change nothing for the real rows.

Which graph runs a batch. Each key is a graph captured while a batch waits (~65 ms for bert-base on an H100), and the
scheduler's batches vary in size, method set and dense-delta count: a concurrency sweep captured ~100 graphs, a large
share of its time (measured on an H100). So every shape also has one *bank-wide* graph: every PET method any
registered task uses, no subsets; a row leaves the methods it does not use on their null slots, so the bank-wide graph
gives the same logits for any batch of that shape. `warm_up` captures the bank-wide graph of every shape at load; a
batch runs its own key's graph when captured, else the bank-wide one, and its own key is captured once it has been
seen `hot_after` times (the hot keys earn their own graph; a rare mix costs no capture).

A hot key is captured off the serving path (`background`, on by default on a GPU): a capture thread records it on its
own stream (capture_error_mode "thread_local": the serving thread's replays and copies go on meanwhile) while the
batches of that key keep running on the bank-wide graph; the graph is swapped in once recorded (if the bank's
addresses did not move meanwhile). Capturing records kernels without running them, so a capture into the shared pool
never touches memory a replay is using. Before this, each hot key stalled the batch that crossed `hot_after` for the
whole capture (~65 ms for bert-base on an H100): the mixed-task Poisson sweep's p99 stayed above 20 ms at every rate
(measured on an H100).

The bank's tensors are captured by address: adding or removing a task writes slots in place (graphs stay valid);
growing a bank re-allocates, so the graphs are dropped when the bank's version moved and any address changed.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
import time

import numpy as np
import torch

from chorus.backends.pet import GatheredRows
from chorus.errors import UnknownTask

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_GRAPH_TOKENS = 64 * 128  # larger padded batches run eagerly: launches are a small share of them

log = logging.getLogger(__name__)


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream every capture on `device` runs on (the mixed forward's and the students'): the caching
    allocator keeps freed blocks per stream, so a new stream per capture left each capture's warm-up memory unusable
    by the next (112 student graphs reserved 10 GiB on the H100 that way)."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def bucket(buckets: tuple[int, ...], n: int) -> int | None:
    """The smallest bucket >= n (None: larger than all)."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class GraphedForward:
    """The mixed-task forward of `model` (a `MultiTaskModel`) over static, bucketed shapes; with `capture` (on a
    CUDA device) each shape is a CUDA graph replayed per batch, else (tests on the CPU) the same static forward runs
    eagerly."""

    def __init__(self, model, capture: bool | None = None, batch_buckets=BATCH_BUCKETS,
                 length_buckets=LENGTH_BUCKETS, max_tokens: int = MAX_GRAPH_TOKENS, hot_after: int = 8,
                 background: bool | None = None):
        self.model, self.bank = model, model.bank
        self.device = model.encoder.word_embeddings.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.batch_buckets, self.length_buckets, self.max_tokens = tuple(batch_buckets), tuple(length_buckets), max_tokens
        self.pad_id = model.encoder.cfg.pad_token_id
        self._graphs: dict[tuple, tuple] = {}
        self._seen: dict[tuple, int] = {}  # batches per key that has no graph of its own yet
        self.hot_after = hot_after
        self.background = self.capture if background is None else background  # hot keys captured on a thread
        self._todo: queue.SimpleQueue = queue.SimpleQueue()  # hot keys for the capture thread
        self._queued: set[tuple] = set()  # keys handed to it and not captured yet
        self._failed: set[tuple] = set()  # keys whose capture failed: they stay on the bank-wide graph
        self._capture_lock = threading.Lock()  # one capture at a time (they share the pool)
        self._capturer: threading.Thread | None = None
        self._wide: tuple[int, tuple[str, ...]] | None = None  # (bank version, the methods registered tasks use)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._version, self._addresses = None, None
        self._lock = threading.Lock()
        self.captures, self.capture_s = 0, 0.0  # every capture so far (re-captures too) and the time they took

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def shape(self, B: int, T: int) -> tuple[int, int] | None:
        """The (batch, length) bucket a batch runs in, or None when it runs eagerly."""
        b, t = bucket(self.batch_buckets, B), bucket(self.length_buckets, T)
        return None if b is None or t is None or b * t > self.max_tokens else (b, t)

    def _check_bank(self) -> dict[str, torch.Tensor]:
        """The bank's tensors; graphs captured against other addresses are dropped."""
        version, tensors = self.bank.snapshot()
        if version != self._version:
            addresses = {k: t.data_ptr() for k, t in tensors.items()}
            if addresses != self._addresses:
                self._graphs.clear()
                self._seen.clear()
                self._failed.clear()
                self._pool = torch.cuda.graph_pool_handle() if self.capture else None
            self._version, self._addresses = version, addresses
        return tensors

    def _static(self, b: int, t: int, methods: tuple[str, ...], subsets: tuple[tuple[str, int], ...],
                tensors: dict[str, torch.Tensor]):
        """A key's static inputs, two tensors (one copy each per batch): `tokens` (2, b, t), the ids and the mask;
        `index` (1 + methods, b), the rows' head slots and their slots in each method (views of its rows)."""
        dev = self.device
        tokens = torch.zeros((2, b, t), dtype=torch.long, device=dev)
        tokens[0] = self.pad_id
        tokens[1, :, 0] = 1
        index = torch.zeros((1 + len(methods), b), dtype=torch.long, device=dev)
        rows = GatheredRows({m: index[i] for i, m in enumerate(methods, start=1)}, index[0],
                            {k: v for k, v in tensors.items() if k.startswith("head.") or k.split(".", 1)[0] in methods},
                            {m: torch.zeros(n, dtype=torch.long, device=dev) for m, n in subsets})
        return tokens, index, rows

    def _build(self, key: tuple, tensors: dict[str, torch.Tensor]):
        """Capture `key` now, on the calling thread (the caller holds the lock)."""
        start = time.perf_counter()
        with self._capture_lock:
            entry = self._capture(key, tensors)
        return self._keep(key, entry, start)

    def _keep(self, key: tuple, entry: tuple, start: float) -> tuple:
        """Serve `key` from `entry`, captured since `start` (the caller holds the lock)."""
        self._graphs[key] = entry
        self.captures += 1
        self.capture_s += time.perf_counter() - start
        return entry

    def _capture(self, key: tuple, tensors: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None):
        """Record `key`'s graph (on `stream`, default the shared capture stream) and return its entry."""
        b, t, methods, subsets = key
        tokens, index, rows = self._static(b, t, methods, subsets, tensors)
        if not self.capture:
            return None, tokens, index, rows, None
        stream = stream or capture_stream(self.device)
        with torch.cuda.device(self.device):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm up kernels and the allocator outside the graph
                    self.model(tokens[0], tokens[1], rows)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"), \
                    torch.inference_mode():
                out = self.model(tokens[0], tokens[1], rows)
            stream.synchronize()
        return graph, tokens, index, rows, out

    def _capture_later(self, key: tuple) -> None:
        """Hand a hot key to the capture thread (started on first use); the caller holds the lock."""
        if key in self._queued or key in self._failed:
            return
        self._queued.add(key)
        self._todo.put(key)
        if self._capturer is None:
            self._capturer = threading.Thread(target=self._capture_loop, name="chorus-graph-capture", daemon=True)
            self._capturer.start()

    def _capture_loop(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.capture else None  # not the shared one: the serving thread
        while (key := self._todo.get()) is not None:                        # may capture on it meanwhile (students)
            with self._lock:
                tensors, addresses = self._check_bank(), self._addresses
            start = time.perf_counter()
            try:
                with self._capture_lock:
                    entry = self._capture(key, tensors, stream)
            except Exception:  # noqa: BLE001 - the key keeps running on the bank-wide graph
                log.exception("capturing the CUDA graph of %s failed; its batches stay on the bank-wide graph", key)
                entry = None
            with self._lock:
                if entry is None:
                    self._failed.add(key)
                elif self._addresses == addresses:  # else the bank moved: captured afresh once hot again
                    self._keep(key, entry, start)
                self._queued.discard(key)

    def close(self) -> None:
        """Stop the capture thread (unload): it holds the model and its graphs until it ends."""
        if self._capturer is not None:
            self._todo.put(None)
            self._capturer.join(timeout=30)
            self._capturer = None

    def wait_captures(self, timeout: float = 60.0) -> bool:
        """Block until the capture thread has nothing left (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queued:
                    return True
            time.sleep(0.005)
        return False

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tasks: list[str]) -> np.ndarray | None:
        """float32 logits (B, max_labels) for a padded batch (CPU tensors, as `Engine.pad` makes them) of rows of
        the named tasks; None when the batch is larger than every graph (run it eagerly)."""
        try:
            entries = [self.bank.tasks[name] for name in tasks]
        except KeyError as e:
            raise UnknownTask(f"unknown task {e.args[0]!r}; served tasks: {sorted(self.bank.tasks)}") from None
        methods = sorted({m for e in entries for m in e.slots})
        return self.forward(input_ids, attention_mask, [e.head_slot for e in entries],
                            {m: [e.slots.get(m, 0) for e in entries] for m in methods})

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, heads: list[int],
                slots: dict[str, list[int]], exact: bool = False) -> np.ndarray | None:
        """The same from slots: each row's head slot, and its slot in each method the batch uses (an empty `slots`:
        the backbone alone, as the latency tables' α profiles it). `exact`: run (capturing now if need be) this
        batch's own graph, never the bank-wide one (the latency tables profile each PET type's own cost)."""
        B, T = input_ids.shape
        shape = self.shape(B, T)
        if shape is None:
            return None
        slots = {m: slots[m] for m in sorted(slots)}  # one key per method set, whatever order the caller gave
        subsets = self._subsets(shape[0], B, slots)
        key = (*shape, tuple(slots), tuple((m, len(rows)) for m, rows in subsets.items()))
        with self._lock:
            tensors = self._check_bank()
            entry = self._graphs.get(key)
            if entry is None and not exact:
                self._seen[key] = seen = self._seen.get(key, 0) + 1
                wide = self._wide_key(shape)
                if set(key[2]) <= set(wide[2]) and (seen < self.hot_after or self.background):
                    if seen >= self.hot_after:
                        self._seen.pop(key, None)
                        self._capture_later(key)
                    key, subsets = wide, {}
                    entry = self._graphs.get(key)
            if entry is None:
                entry = self._build(key, tensors)
                self._seen.pop(key, None)
            graph, tokens, index, rows, out = entry
            _, b, t = tokens.shape
            host_tokens = torch.zeros((2, b, t), dtype=torch.long)
            host_tokens[0], host_tokens[1, :, 0] = self.pad_id, 1
            host_tokens[0, :B, :T], host_tokens[1, :B, :T] = input_ids, attention_mask
            methods = list(rows.slots)  # the graph's methods: those the batch does not use stay on the null slot
            host_index = torch.zeros((len(methods) + 1, b), dtype=torch.long)
            host_index[0, :B] = torch.tensor(heads)
            for i, m in enumerate(methods, start=1):
                if m in slots:
                    host_index[i, :B] = torch.tensor(slots[m])
            tokens.copy_(host_tokens, non_blocking=True)
            index.copy_(host_index, non_blocking=True)
            for m, subset in subsets.items():
                rows.subsets[m].copy_(torch.tensor(subset), non_blocking=True)
            if graph is None:
                out = self.model(tokens[0], tokens[1], rows)
            else:
                graph.replay()
            return out[:B].float().cpu().numpy()

    def _wide_key(self, shape: tuple[int, int]) -> tuple:
        """The bank-wide key of a shape: every PET method a registered task uses, no subsets."""
        if self._wide is None or self._wide[0] != self.bank.version:
            used = {m for e in list(self.bank.tasks.values()) for m in e.slots}
            self._wide = (self.bank.version, tuple(sorted(used)))
        return (*shape, self._wide[1], ())

    def shapes(self, max_length: int) -> list[tuple[int, int]]:
        """Every (batch, length) bucket a batch of rows up to `max_length` tokens can run in."""
        top = bucket(self.length_buckets, max_length) or self.length_buckets[-1]
        return [(b, t) for b in self.batch_buckets for t in self.length_buckets
                if t <= top and self.shape(b, t) == (b, t)]

    def warm_up(self, max_length: int) -> int:
        """Capture the bank-wide graph of every shape up to `max_length` (at load, before serving); returns how many
        were captured now."""
        with self._lock:
            tensors = self._check_bank()
            todo = [k for k in (self._wide_key(s) for s in self.shapes(max_length)) if k not in self._graphs]
            for key in todo:
                self._build(key, tensors)
        return len(todo)

    def _subsets(self, b: int, B: int, slots: dict[str, list[int]]) -> dict[str, list[int]]:
        """{method: the batch rows its op runs on} for the `row_subset` methods used by at most a quarter of the
        batch bucket b: the rows that use it, padded to the next power of two with a row that reads its null slot (a
        padding row, else the first real row that does not use it). A method used by more rows runs on every row."""
        out = {}
        for m, row_slots in slots.items():
            if not getattr(self.bank.methods[m], "row_subset", False):
                continue
            users = [i for i, s in enumerate(row_slots) if s]
            n = 1 << (len(users) - 1).bit_length()  # powers of two: a few sizes, each another graph key
            if n <= max(1, b // 4) and n < b:
                null = B if B < b else next(i for i, s in enumerate(row_slots) if not s)
                out[m] = users + [null] * (n - len(users))
        return out
