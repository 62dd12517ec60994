"""Attention in query chunks: exact chunking, or a sliding window with attention sinks (approximate).

Runs on fused ``Attention`` nodes (ONNX 23, 4-D [B, H, S, D] inputs) with ``is_causal`` and/or a constant
additive mask. The queries are split into chunks of Q rows (Slice on axis 2); each chunk runs its own
``Attention`` over all keys with a constant additive mask [Q, Skv], and the chunk outputs are concatenated.
The kernel's score matrix shrinks from H·Sq·Skv to H·Q·Skv floats (the plan's scratch shows it), and the
chunks run one after another, so only one is alive at a time.

- ``chunked:Q`` keeps the model's mask (causal rows i see keys j ≤ i + Skv − Sq): exact — each row's
  softmax runs over the same keys, masked ones contributing exactly 0 either way.
- ``sliding:W[,sinks=S]`` lets row i see keys j with i − W < j ≤ i, plus the first S keys (attention
  sinks): an approximation of a long-context model with local attention; it only runs when asked, and the
  build reports its error. Chunks default to W rows.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.errors import LmcError
from lmc.compiler.pass_manager import PassContext, PassKind, PassResult, Requirement

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
        rewritten, notes = 0, []
        for node in list(graph.nodes):
            if not ir.is_op(node, "Attention") or len(node.outputs) != 1:
                continue
            reason = self._rewrite(graph, node, names)
            if reason:
                notes.append(f"{node.name}: left dense ({reason})")
            else:
                rewritten += 1
        if not rewritten and not notes:
            notes.append("no fused Attention in the graph: nothing to rewrite")
        return PassResult(graph, modified=bool(rewritten), stats={"attention_rewritten": rewritten}, notes=notes)

    def _rewrite(self, graph: gs.Graph, node: gs.Node, names: ir.Namer) -> str | None:
        q, out = node.inputs[0], node.outputs[0]
        k = node.inputs[1]
        qs, ks = ir.static_shape(q), ir.static_shape(k)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
            return "needs 4-D inputs with static shapes"
        extra = [t for t in node.inputs[4:] if t.name]
        if extra:
            return "has a KV cache input"
        mask_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        base = None
        if mask_t is not None:
            base = ir.const_value(mask_t)
            if base is None or base.dtype == np.bool_:
                return "its mask is not a constant additive mask"
            base = np.asarray(base, dtype=np.float32)
            if base.ndim > 2 and any(d != 1 for d in base.shape[:-2]):
                return "its mask differs per batch or head"
            base = base.reshape(base.shape[-2:])
        sq, skv = qs[2], ks[2]
        chunk = min(self.spec.chunk, sq)
        if chunk >= sq and self.spec.kind is AttentionKind.CHUNKED:
            return f"{sq} query rows fit in one chunk of {self.spec.chunk}"
        causal = int(node.attrs.get("is_causal", 0)) == 1
        attrs = {k: v for k, v in node.attrs.items() if k != "is_causal"}
        dtype = np.dtype(q.dtype) if q.dtype is not None else np.float32
        pieces = []
        new_nodes = []
        for c in range(math.ceil(sq / chunk)):
            lo, hi = c * chunk, min((c + 1) * chunk, sq)
            qc = gs.Variable(names.fresh(f"{q.name}_rows{lo}"), dtype=q.dtype, shape=[qs[0], qs[1], hi - lo, qs[3]])
            new_nodes.append(gs.Node("Slice", name=names.fresh(f"{node.name}_q{c}"), inputs=[
                q, *(gs.Constant(names.fresh(f"{node.name}_q{c}_{w}"), np.array([v], np.int64))
                     for w, v in (("start", lo), ("end", hi), ("axis", 2)))], outputs=[qc]))
            mask = gs.Constant(names.fresh(f"{node.name}_mask{c}"),
                               row_mask(self.spec, range(lo, hi), skv, sq, causal, base).astype(dtype))
            oc = gs.Variable(names.fresh(f"{out.name}_rows{lo}"), dtype=out.dtype,
                             shape=[qs[0], qs[1], hi - lo, (ir.static_shape(out) or qs)[3]])
            new_nodes.append(gs.Node("Attention", name=names.fresh(f"{node.name}_chunk{c}"), attrs=dict(attrs),
                                     inputs=[qc, k, node.inputs[2], mask], outputs=[oc]))
            pieces.append(oc)
        node.inputs.clear()
        node.outputs.clear()
        new_nodes.append(gs.Node("Concat", name=names.fresh(f"{node.name}_rows"), attrs={"axis": 2},
                                 inputs=pieces, outputs=[out]))
        graph.nodes.extend(new_nodes)
        return None
