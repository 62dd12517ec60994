"""RMSNorm → ``RMSNormalization`` (opset 23) or onnxruntime's ``SimplifiedLayerNormalization`` (a contrib
schema onnxruntime registers in the ONNX domain, usable at any opset).

Pattern (anchor: the scale Mul, or the normalisation itself when unscaled):
    y = Mul(w, x / sqrt(mean(x², axis=-1) + ε))      w a constant [D] (either operand order)
Rewrite: y = RMSNormalization(x, w, axis=-1, epsilon=ε) — the same math in one kernel, w = 1 when absent.
Exact up to float reassociation.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.norms import match_inverse_rms, weight_vector
from lmc.passes.fuse.rule import Match, OpRef, Reject, first_runnable, replace_subgraph, sole_reader

CHOICES = (OpRef("RMSNormalization", "", 23), OpRef("SimplifiedLayerNormalization", "", 1))


class RmsNormRule:
    name = "rms-norm"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, ("Mul", "Div")):
            return None
        out = anchor.outputs[0]
        width = (out.shape or [None])[-1]
        core, weight, nodes = None, None, []
        if ir.is_op(anchor, "Mul"):
            for i in (0, 1):
                w = weight_vector(anchor.inputs[i], width) if isinstance(width, int) else None
                if w is None:
                    continue
                inner = anchor.inputs[1 - i]
                if sole_reader(inner, graph) is not anchor:
                    continue
                found = match_inverse_rms(graph, inner)
                if not isinstance(found, str):
                    core, weight, nodes = found, w, [anchor]
                    break
        if core is None:
            found = match_inverse_rms(graph, out)
            if isinstance(found, str):
                return None
            core = found
            weight = np.ones(width, dtype=np.float32) if isinstance(width, int) else None
        x, eps, core_nodes = core
        if weight is None:
            return Reject("normalised width is not static")
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.float32
        op = first_runnable(graph, ctx, CHOICES)

        def apply(names: ir.Namer) -> None:
            scale = gs.Constant(names.fresh(out.name + "_rms_scale"), weight.astype(dtype))
            attrs = {"axis": -1, "epsilon": eps}
            if op.op == "SimplifiedLayerNormalization":
                attrs["stash_type"] = 1
            replace_subgraph(graph, nodes + core_nodes, lambda: [
                gs.Node(op.op, name=names.fresh(anchor.name + "_rmsnorm"), domain=op.domain or None,
                        attrs=attrs, inputs=[x, scale], outputs=[out])])
        return Match(nodes + core_nodes, op, apply)
