"""Latency tables (PetS): alpha(batch_size, seq_len) for the shared ops, beta(pet_type, batch_size, seq_len) for a PET
method's ops; profiled on the engine by a callable the caller supplies, so this module never touches a device.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chorus.errors import InvalidInput

FORMAT = "chorus-latency/1"


def _interp_1d(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys); the first value below xs[0]; above xs[-1] the last slope, never negative."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = bisect_right(xs, x) - 1
    if i >= len(xs) - 1:
        i = len(xs) - 2
        slope = max(0.0, (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]))
        return ys[-1] + slope * (x - xs[-1])
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


@dataclass
class LatencyTable:
    """Seconds measured on a grid of batch sizes x sequence lengths, interpolated between grid points.

    Semantics:
        alpha(n, L)    = bilinear interpolation of shared[i][j] (batch_sizes[i], seq_lens[j]) at (n, L)
        beta(p, n, L)  = the same over pet[p]
        below the grid: the first grid value; above it: the last segment's slope, clamped at >= 0 (so an estimate
        never falls as a batch grows or lengthens, given a grid that does not).
    """

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    shared: list[list[float]]  # (len(batch_sizes), len(seq_lens))
    pet: dict[str, list[list[float]]]  # pet type -> (len(batch_sizes), len(seq_lens))
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.batch_sizes, self.seq_lens = tuple(self.batch_sizes), tuple(self.seq_lens)
        for name, grid in (("batch_sizes", self.batch_sizes), ("seq_lens", self.seq_lens)):
            if not grid or any(not isinstance(v, int) or v < 1 for v in grid) or list(grid) != sorted(set(grid)):
                raise InvalidInput(f"latency table {name} must be strictly increasing positive integers, "
                                   f"got {list(grid)}")
        shape = (len(self.batch_sizes), len(self.seq_lens))
        for name, grid in [("shared", self.shared)] + [(f"pet[{p!r}]", g) for p, g in self.pet.items()]:
            if len(grid) != shape[0] or any(len(row) != shape[1] for row in grid):
                raise InvalidInput(f"latency table {name} must be {shape[0]} x {shape[1]} (batch_sizes x seq_lens), "
                                   f"got {len(grid)} x {[len(row) for row in grid]}")
            if any(not math.isfinite(v) or v < 0 for row in grid for v in row):
                raise InvalidInput(f"latency table {name} holds a negative or non-finite time")

    @property
    def pet_types(self) -> tuple[str, ...]:
        return tuple(sorted(self.pet))

    def _lookup(self, grid: list[list[float]], n: int, seq_len: int) -> float:
        per_size = [_interp_1d(self.seq_lens, row, seq_len) for row in grid]
        return _interp_1d(self.batch_sizes, per_size, n)

    def alpha(self, n: int, seq_len: int) -> float:
        """Seconds of the shared (backbone) ops for n rows padded to seq_len."""
        key = (None, n, seq_len)
        if key not in self._cache:
            self._cache[key] = self._lookup(self.shared, n, seq_len)
        return self._cache[key]

    def beta(self, pet_type: str, n: int, seq_len: int) -> float:
        """Seconds of one PET method's ops for n rows padded to seq_len."""
        key = (pet_type, n, seq_len)
        if key not in self._cache:
            if pet_type not in self.pet:
                raise InvalidInput(f"no latency profile for PET type {pet_type!r}; profiled: {list(self.pet_types)}")
            self._cache[key] = self._lookup(self.pet[pet_type], n, seq_len)
        return self._cache[key]

    # -- files -------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "batch_sizes": list(self.batch_sizes), "seq_lens": list(self.seq_lens),
                "shared": self.shared, "pet": self.pet}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        if d.get("format") != FORMAT:
            raise InvalidInput(f"latency table format {d.get('format')!r}, expected {FORMAT!r}")
        unknown = sorted(set(d) - {"format", "batch_sizes", "seq_lens", "shared", "pet"})
        if unknown:
            raise InvalidInput(f"unknown latency table key(s) {unknown}")
        return cls(tuple(d["batch_sizes"]), tuple(d["seq_lens"]), d["shared"], d["pet"])

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically (a reader never sees half a file)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise InvalidInput(f"cannot read latency table {str(path)!r}: {e}") from None


def profile_latency_table(run: Callable[[int, int, str | None], float], batch_sizes: Iterable[int],
                          seq_lens: Iterable[int], pet_types: Iterable[str],
                          standalone_pet_types: Iterable[str] = ("students",), repeats: int = 3) -> LatencyTable:
    """Measure a table with `run(batch_size, seq_len, pet_type) -> seconds` (the caller times its engine).

    Semantics:
        alpha[n][L]   = median over repeats of run(n, L, None)       # the backbone with no PET op
        beta[p][n][L] = max(0, median run(n, L, p) - alpha[n][L])    # what PET type p adds
        beta[s][n][L] = median run(n, L, s)  for s in standalone_pet_types (they do not run the backbone)
    The caller warms up its engine before; each grid point runs `repeats` times.
    """
    batch_sizes, seq_lens, standalone = tuple(batch_sizes), tuple(seq_lens), set(standalone_pet_types)

    def measure(n: int, seq_len: int, pet_type: str | None) -> float:
        return statistics.median(float(run(n, seq_len, pet_type)) for _ in range(repeats))

    shared = [[measure(n, L, None) for L in seq_lens] for n in batch_sizes]
    pet = {}
    for p in pet_types:
        pet[p] = [[measure(n, L, p) if p in standalone else max(0.0, measure(n, L, p) - shared[i][j])
                   for j, L in enumerate(seq_lens)] for i, n in enumerate(batch_sizes)]
    return LatencyTable(batch_sizes, seq_lens, shared, pet)
