"""Scheduling: a topological order of the steps that keeps the live set small.

``graph_order`` is the steps as given (already topological). ``memory_aware_order`` is a greedy list
scheduler: among ready steps, run the one with the smallest net change of live arena bytes
(outputs allocated − inputs whose last reader it is), ties broken by the original position — so on a
chain it is the graph order, and on branchy graphs it finishes a branch before opening another.
``choose_schedule`` keeps whichever of the two has the lower live-set bound (graph order on ties).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmc.targets.dataflow import Dataflow
from lmc.targets.liveness import compute_liveness, lower_bound


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


def choose_schedule(flow: Dataflow, alignment: int) -> tuple[list[int], str]:
    """The schedule with the lower live-set bound, and its name."""
    candidates: list[tuple[int, int, str, Sequence[int]]] = []
    for rank, (name, order) in enumerate((("graph-order", graph_order(flow)),
                                          ("memory-aware", memory_aware_order(flow)))):
        bound = lower_bound(compute_liveness(flow, order).intervals, alignment)
        candidates.append((bound, rank, name, order))
    bound, _, name, order = min(candidates, key=lambda c: (c[0], c[1]))
    return list(order), name


__all__ = ["graph_order", "memory_aware_order", "choose_schedule"]
