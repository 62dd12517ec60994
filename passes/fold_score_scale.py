"""Fold a scalar scale of a MatMul's result into the weights that produce one of its operands.

Exact up to float reassociation: y = (a @ b)·c (or (a @ b)/c) where a is a pure re-arrangement of some
columns of x·W (+ bias) — the query path of attention: Gemm/MatMul → [Reshape] → [Split] → Reshape →
Transpose — equals a' @ b with a' computed from W·c (+ bias·c) in those columns. The elementwise pass over
the [B, H, S, S] scores disappears. Data-movement ops walked through: Reshape, Transpose, Squeeze,
Unsqueeze, Flatten, Identity, and a Split along the last axis (only the used slice's columns are scaled);
every tensor on the path must be read only along it, and the weight must be read only by its GEMM.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.pass_manager import PassContext, PassKind, PassResult, Requirement

MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")



def _columns_source(graph: gs.Graph, t: gs.Tensor):
    """(gemm node, weight slot, bias tensor or None, bias node or None, (lo, hi)) for the GEMM whose output
    columns [lo, hi) ``t`` re-arranges; None when the path has anything else on it."""
    cols = None
    while True:
        if ir.sole_reader(t, graph) is None:
            return None
        node = ir.producer(t)
        if node is None:
            return None
        if ir.is_op(node, MOVES):
            t = node.inputs[0]
            continue
        if ir.is_op(node, "Split") and cols is None:
            rank = len(node.inputs[0].shape or [])
            axis = int(node.attrs.get("axis", 0))
            sizes = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if rank == 0 or axis not in (-1, rank - 1) or sizes is None:
                return None
            index = list(node.outputs).index(t)
            lo = int(np.sum(sizes[:index]))
            cols = (lo, lo + int(sizes[index]))
            t = node.inputs[0]
            if len(t.outputs) != 1:
                return None
            # a Reshape that keeps the last axis (e.g. [B·S, N] → [B, S, N]) may precede the Split
            pre = ir.producer(t)
            if pre is not None and ir.is_op(pre, "Reshape") and ir.sole_reader(t, graph) is not None and \
                    (pre.inputs[0].shape or [None])[-1] == (t.shape or [None])[-1]:
                t = pre.inputs[0]
            if ir.sole_reader(t, graph) is None:
                return None
            node = ir.producer(t)
            if node is None:
                return None
        bias, bias_node = None, None
        if ir.is_op(node, "Add"):
            consts = [i for i in node.inputs if isinstance(i, gs.Constant)]
            if len(consts) != 1:
                return None
            bias, bias_node = consts[0], node
            t = node.inputs[1] if node.inputs[0] is bias else node.inputs[0]
            if ir.sole_reader(t, graph) is None:
                return None
            node = ir.producer(t)
            if node is None:
                return None
        if bias is not None and (ir.const_value(bias).ndim == 0 or ir.const_value(bias).shape[-1] == 1):
            return None   # a scalar bias cannot be scaled column by column
        if ir.is_op(node, "MatMul") and isinstance(node.inputs[1], gs.Constant):
            return node, 1, bias, bias_node, cols
        if (ir.is_op(node, "Gemm") and isinstance(node.inputs[1], gs.Constant)
                and float(node.attrs.get("alpha", 1.0)) == 1.0 and int(node.attrs.get("transA", 0)) == 0):
            gbias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if gbias is not None and (not isinstance(gbias, gs.Constant) or ir.const_value(gbias).ndim == 0
                                      or ir.const_value(gbias).shape[-1] == 1):
                return None
            return node, 1, gbias if bias is None else bias, bias_node, cols
        return None



class FoldScoreScale:
    name = "fold-score-scale"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded = 0
        for node in list(graph.nodes):
            if not node.outputs or not ir.is_op(node, ("Mul", "Div")):
                continue
            idx = 1 if ir.scalar_value(node.inputs[1]) is not None else (0 if ir.is_op(node, "Mul") else None)
            if idx is None or ir.scalar_value(node.inputs[idx]) in (None, 0.0):
                continue
            mm_out = node.inputs[1 - idx]
            mm = ir.producer(mm_out)
            if mm is None or not ir.is_op(mm, "MatMul") or ir.sole_reader(mm_out, graph) is None:
                continue
            c = ir.scalar_value(node.inputs[idx])
            factor = c if ir.is_op(node, "Mul") else 1.0 / c
            for side in (0, 1):
                src = _columns_source(graph, mm.inputs[side])
                if src is None:
                    continue
                gemm, slot, bias, bias_node, cols = src
                weight = gemm.inputs[slot]
                if len(weight.outputs) != 1 or (bias is not None and len(bias.outputs) != 1):
                    continue
                self._scale(gemm, slot, bias, bias_node, cols, factor)
                ir.bypass(graph, node, input_index=1 - idx)
                folded += 1
                break
        return PassResult(graph, modified=bool(folded), stats={"scales_folded_into_weights": folded})

    @staticmethod
    def _scale(gemm: gs.Node, slot: int, bias, bias_node, cols, factor: float) -> None:
        w = ir.const_value(gemm.inputs[slot]).copy()
        trans_b = ir.is_op(gemm, "Gemm") and int(gemm.attrs.get("transB", 0)) == 1
        lo, hi = cols if cols is not None else (0, w.shape[0] if trans_b else w.shape[-1])
        if trans_b:
            w[lo:hi, :] *= factor
        else:
            w[..., lo:hi] *= factor
        gemm.inputs[slot] = gs.Constant(gemm.inputs[slot].name + "_scaled", w.astype(w.dtype))
        if bias is not None:
            b = np.array(ir.const_value(bias), copy=True)
            b[..., lo:hi] *= factor
            new_bias = gs.Constant(bias.name + "_scaled", b.astype(b.dtype))
            owner = bias_node if bias_node is not None else gemm
            for i, t in enumerate(owner.inputs):
                if t is bias:
                    owner.inputs[i] = new_bias
