"""GELU → ``Gelu`` (opset 20) or ``com.microsoft.Gelu`` / ``FastGelu``.

Patterns (anchor: the outermost Mul of the product; factors in any order and association):
    erf form:  x · 0.5 · (1 + erf(x / √2))          (x/√2 as Div(x, 1.4142…) or Mul(x, 0.7071…))
    tanh form: x · 0.5 · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))   (x³ as Pow(x, 3) or x·x·x)
Rewrite: Gelu(x) (approximate="tanh" for the tanh form). Exact up to the kernels' rounding.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, close, first_runnable, produced_by, replace_subgraph, sole_reader

ERF_CHOICES = (OpRef("Gelu", "", 20), OpRef("Gelu", ir.MS_DOMAIN))
TANH_CHOICES = (OpRef("Gelu", "", 20), OpRef("FastGelu", ir.MS_DOMAIN))
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def product_factors(graph: gs.Graph, t: gs.Tensor, depth: int = 3) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """Flatten a tree of Mul nodes ending at ``t`` (inner results read once) into its leaf factors."""
    node = ir.producer(t)
    if depth == 0 or node is None or not ir.is_op(node, "Mul"):
        return [t], []
    factors, nodes = [], [node]
    for inp in node.inputs:
        if ir.producer(inp) is not None and ir.is_op(ir.producer(inp), "Mul") and sole_reader(inp, graph) is node:
            f, n = product_factors(graph, inp, depth - 1)
            factors += f
            nodes += n
        else:
            factors.append(inp)
    return factors, nodes


def _one_plus(graph: gs.Graph, t: gs.Tensor, op: str) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(argument of ``op``, nodes) for t = 1 + op(argument)."""
    add = produced_by(t, "Add")
    if add is None:
        return None
    for i in (0, 1):
        if close(ir.scalar_value(add.inputs[i]), 1.0):
            inner = produced_by(add.inputs[1 - i], op)
            if inner is not None and sole_reader(inner.outputs[0], graph) is add:
                return inner.inputs[0], [add, inner]
    return None


def _scaled(t: gs.Tensor, factor: float) -> tuple[gs.Tensor, gs.Node] | None:
    """(x, node) for t = x·factor (Mul) or x/(1/factor) (Div)."""
    node = ir.producer(t)
    if node is None:
        return None
    if ir.is_op(node, "Mul"):
        for i in (0, 1):
            if close(ir.scalar_value(node.inputs[i]), factor, 1e-4):
                return node.inputs[1 - i], node
    if ir.is_op(node, "Div") and close(ir.scalar_value(node.inputs[1]), 1.0 / factor, 1e-4):
        return node.inputs[0], node
    return None


def _tanh_argument(graph: gs.Graph, t: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """Nodes of √(2/π)·(x + 0.044715·x³) when ``t`` is that and its x is ``x``."""
    scaled = _scaled(t, SQRT_2_OVER_PI)
    if scaled is None:
        return None
    inner, scale_node = scaled
    add = produced_by(inner, "Add")
    if add is None or x not in add.inputs:
        return None
    cube_term = add.inputs[1] if add.inputs[0] is x else add.inputs[0]
    cubed = _scaled(cube_term, 0.044715)
    if cubed is None:
        return None
    cube_t, coef_node = cubed
    pow_ = produced_by(cube_t, "Pow")
    if pow_ is not None and pow_.inputs[0] is x and close(ir.scalar_value(pow_.inputs[1]), 3.0):
        return [scale_node, add, coef_node, pow_]
    factors, nodes = product_factors(graph, cube_t)
    if len(factors) == 3 and all(f is x for f in factors):
        return [scale_node, add, coef_node] + nodes
    return None


class GeluRule:
    name = "gelu"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Mul"):
            return None
        out = anchor.outputs[0]
        factors, mul_nodes = product_factors(graph, out)
        if len(factors) != 3:
            return None
        half = [f for f in factors if close(ir.scalar_value(f), 0.5)]
        if len(half) != 1:
            return None
        rest = [f for f in factors if f is not half[0]]
        for x, other in (rest, rest[::-1]):
            for fn, choices, approx in (("Erf", ERF_CHOICES, None), ("Tanh", TANH_CHOICES, "tanh")):
                found = _one_plus(graph, other, fn)
                if found is None:
                    continue
                arg, nodes = found
                if fn == "Erf":
                    scaled = _scaled(arg, 1.0 / math.sqrt(2.0))
                    if scaled is None or scaled[0] is not x:
                        return Reject("erf argument is not x/√2")
                    inner = [scaled[1]]
                else:
                    inner = _tanh_argument(graph, arg, x)
                    if inner is None:
                        return Reject("tanh argument is not √(2/π)(x + 0.044715x³)")
                all_nodes = mul_nodes + nodes + inner
                if any(sole_reader(n.outputs[0], graph) is None for n in all_nodes if n is not anchor):
                    return Reject("an intermediate has readers outside the pattern")
                op = first_runnable(graph, ctx, choices)
                return Match(all_nodes, op, self._apply(graph, all_nodes, anchor, x, out, op, approx))
        return None

    @staticmethod
    def _apply(graph, nodes, anchor, x, out, op: OpRef, approx):
        def apply(names: ir.Namer) -> None:
            attrs = {"approximate": approx} if (approx and not op.domain) else {}
            replace_subgraph(graph, nodes, lambda: [
                gs.Node(op.op, name=names.fresh(anchor.name + "_gelu"), domain=op.domain or None, attrs=attrs,
                        inputs=[x], outputs=[out])])
        return apply
