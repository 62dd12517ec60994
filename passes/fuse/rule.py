"""Rewrite rules in the pattern / check / rewrite shape, and the pass that applies them.

A rule looks at one *anchor* node (the last node of its pattern) and returns
- ``None``: the anchor is not the start of this rule's pattern (not counted);
- ``Reject(reason)``: the pattern's structure is there but a check failed ("epsilon is not a constant");
- ``Match(nodes, emit, apply)``: the pattern matched and may be rewritten by ``apply(names)``; ``emit``
  names the fused op (``OpRef``) it would create.

``FuseRules`` walks the graph anchors in reverse topological order, applies each match whose fused op the
target can run (``Target.tuning.can_emit`` and the graph's opset), and counts per rule: matched, applied,
rejected with the reasons. A rule whose op the target cannot run is not applied and says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpRef:
    op: str
    domain: str = ""
    since_opset: int = 1        # for ONNX-domain ops: the opset that introduced the op
    core: bool = False          # a basic op every runtime implements (Conv, Gemm): no target listing needed

    def __str__(self) -> str:
        return f"{self.domain}.{self.op}" if self.domain else f"{self.op}-{self.since_opset}"


@dataclass(frozen=True)
class Reject:
    reason: str


@dataclass
class Match:
    nodes: list[gs.Node]
    emit: OpRef
    apply: Callable[[ir.Namer], None]
    note: str = ""              # what was recognised, for rules that report every site (``report_each``)


class Rule(Protocol):
    name: str

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None: ...


def can_run(graph: gs.Graph, op: OpRef, ctx: PassContext) -> str | None:
    """None when the target may emit ``op`` in this graph; otherwise the reason it may not."""
    target = ctx.target
    if target is None:
        return None
    if op.domain:
        if not target.tuning.can_emit(op.op, op.domain):
            return f"target {target.name} has no kernel for {op}"
        return None
    if int(graph.opset) < op.since_opset:
        return f"{op} needs opset {op.since_opset}; the graph is at opset {graph.opset}"
    if not op.core and op.op not in target.tuning.fused_ops:
        return f"target {target.name} does not list {op.op} among its fused ops"
    return None


@dataclass
class RuleStats:
    matched: int = 0
    applied: int = 0
    rejected: Counter = field(default_factory=Counter)


class FuseRules:
    """Apply ``rules`` (in order of priority) to every anchor; exact when every rule is."""

    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})   # rules check the static shapes they need
    in_place = True
    preserves_shapes = False

    def __init__(self, name: str, rules: Sequence[Rule]):
        self.name = name
        self.rules = list(rules)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {r.name: RuleStats() for r in self.rules}
        names = ir.Namer(graph)
        removed: set[int] = set()
        sites: list[str] = []
        for anchor in reversed(list(graph.nodes)):
            if id(anchor) in removed or not anchor.outputs:
                continue
            for rule in self.rules:
                result = rule.match(graph, anchor, ctx)
                if result is None:
                    continue
                if isinstance(result, Reject):
                    stats[rule.name].rejected[result.reason] += 1
                    if getattr(rule, "report_each", False):
                        sites.append(f"{rule.name} at '{anchor.name}': not fused — {result.reason}")
                    continue
                stats[rule.name].matched += 1
                reason = can_run(graph, result.emit, ctx)
                if reason:
                    stats[rule.name].rejected[reason] += 1
                    if getattr(rule, "report_each", False):
                        sites.append(f"{rule.name} at '{anchor.name}': recognised ({result.note}), not fused — {reason}")
                    removed.update(id(n) for n in result.nodes)   # its inner nodes are not new matches
                    break
                result.apply(names)
                removed.update(id(n) for n in result.nodes)
                stats[rule.name].applied += 1
                if getattr(rule, "report_each", False):
                    sites.append(f"{rule.name} at '{anchor.name}': {result.note or 'fused'}")
                break
        out: dict[str, int | float] = {}
        notes = []
        for rule_name, st in stats.items():
            if st.matched or st.rejected:
                out[f"{rule_name}.matched"] = st.matched
                out[f"{rule_name}.applied"] = st.applied
                out[f"{rule_name}.rejected"] = sum(st.rejected.values())
            for reason, n in st.rejected.most_common(3):
                notes.append(f"{rule_name}: {n}× not applied: {reason}")
        applied = sum(st.applied for st in stats.values())
        return PassResult(graph, modified=bool(applied), stats=out, notes=notes + sites[::-1])


# ----------------------------------------------------------------------------------- match helpers
sole_reader = ir.sole_reader


def produced_by(t: gs.Tensor, op: str | tuple[str, ...], domain=ir.DEFAULT_DOMAINS) -> gs.Node | None:
    node = ir.producer(t)
    return node if node is not None and ir.is_op(node, op, domain) else None


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a binary node reading ``t``, the other operand."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is t:
        return node.inputs[1]
    if node.inputs[1] is t:
        return node.inputs[0]
    return None


def close(value: float | None, expected: float, rel: float = 1e-6) -> bool:
    return value is not None and abs(value - expected) <= rel * max(1.0, abs(expected))


def replace_subgraph(graph: gs.Graph, nodes: list[gs.Node], make: Callable[[], list[gs.Node]]) -> None:
    """Disconnect the pattern's ``nodes``, then add the nodes ``make()`` builds (they write the pattern's
    output tensors). Disconnecting first keeps every tensor with exactly one producer."""
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes.extend(make())


def first_runnable(graph: gs.Graph, ctx: PassContext, choices: Sequence[OpRef]) -> OpRef:
    """The first of ``choices`` the target can run here, else the first (its rejection names why)."""
    for op in choices:
        if can_run(graph, op, ctx) is None:
            return op
    return choices[0]
