"""Residual Add → RMS norm as onnxruntime's ``SkipSimplifiedLayerNormalization`` (com.microsoft): one kernel
adds the residual and normalises the sum, and hands the sum on to the next residual.

Pattern (anchor: the norm):
    s = Add(a, b)                     a, b the same shape [.., D] (rank 2 or 3), float
    y = RMSNormalization(s, γ)        or SimplifiedLayerNormalization; axis −1, γ a constant [D]
Rewrite:
    y, _, _, s = SkipSimplifiedLayerNormalization(a, b, γ, epsilon=ε)
with s kept as the fused node's fourth output when anything else reads it (the next residual Add, a graph
output), else left out. Math: s = a + b; y = s / √(mean(s², axis −1) + ε) · γ, the mean in float32 (the
norm's ``stash_type`` 1) — what the two nodes compute, up to float reassociation.

A decoder layer has two of these (before attention, before the MLP): a transformer of L layers loses 2L − 1
Add kernels (the first layer's input norm reads the embedding, not a sum). Applied where a target's runtime
has the kernel (``tuning.fused_ops``), when a generation bundle is lowered
(``lmc.compiler.build.lower_for_runtime``; one-shot bundles keep the Add, which runs in place), after every
pass that looks for the plain norm (quantization's smoothing among them).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph

SKIP_NORM = OpRef("SkipSimplifiedLayerNormalization", ir.MS_DOMAIN)
NORMS = ("RMSNormalization", "SimplifiedLayerNormalization")


class SkipNormRule:
    name = "skip-norm"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, NORMS) or len(anchor.inputs) < 2 or len(anchor.outputs) != 1:
            return None
        add = produced_by(anchor.inputs[0], "Add")
        if add is None or len(add.inputs) != 2:
            return None
        a, b = add.inputs
        s, y = add.outputs[0], anchor.outputs[0]
        gamma = anchor.inputs[1]
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
            return Reject("the residual Add has a constant operand")
        if a.shape is None or list(a.shape) != list(b.shape or []) or len(a.shape) not in (2, 3):
            return Reject("the residual Add's operands are not of one shape, rank 2 or 3")
        if a.dtype not in (np.float32, np.float16) or b.dtype != a.dtype:
            return Reject("not a float32 / float16 residual")
        width = a.shape[-1]
        if not isinstance(gamma, gs.Constant) or not isinstance(width, int) or list(gamma.shape) != [width]:
            return Reject("the norm's scale is not a constant of the normalised width")
        if anchor.attrs.get("axis", -1) not in (-1, len(a.shape) - 1):
            return Reject("the norm is not over the last axis")
        if anchor.attrs.get("stash_type", 1) != 1:
            return Reject("the norm does not compute in float32")
        if len(anchor.inputs) > 2 and anchor.inputs[2] is not None and anchor.inputs[2].name:
            return Reject("the norm has a bias")
        epsilon = float(anchor.attrs.get("epsilon", 1e-5))
        keep_sum = len(s.outputs) > 1 or s.name in ir.graph_outputs(graph)

        def apply(names: ir.Namer) -> None:
            empty = gs.Variable.empty
            outputs = [y, empty(), empty(), s] if keep_sum else [y]
            replace_subgraph(graph, [add, anchor], lambda: [
                gs.Node(SKIP_NORM.op, name=names.fresh(anchor.name + "_skip"), domain=SKIP_NORM.domain,
                        attrs={"epsilon": epsilon}, inputs=[a, b, gamma], outputs=outputs)])
        return Match([add, anchor], SKIP_NORM, apply)
