"""The static memory plan of a bundle and its JSON form (``plan.json``, schema ``lmc.plan/1``).

Fields: ``schema``, ``target``, ``alignment``, ``arena_bytes``, ``lower_bound_bytes``, ``weights_bytes``
(bytes by placement: ``mmap`` | ``flash`` | ``ram``), ``io_bytes`` (graph inputs + outputs),
``peak_ram_bytes`` = arena + io + weights placed in RAM, ``scheduler``, ``placement_strategy``,
``schedule`` (node names in run order) and ``tensors`` (``name``, ``size`` (aligned bytes), ``offset``,
``first``, ``last`` — step indices into ``schedule``, inclusive), ``scratch`` (the same fields for a fused
kernel's working memory: ``name`` is the node, ``first`` = ``last`` its step) and ``decoded_weights`` (outputs of
DequantizeLinear nodes the runtime fuses into their MatMul: no arena buffer) and ``inplace`` (pairs
[input, output] planned in place: the output is written over the input at the step where the input dies;
empty unless ``--in-place``).

Generation bundles add ``state`` (the cache: ``bytes``, ``placement`` and its ``buffers`` — ``input``,
``output`` (the same buffer, updated in place), ``size``), counted in ``peak_ram_bytes`` and not in
``io_bytes``, and ``profiles``: the plan at each bound sequence length (``decode``: 1, ``prefill``: the
context) with its ``arena_bytes``, ``lower_bound_bytes``, ``io_bytes`` and ``peak_ram_bytes``; the
top-level fields are those of the profile with the highest peak. ``runtime`` is the target's runtime
model's prediction (``lmc.targets.runtime_model``): ``predicted_peak_bytes`` — the runtime's resident
peak attributable to the model (above an empty session under the same options) — its ``items`` (fixed
and per-node session cost, kernel workspaces, weights, prepacked copies, arena, kernel temporaries, io,
state), ``session_bytes`` (the empty session's own cost, not in the peak) and the ``session_options`` it
assumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SCHEMA = "lmc.plan/1"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    size: int
    offset: int
    first: int
    last: int


@dataclass(frozen=True)
class StateBuffer:
    input: str
    output: str
    size: int


@dataclass(frozen=True)
class Profile:
    name: str
    sequence: int
    arena_bytes: int
    lower_bound_bytes: int
    io_bytes: int
    peak_ram_bytes: int
    predicted_peak_bytes: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    target: str
    alignment: int
    arena_bytes: int
    lower_bound_bytes: int
    weights_bytes: dict[str, int]
    io_bytes: int
    scheduler: str
    placement_strategy: str
    schedule: tuple[str, ...]
    tensors: tuple[PlannedTensor, ...]
    decoded_weights: tuple[str, ...] = ()   # weights dequantized inside their consumer (no arena buffer)
    scratch: tuple[PlannedTensor, ...] = ()  # kernel working memory, named by node, alive for its step
    inplace: tuple[tuple[str, str], ...] = ()  # (input, output): output written over its dying input
    state: tuple[StateBuffer, ...] = ()      # generation bundles: cache buffers updated in place
    profiles: tuple[Profile, ...] = ()       # generation bundles: the plan per bound sequence length
    runtime: dict | None = None              # the target's runtime model: predicted resident peak, itemised

    @property
    def state_bytes(self) -> int:
        return sum(b.size for b in self.state)

    @property
    def peak_ram_bytes(self) -> int:
        return self.arena_bytes + self.io_bytes + self.weights_bytes.get("ram", 0) + self.state_bytes

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "target": self.target,
            "alignment": self.alignment,
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "weights_bytes": dict(sorted(self.weights_bytes.items())),
            "io_bytes": self.io_bytes,
            "peak_ram_bytes": self.peak_ram_bytes,
            "scheduler": self.scheduler,
            "placement_strategy": self.placement_strategy,
            "schedule": list(self.schedule),
            "tensors": [t.__dict__ for t in self.tensors],
            "scratch": [t.__dict__ for t in self.scratch],
            "decoded_weights": list(self.decoded_weights),
            "inplace": [list(p) for p in self.inplace],
            **({"state": {"bytes": self.state_bytes, "placement": "ram",
                          "buffers": [b.__dict__ for b in self.state]},
                "profiles": [p.__dict__ for p in self.profiles]} if self.state else {}),
            **({"runtime": self.runtime} if self.runtime else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryPlan":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported plan schema {data.get('schema')!r}; expected {SCHEMA}")
        return cls(
            target=data["target"], alignment=int(data["alignment"]), arena_bytes=int(data["arena_bytes"]),
            lower_bound_bytes=int(data["lower_bound_bytes"]), weights_bytes=dict(data["weights_bytes"]),
            io_bytes=int(data["io_bytes"]), scheduler=data.get("scheduler", ""),
            placement_strategy=data.get("placement_strategy", ""), schedule=tuple(data["schedule"]),
            tensors=tuple(PlannedTensor(**t) for t in data["tensors"]),
            scratch=tuple(PlannedTensor(**t) for t in data.get("scratch", ())),
            decoded_weights=tuple(data.get("decoded_weights", ())),
            inplace=tuple(tuple(p) for p in data.get("inplace", ())),
            state=tuple(StateBuffer(**b) for b in data.get("state", {}).get("buffers", ())),
            profiles=tuple(Profile(**p) for p in data.get("profiles", ())),
            runtime=data.get("runtime"))


def _handover(a: PlannedTensor, b: PlannedTensor, inplace: set) -> bool:
    """a and b are an in-place pair sharing exactly the step where one becomes the other."""
    return ((a.name, b.name) in inplace and a.last == b.first and a.offset == b.offset) or \
        ((b.name, a.name) in inplace and b.last == a.first and a.offset == b.offset)


def check_plan(plan: MemoryPlan, readers: dict[str, tuple[int, list[int]]] | None = None) -> list[str]:
    """Independent checks of a plan; returns the violations (empty when sound).

    - no tensor beyond the arena, offsets aligned;
    - no two tensors overlapping in both bytes and lifetime, except an in-place pair (input, output) at the
      one step where the output is written over the dying input;
    - with ``readers`` (name -> (producer step, consumer steps)): lifetimes cover producer and last consumer.
    """
    problems: list[str] = []
    inplace = {tuple(p) for p in plan.inplace}
    for t in plan.tensors + plan.scratch:
        if t.offset < 0 or t.offset + t.size > plan.arena_bytes:
            problems.append(f"{t.name}: [{t.offset}, {t.offset + t.size}) outside arena {plan.arena_bytes}")
        if t.offset % plan.alignment:
            problems.append(f"{t.name}: offset {t.offset} not aligned to {plan.alignment}")
        if not 0 <= t.first <= t.last < len(plan.schedule):
            problems.append(f"{t.name}: lifetime [{t.first}, {t.last}] outside schedule")
    ordered = sorted(plan.tensors + plan.scratch, key=lambda t: t.offset)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.offset >= a.offset + a.size:
                break
            if a.first <= b.last and b.first <= a.last and not _handover(a, b, inplace):
                problems.append(f"{a.name} and {b.name} overlap in bytes and lifetime")
    if readers is not None:
        by_name = {t.name: t for t in plan.tensors}
        for name, (prod, consumers) in readers.items():
            t = by_name.get(name)
            if t is None:
                problems.append(f"{name}: intermediate missing from plan")
                continue
            if t.first > prod or t.last < max(consumers, default=prod):
                problems.append(f"{name}: lifetime [{t.first}, {t.last}] does not cover producer {prod} "
                                f"and consumers {consumers}")
    return problems
