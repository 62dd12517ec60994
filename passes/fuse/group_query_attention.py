"""A generation bundle's attention over in-place state → com.microsoft ``GroupQueryAttention`` (onnxruntime's
kernel for decoding with a shared past/present buffer, rotary included).

Pattern (anchor: the Attention), as ``StaticKVCache`` and ``RotaryPositionsRule`` leave it:
    q  = [RotaryEmbedding](Transpose₀₂₁₃(Reshape(q₂ [B, S, H·D] → [B, S, H, D])), cos, sin, p)
    kₙ = [RotaryEmbedding](Transpose₀₂₁₃(Reshape(k₂ [B, S, Hkv·D] → …)), cos, sin, p)      (same tables)
    vₙ = Transpose₀₂₁₃(Reshape(v₂ [B, S, Hkv·D] → …))
    K  = TensorScatter(past_k, kₙ, p[:, 0]);  V = TensorScatter(past_v, vₙ, p[:, 0])        (state outputs)
    y₄ = Attention(q, K, V, j ≤ p[b, i], nonpad = p[:, −1] + 1, scale)
    y  = Reshape(Transpose₀₂₁₃(y₄) → [B, S, H·D])
Rewrite: y, K, V = GroupQueryAttention(q₂, k₂, v₂, past_k, past_v, seqlens_k = p[:, −1], total = max(p[:, −1]) + 1,
cos, sin; num_heads = H, kv_num_heads = Hkv, scale, do_rotary). The kernel places the new rows at
seqlens_k + 1 − S … and rotates query i at that position: equal to the pattern when each row's positions
are consecutive (p[b, i] = p[b, 0] + i), which is how a generation bundle is driven. It needs D % 8 == 0.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph

GQA = OpRef("GroupQueryAttention", ir.MS_DOMAIN)
BSHD = [0, 2, 1, 3]


def _heads_view(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """For t = Transpose₀₂₁₃(Reshape(x [B, S, H·D] → [B, S, H, D])): (x, [transpose, reshape])."""
    tr = produced_by(t, "Transpose")
    if tr is None or list(tr.attrs.get("perm", [])) != BSHD:
        return None
    rs = produced_by(tr.inputs[0], "Reshape")
    if rs is None:
        return None
    x, shape = ir.static_shape(rs.inputs[0]), ir.static_shape(rs.outputs[0])
    if x is None or shape is None or len(x) != 3 or len(shape) != 4 or x[:2] != shape[:2] \
            or x[2] != shape[2] * shape[3]:
        return None
    return rs.inputs[0], [tr, rs]


def _unrotate(t: gs.Tensor) -> tuple[gs.Tensor, tuple | None, list[gs.Node]]:
    rot = produced_by(t, "RotaryEmbedding")
    if rot is None:
        return t, None, []
    if int(rot.attrs.get("interleaved", 0)) or len(rot.inputs) < 4 or "rotary_embedding_dim" in rot.attrs:
        return t, (), []          # a form the kernel cannot take: never the same rotation
    return rot.inputs[0], tuple(rot.inputs[1:4]), [rot]


def _same_rotation(a: tuple | None, b: tuple | None) -> bool:
    """Both absent, or the same positions and equal constant cos/sin tables."""
    if a is None or b is None:
        return a is None and b is None
    if len(a) != 3 or len(b) != 3 or a[2] is not b[2]:
        return False
    return all(x is y or (isinstance(x, gs.Constant) and isinstance(y, gs.Constant)
                          and np.array_equal(ir.const_value(x), ir.const_value(y))) for x, y in zip(a[:2], b[:2]))


class GroupQueryAttentionRule:
    name = "group-query-attention"

    def __init__(self):
        self.shared: dict[str, gs.Tensor] = {}

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "Attention") or len(anchor.inputs) != 7:
            return None
        q, k_state, v_state, mask, total = (anchor.inputs[i] for i in (0, 1, 2, 3, 6))
        scatters = [produced_by(t, "TensorScatter") for t in (k_state, v_state)]
        outputs = ir.graph_outputs(graph)
        if any(s is None for s in scatters) or k_state.name not in outputs or v_state.name not in outputs:
            return None
        if any(int(s.attrs.get("axis", -2)) % 4 != 2 or s.attrs.get("mode", "linear") != "linear" for s in scatters):
            return Reject("cache writes are not linear along the sequence axis")
        out = anchor.outputs[0]
        readers = out.outputs
        tr = readers[0] if len(readers) == 1 and ir.is_op(readers[0], "Transpose") else None
        if tr is None or list(tr.attrs.get("perm", [])) != BSHD or len(tr.outputs[0].outputs) != 1:
            return Reject("attention output is not transposed back to [B, S, H, D]")
        merge = tr.outputs[0].outputs[0]
        y_shape = ir.static_shape(merge.outputs[0]) if ir.is_op(merge, "Reshape") else None
        if y_shape is None or len(y_shape) != 3:
            return Reject("attention output is not merged to [B, S, H·D]")
        q0, q_rot, q_rot_nodes = _unrotate(q)
        k0, k_rot, k_rot_nodes = _unrotate(scatters[0].inputs[1])
        if not _same_rotation(q_rot, k_rot):
            return Reject("queries and keys are not rotated by the same rotate-half tables")
        views = [_heads_view(q0), _heads_view(k0), _heads_view(scatters[1].inputs[1])]
        if any(v is None for v in views):
            return Reject("q/k/v are not head views of [B, S, heads·D] projections")
        qs, ks = ir.static_shape(q), ir.static_shape(k_state)
        heads, kv_heads, depth = qs[1], ks[1], qs[3]
        if depth % 8 or heads % kv_heads:
            return Reject(f"head size {depth} is not a multiple of 8 (GroupQueryAttention)")
        if q_rot is not None and (not isinstance(q_rot[0], gs.Constant) or ir.static_shape(q_rot[0])[1] * 2 != depth):
            return Reject("rotary caches are not constant full-width tables")
        nodes = [anchor, tr, merge] + q_rot_nodes + k_rot_nodes + [n for v in views for n in v[1]] + scatters
        inside = {id(n) for n in nodes}
        for n in nodes:
            if n is not anchor and n is not merge and n not in scatters and \
                    (len(n.outputs[0].outputs) != 1 or id(n.outputs[0].outputs[0]) not in inside):
                return Reject(f"'{n.outputs[0].name}' is read outside the attention")
        positions = mask_positions(mask)
        if positions is None:
            return Reject("the attention mask is not the state's causal mask")
        pasts = [s.inputs[0] for s in scatters]
        y = merge.outputs[0]
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(anchor.attrs.get("scale", depth ** -0.5)),
                 "do_rotary": int(q_rot is not None), "rotary_interleaved": 0}

        qkv = [v[0] for v in views]
        split = _packed_split(qkv)
        if split is not None:        # q, k, v are the parts of one merged projection: the kernel takes it packed
            nodes.append(split)
            qkv = [split.inputs[0], gs.Variable.empty(), gs.Variable.empty()]

        def apply(names: ir.Namer) -> None:
            seqlens, total_len = self._lengths(graph, positions, names)
            rotary = list(q_rot[:2]) if q_rot is not None else []
            replace_subgraph(graph, nodes, lambda: [gs.Node(
                "GroupQueryAttention", domain=ir.MS_DOMAIN, name=names.fresh(anchor.name + "_gqa"), attrs=attrs,
                inputs=qkv + [pasts[0], pasts[1], seqlens, total_len] + rotary,
                outputs=[y, k_state, v_state])])
        return Match(nodes, GQA, apply)

    def _lengths(self, graph: gs.Graph, positions: gs.Tensor, names: ir.Namer) -> tuple[gs.Tensor, gs.Tensor]:
        """seqlens_k = p[:, −1] (int32 [B]) and total_sequence_length = max(p[:, −1]) + 1 (int32 scalar),
        built once for all layers."""
        if positions.name not in self.shared:
            last = gs.Variable(names.fresh("gqa_last_position"), dtype=np.int64, shape=[positions.shape[0]])
            seqlens = gs.Variable(names.fresh("gqa_seqlens_k"), dtype=np.int32, shape=[positions.shape[0]])
            top = gs.Variable(names.fresh("gqa_max_position"), dtype=np.int32, shape=[])
            total = gs.Variable(names.fresh("gqa_total_length"), dtype=np.int32, shape=[])
            graph.nodes += [
                gs.Node("Gather", name=last.name, attrs={"axis": 1},
                        inputs=[positions, gs.Constant(names.fresh("gqa_minus1"), np.array(-1, np.int64))],
                        outputs=[last]),
                gs.Node("Cast", name=seqlens.name, attrs={"to": 6}, inputs=[last], outputs=[seqlens]),
                gs.Node("ReduceMax", name=top.name, attrs={"keepdims": 0}, inputs=[seqlens], outputs=[top]),
                gs.Node("Add", name=total.name, inputs=[top, gs.Constant(names.fresh("gqa_one"), np.array(1, np.int32))],
                        outputs=[total])]
            self.shared[positions.name] = (seqlens, total)
        return self.shared[positions.name]


def _packed_split(parts: list[gs.Tensor]) -> gs.Node | None:
    """The Split that makes q, k, v (in that order, last axis, read only here) from one tensor, else None."""
    split = ir.producer(parts[0])
    if split is None or not ir.is_op(split, "Split") or list(split.outputs) != parts:
        return None
    rank = len(parts[0].shape or [])
    if int(split.attrs.get("axis", 0)) % max(rank, 1) != rank - 1 or any(len(p.outputs) != 1 for p in parts):
        return None
    return split


def mask_positions(mask: gs.Tensor) -> gs.Tensor | None:
    """The positions p of a state causal mask LessOrEqual(slots, Unsqueeze(p, [1, 3])), else None."""
    le = produced_by(mask, "LessOrEqual")
    if le is None:
        return None
    slots = ir.const_value(le.inputs[0])
    unsq = produced_by(le.inputs[1], "Unsqueeze")
    if slots is None or unsq is None or not np.array_equal(slots, np.arange(slots.size)):
        return None
    axes = ir.const_value(unsq.inputs[1]) if len(unsq.inputs) > 1 else np.asarray(unsq.attrs.get("axes", []))
    if axes is None or list(np.asarray(axes).reshape(-1)) != [1, 3]:
        return None
    return unsq.inputs[0]
