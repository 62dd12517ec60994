"""Arena planner: place buffers with lifetimes in one byte arena (graph-agnostic, TFLite-Micro style).

Problem: buffers b_i with size s_i (aligned up to A) and lifetime [f_i, l_i]. Find offsets o_i (multiples of
A) such that any two buffers whose lifetimes intersect have disjoint byte ranges [o_i, o_i + s_i); minimise
the arena size max_i(o_i + s_i). The lower bound LB = max over steps of the summed sizes live there.

Baseline: greedy best-fit in decreasing size — each buffer goes into the smallest gap, among buffers
already placed that overlap it in time, that can hold it (else on top). When that is above LB, a bounded
search tries other orders (by lifetime start, by duration, by size×duration) and a deterministic
hill-climb that moves single buffers to the front of the order; the best placement wins. The result is
deterministic: same buffers, same offsets.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from lmc.targets.liveness import align_up, peak_live

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArenaPlan:
    offsets: tuple[int, ...]     # per buffer, in add order
    sizes: tuple[int, ...]       # aligned sizes
    arena_bytes: int
    lower_bound_bytes: int
    strategy: str


class ArenaPlanner:
    """``add_buffer(size, first, last)`` for every buffer, then ``plan()``."""

    def __init__(self, alignment: int = 64, search_iterations: int = 200, seed: int = 0):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.search_iterations = search_iterations
        self.seed = seed
        self._sizes: list[int] = []
        self._first: list[int] = []
        self._last: list[int] = []

    def add_buffer(self, size: int, first: int, last: int) -> int:
        if size < 0 or first < 0 or last < first:
            raise ValueError(f"bad buffer: size={size} first={first} last={last}")
        self._sizes.append(align_up(max(size, 1), self.alignment))
        self._first.append(first)
        self._last.append(last)
        return len(self._sizes) - 1

    # ------------------------------------------------------------------------------------------------
    def lower_bound(self) -> int:
        return peak_live(zip(self._sizes, self._first, self._last))[0]

    def _place(self, order: list[int]) -> tuple[list[int], int]:
        """Best-fit placement in the given order; returns offsets and arena size."""
        sizes, first, last = self._sizes, self._first, self._last
        offsets = [-1] * len(sizes)
        placed: list[int] = []
        arena = 0
        for b in order:
            f, l, s = first[b], last[b], sizes[b]
            busy = sorted((offsets[p], offsets[p] + sizes[p]) for p in placed
                          if first[p] <= l and f <= last[p])
            best_offset, best_gap = None, None
            cursor = 0
            for lo, hi in busy:
                gap = lo - cursor
                if gap >= s and (best_gap is None or gap < best_gap):
                    best_offset, best_gap = cursor, gap
                cursor = max(cursor, hi)
            if best_offset is None:
                best_offset = cursor
            offsets[b] = best_offset
            placed.append(b)
            arena = max(arena, best_offset + s)
        return offsets, arena

    def plan(self) -> ArenaPlan:
        n = len(self._sizes)
        lb = self.lower_bound()
        if n == 0:
            return ArenaPlan((), (), 0, 0, "empty")
        sizes, first, last = self._sizes, self._first, self._last
        orders = {
            "size": sorted(range(n), key=lambda b: (-sizes[b], first[b], b)),
            "first": sorted(range(n), key=lambda b: (first[b], -sizes[b], b)),
            "duration": sorted(range(n), key=lambda b: (-(last[b] - first[b]), -sizes[b], b)),
            "area": sorted(range(n), key=lambda b: (-sizes[b] * (last[b] - first[b] + 1), b)),
        }
        best_name, best_order = "size", orders["size"]
        best_offsets, best_arena = self._place(best_order)
        for name, order in orders.items():
            if best_arena <= lb:
                break
            if name == "size":
                continue
            offsets, arena = self._place(order)
            if arena < best_arena:
                best_name, best_order, best_offsets, best_arena = name, order, offsets, arena
        # Each placement is O(n^2); cap the search at ~4M pair checks so it stays around a second.
        iterations = min(self.search_iterations, 4_000_000 // max(1, n * n))
        if best_arena > lb and iterations > 0:
            rng = random.Random(self.seed)
            order = list(best_order)
            improved = False
            for _ in range(iterations):
                if best_arena <= lb:
                    break
                candidate = list(order)
                i = rng.randrange(n)
                j = rng.randrange(max(1, i + 1))
                candidate.insert(j, candidate.pop(i))
                offsets, arena = self._place(candidate)
                if arena <= best_arena:
                    if arena < best_arena:
                        improved = True
                    order, best_offsets, best_arena = candidate, offsets, arena
            if improved:
                best_name += "+search"
        log.info("arena plan: %d buffers, arena=%d, lower bound=%d (%s)", n, best_arena, lb, best_name)
        return ArenaPlan(tuple(best_offsets), tuple(sizes), best_arena, lb, best_name)
