"""Conv + BatchNormalization (inference) → one Conv with folded weights.

Pattern (anchor: BatchNormalization, mode inference, one output) reading a Conv whose output nothing
else reads, Conv weight/bias and BN parameters all constants. With a = γ / √(σ² + ε):
    W' = W · a (per output channel),  b' = (b − μ) · a + β
Exact up to float rounding of the folded constants.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

CONV = OpRef("Conv", "", 1, core=True)


class ConvBatchNormRule:
    name = "conv-bn"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "BatchNormalization"):
            return None
        conv = produced_by(anchor.inputs[0], "Conv")
        if conv is None:
            return None
        if len([o for o in anchor.outputs if o.outputs or o.name in ir.graph_outputs(graph)]) > 1:
            return Reject("BatchNormalization runs in training mode (extra outputs are used)")
        if sole_reader(conv.outputs[0], graph) is not anchor:
            return Reject("the Conv output has other readers")
        params = [ir.const_value(t) for t in anchor.inputs[1:5]]
        w = ir.const_value(conv.inputs[1])
        b = ir.const_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
        if w is None or any(p is None for p in params) or (len(conv.inputs) > 2 and conv.inputs[2].name and b is None):
            return Reject("Conv weights or BatchNormalization parameters are not constants")
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = float(anchor.attrs.get("epsilon", 1e-5))
        a = gamma / np.sqrt(var + eps)
        w_new = (w.astype(np.float64) * a.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        b_old = b.astype(np.float64) if b is not None else np.zeros_like(mean)
        b_new = ((b_old - mean) * a + beta).astype(w.dtype)
        out = anchor.outputs[0]

        def apply(names: ir.Namer) -> None:
            x, attrs = conv.inputs[0], dict(conv.attrs)
            wc = gs.Constant(names.fresh(conv.inputs[1].name + "_bn"), w_new)
            bc = gs.Constant(names.fresh(out.name + "_bias"), b_new)
            replace_subgraph(graph, [anchor, conv], lambda: [
                gs.Node("Conv", name=names.fresh(conv.name + "_bn"), attrs=attrs, inputs=[x, wc, bc], outputs=[out])])
        return Match([anchor, conv], CONV, apply)
