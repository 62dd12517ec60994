"""What the runtime holds beyond lmc's exact placements: a per-target cost model (data in the target's
``[runtime]`` table), graph-agnostic like the planner — it sees op names and byte counts only.

Prediction of the model-attributable peak: the runtime's resident peak while it loads the model and runs
it, above the same kind of process after it opened an empty session under the same session options:
    peak = first_run + node_bytes · nodes + Σ_k workspace(k) + Σ_w resident(w)
           + (arena_factor + Σ_k share(k) · temporaries(k)) · arena + inputs + output_copies · outputs + state
- ``first_run``: what any model adds over an empty session whatever its size (the code pages of the graph
  optimisers and kernels a real model touches); ``node_bytes``: the session's state per node of the
  graph (kernels, the graph itself, the execution plan); ``workspace(k)``: a kernel kind's one-time cost
  (``kernel_workspaces``: its code, its buffers), counted once when the graph uses it;
- resident(w): every weight is read at every step, so all of it is resident (mapped or copied). A weight
  read only by *prepacking* ops (``prepack_ops``) is repacked at load and the packed copy, of
  ``prepack_factor[op]`` × its bytes (default 1), replaces it; it stays resident too when the op keeps
  its original (``prepack_keeps_original``) or another, non-prepacking op reads it (a tied embedding's
  Gather);
- arena: lmc's plan of the intermediates (kernel scratch included) times ``arena_factor``, the measured
  ratio of what the runtime's allocator holds beyond the outputs to lmc's packing (the runtime plans
  without lmc's offsets), plus ``kernel_temporaries[k]`` × it for a kernel kind whose per-call buffers
  live outside the arena (MatMulNBits quantizing its activation at every call: the C heap's high water of
  them), weighted by share(k), the fraction of the prepacked weights kind k reads (its share of the calls);
- inputs, outputs: the graph's; each output exists ``output_copies`` times; state: the in-place cache.
``session_bytes``, the empty session's own cost (the runtime's code pages and allocators), is not part of
the peak: it is what the process pays before any model, reported beside the prediction.
The model describes the runtime under ``session_options`` (written into every bundle as
``session_options.json`` and applied by lmc's drivers, ``lmc.compiler.runtime``); the numbers were
measured with the runtime the target file names (``bench/bench_memory.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RuntimeModel:
    session_bytes: int = 0
    prepack_ops: frozenset[str] = frozenset()
    prepack_keeps_original: frozenset[str] = frozenset()
    prepack_factor: dict = field(default_factory=dict)
    arena_factor: float = 1.0
    output_copies: int = 1
    first_run_bytes: int = 0
    node_bytes: int = 0
    kernel_workspaces: dict = field(default_factory=dict)
    kernel_temporaries: dict = field(default_factory=dict)
    session_options: dict = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: dict | None) -> "RuntimeModel":
        table = table or {}
        return cls(session_bytes=int(table.get("session_bytes", 0)),
                   prepack_ops=frozenset(table.get("prepack_ops", [])),
                   prepack_keeps_original=frozenset(table.get("prepack_keeps_original", [])),
                   prepack_factor={k: float(v) for k, v in table.get("prepack_factor", {}).items()},
                   arena_factor=float(table.get("arena_factor", 1.0)),
                   output_copies=int(table.get("output_copies", 1)),
                   first_run_bytes=int(table.get("first_run_bytes", 0)),
                   node_bytes=int(table.get("node_bytes", 0)),
                   kernel_workspaces={k: int(v) for k, v in table.get("kernel_workspaces", {}).items()},
                   kernel_temporaries={k: float(v) for k, v in table.get("kernel_temporaries", {}).items()},
                   session_options=dict(table.get("session_options", {})))

    def weight_resident(self, size: int, readers: Iterable[str]) -> tuple[int, int]:
        """(resident bytes of the weight itself, bytes of prepacked copies) for a weight of ``size`` bytes
        read by ops named ``readers``."""
        readers = set(readers)
        packed = readers & self.prepack_ops
        if not packed:
            return size, 0
        keeps = bool(packed & self.prepack_keeps_original) or bool(readers - self.prepack_ops)
        factor = max(self.prepack_factor.get(op, 1.0) for op in packed)
        return (size if keeps else 0), int(size * factor)

    def predict(self, weights: Iterable[tuple[int, Iterable[str]]], arena: int, inputs: int, outputs: int,
                state: int, nodes: int = 0) -> "RuntimePrediction":
        """``weights``: (bytes, reader op names) per constant; ``arena``: lmc's arena bytes; ``inputs``,
        ``outputs``, ``state``: bytes; ``nodes``: the graph's node count."""
        original = prepacked = packed_count = 0
        kinds: set[str] = set()
        read_by: dict[str, int] = {}
        for size, readers in weights:
            readers = set(readers)
            kinds.update(readers)
            a, b = self.weight_resident(size, readers)
            original += a
            prepacked += b
            if readers & self.prepack_ops:
                packed_count += 1
                for op in readers & self.prepack_ops:
                    read_by[op] = read_by.get(op, 0) + 1
        workspaces = sum(v for k, v in self.kernel_workspaces.items() if k in kinds)
        temporaries = sum(v * read_by.get(k, 0) / packed_count for k, v in self.kernel_temporaries.items()
                          if packed_count)
        items = {"first_run": self.first_run_bytes, "session_state": self.node_bytes * nodes,
                 "kernel_workspaces": workspaces, "weights": original, "prepacked_weights": prepacked,
                 "arena": int(arena * self.arena_factor), "kernel_temporaries": int(arena * temporaries),
                 "inputs": inputs,
                 "outputs": outputs * self.output_copies, "state": state}
        return RuntimePrediction(items, self.session_bytes)


@dataclass(frozen=True)
class RuntimePrediction:
    items: dict[str, int]
    session_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict:
        return {"predicted_peak_bytes": self.peak_bytes, "items": dict(self.items),
                "session_bytes": self.session_bytes}
