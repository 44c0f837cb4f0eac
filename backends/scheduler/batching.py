"""PetS's coordinated batching: a two-stage dynamic programme over length-sorted requests, a brute-force reference for
small inputs, and the deadline pass that orders (and if needed splits) the batches it forms.

Cost model: a batch padded to L (its longest request) with n_p rows of PET type p costs
    alpha(sum n_p, L) + sum_p beta(p, n_p, L)
alpha is paid once for the shared backbone ops; chorus's task bank gathers one PET op per method over all rows that
use it (whatever their task), so beta is summed per PET type present, not per task. A batch of a standalone type
(students) pays only its beta and never mixes with other types.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import count

from chorus.backends.scheduler.config import SchedulerConfig
from chorus.backends.scheduler.latency import LatencyTable
from chorus.backends.scheduler.request import Request

EPS = 1e-12


def path_of(pet_type: str, cfg: SchedulerConfig) -> str:
    """Which requests may share a batch: "backbone" for PET types on the shared backbone, else the type itself."""
    return pet_type if pet_type in cfg.standalone_pet_types else "backbone"


def batch_time(pet_counts: Mapping[str, int], padded_len: int, table: LatencyTable, cfg: SchedulerConfig) -> float:
    """Estimated seconds of one batch: alpha(N, L) (unless standalone) + sum over PET types of beta(p, n_p, L)."""
    paths = {path_of(p, cfg) for p in pet_counts}
    assert len(paths) <= 1, f"a batch mixes paths {sorted(paths)}: standalone PET types batch alone"
    shared = table.alpha(sum(pet_counts.values()), padded_len) if paths == {"backbone"} else 0.0
    return shared + sum(table.beta(p, c, padded_len) for p, c in sorted(pet_counts.items()))


def requests_time(requests: Sequence[Request], table: LatencyTable, cfg: SchedulerConfig) -> float:
    return batch_time(Counter(r.pet_type for r in requests), max(r.num_tokens for r in requests), table, cfg)


def rows_cap(padded_len: int, cfg: SchedulerConfig) -> int:
    """The most rows a batch padded to `padded_len` may hold."""
    return min(cfg.max_batch_size, cfg.max_tokens_per_batch // padded_len)


def feasible(requests: Sequence[Request], cfg: SchedulerConfig) -> bool:
    return (len(requests) <= rows_cap(max(r.num_tokens for r in requests), cfg)
            and len({path_of(r.pet_type, cfg) for r in requests}) == 1)


def split_task(requests: Sequence[Request], table: LatencyTable, cfg: SchedulerConfig) -> list[list[Request]]:
    """Stage 1: cut one task's requests, sorted by length, into mini-batches of least total estimated time.

    Semantics:
        best[0] = 0;  best[i] = min_j best[j] + time(requests[j:i])   over j with requests[j:i] feasible
    Optimal over all partitions, not only contiguous ones: given any partition, giving its groups (ordered by their
    longest request) the same sizes but contiguous runs of the sorted list lengthens no group.
    """
    reqs = sorted(requests, key=lambda r: r.num_tokens)
    pet = reqs[0].pet_type if reqs else ""
    assert all(r.pet_type == pet for r in reqs), "split_task takes one task's requests (one PET type)"
    n = len(reqs)
    shared = path_of(pet, cfg) == "backbone" if reqs else False
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(1, n + 1):
        L = reqs[i - 1].num_tokens
        for j in range(max(0, i - rows_cap(L, cfg)), i):  # largest mini-batch first: ties keep it
            # batch_time({pet: i - j}, L), inlined: this is the hot loop
            c = best[j] + (table.alpha(i - j, L) if shared else 0.0) + table.beta(pet, i - j, L)
            if c < best[i] - EPS:
                best[i], cut[i] = c, j
    out, i = [], n
    while i > 0:
        out.append(reqs[cut[i]:i])
        i = cut[i]
    return out[::-1]


def combine(minibatches: Sequence[Sequence[Request]], table: LatencyTable,
            cfg: SchedulerConfig) -> list[list[Request]]:
    """Stage 2: merge mini-batches (one path), sorted by padded length, into macro-batches of least total time.

    Semantics:
        best[0] = 0;  best[i] = min_j best[j] + time(union of minibatches[j:i])   over feasible j
    A macro-batch pays alpha once at its padded length and beta per PET type over its rows.
    """
    mbs = sorted(minibatches, key=lambda mb: (max(r.num_tokens for r in mb), mb[0].task))
    m = len(mbs)
    best, cut = [0.0] + [float("inf")] * m, [0] * (m + 1)
    for i in range(1, m + 1):
        L = max(r.num_tokens for r in mbs[i - 1])
        counts: Counter = Counter()
        rows = 0
        for j in range(i - 1, -1, -1):  # grow the last macro-batch backwards
            rows += len(mbs[j])
            if rows > rows_cap(L, cfg):
                break
            counts.update(r.pet_type for r in mbs[j])
            c = best[j] + batch_time(counts, L, table, cfg)
            if c <= best[i] + EPS:  # a tie keeps the larger macro-batch
                best[i], cut[i] = c, j
    out, i = [], m
    while i > 0:
        out.append(sorted((r for mb in mbs[cut[i]:i] for r in mb), key=lambda r: r.num_tokens))
        i = cut[i]
    return out[::-1]


def form_batches(requests: Sequence[Request], table: LatencyTable, cfg: SchedulerConfig) -> list[list[Request]]:
    """Both stages: per task split into mini-batches, then per path combine into macro-batches.

    Each returned batch is sorted by length; batches come in path order, then by padded length.
    """
    by_task: dict[tuple[str, str, str], list[Request]] = {}
    for r in requests:
        by_task.setdefault((path_of(r.pet_type, cfg), r.task, r.pet_type), []).append(r)
    by_path: dict[str, list[list[Request]]] = {}
    for key in sorted(by_task):
        by_path.setdefault(key[0], []).extend(split_task(by_task[key], table, cfg))
    return [b for path in sorted(by_path) for b in combine(by_path[path], table, cfg)]


def total_time(batches: Sequence[Sequence[Request]], table: LatencyTable, cfg: SchedulerConfig) -> float:
    return sum(requests_time(b, table, cfg) for b in batches)


# -- references for tests (small inputs only) -------------------------------------------------------------------------
def brute_force_batches(requests: Sequence[Request], table: LatencyTable,
                        cfg: SchedulerConfig) -> tuple[float, list[list[Request]]]:
    """The least total time over every partition of `requests` into feasible batches (Bell(n) of them: n <= 9).

    Prunes on the partial sum, which is exact for tables whose times do not fall as a batch grows or lengthens.
    """
    assert len(requests) <= 9, f"brute force over {len(requests)} requests would not finish; use <= 9"
    best: list = [float("inf"), []]

    def place(i: int, groups: list[list[Request]], cost_so_far: float) -> None:
        if cost_so_far >= best[0] - EPS:  # time only grows as requests are added (monotone tables): prune
            return
        if i == len(requests):
            best[0], best[1] = cost_so_far, [list(g) for g in groups]
            return
        r = requests[i]
        for g in groups:
            g.append(r)
            if feasible(g, cfg):
                before = requests_time(g[:-1], table, cfg)
                place(i + 1, groups, cost_so_far - before + requests_time(g, table, cfg))
            g.pop()
        groups.append([r])
        place(i + 1, groups, cost_so_far + requests_time([r], table, cfg))
        groups.pop()

    place(0, [], 0.0)
    return best[0], best[1]


def brute_force_combine(minibatches: Sequence[Sequence[Request]], table: LatencyTable,
                        cfg: SchedulerConfig) -> float:
    """The least total time over every contiguous grouping of the length-sorted mini-batches (what `combine` solves)."""
    mbs = sorted(minibatches, key=lambda mb: (max(r.num_tokens for r in mb), mb[0].task))
    m, best = len(mbs), float("inf")
    for mask in range(1 << max(0, m - 1)):  # bit k set: a cut after mini-batch k
        groups, current = [], list(mbs[0]) if m else []
        for k in range(1, m):
            if mask >> (k - 1) & 1:
                groups.append(current)
                current = []
            current = current + list(mbs[k])
        if current:
            groups.append(current)
        if all(feasible(g, cfg) for g in groups):
            best = min(best, total_time(groups, table, cfg))
    return best


# -- deadlines -------------------------------------------------------------------------------------------------------
def order_by_deadline(batches: Sequence[Sequence[Request]], start: float, table: LatencyTable,
                      cfg: SchedulerConfig) -> list[tuple[list[Request], float, float]]:
    """Run order for one executor starting at `start`: earliest deadline first, splitting a batch that would be late.

    Semantics: pop the batch with the earliest deadline; finish = t + time(batch). If finish misses a deadline in it:
        - the requests that would be late form their own batch, run first (if they are not all of it);
        - if all would be late, the half with the earliest deadlines runs first when that half then makes it;
        - else the batch runs as it is (nothing helps; the requests are counted late).
    Returns (requests sorted by length, estimated start, estimated finish) per batch, in run order.
    """
    tie = count()
    heap = [(min(r.deadline for r in b), next(tie), list(b)) for b in batches]
    heapq.heapify(heap)
    out, t = [], start
    while heap:
        deadline, _, b = heapq.heappop(heap)
        dt = requests_time(b, table, cfg)
        if t + dt > deadline and len(b) > 1:
            late = [r for r in b if r.deadline < t + dt]
            if len(late) < len(b):
                parts = [late, [r for r in b if r.deadline >= t + dt]]
            else:
                by_deadline = sorted(b, key=lambda r: r.deadline)
                half = by_deadline[: len(b) // 2]
                parts = [half, by_deadline[len(b) // 2:]] if t + requests_time(half, table, cfg) <= half[0].deadline \
                    else []
            if parts:
                for p in parts:
                    heapq.heappush(heap, (min(r.deadline for r in p), next(tie), sorted(p, key=lambda r: r.num_tokens)))
                continue
        out.append((b, t, t + dt))
        t += dt
    return out
