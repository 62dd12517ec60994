"""MatMul + Add(bias) → Gemm, for 2-D activations.

Pattern (anchor: Add) reading MatMul(x, W) with x 2-D [M, K], W a constant [K, N], and a constant bias
that broadcasts to [N] (either Add operand order), the MatMul read only by the Add.
Rewrite: Gemm(x, W, bias). Exact up to float reassociation.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

GEMM = OpRef("Gemm", "", 1, core=True)


class MatMulAddRule:
    name = "matmul-add"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Add"):
            return None
        for i in (0, 1):
            mm = produced_by(anchor.inputs[i], "MatMul")
            bias = ir.const_value(anchor.inputs[1 - i])
            if mm is None or bias is None:
                continue
            x, w = mm.inputs
            xs, ws = ir.static_shape(x), ir.static_shape(w)
            if xs is None or len(xs) != 2 or not isinstance(w, gs.Constant) or ws is None or len(ws) != 2:
                return Reject("MatMul is not 2-D × constant 2-D")
            if bias.size not in (1, ws[1]) or (bias.ndim > 1 and bias.shape[-1] != bias.size):
                return Reject("bias does not broadcast along the output features only")
            if sole_reader(mm.outputs[0], graph) is not anchor:
                return Reject("the MatMul output has other readers")
            out = anchor.outputs[0]
            vec = np.broadcast_to(bias.reshape(-1), (ws[1],)).copy()

            def apply(names: ir.Namer, mm=mm, x=x, w=w, vec=vec) -> None:
                c = gs.Constant(names.fresh(out.name + "_bias"), vec)
                replace_subgraph(graph, [anchor, mm], lambda: [
                    gs.Node("Gemm", name=names.fresh(mm.name + "_gemm"), inputs=[x, w, c], outputs=[out])])
            return Match([anchor, mm], GEMM, apply)
        return None
