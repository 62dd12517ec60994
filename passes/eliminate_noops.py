"""Remove ops that return their input unchanged at inference time.

Exact. Removed — each only under the conditions that make it an identity, checked on constant inputs and
static shapes, never on "the output has the input's shape" alone (a reversal keeps the shape):
``Identity``; ``Dropout`` at inference (no ``training_mode`` input, or a constant false one; its mask output
unused); ``Cast`` whose ``to`` is the input's own dtype; ``Reshape``/``Squeeze``/``Unsqueeze``/``Flatten``
whose static output shape equals the input's; ``Expand`` whose constant shape broadcasts to the input's own
shape; ``Transpose`` whose permutation moves no axis of size > 1 relative to the others and keeps the shape;
``Slice`` that keeps the shape and steps by +1 along every axis longer than 1 (constant steps/axes); ``Pad``
whose constant pads are all zero.
A node is kept when removing it would rename a graph input or merge two graph outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement


def _same_shape(node: gs.Node) -> bool:
    a, b = ir.static_shape(node.inputs[0]), ir.static_shape(node.outputs[0])
    return a is not None and a == b


def _same_dtype(node: gs.Node) -> bool:
    src = ir.onnx_dtype(node.inputs[0].dtype)
    return src != onnx.TensorProto.UNDEFINED and src == ir.onnx_dtype(node.outputs[0].dtype)


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Optional input ``index`` (None when absent or given as the empty name)."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    return node.inputs[index]


def _const_ints(tensor: gs.Tensor | None) -> list[int] | None:
    value = None if tensor is None else ir.const_value(tensor)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _dropout_is_noop(node: gs.Node, outputs: set[str]) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].name and (node.outputs[1].outputs or node.outputs[1].name in outputs):
        return False                       # the mask is read
    training = _input(node, 2)
    if training is None:
        return True
    value = ir.const_value(training)
    return value is not None and value.size == 1 and not bool(np.asarray(value).reshape(()))


def _expand_is_noop(node: gs.Node) -> bool:
    shape_in, target = ir.static_shape(node.inputs[0]), _const_ints(_input(node, 1))
    if shape_in is None or target is None or not _same_shape(node):
        return False
    try:
        return tuple(np.broadcast_shapes(shape_in, tuple(target))) == shape_in
    except ValueError:
        return False


def _transpose_is_noop(node: gs.Node) -> bool:
    shape = ir.static_shape(node.inputs[0])
    perm = node.attrs.get("perm")
    if perm is None:                       # default: reverse the axes
        if shape is None:
            return False
        perm = list(range(len(shape)))[::-1]
    perm = [int(p) for p in perm]
    if perm == list(range(len(perm))):
        return True
    if shape is None or len(shape) != len(perm) or not _same_shape(node):
        return False
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)          # only size-1 axes change place: the bytes keep their order


def _slice_is_noop(node: gs.Node) -> bool:
    shape = ir.static_shape(node.inputs[0])
    if shape is None or not _same_shape(node):
        return False
    if "starts" in node.attrs:             # Slice-1: no steps
        return True
    steps_t = _input(node, 4)
    if steps_t is None:
        return True
    steps = _const_ints(steps_t)
    if steps is None:
        return False
    axes_t = _input(node, 3)
    axes = list(range(len(steps))) if axes_t is None else _const_ints(axes_t)
    if axes is None or len(axes) != len(steps):
        return False
    for axis, step in zip(axes, steps):
        if not -len(shape) <= axis < len(shape):
            return False
        if step != 1 and shape[axis] != 1:  # a step of -1 reverses, a step of k > 1 would shrink
            return False
    return True


def _pad_is_noop(node: gs.Node) -> bool:
    pads = _const_ints(_input(node, 1)) if "pads" not in node.attrs else [int(p) for p in node.attrs["pads"]]
    return pads is not None and all(p == 0 for p in pads) and _same_shape(node) and _same_dtype(node)


def _is_noop(node: gs.Node, outputs: set[str]) -> bool:
    if ir.is_op(node, "Identity"):
        return True
    if ir.is_op(node, "Dropout"):
        return _dropout_is_noop(node, outputs)
    if ir.is_op(node, "Cast"):
        src, to = ir.onnx_dtype(node.inputs[0].dtype), node.attrs.get("to")
        return src != onnx.TensorProto.UNDEFINED and to is not None and int(to) == src
    if ir.is_op(node, ("Reshape", "Squeeze", "Unsqueeze", "Flatten")):
        return _same_shape(node) and _same_dtype(node)
    if ir.is_op(node, "Expand"):
        return _expand_is_noop(node) and _same_dtype(node)
    if ir.is_op(node, "Transpose"):
        return _transpose_is_noop(node)
    if ir.is_op(node, "Slice"):
        return _slice_is_noop(node)
    if ir.is_op(node, "Pad"):
        return _pad_is_noop(node)
    return False


class EliminateNoops:
    name = "eliminate-noops"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            if not node.inputs or not node.outputs or not _is_noop(node, ir.graph_outputs(graph)):
                continue
            if ir.bypass(graph, node):
                removed[node.op] = removed.get(node.op, 0) + 1
        stats = {f"removed_{op}": n for op, n in sorted(removed.items())}
        return PassResult(graph, modified=bool(removed), stats=stats)


__all__ = ["EliminateNoops"]
