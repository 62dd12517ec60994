"""Remove ops that return their input unchanged at inference time.

Exact. Removed: ``Identity``; ``Dropout`` (inference: output = input; its mask output must be unused);
``Cast`` to the input's own dtype; ``Reshape``/``Expand`` whose static output shape equals the input's;
``Transpose`` with the identity permutation; ``Slice`` that keeps every element (static shapes only).
A node is kept when removing it would rename a graph input or merge two graph outputs.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.pass_manager import PassContext, PassKind, PassResult, Requirement


def _same_shape(node: gs.Node) -> bool:
    a, b = ir.static_shape(node.inputs[0]), ir.static_shape(node.outputs[0])
    return a is not None and a == b


def _is_noop(node: gs.Node) -> bool:
    if ir.is_op(node, "Identity"):
        return True
    if ir.is_op(node, "Dropout"):
        return len(node.outputs) < 2 or not node.outputs[1].outputs
    if ir.is_op(node, "Cast"):
        src, dst = node.inputs[0].dtype, node.outputs[0].dtype
        return src is not None and dst is not None and ir.onnx_dtype(src) == ir.onnx_dtype(dst)
    if ir.is_op(node, ("Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten")):
        return _same_shape(node) and ir.onnx_dtype(node.inputs[0].dtype) == ir.onnx_dtype(node.outputs[0].dtype)
    if ir.is_op(node, "Transpose"):
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if ir.is_op(node, "Slice"):
        return _same_shape(node)
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
            if not node.inputs or not node.outputs or not _is_noop(node):
                continue
            if ir.bypass(graph, node):
                removed[node.op] = removed.get(node.op, 0) + 1
        stats = {f"removed_{op}": n for op, n in sorted(removed.items())}
        return PassResult(graph, modified=bool(removed), stats=stats)


__all__ = ["EliminateNoops"]
