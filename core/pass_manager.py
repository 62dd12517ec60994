"""The pass contract and the PassManager that runs passes and records what each did.

A pass is an object with
- ``name`` (str), ``kind`` (``PassKind.EXACT`` leaves every output equal up to float reassociation;
  ``PassKind.APPROXIMATE`` changes numerics and only runs when asked),
- ``requires`` (a set of ``Requirement``) that the manager checks before running it,
- ``run(graph, ctx) -> PassResult``; passes edit the gs graph in place and say so (``in_place = True``),
- ``preserves_shapes``: True when every tensor the pass leaves or creates keeps a dtype and shape, so
  shape inference need not run again after it.

Whether a build is exact is derived from the runs: a run that changes numerics says so
(``PassResult.approximation``, or any modifying run of an ``APPROXIMATE`` pass) and its record keeps it;
``approximations(records)`` empty means every run was exact and the bundle is held to the exact check.

After every pass the manager restores a topological order, re-infers shapes when the pass modified the
graph, and records a ``PassRecord``: wall time, node count, weight bytes and the estimated peak (the largest
live set of intermediates over the current node order — the arena planner's lower bound). A ``FixedPoint``
group repeats its passes until none modifies the graph (bounded by ``max_iterations``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import LmcError

log = logging.getLogger(__name__)


class PassError(RuntimeError):
    """An internal error inside a pass (not a user error): names the pass it came from."""

    def __init__(self, name: str, cause: BaseException):
        super().__init__(f"pass '{name}' failed: {type(cause).__name__}: {cause}")
        self.pass_name = name


class PassKind(enum.Enum):
    EXACT = "exact"
    APPROXIMATE = "approximate"


class Requirement(enum.Enum):
    STATIC_SHAPES = "static shapes"
    TOPOLOGICAL_ORDER = "topological order"
    UNIQUE_NODE_NAMES = "unique node names"


@dataclass
class PassResult:
    """What a pass returns: the graph (edited in place or new), whether it changed, counters and notes."""

    graph: gs.Graph
    modified: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    approximation: str | None = None     # what this run changed in the numerics (None: exact)


@dataclass
class PassContext:
    """Read-only facts passes may consult (the target, the build options) and an optional progress sink
    ``progress(label, done, total)`` for long work (calibration, quantization); the CLI draws it."""

    target: Any = None
    options: Any = None
    progress: Callable[[str, int, int], None] | None = None
    spill: Any = None          # a weights.SpillFile: large weights a pass creates move there after it
    masks: Any = None          # generation builds: {key present: MaskPattern} judged on bound copies first


    def report(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)


@runtime_checkable
class Pass(Protocol):
    name: str
    kind: PassKind
    requires: frozenset[Requirement]
    in_place: bool
    preserves_shapes: bool

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult: ...


@dataclass(frozen=True)
class PassRecord:
    """One row of the per-pass table."""

    name: str
    seconds: float
    nodes: int
    weight_bytes: int
    peak_estimate_bytes: int | None
    modified: bool
    stats: dict[str, int | float]
    notes: tuple[str, ...]
    approximation: str | None = None     # set when the run changed the numerics: the build is then approximate


@dataclass(frozen=True)
class FixedPoint:
    """Run ``passes`` repeatedly until none of them modifies the graph."""

    name: str
    passes: Sequence[Pass]
    max_iterations: int = 8


PeakEstimator = Callable[[gs.Graph], "int | None"]


def approximation_of(pass_: Pass, result: PassResult) -> str | None:
    """What a run changed in the numerics: the pass's own label, or its name when an approximating pass
    (``PassKind.APPROXIMATE``) modified the graph; None when the run was exact."""
    if result.approximation:
        return result.approximation
    if getattr(pass_, "kind", PassKind.EXACT) is PassKind.APPROXIMATE and result.modified:
        return pass_.name
    return None


def approximations(records: Sequence[PassRecord]) -> tuple[str, ...]:
    """The distinct approximations of a build's pass records, in order: empty = the bundle is exact."""
    return tuple(dict.fromkeys(r.approximation for r in records if r.approximation))


def check_requirements(graph: gs.Graph, pass_: Pass, sorted_already: bool = False) -> None:
    for req in pass_.requires:
        if req is Requirement.STATIC_SHAPES:
            shapes.require_static_shapes(graph, where=f"needed by pass '{pass_.name}'")
        elif req is Requirement.UNIQUE_NODE_NAMES:
            ir.ensure_unique_names(graph)
        elif req is Requirement.TOPOLOGICAL_ORDER and not sorted_already:
            ir.topological_sort(graph)


class PassManager:
    """Runs a pipeline of passes (and fixed-point groups) and keeps one record per pass run."""

    def __init__(self, pipeline: Sequence[Pass | FixedPoint], ctx: PassContext,
                 peak_estimator: PeakEstimator | None = None,
                 on_pass: Callable[[PassRecord], None] | None = None):
        self.pipeline = list(pipeline)
        self.ctx = ctx
        self.peak_estimator = peak_estimator
        self.on_pass = on_pass
        self._sorted = False
        self._last: PassRecord | None = None

    def _record(self, graph: gs.Graph, name: str, seconds: float, result: PassResult,
                approximation: str | None = None) -> PassRecord:
        if result.modified or self._last is None:
            peak = self.peak_estimator(graph) if self.peak_estimator else None
            nodes, weights = len(graph.nodes), ir.weight_bytes(graph)
        else:  # unchanged graph: the previous measurements still hold
            peak, nodes, weights = self._last.peak_estimate_bytes, self._last.nodes, self._last.weight_bytes
        record = PassRecord(name=name, seconds=seconds, nodes=nodes, weight_bytes=weights,
                            peak_estimate_bytes=peak, modified=result.modified, stats=dict(result.stats),
                            notes=tuple(result.notes), approximation=approximation)
        self._last = record
        log.info("pass %-24s %7.3fs nodes=%d weights=%d modified=%s %s", name, seconds, record.nodes,
                 record.weight_bytes, result.modified, result.stats)
        if self.on_pass:
            self.on_pass(record)
        return record

    def _run_one(self, graph: gs.Graph, pass_: Pass, records: list[PassRecord], suffix: str = "") -> tuple[gs.Graph, bool]:
        start = time.perf_counter()
        check_requirements(graph, pass_, sorted_already=self._sorted)
        self._sorted = self._sorted or Requirement.TOPOLOGICAL_ORDER in pass_.requires
        try:
            result = pass_.run(graph, self.ctx)
        except LmcError:
            raise
        except Exception as exc:      # a bug in the pass: say which one
            raise PassError(pass_.name, exc) from exc
        graph = result.graph
        if result.modified:
            ir.remove_dead_nodes(graph)
            ir.topological_sort(graph)
            ir.ensure_unique_names(graph)
            if not getattr(pass_, "preserves_shapes", False):
                shapes.infer_shapes(graph)
            self._sorted = True
            if self.ctx.spill is not None:
                ir.spill_constants(graph, self.ctx.spill)
        seconds = time.perf_counter() - start
        records.append(self._record(graph, pass_.name + suffix, seconds, result, approximation_of(pass_, result)))
        return graph, result.modified

    def run(self, graph: gs.Graph) -> tuple[gs.Graph, list[PassRecord]]:
        records: list[PassRecord] = []
        for item in self.pipeline:
            if isinstance(item, FixedPoint):
                for iteration in range(item.max_iterations):
                    changed = False
                    for pass_ in item.passes:
                        graph, modified = self._run_one(graph, pass_, records, suffix=f" [{iteration + 1}]")
                        changed |= modified
                    if not changed:
                        break
                else:
                    note = (f"{item.name}: still changing the graph after {item.max_iterations} rounds; stopped "
                            f"there (the graph is valid, perhaps not fully simplified)")
                    log.warning(note)
                    records[-1] = dataclasses.replace(records[-1], notes=records[-1].notes + (note,))
            else:
                graph, _ = self._run_one(graph, item, records)
        return graph, records
