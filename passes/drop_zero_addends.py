"""Drop all-zero constants that are added only for their shape.

T5's cross-attention adds to its scores ``zeros([1, H, S, L]) + mask`` (a position bias that is zero without
relative attention, plus the encoder mask [1, 1, 1, L]): once the sequence length S is bound the zeros fold to
a constant whose size depends on S, which a generation bundle cannot keep. For Z an all-zero constant:
    R = Z + x,  y = a ± R   →   y = a ± x      when broadcast(shape(a), shape(x)) = shape(y)
(and R = x when shape(R) = shape(x)): the sum keeps its shape and values, so the rewrite is exact.
Precondition: static shapes of the tensors involved (it runs on compiles with every length bound).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

log = logging.getLogger(__name__)

MAX_CHECKED = 1 << 24          # elements: larger constants are not read to prove them zero


def _zero(t: gs.Tensor) -> bool:
    if not isinstance(t, gs.Constant) or int(np.prod(t.shape)) > MAX_CHECKED:
        return False
    value = ir.const_value(t)
    return value is not None and value.dtype.kind in "fiu" and not np.any(value)


def _broadcast(*shapes_: tuple | None) -> tuple | None:
    if any(s is None for s in shapes_):
        return None
    try:
        return tuple(np.broadcast_shapes(*shapes_))
    except ValueError:
        return None


class DropZeroAddends:
    """Remove ``Z + x`` where Z is an all-zero constant and the shape it lends is not needed downstream."""

    name = "drop-zero-addends"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        outputs = ir.graph_outputs(graph)
        dropped = 0
        for node in list(graph.nodes):
            if not ir.is_op(node, "Add") or len(node.inputs) != 2:
                continue
            zeros = [i for i, t in enumerate(node.inputs) if _zero(t)]
            if len(zeros) != 1:
                continue
            x, r = node.inputs[1 - zeros[0]], node.outputs[0]
            if r.name in outputs or x.dtype != r.dtype:
                continue
            x_shape = ir.static_shape(x)
            if x_shape is not None and x_shape == ir.static_shape(r):
                readers = list(r.outputs)
            else:
                readers = [n for n in r.outputs if self._covered(n, r, x_shape)]
                if len(readers) != len(r.outputs):
                    continue
            for reader in readers:
                for i, t in enumerate(reader.inputs):
                    if t is r:
                        reader.inputs[i] = x
            node.inputs.clear()
            node.outputs.clear()
            dropped += 1
        if dropped:
            ir.remove_dead_nodes(graph)
        return PassResult(graph, modified=bool(dropped), stats={"dropped": dropped},
                          notes=[f"{dropped} all-zero addends dropped"] if dropped else [])

    @staticmethod
    def _covered(reader: gs.Node, r: gs.Tensor, x_shape: tuple | None) -> bool:
        """``reader`` is a ± whose result keeps its shape with x in place of R."""
        if not ir.is_op(reader, ("Add", "Sub")) or len(reader.inputs) != 2 or reader.inputs[0] is reader.inputs[1]:
            return False
        other = reader.inputs[1] if reader.inputs[0] is r else reader.inputs[0]
        out = ir.static_shape(reader.outputs[0])
        return out is not None and _broadcast(ir.static_shape(other), x_shape) == out
