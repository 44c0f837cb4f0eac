"""Student Parallelism's length-aware buffer: requests binned by token length, each bin a queue of small elements."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from chorus.backends.scheduler.request import Request


@dataclass(eq=False)
class Element:
    """A small batch of at most `capacity` requests of one length bin, in arrival order.

    `batch_mark` is the scheduler's count of formed batches when the element's first request arrived (fairness).
    """

    bin: int
    capacity: int
    batch_mark: int
    requests: list[Request] = field(default_factory=list)
    pet_counts: Counter = field(default_factory=Counter)
    max_tokens: int = 0
    earliest_deadline: float = float("inf")
    est_s: float | None = None  # the scheduler's cached time estimate; None after a change

    @property
    def full(self) -> bool:
        return len(self.requests) >= self.capacity

    @property
    def oldest_arrival(self) -> float:
        return self.requests[0].arrival

    def add(self, request: Request) -> None:
        assert not self.full, f"element of bin {self.bin} is full ({self.capacity} requests)"
        self.requests.append(request)
        self.pet_counts[request.pet_type] += 1
        self.max_tokens = max(self.max_tokens, request.num_tokens)
        self.earliest_deadline = min(self.earliest_deadline, request.deadline)
        self.est_s = None


class LengthBuffer:
    """Bins by token length; each bin is a queue of elements, the oldest at the head.

    Semantics (add):
        b = first bin with num_tokens <= bin_edges[b]
        if bins[b] and not bins[b][-1].full: bins[b][-1].add(request)    # join the last element
        else: bins[b].append(Element([request]))                        # a new element at the tail
    Only the tail element of a bin can be partial; elements leave whole (`take`).
    """

    def __init__(self, bin_edges: tuple[int, ...], element_size: int):
        self.bin_edges, self.element_size = bin_edges, element_size
        self.bins: list[deque[Element]] = [deque() for _ in bin_edges]
        self.bin_counts: list[Counter] = [Counter() for _ in bin_edges]  # PET type -> requests waiting in the bin
        self.bin_longest: list[int] = [0 for _ in bin_edges]  # longest request waiting in the bin
        self.bin_est_s: list[float | None] = [None for _ in bin_edges]  # admission's cached estimate; None: stale
        self.latest_deadline = float("-inf")  # >= every waiting request's deadline (an upper bound)
        self._len = 0

    def bin_of(self, num_tokens: int) -> int:
        b = bisect_left(self.bin_edges, num_tokens)
        if b == len(self.bin_edges):
            raise ValueError(f"{num_tokens} tokens is longer than the last bin edge {self.bin_edges[-1]}")
        return b

    def add(self, request: Request, batch_mark: int) -> Element:
        """Put `request` in its bin (see Semantics) and return the element that holds it."""
        b = self.bin_of(request.num_tokens)
        queue = self.bins[b]
        if not queue or queue[-1].full:
            queue.append(Element(b, self.element_size, batch_mark))
        queue[-1].add(request)
        self.bin_counts[b][request.pet_type] += 1
        self.bin_longest[b] = max(self.bin_longest[b], request.num_tokens)
        self.bin_est_s[b] = None
        self.latest_deadline = max(self.latest_deadline, request.deadline)
        self._len += 1
        return queue[-1]

    def elements(self) -> Iterator[Element]:
        """Every element, bin by bin, head first."""
        for queue in self.bins:
            yield from queue

    def take(self, elements: Iterable[Element]) -> None:
        """Remove whole elements (the ones a schedule() batched)."""
        gone = {id(e) for e in elements}
        for b, queue in enumerate(self.bins):
            if any(id(e) in gone for e in queue):
                for e in queue:
                    if id(e) in gone:
                        self.bin_counts[b] -= e.pet_counts
                        self._len -= len(e.requests)
                self.bins[b] = deque(e for e in queue if id(e) not in gone)
                self.bin_longest[b] = max((e.max_tokens for e in self.bins[b]), default=0)
                self.bin_est_s[b] = None
        if not self._len:
            self.latest_deadline = float("-inf")

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        for e in self.elements():
            yield from e.requests
