"""Masked scores with a run-time mask: Where(C, s, f) + m  →  s + (Where(C, 0, f) + m).

C a constant condition (the causal mask), f a constant fill ≤ −1e30, m a run-time additive mask (from an
``attention_mask`` input). The right-hand sum no longer depends on s: it is the same tensor in every layer
(one Add once ``dedup-weights`` and ``cse`` run), and each layer does one elementwise pass instead of two.
Exact for finite scores: where C is false, s + (f + m) equals f + m because |s| ≪ ulp(f) (f + 0 = f and
f + f = −inf either way); where C is true both give s + m.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

ADD = OpRef("Add", "", 1, core=True)
FILL_LIMIT = -1e30


class AttentionMaskRule:
    name = "attention-mask"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Add"):
            return None
        for i in (0, 1):
            where = produced_by(anchor.inputs[i], "Where")
            m = anchor.inputs[1 - i]
            if where is None or isinstance(m, gs.Constant):
                continue
            cond, fill = ir.const_value(where.inputs[0]), ir.scalar_value(where.inputs[2])
            if cond is None or fill is None or isinstance(where.inputs[1], gs.Constant):
                continue
            if fill > FILL_LIMIT:
                return Reject("the masked fill is not ≤ −1e30")
            if sole_reader(where.outputs[0], graph) is not anchor:
                return Reject("the masked scores have other readers")
            scores, out = where.inputs[1], anchor.outputs[0]
            dtype = np.dtype(scores.dtype) if scores.dtype is not None else np.float32
            bias = np.where(np.asarray(cond, dtype=bool), 0.0, fill).astype(dtype)

            def apply(names: ir.Namer, m=m, scores=scores, bias=bias, where=where) -> None:
                mshape = list(np.broadcast_shapes(bias.shape, tuple(ir.static_shape(m))))
                total = gs.Variable(names.fresh(m.name + "_with_causal"), dtype=m.dtype, shape=mshape)
                const = gs.Constant(names.fresh(m.name + "_causal_bias"), bias)
                replace_subgraph(graph, [anchor, where], lambda: [
                    gs.Node("Add", name=names.fresh(anchor.name + "_mask"), inputs=[const, m], outputs=[total]),
                    gs.Node("Add", name=names.fresh(anchor.name + "_masked"), inputs=[scores, total], outputs=[out])])
            return Match([anchor, where], ADD, apply)
        return None
