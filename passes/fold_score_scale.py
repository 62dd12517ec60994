"""Fold a scalar scale of a MatMul's result into the weights that produce one of its operands.

Exact up to float reassociation: y = (a @ b)·c (or (a @ b)/c) where a is a pure re-arrangement of some
columns of x·W (+ bias) — the query path of attention: Gemm/MatMul → [Reshape] → [Split] → Reshape →
Transpose — equals a' @ b with a' computed from W·c (+ bias·c) in those columns (``weight_columns``). The
elementwise pass over the [B, H, S, S] scores disappears.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.weight_columns import find_columns

class FoldScoreScale:
    name = "fold-score-scale"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded = 0
        names = ir.Namer(graph)
        for node in list(graph.nodes):
            if not node.outputs or not ir.is_op(node, ("Mul", "Div")):
                continue
            idx = 1 if ir.scalar_value(node.inputs[1]) is not None else (0 if ir.is_op(node, "Mul") else None)
            if idx is None or ir.scalar_value(node.inputs[idx]) in (None, 0.0):
                continue
            mm_out = node.inputs[1 - idx]
            mm = ir.producer(mm_out)
            if mm is None or not ir.is_op(mm, "MatMul") or ir.sole_reader(mm_out, graph) is None:
                continue
            c = ir.scalar_value(node.inputs[idx])
            factor = c if ir.is_op(node, "Mul") else 1.0 / c
            for side in (0, 1):
                src = find_columns(graph, mm.inputs[side])
                if src is None:
                    continue
                src.scale(factor, names)
                ir.bypass(graph, node, input_index=1 - idx)
                folded += 1
                break
        return PassResult(graph, modified=bool(folded), stats={"scales_folded_into_weights": folded})
