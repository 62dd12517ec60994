"""Rotary embedding whose cos/sin are computed at run time from ``position_ids`` → ``RotaryEmbedding``
(opset 23) with tabulated caches and the positions as its ``position_ids`` input.

Pattern (anchor: the Add), as transformers exports it (``LlamaRotaryEmbedding`` then
``apply_rotary_pos_emb``), x 4-D [B, H, S, D]:
    y = x · C + Concat(−x₂, x₁, axis=-1) · S'                 (rotate-half; x₁, x₂ the halves of x)
with C and S' *tensors computed from one integer graph input* p [B, S] alone (inv_freq ⊗ p → Concat →
Cos/Sin, or a Gather of stored tables, through any casts and unsqueezes), broadcasting to [B, 1, S, D].
The cone behind C is not matched op by op: it is evaluated under onnxruntime at positions 0…T−1
(T = the generation context) and must be a function of each position alone (checked with a shuffled
probe) whose two halves are equal; the evaluated rows *are* the cos/sin caches, so the fused op computes
exactly what the original does at every position below T. Positions ≥ T are outside the bundle's cache
anyway. Runs only in generation builds (``options.context``), where T is known.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.core.runtime import session
from lmc.passes.fuse.rotary import ROTARY, _rotate_half
from lmc.passes.fuse.rule import Match, Reject, produced_by, replace_subgraph, sole_reader


class PositionTables:
    """Evaluates position-only tensors into [T, D] tables (one session per tensor, cached by name)."""

    def __init__(self):
        self.cache: dict[str, np.ndarray | str] = {}

    def table(self, graph: gs.Graph, t: gs.Tensor, positions: gs.Tensor, rows: int) -> np.ndarray | str:
        if t.name not in self.cache:
            self.cache[t.name] = self._evaluate(graph, t, positions, rows)
        return self.cache[t.name]

    @staticmethod
    def _evaluate(graph, t, positions, rows) -> np.ndarray | str:
        model = ir.cone_model(graph, [t], inputs=[positions])
        b, s = (int(d) for d in positions.shape)
        sess = session(model, optimize=False)
        dtype = np.dtype(positions.dtype)
        out = []
        for start in range(0, rows, s):
            p = np.broadcast_to(np.arange(start, start + s, dtype=dtype), (b, s))
            value = np.asarray(sess.run(None, {positions.name: np.ascontiguousarray(p)})[0])
            if value.ndim != 4 or value.shape[1] != 1 or value.shape[2] != s:
                return f"position table '{t.name}' is not [B, 1, S, D]"
            out.append(value[0, 0])
        table = np.concatenate(out)[:rows]
        shuffled = np.broadcast_to(np.array([(7 * i + 3) % rows for i in range(s)], dtype=dtype), (b, s))
        probe = np.asarray(sess.run(None, {positions.name: np.ascontiguousarray(shuffled)})[0])[0, 0]
        if not np.array_equal(probe, table[shuffled[0]]):
            return f"'{t.name}' is not a function of each position alone"
        return table


class RotaryPositionsRule:
    name = "rotary-positions"

    def __init__(self):
        self.tables = PositionTables()

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Add"):
            return None
        context = getattr(getattr(ctx, "options", None), "context", None)
        muls = [produced_by(t, "Mul") for t in anchor.inputs]
        if not context or any(m is None for m in muls):
            return None
        out = anchor.outputs[0]
        shape = ir.static_shape(out)
        if shape is None or len(shape) != 4:
            return None
        d = shape[3]
        inputs = {t.name: t for t in graph.inputs}
        for plain, rotated in (muls, muls[::-1]):
            for i in (0, 1):
                x, cos = plain.inputs[i], plain.inputs[1 - i]
                if ir.static_shape(x) != shape or isinstance(cos, gs.Constant):
                    continue
                for j in (0, 1):
                    sin = rotated.inputs[1 - j]
                    half = _rotate_half(graph, rotated.inputs[j], x, d)
                    if half is None or isinstance(sin, gs.Constant):
                        continue
                    leaves = ir.cone([cos, sin])[1]
                    if len(leaves) != 1 or next(iter(leaves)) not in inputs:
                        return Reject("cos/sin do not come from one position input alone")
                    positions = inputs[next(iter(leaves))]
                    if ir.static_shape(positions) is None or len(positions.shape) != 2:
                        return Reject("the position input is not a static [B, S] tensor")
                    tables = [self.tables.table(graph, t, positions, context) for t in (cos, sin)]
                    for tab in tables:
                        if isinstance(tab, str):
                            return Reject(tab)
                    cos_t, sin_t = tables
                    if cos_t.shape[-1] != d or not (np.array_equal(cos_t[:, : d // 2], cos_t[:, d // 2:])
                                                    and np.array_equal(sin_t[:, : d // 2], sin_t[:, d // 2:])):
                        return Reject("cos/sin tables do not repeat their halves (not rotate-half form)")
                    if sole_reader(plain.outputs[0], graph) is not anchor or \
                            sole_reader(rotated.outputs[0], graph) is not anchor:
                        return Reject("rotary products have other readers")
                    nodes = [anchor, plain, rotated] + half
                    dtype = np.dtype(x.dtype) if x.dtype is not None else np.float32
                    caches = (np.ascontiguousarray(cos_t[:, : d // 2], dtype=dtype),
                              np.ascontiguousarray(sin_t[:, : d // 2], dtype=dtype))
                    return Match(nodes, ROTARY, self._apply(graph, nodes, anchor, x, out, caches, positions))
        return None

    @staticmethod
    def _apply(graph, nodes, anchor, x, out, caches, positions):
        def apply(names: ir.Namer) -> None:
            c = gs.Constant(names.fresh("rotary_cos_cache"), caches[0])
            s = gs.Constant(names.fresh("rotary_sin_cache"), caches[1])
            replace_subgraph(graph, nodes, lambda: [
                gs.Node("RotaryEmbedding", name=names.fresh(anchor.name + "_rotary"), attrs={"interleaved": 0},
                        inputs=[x, c, s, positions], outputs=[out])])
        return apply
