"""Shared matching of the normalisation core  x / sqrt(mean(t²) + ε)  as exporters write it.

``match_inverse_rms(t_out)`` recognises, ending at tensor ``n``:
    n = Mul(x, Div(1, Sqrt(Add(ReduceMean(Pow(x, 2) | Mul(x, x)), ε))))      (either operand order)
    n = Mul(x, Reciprocal(Sqrt(...)))
    n = Div(x, Sqrt(Add(ReduceMean(...), ε)))
with ReduceMean over the last axis only, keepdims=1 (axes as attribute or as constant input), ε a constant
scalar. Returns (x, ε, nodes) or a reason string.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.passes.fuse.rule import close, other_input, produced_by, sole_reader


def last_axis_mean(node: gs.Node) -> str | None:
    """None when ``node`` is ReduceMean over the last axis with keepdims=1; else why not."""
    if not ir.is_op(node, "ReduceMean"):
        return "not a ReduceMean"
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        value = ir.const_value(node.inputs[1])
        axes = None if value is None else value.reshape(-1).tolist()
    rank = len(node.inputs[0].shape or [])
    if axes is None or len(axes) != 1 or axes[0] not in (-1, rank - 1):
        return "ReduceMean is not over the last axis only"
    if int(node.attrs.get("keepdims", 1)) != 1:
        return "ReduceMean drops the reduced axis"
    return None


def match_square(t: gs.Tensor) -> tuple[gs.Tensor, gs.Node] | str:
    node = ir.producer(t)
    if node is not None and ir.is_op(node, "Pow") and close(ir.scalar_value(node.inputs[1]), 2.0):
        return node.inputs[0], node
    if node is not None and ir.is_op(node, "Mul") and node.inputs[0] is node.inputs[1]:
        return node.inputs[0], node
    return "no x² (Pow(x, 2) or Mul(x, x)) before the mean"


def match_inverse_rms(graph: gs.Graph, n: gs.Tensor) -> tuple[gs.Tensor, float, list[gs.Node]] | str:
    node = ir.producer(n)
    if node is None:
        return "no producer"
    if ir.is_op(node, "Div"):
        x, sqrt_t = node.inputs
        sqrt = produced_by(sqrt_t, "Sqrt")
        head = [node]
    elif ir.is_op(node, "Mul"):
        sqrt, x, head = None, None, [node]
        for cand in node.inputs:
            inv = ir.producer(cand)
            if inv is None:
                continue
            if ir.is_op(inv, "Div") and close(ir.scalar_value(inv.inputs[0]), 1.0):
                sqrt = produced_by(inv.inputs[1], "Sqrt")
            elif ir.is_op(inv, "Reciprocal"):
                sqrt = produced_by(inv.inputs[0], "Sqrt")
            if sqrt is not None:
                x = other_input(node, cand)
                head.append(inv)
                break
    else:
        return "not Mul/Div"
    if sqrt is None or x is None:
        return "no 1/sqrt(·) factor"
    add = produced_by(sqrt.inputs[0], "Add")
    if add is None:
        return "no Add(ε) under the Sqrt"
    eps, mean = None, None
    for t in add.inputs:
        if ir.scalar_value(t) is not None:
            eps = ir.scalar_value(t)
        elif produced_by(t, "ReduceMean") is not None:
            mean = produced_by(t, "ReduceMean")
    if eps is None:
        return "epsilon is not a constant scalar"
    if mean is None:
        return "no ReduceMean under the Add"
    why = last_axis_mean(mean)
    if why:
        return why
    sq = match_square(mean.inputs[0])
    if isinstance(sq, str):
        return sq
    base, square = sq
    if base is not x:
        return "the squared tensor is not the normalised one"
    inner = [square, mean, add, sqrt]
    for t in [square.outputs[0], mean.outputs[0], add.outputs[0], sqrt.outputs[0]] + [h.outputs[0] for h in head[1:]]:
        if sole_reader(t, graph) is None:
            return f"intermediate '{t.name}' has other readers"
    return x, float(eps), head + inner


def weight_vector(t: gs.Tensor, width: int) -> np.ndarray | None:
    """A constant broadcast along the last axis only: returned as a [width] vector."""
    value = ir.const_value(t)
    if value is None or value.size not in (1, width):
        return None
    if value.size == width and (value.ndim == 0 or value.shape[-1] != width):
        return None
    return np.broadcast_to(value.reshape(-1), (width,)).copy()
