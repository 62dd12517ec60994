"""In-place reuse: an output may take its input's bytes when the input dies at the step that writes it.

Given intervals [first, last] and, per step position p, the (input, output) pairs the kernel allows in
place (elementwise ops, reshapes), a pair (a, o) is merged when a's last reader is that step (last(a) = p =
first(o)), o fits in a's aligned bytes, and a is the latest member of its buffer (a buffer hosts a chain
a → o₁ → o₂ …, never a tree). Merged tensors share one buffer whose lifetime is the union of theirs; the
planner then places buffers instead of tensors. Members of a chain overlap only at the step where one
hands its bytes to the next — which is exactly what the kernel does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lmc.targets.liveness import Interval, align_up


@dataclass
class Buffer:
    size: int                     # aligned bytes
    first: int
    last: int
    members: list[str] = field(default_factory=list)


def merge_inplace(intervals: Sequence[Interval], pairs_at: dict[int, Sequence[tuple[str, str]]],
                  alignment: int) -> tuple[list[Buffer], dict[str, int], list[tuple[str, str]]]:
    """(buffers, tensor name → buffer index, merged (input, output) pairs)."""
    by_name = {iv.name: iv for iv in intervals}
    buffers: list[Buffer] = []
    owner: dict[str, int] = {}
    for iv in sorted(intervals, key=lambda iv: (iv.first, iv.name)):
        owner[iv.name] = len(buffers)
        buffers.append(Buffer(align_up(iv.size, alignment), iv.first, iv.last, [iv.name]))
    merged: list[tuple[str, str]] = []
    for pos in sorted(pairs_at):
        for a, o in pairs_at[pos]:
            ia, io = by_name.get(a), by_name.get(o)
            if ia is None or io is None or ia.last != pos or io.first != pos:
                continue
            ba, bo = owner[a], owner[o]
            if ba == bo or buffers[ba].members[-1] != a or len(buffers[bo].members) != 1:
                continue
            if align_up(io.size, alignment) > buffers[ba].size:
                continue
            buffers[ba].members.append(o)
            buffers[ba].last = max(buffers[ba].last, io.last)
            owner[o] = ba
            buffers[bo].members = []
            merged.append((a, o))
    live = [b for b in buffers if b.members]
    index = {id(b): i for i, b in enumerate(live)}
    return live, {name: index[id(buffers[b])] for name, b in owner.items()}, merged
