"""Conv + activation → ``com.microsoft.FusedConv`` (the activation applied in the convolution's epilogue).

Pattern (anchor: the activation) reading a Conv whose output nothing else reads. Activations:
Relu, Sigmoid, Tanh, LeakyRelu(alpha), HardSigmoid(alpha, beta), Clip(min, max constants).
Rewrite: FusedConv(x, W[, b], conv attrs, activation=…, activation_params=[…]). Exact; one intermediate
(the pre-activation tensor) fewer in the plan.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

FUSED_CONV = OpRef("FusedConv", ir.MS_DOMAIN)
ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip")


def activation_params(node: gs.Node) -> list[float] | None:
    if node.op == "LeakyRelu":
        return [float(node.attrs.get("alpha", 0.01))]
    if node.op == "HardSigmoid":
        return [float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))]
    if node.op == "Clip":
        bounds = [ir.scalar_value(t) if t.name else None for t in node.inputs[1:3]]
        if len(bounds) < 2 or any(b is None for b in bounds):
            return None
        return [float(b) for b in bounds]
    return []


class ConvActivationRule:
    name = "conv-activation"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, ACTIVATIONS):
            return None
        conv = produced_by(anchor.inputs[0], "Conv")
        if conv is None:
            return None
        if sole_reader(conv.outputs[0], graph) is not anchor:
            return Reject("the Conv output has other readers")
        params = activation_params(anchor)
        if params is None:
            return Reject("Clip bounds are not constant scalars")
        out = anchor.outputs[0]

        def apply(names: ir.Namer) -> None:
            inputs, attrs = list(conv.inputs), dict(conv.attrs)
            attrs["activation"] = anchor.op
            if params:
                attrs["activation_params"] = params
            replace_subgraph(graph, [anchor, conv], lambda: [
                gs.Node("FusedConv", name=names.fresh(conv.name + "_" + anchor.op.lower()), domain=ir.MS_DOMAIN,
                        attrs=attrs, inputs=inputs, outputs=[out])])
        return Match([anchor, conv], FUSED_CONV, apply)
