"""Arena planner: place buffers with lifetimes in one byte arena (graph-agnostic, TFLite-Micro style).

Problem: buffers b_i with size s_i (aligned up to A) and lifetime [f_i, l_i]. Find offsets o_i (multiples of
A) such that any two buffers whose lifetimes intersect have disjoint byte ranges [o_i, o_i + s_i); minimise
the arena size max_i(o_i + s_i). The lower bound LB = max over steps of the summed sizes live there.

Baseline: greedy best-fit in decreasing size — each buffer goes into the smallest gap, among buffers
already placed that overlap it in time, that can hold it (else on top). When that is above LB, a bounded
search runs: other orders (by lifetime start, by duration, by size×duration, by the largest live set a
buffer crosses, by lifetime end), each placed best-fit and first-fit (lowest offset), then an iterated local
search on the best order that moves a buffer lying on the arena's top (the ones that set its size) earlier
in the order, accepting equal arenas (plateau moves), bounded by a count of placements and of neighbour
visits (never by the clock); the best placement wins. Placement only looks at a buffer's time-overlapping
neighbours (computed once), so one placement is near-linear on real graphs. The result is deterministic: same buffers, same
offsets.

``exact_arena`` is a branch and bound over offsets for small sets (tests judge the heuristic with it): in an
optimal packing pushed down as far as it goes, every buffer sits at 0 or on top of a time-overlapping
buffer below it, so buffers are chosen in nondecreasing offset order among those candidate offsets.
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

    def __init__(self, alignment: int = 64, search_iterations: int = 2000, seed: int = 0,
                 search_work: int = 3_000_000):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.search_iterations = search_iterations
        self.seed = seed
        self.search_work = search_work
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

    def _neighbours(self) -> list[list[int]]:
        """For every buffer, the buffers whose lifetimes intersect its own (a sweep over start times)."""
        n = len(self._sizes)
        first, last = self._first, self._last
        by_start = sorted(range(n), key=lambda b: (first[b], b))
        nb: list[list[int]] = [[] for _ in range(n)]
        active: list[int] = []
        for b in by_start:
            active = [a for a in active if last[a] >= first[b]]
            for a in active:
                nb[a].append(b)
                nb[b].append(a)
            active.append(b)
        return nb

    def _place(self, order: list[int], first_fit: bool = False) -> tuple[list[int], int]:
        """Best-fit (or first-fit: lowest offset) placement in the given order; offsets and arena size."""
        sizes = self._sizes
        nb = self._nb
        offsets = [-1] * len(sizes)
        arena = 0
        for b in order:
            s = sizes[b]
            busy = sorted((offsets[p], offsets[p] + sizes[p]) for p in nb[b] if offsets[p] >= 0)
            best_offset, best_gap = None, None
            cursor = 0
            for lo, hi in busy:
                gap = lo - cursor
                if gap >= s and (best_gap is None or gap < best_gap):
                    best_offset, best_gap = cursor, gap
                    if first_fit:
                        break
                cursor = max(cursor, hi)
            if best_offset is None:
                best_offset = cursor
            offsets[b] = best_offset
            arena = max(arena, best_offset + s)
        return offsets, arena

    def plan(self) -> ArenaPlan:
        n = len(self._sizes)
        lb = self.lower_bound()
        if n == 0:
            return ArenaPlan((), (), 0, 0, "empty")
        sizes, first, last = self._sizes, self._first, self._last
        self._nb = self._neighbours()
        best_name, best_order, best_fit = "size", sorted(range(n), key=lambda b: (-sizes[b], first[b], b)), False
        best_offsets, best_arena = self._place(best_order)
        if best_arena > lb:
            # the live bytes at each step, and the largest live set each buffer crosses
            live = [0] * (max(last) + 2)
            for b in range(n):
                live[first[b]] += sizes[b]
                live[last[b] + 1] -= sizes[b]
            for p in range(1, len(live)):
                live[p] += live[p - 1]
            crossing = [max(live[first[b]: last[b] + 1]) for b in range(n)]
            orders = {
                "first": sorted(range(n), key=lambda b: (first[b], -sizes[b], b)),
                "duration": sorted(range(n), key=lambda b: (-(last[b] - first[b]), -sizes[b], b)),
                "area": sorted(range(n), key=lambda b: (-sizes[b] * (last[b] - first[b] + 1), b)),
                "pressure": sorted(range(n), key=lambda b: (-crossing[b], -sizes[b], first[b], b)),
                "last": sorted(range(n), key=lambda b: (-last[b], -sizes[b], b)),
                "size": best_order,
            }
            for name, order in orders.items():
                for fit in (False, True):
                    if best_arena <= lb:
                        break
                    if name == "size" and not fit:
                        continue
                    offsets, arena = self._place(order, fit)
                    if arena < best_arena:
                        best_name = name + ("/first-fit" if fit else "")
                        best_order, best_fit, best_offsets, best_arena = order, fit, offsets, arena
        if best_arena > lb and self.search_iterations > 0:
            best_offsets, best_arena, improved = self._local_search(best_order, best_fit, best_offsets,
                                                                    best_arena, lb)
            if improved:
                best_name += "+search"
        log.info("arena plan: %d buffers, arena=%d, lower bound=%d (%s)", n, best_arena, lb, best_name)
        return ArenaPlan(tuple(best_offsets), tuple(sizes), best_arena, lb, best_name)

    def _local_search(self, order: list[int], fit: bool, offsets: list[int], arena: int, lb: int
                      ) -> tuple[list[int], int, bool]:
        """Iterated local search on the placement order: move a buffer that touches the arena's top (or,
        one time in four, any buffer) to an earlier position; keep the move when the arena does not grow.
        Bounded by ``search_iterations`` placements and by ``search_work`` neighbour visits in all (so
        about a second on any graph), never by the clock: the same buffers give the same offsets."""
        n = len(order)
        rng = random.Random(self.seed)
        sizes = self._sizes
        per_placement = n + sum(len(nb) for nb in self._nb)
        iterations = min(self.search_iterations, self.search_work // per_placement)
        order = list(order)
        cur_offsets, cur_arena = offsets, arena
        best_offsets, best_arena, improved = offsets, arena, False
        for _ in range(iterations):
            if best_arena <= lb:
                break
            pos = {b: k for k, b in enumerate(order)}
            if rng.random() < 0.75:
                top = [b for b in order if cur_offsets[b] + sizes[b] == cur_arena]
                b = top[rng.randrange(len(top))]
            else:
                b = order[rng.randrange(n)]
            i = pos[b]
            if i == 0:
                continue
            j = rng.randrange(i)
            candidate = list(order)
            candidate.insert(j, candidate.pop(i))
            cand_offsets, cand_arena = self._place(candidate, fit)
            if cand_arena <= cur_arena:
                order, cur_offsets, cur_arena = candidate, cand_offsets, cand_arena
                if cand_arena < best_arena:
                    best_offsets, best_arena, improved = cand_offsets, cand_arena, True
        return best_offsets, best_arena, improved


def exact_arena(buffers: list[tuple[int, int, int]], alignment: int = 1, limit: int = 2_000_000
                ) -> tuple[int, list[int]]:
    """The smallest arena for (size, first, last) buffers and offsets reaching it, by branch and bound
    (see the module docstring). For small sets (~12 buffers); ``limit`` bounds the nodes visited (a
    RuntimeError past it, so a test never reports a non-optimum as exact)."""
    sizes = [align_up(max(s, 1), alignment) for s, _, _ in buffers]
    first = [f for _, f, _ in buffers]
    last = [l for _, _, l in buffers]
    n = len(sizes)
    if n == 0:
        return 0, []
    lb = peak_live(zip(sizes, first, last))[0]
    conflict = [[j for j in range(n) if j != i and first[i] <= last[j] and first[j] <= last[i]] for i in range(n)]
    heuristic = ArenaPlanner(alignment)
    for b in buffers:
        heuristic.add_buffer(*b)
    start = heuristic.plan()
    best = [start.arena_bytes, list(start.offsets)]
    offsets = [-1] * n
    visited = [0]

    steps = range(min(first), max(last) + 1)

    def floor_above(o: int) -> int:
        """Every unplaced buffer will sit at or above o: at each step, the bytes above o (unplaced
        buffers plus the parts of placed ones above o) must fit between o and the arena's top."""
        worst = 0
        for p in steps:
            total = 0
            for j in range(n):
                if first[j] <= p <= last[j]:
                    if offsets[j] < 0:
                        total += sizes[j]
                    elif offsets[j] + sizes[j] > o:
                        total += offsets[j] + sizes[j] - max(o, offsets[j])
            worst = max(worst, total)
        return worst

    def dfs(placed: int, top: int, last_offset: int, last_buffer: int) -> None:
        visited[0] += 1
        if visited[0] > limit:
            raise RuntimeError("exact_arena: node limit reached")
        if best[0] <= lb:
            return
        if placed == n:
            if top < best[0]:
                best[0], best[1] = top, list(offsets)
            return
        candidates = {0} | {offsets[j] + sizes[j] for j in range(n) if offsets[j] >= 0}
        for o in sorted(c for c in candidates if c >= last_offset):
            for b in range(n):
                if offsets[b] >= 0 or (o == last_offset and b < last_buffer):
                    continue
                if max(top, o + sizes[b]) >= best[0]:
                    continue
                if any(offsets[j] >= 0 and offsets[j] < o + sizes[b] and o < offsets[j] + sizes[j]
                       for j in conflict[b]):
                    continue
                offsets[b] = o
                if o + floor_above(o) >= best[0]:
                    offsets[b] = -1
                    continue
                dfs(placed + 1, max(top, o + sizes[b]), o, b)
                offsets[b] = -1

    dfs(0, 0, 0, -1)
    return best[0], best[1]
