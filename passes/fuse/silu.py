"""SiLU x·σ(x) → ``com.microsoft.QuickGelu`` (alpha = 1), which computes x·σ(alpha·x) in one kernel.

Pattern (anchor Mul): Mul(x, Sigmoid(x)) in either operand order, the Sigmoid read only here. Exact.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

QUICK_GELU = OpRef("QuickGelu", ir.MS_DOMAIN)


class SiluRule:
    name = "silu"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Mul"):
            return None
        for i in (0, 1):
            sig = produced_by(anchor.inputs[i], "Sigmoid")
            if sig is None or sig.inputs[0] is not anchor.inputs[1 - i]:
                continue
            if sole_reader(sig.outputs[0], graph) is not anchor:
                return Reject("the sigmoid has other readers")
            x, out = anchor.inputs[1 - i], anchor.outputs[0]

            def apply(names: ir.Namer) -> None:
                replace_subgraph(graph, [anchor, sig], lambda: [
                    gs.Node("QuickGelu", name=names.fresh(anchor.name + "_silu"), domain=ir.MS_DOMAIN,
                            attrs={"alpha": 1.0}, inputs=[x], outputs=[out])])
            return Match([anchor, sig], QUICK_GELU, apply)
        return None
