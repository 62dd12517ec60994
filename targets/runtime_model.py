"""What the runtime holds beyond lmc's exact placements: a per-target cost model (data in the target's
``[runtime]`` table), graph-agnostic like the planner — it sees op names and byte counts only.

Prediction of the runtime's peak resident memory, above the process before the session is created:
    peak = session + first_run + Σ_k workspace(k) + Σ_w resident(w) + arena_factor · arena + inputs
           + output_copies · outputs + state
- ``session``: an empty session's own cost (allocators, kernel registry, thread pool), measured;
  ``first_run``: what running a model the first time adds whatever its size (the allocator's first chunk,
  GEMM buffers); ``workspace(k)``: a kernel kind's one-time buffers (``kernel_workspaces``, e.g. the int8
  activation GEMM behind MatMulNBits), counted once when the graph uses that kind;
- resident(w): every weight is read at every step, so all of it is resident (mapped or copied). A weight
  read by a *prepacking* op (``prepack_ops``) is repacked at load: the packed copy replaces the original,
  unless the op keeps its original too (``prepack_keeps_original``) or another, non-prepacking op reads
  the same weight (a tied embedding's Gather) — then both are resident;
- arena: lmc's plan of the intermediates (kernel scratch included) times ``arena_factor``, the measured
  ratio of the runtime's own allocator peak to lmc's packing (it plans without lmc's offsets);
- inputs, outputs: the graph's; each output exists ``output_copies`` times (the runtime's buffer and the
  caller's copy of it); state: the in-place cache.
The model describes the runtime under ``session_options`` (written into every bundle as
``session_options.json`` and applied by lmc's drivers); the numbers were measured with the runtime the
target file names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RuntimeModel:
    session_bytes: int = 0
    prepack_ops: frozenset[str] = frozenset()
    prepack_keeps_original: frozenset[str] = frozenset()
    arena_factor: float = 1.0
    output_copies: int = 1
    first_run_bytes: int = 0
    kernel_workspaces: dict = field(default_factory=dict)
    session_options: dict = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: dict | None) -> "RuntimeModel":
        table = table or {}
        return cls(session_bytes=int(table.get("session_bytes", 0)),
                   prepack_ops=frozenset(table.get("prepack_ops", [])),
                   prepack_keeps_original=frozenset(table.get("prepack_keeps_original", [])),
                   arena_factor=float(table.get("arena_factor", 1.0)),
                   output_copies=int(table.get("output_copies", 1)),
                   first_run_bytes=int(table.get("first_run_bytes", 0)),
                   kernel_workspaces={k: int(v) for k, v in table.get("kernel_workspaces", {}).items()},
                   session_options=dict(table.get("session_options", {})))

    def weight_resident(self, size: int, readers: Iterable[str]) -> tuple[int, int]:
        """(resident bytes of the weight itself, bytes of prepacked copies) for a weight of ``size`` bytes
        read by ops named ``readers``."""
        readers = set(readers)
        packed = readers & self.prepack_ops
        if not packed:
            return size, 0
        keeps = bool(packed & self.prepack_keeps_original) or bool(readers - self.prepack_ops)
        return (size if keeps else 0), size

    def predict(self, weights: Iterable[tuple[int, Iterable[str]]], arena: int, inputs: int, outputs: int,
                state: int) -> "RuntimePrediction":
        original = prepacked = 0
        kinds: set[str] = set()
        for size, readers in weights:
            readers = list(readers)
            kinds.update(readers)
            a, b = self.weight_resident(size, readers)
            original += a
            prepacked += b
        workspaces = sum(v for k, v in self.kernel_workspaces.items() if k in kinds)
        items = {"session": self.session_bytes, "first_run": self.first_run_bytes, "kernel_workspaces": workspaces,
                 "weights": original, "prepacked_weights": prepacked,
                 "arena": int(arena * self.arena_factor), "inputs": inputs,
                 "outputs": outputs * self.output_copies, "state": state}
        return RuntimePrediction(items)


@dataclass(frozen=True)
class RuntimePrediction:
    items: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict:
        return {"predicted_peak_bytes": self.peak_bytes, "items": dict(self.items)}
