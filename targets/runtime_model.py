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
Kernel kinds are op names (``domain.op``); ``DECODED_MATMUL`` stands for a weight lmc decodes into a
MatMul (DequantizeLinear → MatMul, the activation not quantized), and ``dequantize_matmul`` names the kind
the runtime makes of it. A kind ``family@variant`` (the same op run another way, e.g.
``com.microsoft.MatMulNBits@0``: accuracy level 0) takes its own entry in each table where it has one, its
family's otherwise; its family's workspace counts once with its own.

The model describes the runtime under ``session_options`` (written into the bundle as
``session_options.json`` and applied by lmc's drivers, ``lmc.core.runtime``); the numbers were
measured with the runtime the target file names (``bench/bench_memory.py``). ``choices`` (the target's
``[[runtime.choices]]``) make the configuration a per-bundle one: ``choose`` takes what the bundle's
decoded MatMuls are (weight bits, rows) and returns the model under the first choice that applies — its
session options merged in, its ``dequantize_matmul`` kind — or this one when none does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

DECODED_MATMUL = "DequantizeLinear→MatMul"


def family(kind: str) -> str:
    """``op`` of a kind ``op@variant`` (the kind itself when it has no variant)."""
    return kind.split("@", 1)[0]


def _lookup(table: dict, kind: str, default):
    return table.get(kind, table.get(family(kind), default))


@dataclass(frozen=True)
class DecodedMatMul:
    """What a choice reads of one decoded MatMul: its weight's bit width and the rows it multiplies (the
    product of its activation's leading dims, a dimension left symbolic counting as 1)."""
    bits: int
    rows: int


@dataclass(frozen=True)
class Choice:
    """One ``[[runtime.choices]]`` entry: it applies to a bundle with decoded MatMuls all of whose weights
    have one of ``weight_bits`` widths and all of which multiply at least ``min_rows`` rows; it merges
    ``session_options`` into the target's and runs those MatMuls as ``dequantize_matmul``."""
    name: str
    weight_bits: frozenset[int] = frozenset()
    min_rows: int = 1
    session_options: dict = field(default_factory=dict)
    dequantize_matmul: str = ""

    @classmethod
    def from_table(cls, table: dict) -> "Choice":
        return cls(name=str(table["name"]), weight_bits=frozenset(int(b) for b in table.get("weight_bits", [])),
                   min_rows=int(table.get("min_rows", 1)), session_options=dict(table.get("session_options", {})),
                   dequantize_matmul=str(table.get("dequantize_matmul", "")))

    def applies(self, matmuls: Sequence[DecodedMatMul]) -> bool:
        return bool(matmuls) and all(m.bits in self.weight_bits and m.rows >= self.min_rows for m in matmuls)


def merge_session_options(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s settings; nested tables (``config_entries``, ``cpu_arena``) key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    dequantize_matmul: str = DECODED_MATMUL
    choices: tuple[Choice, ...] = ()
    choice: str | None = None          # the name of the choice this model is under (``choose``)

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
                   session_options=dict(table.get("session_options", {})),
                   dequantize_matmul=str(table.get("dequantize_matmul", DECODED_MATMUL)),
                   choices=tuple(Choice.from_table(c) for c in table.get("choices", [])))

    def choose(self, matmuls: Sequence[DecodedMatMul]) -> "RuntimeModel":
        """The model under the first choice that applies to a bundle whose decoded MatMuls are ``matmuls``
        (this one, with no choices left, when none does)."""
        for choice in self.choices:
            if choice.applies(matmuls):
                return replace(self, choices=(), choice=choice.name,
                               session_options=merge_session_options(self.session_options, choice.session_options),
                               dequantize_matmul=choice.dequantize_matmul or self.dequantize_matmul)
        return replace(self, choices=())

    def kind(self, reader: str) -> str:
        return self.dequantize_matmul if reader == DECODED_MATMUL else reader

    def _prepacks(self, kind: str) -> bool:
        return kind in self.prepack_ops or family(kind) in self.prepack_ops

    def weight_resident(self, size: int, readers: Iterable[str]) -> tuple[int, int]:
        """(resident bytes of the weight itself, bytes of prepacked copies) for a weight of ``size`` bytes
        read by ops named ``readers``."""
        readers = {self.kind(r) for r in readers}
        packed = {r for r in readers if self._prepacks(r)}
        if not packed:
            return size, 0
        keeps = any(r in self.prepack_keeps_original or family(r) in self.prepack_keeps_original
                    for r in packed) or bool(readers - packed)
        factor = max(_lookup(self.prepack_factor, op, 1.0) for op in packed)
        return (size if keeps else 0), int(size * factor)

    def predict(self, weights: Iterable[tuple[int, Iterable[str]]], arena: int, inputs: int, outputs: int,
                state: int, nodes: int = 0) -> "RuntimePrediction":
        """``weights``: (bytes, reader op names) per constant; ``arena``: lmc's arena bytes; ``inputs``,
        ``outputs``, ``state``: bytes; ``nodes``: the graph's node count."""
        original = prepacked = packed_count = 0
        kinds: set[str] = set()
        read_by: dict[str, int] = {}
        for size, readers in weights:
            readers = {self.kind(r) for r in readers}
            kinds.update(readers)
            a, b = self.weight_resident(size, readers)
            original += a
            prepacked += b
            packed = {r for r in readers if self._prepacks(r)}
            if packed:
                packed_count += 1
                for op in packed:
                    read_by[op] = read_by.get(op, 0) + 1
        kinds |= {family(k) for k in kinds}
        workspaces = sum(v for k, v in self.kernel_workspaces.items() if k in kinds)
        temporaries = sum(_lookup(self.kernel_temporaries, k, 0.0) * n / packed_count for k, n in read_by.items())
        items = {"first_run": self.first_run_bytes, "session_state": self.node_bytes * nodes,
                 "kernel_workspaces": workspaces, "weights": original, "prepacked_weights": prepacked,
                 "arena": int(arena * self.arena_factor), "kernel_temporaries": int(arena * temporaries),
                 "inputs": inputs,
                 "outputs": outputs * self.output_copies, "state": state}
        return RuntimePrediction(items, self.session_bytes, self.session_options, self.choice)


@dataclass(frozen=True)
class RuntimePrediction:
    items: dict[str, int]
    session_bytes: int = 0
    session_options: dict = field(default_factory=dict)
    choice: str | None = None

    @property
    def peak_bytes(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict:
        return {"predicted_peak_bytes": self.peak_bytes, "items": dict(self.items),
                "session_bytes": self.session_bytes, "session_options": dict(self.session_options),
                "choice": self.choice}
