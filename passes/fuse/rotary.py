"""Rotary position embedding → ONNX ``RotaryEmbedding`` (opset 23), non-interleaved (rotate-half) form.

Pattern (anchor: the Add), x 4-D [B, H, S, D] with static shape:
    x1 = Slice(x, 0:D/2, axis=-1); x2 = Slice(x, D/2:, axis=-1)
    y  = x · C + Concat(−x2, x1, axis=-1) · S'        (Add/Mul operands in either order)
with C, S' constants that broadcast to [B, 1, S, D] and repeat their first half in their second half
(cos/sin tables of angles θ_i duplicated, as rotate-half models build them).
Rewrite: y = RotaryEmbedding(x, cos_cache = C[..., :D/2] as [B, S, D/2], sin_cache likewise). Exact up to
the kernel's rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

ROTARY = OpRef("RotaryEmbedding", "", 23)


def slice_range(node: gs.Node, rank: int) -> tuple[int, int, int] | None:
    """(axis, start, end) of a single-axis, step-1 Slice with constant parameters (ends clamped)."""
    values = [ir.const_value(t) for t in node.inputs[1:]]
    if any(v is None for v in values) or len(values) < 2:
        return None
    starts, ends = values[0].reshape(-1), values[1].reshape(-1)
    axes = values[2].reshape(-1) if len(values) > 2 else np.arange(len(starts))
    steps = values[3].reshape(-1) if len(values) > 3 else np.ones_like(starts)
    if len(starts) != 1 or int(steps[0]) != 1:
        return None
    axis = int(axes[0]) % rank
    dim = ir.static_shape(node.inputs[0])[axis]
    start, end = int(starts[0]), int(ends[0])
    start = max(0, start + dim if start < 0 else min(start, dim))
    end = max(0, end + dim if end < 0 else min(end, dim))
    return axis, start, end


def _rotate_half(graph: gs.Graph, t: gs.Tensor, x: gs.Tensor, d: int) -> list[gs.Node] | None:
    concat = produced_by(t, "Concat")
    if concat is None or len(concat.inputs) != 2 or int(concat.attrs.get("axis", 0)) % 4 != 3:
        return None
    neg = produced_by(concat.inputs[0], "Neg")
    s2, s1 = (produced_by(neg.inputs[0], "Slice") if neg else None), produced_by(concat.inputs[1], "Slice")
    if s1 is None or s2 is None or s1.inputs[0] is not x or s2.inputs[0] is not x:
        return None
    if slice_range(s1, 4) != (3, 0, d // 2) or slice_range(s2, 4) != (3, d // 2, d):
        return None
    nodes = [concat, neg, s1, s2]
    if any(sole_reader(n.outputs[0], graph) is None for n in nodes[1:]) or sole_reader(t, graph) is None:
        return None
    return nodes


def _cache(value: np.ndarray | None, b: int, s: int, d: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        full = np.broadcast_to(value, (b, 1, s, d))
    except ValueError:
        return None
    if not np.array_equal(full[..., : d // 2], full[..., d // 2:]):
        return None
    return np.ascontiguousarray(full[:, 0, :, : d // 2])


class RotaryRule:
    name = "rotary"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Add"):
            return None
        muls = [produced_by(t, "Mul") for t in anchor.inputs]
        if any(m is None for m in muls):
            return None
        out = anchor.outputs[0]
        shape = ir.static_shape(out)
        if shape is None or len(shape) != 4:
            return None
        b, _, s, d = shape
        for plain, rotated in (muls, muls[::-1]):
            for i in (0, 1):
                x, cos = plain.inputs[i], ir.const_value(plain.inputs[1 - i])
                if cos is None or ir.static_shape(x) != shape:
                    continue
                for j in (0, 1):
                    sin = ir.const_value(rotated.inputs[1 - j])
                    if sin is None:
                        continue
                    half = _rotate_half(graph, rotated.inputs[j], x, d)
                    if half is None:
                        continue
                    cos_cache, sin_cache = _cache(cos, b, s, d), _cache(sin, b, s, d)
                    if cos_cache is None or sin_cache is None:
                        return Reject("cos/sin tables do not repeat their halves (not rotate-half form)")
                    nodes = [anchor, plain, rotated] + half
                    if sole_reader(plain.outputs[0], graph) is not anchor or sole_reader(rotated.outputs[0], graph) is not anchor:
                        return Reject("rotary products have other readers")
                    dtype = np.dtype(x.dtype) if x.dtype is not None else np.float32
                    return Match(nodes, ROTARY, self._apply(graph, nodes, anchor, x, out, cos_cache.astype(dtype),
                                                            sin_cache.astype(dtype)))
        return None

    @staticmethod
    def _apply(graph, nodes, anchor, x, out, cos_cache, sin_cache):
        def apply(names: ir.Namer) -> None:
            c = gs.Constant(names.fresh(out.name + "_cos_cache"), cos_cache)
            s = gs.Constant(names.fresh(out.name + "_sin_cache"), sin_cache)
            replace_subgraph(graph, nodes, lambda: [
                gs.Node("RotaryEmbedding", name=names.fresh(anchor.name + "_rotary"), attrs={"interleaved": 0},
                        inputs=[x, c, s], outputs=[out])])
        return apply
