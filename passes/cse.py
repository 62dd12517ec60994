"""Common-subexpression elimination: nodes computing the same thing from the same inputs are merged.

Exact. Two nodes are the same computation when they have the same op, domain and attributes and read the
same tensors in the same order (constants compared by identity — dedup-weights has already merged equal
ones). Nodes are visited in topological order, so chains of duplicates merge in one pass. Only ops known
to be deterministic merge: ONNX-domain ops except the nondeterministic ones
(``fold_constants.is_nondeterministic``: random ops, Dropout in training mode), and ops of other domains
only when ``DETERMINISTIC_CUSTOM_OPS`` lists them. Ops with subgraphs are never merged. Readers of a
merged duplicate's outputs are rewired wherever they are — inside If/Loop/Scan bodies too (a body reads
the outer tensor object itself) — and each body is itself deduplicated within its own scope (its outputs
kept, like the graph's).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.fold_constants import is_nondeterministic

# ops outside the ONNX domain known to be pure functions of their inputs (onnxruntime's contrib kernels)
DETERMINISTIC_CUSTOM_OPS = frozenset({
    (ir.MS_DOMAIN, op) for op in ("FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat", "GatherBlockQuantized",
                                  "QuantizeLinear", "DequantizeLinear", "Gelu", "FastGelu", "BiasGelu",
                                  "QuickGelu", "FusedConv")})


def _mergeable(node: gs.Node) -> bool:
    if (node.domain or "") in ir.DEFAULT_DOMAINS:
        return not is_nondeterministic(node)
    return (node.domain, node.op) in DETERMINISTIC_CUSTOM_OPS


def _attr_key(value) -> object:
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, gs.Tensor):
        return ("tensor", id(value))
    if isinstance(value, float):
        return ("float", value)
    return value


class EliminateCommonSubexpressions:
    name = "cse"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = _merge(graph)
        for sub in ir.nested_graphs(graph):
            merged += _merge(sub)
        return PassResult(graph, modified=bool(merged), stats={"nodes_merged": merged})


def _merge(graph: gs.Graph) -> int:
    """Merge duplicate nodes of one graph (not its subgraphs); returns how many were removed."""
    seen: dict[tuple, gs.Node] = {}
    removed: set[int] = set()
    outputs = ir.graph_outputs(graph)
    for node in list(graph.nodes):
        if (not node.outputs or not _mergeable(node) or ir.has_subgraph(node)
                or any(o.name in outputs for o in node.outputs)):
            continue
        try:
            key = (node.op, node.domain or "", tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())),
                   tuple(id(t) for t in node.inputs), len(node.outputs))
            hash(key)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        for dup, kept in zip(list(node.outputs), first.outputs):
            for reader in list(dup.outputs):
                for i, t in enumerate(reader.inputs):
                    if t is dup:
                        reader.inputs[i] = kept
        node.outputs.clear()
        node.inputs.clear()
        removed.add(id(node))
    if removed:
        graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    return len(removed)
