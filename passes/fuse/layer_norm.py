"""LayerNorm → ``LayerNormalization`` (opset 17; below it, onnxruntime's contrib schema of the same name).

Pattern (anchor: the bias Add, or the gain Mul when there is no bias):
    μ = ReduceMean(x, -1); c = x − μ; σ² = ReduceMean(c², -1)
    y = c / sqrt(σ² + ε) · γ + β                 (γ, β constants [D]; Mul/Add operands in either order)
Rewrite: y = LayerNormalization(x, γ, β, axis=-1, epsilon=ε). Exact up to float reassociation.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.norms import last_axis_mean, match_inverse_rms, weight_vector
from lmc.passes.fuse.rule import Match, OpRef, Reject, first_runnable, produced_by, replace_subgraph, sole_reader

# ONNX's LayerNormalization (17); below 17, the contrib schema onnxruntime registers under the same name.
LAYER_NORM_CHOICES = (OpRef("LayerNormalization", "", 17), OpRef("LayerNormalization", "", 1))


def _affine(graph: gs.Graph, anchor: gs.Node, width: int):
    """(normalised tensor, γ, β, nodes) for y = n·γ + β, y = n·γ or y = n + β... ending at anchor."""
    beta = None
    nodes = []
    node = anchor
    if ir.is_op(node, "Add"):
        for i in (0, 1):
            b = weight_vector(node.inputs[i], width)
            if b is not None:
                beta, nodes, node_in = b, [node], node.inputs[1 - i]
                break
        else:
            return None
        mul = produced_by(node_in, "Mul")
        if mul is None or sole_reader(node_in, graph) is not node:
            return node_in, None, beta, nodes
        node = mul
    if ir.is_op(node, "Mul"):
        for i in (0, 1):
            g = weight_vector(node.inputs[i], width)
            if g is not None and produced_by(node.inputs[1 - i], ("Div", "Mul")) is not None:
                return node.inputs[1 - i], g, beta, nodes + [node]
    return (node.outputs[0], None, beta, nodes) if nodes else None


class LayerNormRule:
    name = "layer-norm"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, ("Add", "Mul")):
            return None
        out = anchor.outputs[0]
        width = (out.shape or [None])[-1]
        if not isinstance(width, int):
            return None
        affine = _affine(graph, anchor, width)
        if affine is None:
            return None
        n, gamma, beta, affine_nodes = affine
        core = match_inverse_rms(graph, n)
        if isinstance(core, str):
            return None
        c, eps, core_nodes = core
        sub = produced_by(c, "Sub")
        if sub is None:
            return None                      # an RMSNorm with bias: not a LayerNorm
        x, mean_t = sub.inputs
        mean = produced_by(mean_t, "ReduceMean")
        if mean is None or mean.inputs[0] is not x:
            return Reject("the subtracted tensor is not the mean of the input")
        why = last_axis_mean(mean)
        if why:
            return Reject(why)
        if any(r not in core_nodes and r is not sub for r in c.outputs) or sole_reader(mean_t, graph) is not sub:
            return Reject("centred tensor has readers outside the pattern")
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.float32
        gamma = np.ones(width, dtype=dtype) if gamma is None else gamma
        beta = np.zeros(width, dtype=dtype) if beta is None else beta
        nodes = affine_nodes + core_nodes + [sub, mean]

        def apply(names: ir.Namer) -> None:
            g = gs.Constant(names.fresh(out.name + "_ln_gamma"), gamma.astype(dtype))
            b = gs.Constant(names.fresh(out.name + "_ln_beta"), beta.astype(dtype))
            replace_subgraph(graph, nodes, lambda: [
                gs.Node("LayerNormalization", name=names.fresh(anchor.name + "_layernorm"),
                        attrs={"axis": -1, "epsilon": eps}, inputs=[x, g, b], outputs=[out])])
        return Match(nodes, first_runnable(graph, ctx, LAYER_NORM_CHOICES), apply)
