"""Liveness of arena tensors over a schedule.

For a schedule s (a permutation of step indices), step position p = index in s. For each arena tensor t
(t in ``Dataflow.sizes``): ``first(t)`` = position of its producer; ``last(t)`` = max position of its
consumers, or ``first(t)`` when nothing reads it. A step's scratch buffer lives exactly at its position.
Two buffers may share bytes iff their [first, last] intervals are disjoint.

``lower_bound(intervals, alignment)`` = max over positions of the summed aligned sizes live there: no
placement can use less.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lmc.targets.dataflow import Dataflow


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Interval:
    name: str
    size: int      # bytes, unaligned
    first: int
    last: int


@dataclass(frozen=True)
class Liveness:
    intervals: tuple[Interval, ...]
    schedule: tuple[int, ...]


SCRATCH_SUFFIX = "::scratch"


def scratch_name(step_name: str) -> str:
    return step_name + SCRATCH_SUFFIX


def compute_liveness(flow: Dataflow, schedule: Sequence[int]) -> Liveness:
    """Intervals of every arena tensor and scratch buffer under ``schedule``."""
    position = {step: pos for pos, step in enumerate(schedule)}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for step_index, step in enumerate(flow.steps):
        pos = position[step_index]
        for t in step.outputs:
            if t in flow.sizes:
                first[t] = pos
                last.setdefault(t, pos)
    for step_index, step in enumerate(flow.steps):
        pos = position[step_index]
        for t in step.inputs:
            if t in flow.sizes and t in first:
                if pos < first[t]:
                    raise ValueError(f"schedule reads '{t}' at step {pos} before it is written at {first[t]}")
                last[t] = max(last[t], pos)
    intervals = [Interval(t, flow.sizes[t], first[t], last[t]) for t in first]
    for step_index, step in enumerate(flow.steps):
        if step.scratch_bytes > 0:
            pos = position[step_index]
            intervals.append(Interval(scratch_name(step.name), step.scratch_bytes, pos, pos))
    intervals.sort(key=lambda iv: (iv.first, iv.last, iv.name))
    return Liveness(tuple(intervals), tuple(schedule))


def peak_live(spans: Iterable[tuple[int, int, int]]) -> tuple[int, int]:
    """(max over steps p of Σ size for (size, first, last) with first ≤ p ≤ last, the first such p)."""
    spans = list(spans)
    if not spans:
        return 0, 0
    delta = [0] * (max(last for _, _, last in spans) + 2)
    for size, first, last in spans:
        delta[first] += size
        delta[last + 1] -= size
    best = best_step = running = 0
    for step, d in enumerate(delta):
        running += d
        if running > best:
            best, best_step = running, step
    return best, best_step


def lower_bound(intervals: Sequence[Interval], alignment: int) -> int:
    """max_p sum_{t live at p} align_up(size_t) — the largest live set."""
    return peak_live((align_up(iv.size, alignment), iv.first, iv.last) for iv in intervals)[0]
