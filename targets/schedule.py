"""Scheduling: a topological order of the steps that keeps the live set small.

Memory model (the one ``liveness`` uses): a tensor is live from the step that writes it through its last
reader, inclusive; a step's scratch lives for that step. With S the set of steps already run, the bytes live
while step v runs are ``live(S) + out(v) + scratch(v)``, where live(S) sums the tensors written in S that a
step outside S still reads (v's inputs among them). A schedule's cost is the largest such value — exactly the
arena lower bound of its liveness — and it depends on the order only through the sets S it passes through.

- ``graph_order``: the steps as given (already topological).
- ``memory_aware_order``: a greedy list scheduler: among ready steps, run the one with the smallest net
  change of live bytes (outputs allocated − inputs whose last reader it is), ties broken by the original
  position — so on a chain it is the graph order, and on branchy graphs it finishes a branch before opening
  another.
- ``search_order``: SERENITY/HMCOS-style search. The graph (in a reference topological order) is cut into
  segments at the boundaries crossed by the fewest tensors (a single-tensor cut splits the problem exactly:
  every order of the whole is a concatenation of orders of the parts, and tensors crossing a segment only
  add a constant to it); each segment is searched by dynamic programming over the sets of scheduled steps
  (memoised on the set: two prefixes with the same set leave the same live set, so only the lower peak is
  kept), level by level, keeping at most ``beam`` sets per level ranked by (peak so far, live bytes). When no
  level exceeds the beam the result is the exact optimum of the segment. A budget of expansions keeps it
  within seconds on thousands of steps (the beam narrows on large graphs).
- ``optimal_order``: the exact optimum by the same dynamic program over all downsets, unbounded — for small
  graphs (tests measure the heuristics against it).
- ``schedule_lower_bound``: a bound no order can beat: while v runs, its inputs, outputs and scratch are live,
  and so is every tensor written by an ancestor of v and read by a descendant of v.

``choose_schedule`` keeps the order with the lowest live-set bound among graph order, the greedy and the
search (graph order on ties, then the greedy): never worse than the export order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmc.targets.dataflow import Dataflow
from lmc.targets.liveness import align_up, compute_liveness, lower_bound


def graph_order(flow: Dataflow) -> list[int]:
    return list(range(len(flow.steps)))


def memory_aware_order(flow: Dataflow) -> list[int]:
    producers = flow.producers()
    readers: dict[str, set[int]] = {}
    deps: list[set[int]] = []
    for i, step in enumerate(flow.steps):
        d = {producers[t] for t in step.inputs if t in producers and producers[t] != i}
        deps.append(d)
        for t in step.inputs:
            readers.setdefault(t, set()).add(i)
    children: list[list[int]] = [[] for _ in flow.steps]
    for i, d in enumerate(deps):
        for p in d:
            children[p].append(i)
    pending = [len(d) for d in deps]
    remaining_readers = {t: len(r) for t, r in readers.items()}

    def delta(i: int) -> int:
        step = flow.steps[i]
        alloc = sum(flow.sizes.get(t, 0) for t in step.outputs) + step.scratch_bytes
        freed = sum(flow.sizes.get(t, 0) for t in set(step.inputs)
                    if t in flow.sizes and remaining_readers.get(t, 0) == 1)
        return alloc - freed

    ready = [i for i, n in enumerate(pending) if n == 0]
    order: list[int] = []
    while ready:
        best = min(ready, key=lambda i: (delta(i), i))
        ready.remove(best)
        order.append(best)
        for t in set(flow.steps[best].inputs):
            if t in remaining_readers:
                remaining_readers[t] -= 1
        for c in children[best]:
            pending[c] -= 1
            if pending[c] == 0:
                ready.append(c)
    if len(order) != len(flow.steps):
        raise ValueError("dataflow has a cycle")
    return order


# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Graph:
    """Steps as integers: predecessors, the arena tensors each step writes/reads (aligned sizes), readers."""
    n: int
    preds: list[set[int]]
    outs: list[list[str]]
    ins: list[list[str]]
    scratch: list[int]
    size: dict[str, int]
    producer: dict[str, int]
    readers: dict[str, list[int]]


def _graph(flow: Dataflow, alignment: int) -> _Graph:
    producer: dict[str, int] = {}
    for i, s in enumerate(flow.steps):
        for t in s.outputs:
            producer[t] = i
    size = {t: align_up(n, alignment) for t, n in flow.sizes.items() if t in producer}
    preds: list[set[int]] = []
    ins: list[list[str]] = []
    readers: dict[str, list[int]] = {}
    for i, s in enumerate(flow.steps):
        p = {producer[t] for t in s.inputs if t in producer and producer[t] != i}
        preds.append(p)
        arena_ins = [t for t in dict.fromkeys(s.inputs) if t in size and producer[t] != i]
        ins.append(arena_ins)
        for t in arena_ins:
            readers.setdefault(t, []).append(i)
    outs = [[t for t in dict.fromkeys(s.outputs) if t in size] for s in flow.steps]
    scratch = [align_up(s.scratch_bytes, alignment) if s.scratch_bytes > 0 else 0 for s in flow.steps]
    return _Graph(len(flow.steps), preds, outs, ins, scratch, size, producer, readers)


def _check_topological(g: _Graph, order: Sequence[int]) -> None:
    pos = {v: k for k, v in enumerate(order)}
    if len(pos) != g.n or any(pos[p] > pos[v] for v in range(g.n) for p in g.preds[v]):
        raise ValueError("dataflow has a cycle")


class _Segment:
    """A contiguous block of a topological order, as bitmasks over its local indices. Tensors read from
    earlier blocks are live on entry and freed by their last reader here (unless a later block reads them);
    tensors written here and read by a later block are never freed here. Everything else crossing the block
    is a constant and left out."""

    def __init__(self, g: _Graph, nodes: Sequence[int], before: frozenset[int] | set[int] = frozenset()):
        self.nodes = list(nodes)
        local = {v: k for k, v in enumerate(self.nodes)}
        m = len(self.nodes)
        self.pred_mask = [0] * m
        self.alloc = [0] * m          # bytes live during the step beyond live(S): outputs + scratch
        self.keep = [0] * m           # bytes of outputs that stay live after the step
        self.frees: list[list[tuple[int, int]]] = [[] for _ in range(m)]  # (reader mask, bytes)
        self.live0 = 0
        for k, v in enumerate(self.nodes):
            for p in g.preds[v]:
                if p in local:
                    self.pred_mask[k] |= 1 << local[p]
            self.alloc[k] = sum(g.size[t] for t in g.outs[v]) + g.scratch[v]
            for t in g.outs[v]:
                if g.readers.get(t):
                    self.keep[k] += g.size[t]
        tensors = {t for v in self.nodes for t in g.outs[v]} | {t for v in self.nodes for t in g.ins[v]}
        for t in sorted(tensors):
            rs = [r for r in g.readers.get(t, []) if r not in before]
            if not rs or any(r not in local for r in rs):
                continue  # not read again, or read after this block: nothing to free here
            mask = 0
            for r in rs:
                mask |= 1 << local[r]
            for r in rs:
                self.frees[local[r]].append((mask, g.size[t]))
            if g.producer[t] not in local:
                self.live0 += g.size[t]
        self.full = (1 << m) - 1

    def step(self, done: int, live: int, k: int) -> tuple[int, int, int]:
        """Run local step k after the set ``done`` with ``live`` bytes: (bytes during, new set, live after)."""
        during = live + self.alloc[k]
        new = done | (1 << k)
        after = live + self.keep[k]
        for mask, nbytes in self.frees[k]:
            if mask & ~new == 0:
                after -= nbytes
        return during, new, after

    def ready(self, done: int) -> list[int]:
        return [k for k in range(len(self.nodes))
                if not done >> k & 1 and self.pred_mask[k] & ~done == 0]

    def search(self, beam: int | None) -> tuple[list[int], int, bool]:
        """Level-by-level DP over scheduled sets; (order as global steps, peak within the block, exact)."""
        level: dict[int, tuple[int, int, int, int]] = {0: (0, self.live0, -1, -1)}   # set -> (peak, live, parent, k)
        history: list[dict[int, tuple[int, int, int, int]]] = [level]
        exact = True
        for _ in range(len(self.nodes)):
            nxt: dict[int, tuple[int, int, int, int]] = {}
            for done, (peak, live, _, _) in level.items():
                for k in self.ready(done):
                    during, new, after = self.step(done, live, k)
                    cand = (max(peak, during), after, done, k)
                    old = nxt.get(new)
                    if old is None or cand[:2] < old[:2]:
                        nxt[new] = cand
            if beam is not None and len(nxt) > beam:
                exact = False
                kept = sorted(nxt.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[0]))[:beam]
                nxt = dict(kept)
            if not nxt:
                raise ValueError("dataflow has a cycle")
            history.append(nxt)
            level = nxt
        done = self.full
        peak = level[done][0]
        order: list[int] = []
        for depth in range(len(self.nodes), 0, -1):
            _, _, parent, k = history[depth][done]
            order.append(self.nodes[k])
            done = parent
        order.reverse()
        return order, peak, exact

    def cost(self, order: Sequence[int]) -> int:
        local = {v: k for k, v in enumerate(self.nodes)}
        done, live, peak = 0, self.live0, 0
        for v in order:
            during, done, live = self.step(done, live, local[v])
            peak = max(peak, during)
        return peak


def _crossings(g: _Graph, order: Sequence[int]) -> list[int]:
    """c[p] = number of tensors written before position p and read at p or later (p = 1..n-1)."""
    pos = {v: k for k, v in enumerate(order)}
    diff = [0] * (g.n + 1)
    for t, rs in g.readers.items():
        a = pos[g.producer[t]] + 1
        b = max(pos[r] for r in rs)
        if b >= a:
            diff[a] += 1
            diff[b + 1] -= 1
    c, run = [0] * (g.n + 1), 0
    for p in range(g.n + 1):
        run += diff[p]
        c[p] = run
    return c


def _segments(g: _Graph, order: Sequence[int], max_len: int) -> list[list[int]]:
    """Cut ``order`` recursively at the boundary crossed by the fewest tensors (the most central one on
    ties) until every block has at most ``max_len`` steps."""
    c = _crossings(g, order)
    blocks: list[tuple[int, int]] = []
    stack = [(0, len(order))]
    while stack:
        lo, hi = stack.pop()
        if hi - lo <= max_len:
            blocks.append((lo, hi))
            continue
        mid = (lo + hi) / 2
        cut = min(range(lo + 1, hi), key=lambda p: (c[p], abs(p - mid)))
        stack.append((cut, hi))
        stack.append((lo, cut))
    blocks.sort()
    return [list(order[lo:hi]) for lo, hi in blocks]


def search_order(flow: Dataflow, alignment: int = 64, beam: int = 64, max_segment: int = 48,
                 budget: int = 400_000, reference: Sequence[int] | None = None) -> list[int]:
    """Segmented beam/DP search (see the module docstring). ``budget`` bounds the total number of
    (set, step) expansions: the beam narrows so that n·beam·(ready width) stays under it (deterministic:
    never bounded by the clock). A block keeps the reference order unless the search found a lower peak."""
    g = _graph(flow, alignment)
    if g.n == 0:
        return []
    ref = list(reference) if reference is not None else memory_aware_order(flow)
    _check_topological(g, ref)
    width = max(1, max(len(g.readers.get(t, ())) for t in g.size) if g.size else 1)
    beam = max(4, min(beam, budget // max(1, g.n * min(width, 8))))
    order: list[int] = []
    before: set[int] = set()
    for nodes in _segments(g, ref, max_segment):
        if len(nodes) == 1:
            order.extend(nodes)
            before.update(nodes)
            continue
        seg = _Segment(g, nodes, before)
        before.update(nodes)
        found, peak, _ = seg.search(beam)
        order.extend(found if peak < seg.cost(nodes) else nodes)
    return order


def optimal_order(flow: Dataflow, alignment: int = 64, max_steps: int = 20) -> tuple[list[int], int]:
    """The exact minimum of the live-set bound over all topological orders (DP over every downset) and
    an order reaching it. Exponential: refused above ``max_steps`` steps."""
    g = _graph(flow, alignment)
    if g.n > max_steps:
        raise ValueError(f"optimal_order is exhaustive; {g.n} steps > {max_steps}")
    if g.n == 0:
        return [], 0
    seg = _Segment(g, list(range(g.n)))
    order, peak, exact = seg.search(None)
    assert exact
    return order, peak


def schedule_lower_bound(flow: Dataflow, alignment: int = 64) -> int:
    """No topological order has a smaller live-set bound: while step v runs, its arena inputs, outputs and
    scratch are live, and so is every tensor written by an ancestor of v and read by a descendant of v."""
    g = _graph(flow, alignment)
    if g.n == 0:
        return 0
    order = memory_aware_order(flow)
    anc = [0] * g.n
    for v in order:
        for p in g.preds[v]:
            anc[v] |= anc[p] | (1 << p)
    desc = [0] * g.n
    for v in reversed(order):
        for p in g.preds[v]:
            desc[p] |= desc[v] | (1 << v)
    forced = [0] * g.n
    for t, rs in g.readers.items():
        p = g.producer[t]
        between = 0
        for r in rs:
            between |= anc[r]
        between &= desc[p]
        for r in rs:   # a reader in between counts t among its own inputs
            between &= ~(1 << r)
        while between:
            low = between & -between
            forced[low.bit_length() - 1] += g.size[t]
            between ^= low
    best = 0
    for v in range(g.n):
        own = sum(g.size[t] for t in set(g.ins[v]) | set(g.outs[v])) + g.scratch[v]
        best = max(best, own + forced[v])
    return best


def choose_schedule(flow: Dataflow, alignment: int) -> tuple[list[int], str]:
    """The schedule with the lowest live-set bound among graph order, the greedy and the search, and its
    name (graph order on ties, then the greedy). The search is skipped when graph order already meets
    ``schedule_lower_bound``."""
    def bound(order: Sequence[int]) -> int:
        return lower_bound(compute_liveness(flow, order).intervals, alignment)

    candidates: list[tuple[int, int, str, list[int]]] = []
    for rank, (name, order) in enumerate((("graph-order", graph_order(flow)),
                                          ("memory-aware", memory_aware_order(flow)))):
        candidates.append((bound(order), rank, name, order))
    floor = schedule_lower_bound(flow, alignment)
    if min(c[0] for c in candidates) > floor:
        best_ref = min(candidates, key=lambda c: (c[0], c[1]))[3]
        order = search_order(flow, alignment, reference=best_ref)
        candidates.append((bound(order), 2, "search", order))
    bound_, _, name, order = min(candidates, key=lambda c: (c[0], c[1]))
    return list(order), name


__all__ = ["graph_order", "memory_aware_order", "search_order", "optimal_order", "schedule_lower_bound",
           "choose_schedule"]
