"""Reshape chains: collapse consecutive reshapes, and drop reshape pairs around elementwise ops.

Exact (only data layout changes):
- Reshape(Reshape(x, s₁), s₂) → Reshape(x, s₂) when s₂ is a constant shape without 0 entries (or
  ``allowzero=1``) and the inner result has no other reader;
- Reshape(U(Reshape(x, s₁)), s₂) → U(x) for a unary elementwise U when the final shape equals x's shape
  (the pair around a GELU between two flattened GEMMs, as transformers' Conv1D exports write it).
A Reshape left with output shape = input shape is removed by eliminate-noops.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

UNARY = ("Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Gelu", "LeakyRelu", "Elu", "Softplus",
         "HardSigmoid", "HardSwish", "Mish", "Sin", "Cos", "Reciprocal")
MS_UNARY = ("QuickGelu", "FastGelu", "Gelu")



def _is_unary(node: gs.Node) -> bool:
    if ir.is_op(node, UNARY):
        return len([t for t in node.inputs if t.name]) == 1
    return ir.is_op(node, MS_UNARY, ir.MS_DOMAIN) and len([t for t in node.inputs if t.name]) == 1



class SimplifyReshapes:
    name = "simplify-reshapes"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        collapsed = hoisted = 0
        for node in list(graph.nodes):
            if not node.outputs or not ir.is_op(node, "Reshape"):
                continue
            shape = ir.const_value(node.inputs[1])
            if shape is None or (0 in shape.tolist() and not int(node.attrs.get("allowzero", 0))):
                continue
            inner = ir.producer(node.inputs[0])
            if inner is not None and ir.is_op(inner, "Reshape") and ir.sole_reader(node.inputs[0], graph) is not None:
                node.inputs[0] = inner.inputs[0]
                collapsed += 1
                continue
            if inner is not None and _is_unary(inner) and ir.sole_reader(node.inputs[0], graph) is not None:
                first = ir.producer(inner.inputs[0])
                if (first is not None and ir.is_op(first, "Reshape") and ir.sole_reader(inner.inputs[0], graph) is not None
                        and ir.static_shape(first.inputs[0]) is not None
                        and ir.static_shape(first.inputs[0]) == ir.static_shape(node.outputs[0])):
                    x, out = first.inputs[0], node.outputs[0]
                    inner.inputs[0] = x
                    node.outputs.clear()
                    node.inputs.clear()
                    inner.outputs[0] = out
                    first.outputs.clear()
                    first.inputs.clear()
                    hoisted += 1
        return PassResult(graph, modified=bool(collapsed or hoisted),
                          stats={"reshapes_collapsed": collapsed, "reshape_pairs_removed": hoisted})
