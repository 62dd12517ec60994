"""Which columns of which constant GEMM weight a tensor comes from — and scaling them.

``find_columns(graph, t)`` walks from ``t`` up to a MatMul/Gemm with a constant weight:
    t ← [data movement: Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity]*
      ← [Split along the last axis → its slice of columns] ← [Reshape keeping the last axis]
      ← [Add(constant bias)] ← MatMul(x, W) | Gemm(x, W[, bias])
every tensor on the path read only along it. ``ColumnSource.scale(f, names)`` multiplies those output columns by
f — a scalar, or one factor per column when the path moved no data (``permuted`` is False) — by scaling
the weight's columns and the bias: (x·W + b)·f = x·(W·f) + b·f, exact up to rounding of the new constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir

MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


@dataclass
class ColumnSource:
    gemm: gs.Node
    bias: gs.Constant | None
    bias_owner: gs.Node | None            # the Add (or the Gemm itself) that reads the bias
    columns: tuple[int, int] | None       # [lo, hi) of the GEMM output; None = all
    permuted: bool                        # data movement between the GEMM and the tensor

    def scale(self, factor: float | np.ndarray, names: ir.Namer, suffix: str = "_scaled") -> None:
        """Multiply the columns by ``factor`` in new constants (``names``: a weight shared with other readers
        — deduplicated, tied — keeps its values for them, and each scaled copy gets a name of its own)."""
        weight = self.gemm.inputs[1]
        w = np.array(ir.const_value(weight), copy=True)
        trans_b = ir.is_op(self.gemm, "Gemm") and int(self.gemm.attrs.get("transB", 0)) == 1
        n = w.shape[0] if trans_b else w.shape[-1]
        lo, hi = self.columns if self.columns is not None else (0, n)
        f = np.asarray(factor, dtype=np.float64)
        if trans_b:
            w[lo:hi, :] = (w[lo:hi, :] * (f[:, None] if f.ndim else f)).astype(w.dtype)
        else:
            w[..., lo:hi] = (w[..., lo:hi] * f).astype(w.dtype)
        self.gemm.inputs[1] = gs.Constant(names.fresh(weight.name + suffix), w)
        if self.bias is not None:
            b = np.array(ir.const_value(self.bias), copy=True)
            b[..., lo:hi] = (b[..., lo:hi] * f).astype(b.dtype)
            new_bias = gs.Constant(names.fresh(self.bias.name + suffix), b)
            for i, t in enumerate(self.bias_owner.inputs):
                if t is self.bias:
                    self.bias_owner.inputs[i] = new_bias


def _vector_bias(t) -> bool:
    value = ir.const_value(t)
    return value is not None and value.ndim >= 1 and value.shape[-1] > 1


def find_columns(graph: gs.Graph, t: gs.Tensor) -> ColumnSource | None:
    """The GEMM columns ``t`` re-arranges (see the module docstring), or None."""
    cols, permuted = None, False
    node = None
    while True:
        if ir.sole_reader(t, graph) is None:
            return None
        node = ir.producer(t)
        if node is None:
            return None
        if ir.is_op(node, MOVES):
            t, permuted = node.inputs[0], True
            continue
        break
    if ir.is_op(node, "Split"):
        rank = len(node.inputs[0].shape or [])
        sizes = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if rank == 0 or int(node.attrs.get("axis", 0)) not in (-1, rank - 1) or sizes is None:
            return None
        index = list(node.outputs).index(t)
        lo = int(np.sum(sizes[:index]))
        cols = (lo, lo + int(sizes[index]))
        t = node.inputs[0]
        pre = ir.producer(t)
        if (pre is not None and ir.is_op(pre, "Reshape") and ir.sole_reader(t, graph) is not None
                and (pre.inputs[0].shape or [None])[-1] == (t.shape or [None])[-1]):
            t = pre.inputs[0]
        if ir.sole_reader(t, graph) is None or ir.producer(t) is None:
            return None
        node = ir.producer(t)
    bias, owner = None, None
    if ir.is_op(node, "Add"):
        consts = [i for i in node.inputs if isinstance(i, gs.Constant)]
        if len(consts) != 1 or not _vector_bias(consts[0]):
            return None
        bias, owner = consts[0], node
        t = node.inputs[1] if node.inputs[0] is bias else node.inputs[0]
        if ir.sole_reader(t, graph) is None or ir.producer(t) is None:
            return None
        node = ir.producer(t)
    if not ir.is_op(node, ("MatMul", "Gemm")) or not isinstance(node.inputs[1], gs.Constant) \
            or len(node.inputs[1].outputs) != 1:
        return None
    if ir.is_op(node, "Gemm"):
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or int(node.attrs.get("transA", 0)) != 0:
            return None
        gbias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if gbias is not None:
            if bias is not None or not isinstance(gbias, gs.Constant) or not _vector_bias(gbias):
                return None
            bias, owner = gbias, node
    if bias is not None and len(bias.outputs) != 1:
        return None
    return ColumnSource(node, bias, owner, cols, permuted)
