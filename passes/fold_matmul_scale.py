"""Move scalar scales across MatMul.

Exact up to float reassociation: scalar multiplication commutes with matrix products,
(x·a) @ (y·b) = (x @ y)·(a·b). Two rewrites, when the Mul's output is read only by the MatMul and a, b
are constant scalars:
- both operands scaled:       MatMul(Mul(x, a), Mul(y, b)) → Mul(MatMul(x, y), a·b)   (one node fewer)
- one operand scaled and the other a constant W read only here:
                              MatMul(Mul(x, a), W) → MatMul(x, W·a)                    (scale folded into W)
Exported attention writes q·√s and kᵀ·√s (the first form).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement


def _scaled(t: gs.Tensor, graph: gs.Graph) -> tuple[gs.Tensor, float, gs.Node] | None:
    """(x, a, mul) when t = Mul(x, a) with a scalar constant a and t read by one node only."""
    mul = ir.producer(t)
    if mul is None or not ir.is_op(mul, "Mul") or len(t.outputs) != 1 or t.name in ir.graph_outputs(graph):
        return None
    for i in (0, 1):
        s = ir.scalar_value(mul.inputs[1 - i])
        if s is not None and not isinstance(mul.inputs[i], gs.Constant):
            return mul.inputs[i], s, mul
    return None


def _scaled_weight(w: gs.Constant, factor: float) -> np.ndarray:
    value = ir.const_value(w)
    return (value * factor).astype(value.dtype)


class FoldMatMulScale:
    name = "fold-matmul-scale"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = folded = 0
        names = ir.Namer(graph)
        for node in list(graph.nodes):
            if not ir.is_op(node, "MatMul") or not node.outputs:
                continue
            left, right = _scaled(node.inputs[0], graph), _scaled(node.inputs[1], graph)
            dtype = np.dtype(node.outputs[0].dtype) if node.outputs[0].dtype is not None else np.float32
            if left and right:
                out = node.outputs[0]
                product = gs.Variable(names.fresh(out.name + "_unscaled"), dtype=out.dtype, shape=out.shape)
                node.inputs[0], node.inputs[1] = left[0], right[0]
                node.outputs[0] = product
                scale = gs.Constant(names.fresh(node.name + "_scale"), np.array(left[1] * right[1], dtype=dtype))
                graph.nodes.append(gs.Node("Mul", name=names.fresh(node.name + "_scaled"),
                                           inputs=[product, scale], outputs=[out]))
                left[2].outputs.clear()
                right[2].outputs.clear()
                merged += 1
                continue
            for side, other in ((left, 1), (right, 0)):
                w = node.inputs[other]
                if side and isinstance(w, gs.Constant) and len(w.outputs) == 1:
                    node.inputs[1 - other] = side[0]
                    node.inputs[other] = gs.Constant(names.fresh(w.name + "_scaled"),
                                                     _scaled_weight(w, side[1]))
                    side[2].outputs.clear()
                    folded += 1
                    break
        return PassResult(graph, modified=bool(merged or folded),
                          stats={"scales_merged": merged, "scales_folded_into_weights": folded})
