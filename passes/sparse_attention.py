"""Attention in query chunks: exact chunking, or a sliding window with attention sinks (approximate).

Runs on fused ``Attention`` nodes (ONNX 23, 4-D [B, H, S, D] inputs) with ``is_causal`` and/or a constant
additive mask. The queries are split into chunks of Q rows [lo, hi) (Slice on axis 2), and each chunk
attends only to the keys it can see, with k = j − (Skv − Sq) the key index aligned to the rows:
- ``chunked:Q`` (exact): causal chunk rows see keys [0, hi) — about half the score work and scratch of
  full rows; a non-causal chunk sees all keys. Each row's softmax runs over the same visible keys as
  before (the keys cut away were masked to exactly 0).
- ``sliding:W[,sinks=S]`` (approximate): row i sees keys i − W < j ≤ i plus the first S (attention sinks),
  so chunk rows read keys [max(S, lo − W + 1), hi) and [0, S): score scratch and FLOPs O(Sq·(W + S + Q)).
  With W ≥ Sq it equals causal attention. It only runs when asked, and the build reports its error.
Masks are computed at run time from two small index vectors (key positions [Skv], row positions [Sq, 1])
sliced per chunk: the weights file does not grow with S. A constant additive mask of the model is sliced
the same way. On targets without a fused ``Attention`` kernel each chunk is written in standard ops
(grouped-query MatMul, scale, Where, Softmax, MatMul). The chunks are emitted one after the other, so in
graph order only one chunk's keys, mask and scores are alive at a time (the pass counts it).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.fuse.attention import ATTENTION, AttentionRule
from lmc.passes.fuse.rule import Match, can_run

MASKED = float("-inf")


class AttentionKind(enum.Enum):
    DENSE = "dense"
    CHUNKED = "chunked"
    SLIDING = "sliding"


@dataclass(frozen=True)
class AttentionSpec:
    kind: AttentionKind = AttentionKind.DENSE
    chunk: int = 128
    window: int = 0
    sinks: int = 0

    @property
    def exact(self) -> bool:
        return self.kind is not AttentionKind.SLIDING

    @classmethod
    def parse(cls, text: str) -> "AttentionSpec":
        """``dense`` | ``chunked[:Q]`` | ``sliding:W[,sinks=S]``."""
        head, _, rest = text.partition(":")
        try:
            kind = AttentionKind(head)
        except ValueError:
            raise LmcError(f"--attention '{text}': expected dense, chunked[:Q] or sliding:W[,sinks=S]") from None
        try:
            if kind is AttentionKind.DENSE:
                if rest:
                    raise ValueError
                return cls()
            if kind is AttentionKind.CHUNKED:
                chunk = int(rest) if rest else 128
                if chunk <= 0:
                    raise ValueError
                return cls(kind, chunk=chunk)
            parts = rest.split(",")
            window = int(parts[0])
            sinks = 0
            for p in parts[1:]:
                key, _, value = p.partition("=")
                if key.strip() != "sinks":
                    raise ValueError
                sinks = int(value)
            if window <= 0 or sinks < 0:
                raise ValueError
            return cls(kind, chunk=window, window=window, sinks=sinks)
        except ValueError:
            raise LmcError(f"--attention '{text}': expected dense, chunked[:Q] or sliding:W[,sinks=S] with "
                           "positive integers") from None

    def __str__(self) -> str:
        if self.kind is AttentionKind.DENSE:
            return "dense"
        if self.kind is AttentionKind.CHUNKED:
            return f"chunked:{self.chunk}"
        return f"sliding:{self.window}" + (f",sinks={self.sinks}" if self.sinks else "")


def row_mask(spec: AttentionSpec, rows: range, skv: int, sq: int, causal: bool,
             base: np.ndarray | None) -> np.ndarray:
    """Additive mask [len(rows), skv] for query rows ``rows`` (global indices)."""
    i = np.asarray(rows)[:, None] + (skv - sq)           # key index aligned with each query row
    j = np.arange(skv)[None, :]
    allowed = np.ones((len(rows), skv), dtype=bool)
    if causal:
        allowed &= j <= i
    if spec.kind is AttentionKind.SLIDING:
        allowed &= (j > i - spec.window) | (j < spec.sinks)
        allowed &= j <= i
    mask = np.where(allowed, 0.0, MASKED).astype(np.float32)
    if base is not None:
        mask = mask + np.broadcast_to(base, (sq, skv))[np.asarray(rows)]
    return mask


class SparseAttention:
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.name = f"attention-{spec.kind.value}"
        self.kind = PassKind.EXACT if spec.exact else PassKind.APPROXIMATE

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = ir.Namer(graph)
        fused = _can_emit_attention(graph, ctx)
        if not fused:
            _fuse_for_chunking(graph, ctx, names)
        rewritten, notes, chunks = 0, [], 0
        index: dict[tuple[int, int], tuple[gs.Tensor, gs.Tensor]] = {}
        for node in list(graph.nodes):
            if not ir.is_op(node, "Attention") or len(node.outputs) != 1:
                continue
            result = self._rewrite(graph, node, names, fused, index)
            if isinstance(result, str) and not fused:      # the target cannot run the fused node: one chunk
                result = self._rewrite(graph, node, names, fused, index, whole=True)
            if isinstance(result, str):
                notes.append(f"{node.name}: left dense ({result})")
            else:
                rewritten += 1
                chunks = max(chunks, result)
        if not rewritten and not notes:
            notes.append("no fused Attention in the graph: nothing to rewrite")
        if rewritten:
            notes.append(f"{rewritten} attentions in up to {chunks} chunks, run one chunk at a time"
                         + ("" if fused else " in standard ops (the target has no fused Attention)"))
        return PassResult(graph, modified=bool(rewritten), stats={"attention_rewritten": rewritten,
                                                                   "chunks": chunks}, notes=notes)

    def _key_ranges(self, lo: int, hi: int, off: int, skv: int, causal: bool) -> list[tuple[int, int]]:
        """Key index ranges [a, b) the rows [lo, hi) can see."""
        end = min(skv, hi + off) if causal or self.spec.kind is AttentionKind.SLIDING else skv
        if self.spec.kind is not AttentionKind.SLIDING:
            return [(0, end)]
        start = max(0, lo + off - self.spec.window + 1)
        sinks = min(self.spec.sinks, start)
        return ([(0, sinks)] if sinks else []) + [(max(start, sinks), end)]

    def _rewrite(self, graph: gs.Graph, node: gs.Node, names: ir.Namer, fused: bool,
                 index: dict, whole: bool = False) -> int | str:
        q, k, v, out = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        qs, ks = ir.static_shape(q), ir.static_shape(k)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
            return "needs 4-D inputs with static shapes"
        if any(t.name for t in node.inputs[4:]):
            return "has a KV cache input"
        mask_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        base = None
        if mask_t is not None:
            base = ir.const_value(mask_t)
            if base is None or base.dtype == np.bool_:
                return "its mask is not a constant additive mask"
            if base.ndim > 2 and any(d != 1 for d in base.shape[:-2]):
                return "its mask differs per batch or head"
        sq, skv = qs[2], ks[2]
        off = skv - sq
        chunk = sq if whole else min(self.spec.chunk, sq)
        causal = int(node.attrs.get("is_causal", 0)) == 1
        window_covers = self.spec.kind is AttentionKind.SLIDING and causal and self.spec.window >= skv
        if chunk >= sq and (self.spec.kind is AttentionKind.CHUNKED or window_covers) and not whole:
            return f"{sq} query rows fit in one chunk of {chunk}" + (
                f" and the window {self.spec.window} covers every key" if window_covers else "")
        attrs = {key: val for key, val in node.attrs.items() if key != "is_causal"}
        scale = float(attrs.get("scale", qs[3] ** -0.5))
        if (sq, skv) not in index:     # row and key positions, shared by every layer of this shape
            index[(sq, skv)] = (gs.Constant(names.fresh("attention_row_index"), np.arange(sq, dtype=np.int64).reshape(sq, 1) + off),
                                gs.Constant(names.fresh("attention_key_index"), np.arange(skv, dtype=np.int64)))
        rows_idx, keys_idx = index[(sq, skv)]
        base_c = None
        if base is not None:
            base_c = gs.Constant(names.fresh(mask_t.name + "_2d"), np.ascontiguousarray(
                np.broadcast_to(base, base.shape[:-2] + (sq, skv)).reshape(sq, skv), dtype=np.float32))
        new_nodes: list[gs.Node] = []
        pieces = []
        n_chunks = math.ceil(sq / chunk)
        for c in range(n_chunks):
            lo, hi = c * chunk, min((c + 1) * chunk, sq)
            builder = _Emitter(names, new_nodes, f"{node.name}_chunk{c}")     # names carry the chunk
            ranges = [(a, b) for a, b in self._key_ranges(lo, hi, off, skv, causal) if b > a]
            qc = builder.slice(q, lo, hi, 2, [qs[0], qs[1], hi - lo, qs[3]])
            kc = builder.concat([builder.slice(k, a, b, 2, [ks[0], ks[1], b - a, ks[3]]) for a, b in ranges], 2)
            vs = ir.static_shape(v)
            vc = builder.concat([builder.slice(v, a, b, 2, [vs[0], vs[1], b - a, vs[3]]) for a, b in ranges], 2)
            width = sum(b - a for a, b in ranges)
            keep = None
            if causal or self.spec.kind is AttentionKind.SLIDING:
                ri = builder.slice(rows_idx, lo, hi, 0, [hi - lo, 1])
                kj = builder.concat([builder.slice(keys_idx, a, b, 0, [b - a]) for a, b in ranges], 0)
                keep = builder.op("LessOrEqual", [kj, ri], np.bool_, [hi - lo, width])
                if self.spec.kind is AttentionKind.SLIDING:
                    start = builder.op("Sub", [ri, builder.const(self.spec.window)], np.int64, [hi - lo, 1])
                    recent = builder.op("Greater", [kj, start], np.bool_, [hi - lo, width])
                    if self.spec.sinks:
                        sink = builder.op("Less", [kj, builder.const(self.spec.sinks)], np.bool_, [width])
                        recent = builder.op("Or", [recent, sink], np.bool_, [hi - lo, width])
                    keep = builder.op("And", [keep, recent], np.bool_, [hi - lo, width])
            additive = None
            if base_c is not None:
                rows = builder.slice(base_c, lo, hi, 0, [hi - lo, skv])
                additive = builder.concat([builder.slice(rows, a, b, 1, [hi - lo, b - a]) for a, b in ranges], 1)
            oc = gs.Variable(names.fresh(f"{out.name}_rows{lo}"), dtype=out.dtype,
                             shape=[qs[0], qs[1], hi - lo, (ir.static_shape(out) or qs)[3]])
            if fused:
                mask = keep
                if additive is not None:
                    mask = additive if keep is None else builder.op(
                        "Where", [keep, additive, builder.const(MASKED, np.float32)], np.float32, [hi - lo, width])
                inputs = [qc, kc, vc] + ([mask] if mask is not None else [])
                new_nodes.append(gs.Node("Attention", name=names.fresh(f"{node.name}_chunk{c}"), attrs=dict(attrs),
                                         inputs=inputs, outputs=[oc]))
            else:
                builder.standard_attention(qc, kc, vc, keep, additive, scale, oc)
            pieces.append(oc)
        node.inputs.clear()
        node.outputs.clear()
        new_nodes.append(gs.Node("Concat", name=names.fresh(f"{node.name}_rows"), attrs={"axis": 2},
                                 inputs=pieces, outputs=[out]))
        graph.nodes.extend(new_nodes)
        return n_chunks


def _fuse_for_chunking(graph: gs.Graph, ctx: PassContext | None, names: ir.Namer) -> None:
    """Recognise decomposed attention (``AttentionRule``) even where the target has no fused kernel: the
    Attention nodes made here are all lowered back to standard ops, chunk by chunk, by this pass."""
    rule, removed = AttentionRule(), set()
    for anchor in reversed(list(graph.nodes)):
        if id(anchor) in removed or not anchor.outputs:
            continue
        match = rule.match(graph, anchor, ctx)
        if isinstance(match, Match):
            match.apply(names)
            removed.update(id(n) for n in match.nodes)
    ir.topological_sort(graph)


def _can_emit_attention(graph: gs.Graph, ctx: PassContext | None) -> bool:
    return ctx is None or ctx.target is None or can_run(graph, ATTENTION, ctx) is None


class _Emitter:
    """Small node factory for one rewrite (fresh names, shapes and dtypes recorded)."""

    def __init__(self, names: ir.Namer, nodes: list[gs.Node], base: str):
        self.names, self.nodes, self.base = names, nodes, base

    def const(self, value, dtype=np.int64) -> gs.Constant:
        return gs.Constant(self.names.fresh(f"{self.base}_c"), np.asarray(value, dtype=dtype))

    def op(self, op: str, inputs: list, dtype, shape, **attrs) -> gs.Variable:
        out = gs.Variable(self.names.fresh(f"{self.base}_{op.lower()}"), dtype=dtype, shape=shape)
        self.nodes.append(gs.Node(op, name=out.name, attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    def slice(self, t: gs.Tensor, lo: int, hi: int, axis: int, shape) -> gs.Tensor:
        if ir.static_shape(t) is not None and ir.static_shape(t)[axis] == hi - lo and lo == 0:
            return t
        return self.op("Slice", [t, self.const([lo]), self.const([hi]), self.const([axis])], t.dtype, shape)

    def concat(self, parts: list[gs.Tensor], axis: int) -> gs.Tensor:
        if len(parts) == 1:
            return parts[0]
        shape = list(parts[0].shape)
        shape[axis] = sum(int(p.shape[axis]) for p in parts)
        return self.op("Concat", parts, parts[0].dtype, shape, axis=axis)

    def standard_attention(self, q, k, v, keep, additive, scale: float, out: gs.Variable) -> None:
        """softmax(q·kᵀ·scale [+ mask]) · v in standard ops, kv heads shared by groups of query heads:
        q [B, H, Q, D] → [B, Hkv, r, Q, D]; k, v [B, Hkv, K, D] → [B, Hkv, 1, …]."""
        b, h, rows, d = (int(x) for x in q.shape)
        hkv, width = int(k.shape[1]), int(k.shape[2])
        r = h // hkv
        f32 = np.float32
        qg = self.op("Reshape", [q, self.const([b, hkv, r, rows, d])], q.dtype, [b, hkv, r, rows, d])
        kg = self.op("Unsqueeze", [k, self.const([2])], k.dtype, [b, hkv, 1, width, d])
        kt = self.op("Transpose", [kg], k.dtype, [b, hkv, 1, d, width], perm=[0, 1, 2, 4, 3])
        scores = self.op("MatMul", [qg, kt], f32, [b, hkv, r, rows, width])
        scores = self.op("Mul", [scores, self.const(scale, f32)], f32, [b, hkv, r, rows, width])
        if additive is not None:
            scores = self.op("Add", [scores, additive], f32, [b, hkv, r, rows, width])
        if keep is not None:
            scores = self.op("Where", [keep, scores, self.const(MASKED, f32)], f32, [b, hkv, r, rows, width])
        probs = self.op("Softmax", [scores], f32, [b, hkv, r, rows, width], axis=-1)
        vg = self.op("Unsqueeze", [v, self.const([2])], v.dtype, [b, hkv, 1, width, d])
        y = self.op("MatMul", [probs, vg], f32, [b, hkv, r, rows, d])
        self.nodes.append(gs.Node("Reshape", name=self.names.fresh(f"{self.base}_heads"),
                                  inputs=[y, self.const([b, h, rows, d])], outputs=[out]))
