"""Scaled-dot-product attention → ONNX ``Attention`` (opset 23), with GQA and causal masking.

Pattern (anchor: the second MatMul), on 4-D [B, H, S, Dh] tensors as exporters write them:
    K' = K | Gather(K, [0..0, 1..1, …], axis=1)          (GQA: kv heads repeated r times)
    s  = MatMul(Q, Transpose(K', perm=[0,1,3,2]))
    s  = s · c | s / c | s                                (scale; absent → 1)
    s  = s + M | Where(C, s, f) | s                       (M, C, f constants)
    y  = MatMul(Softmax(s, axis=-1), V')                  (V' like K')
Rewrite: y = Attention(Q, K, V[, mask], scale=…, is_causal=…). A mask that is exactly causal (0 / ≤ −1e30
below/above the diagonal, or a lower-triangular boolean with a fill ≤ −1e30) with Sq = Skv becomes
``is_causal=1``; any other constant mask is passed as an additive float ``attn_mask``. Exact up to
float reassociation (masked scores contribute exactly 0 either way). The kernel's S×S score matrix is
accounted for as scratch by the memory plan (``lmc.compiler.scratch``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.pass_manager import PassContext
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph, sole_reader

ATTENTION = OpRef("Attention", "", 23)
MASKED = -1e30


def _unrepeat(t: gs.Tensor) -> tuple[gs.Tensor, gs.Node | None]:
    """(K, gather) when t = Gather(K, repeat(arange(n), r), axis=1); else (t, None)."""
    g = produced_by(t, "Gather")
    if g is None or int(g.attrs.get("axis", 0)) != 1:
        return t, None
    idx = ir.const_value(g.inputs[1])
    src = ir.static_shape(g.inputs[0])
    if idx is None or src is None or len(src) != 4 or idx.ndim != 1:
        return t, None
    n = src[1]
    if idx.size % n or not np.array_equal(idx, np.repeat(np.arange(n), idx.size // n)):
        return t, None
    return g.inputs[0], g


def _causal_bias(sq: int, skv: int) -> np.ndarray:
    return np.triu(np.ones((sq, skv), dtype=bool), k=1 + skv - sq)


def _mask(graph: gs.Graph, s: gs.Tensor, sq: int, skv: int):
    """(scores tensor before masking, additive mask or None, is_causal, nodes) for s = masked scores."""
    node = ir.producer(s)
    if node is not None and ir.is_op(node, "Add"):
        for i in (0, 1):
            m = ir.const_value(node.inputs[i])
            if m is None:
                continue
            m = np.asarray(m, dtype=np.float32)
            try:
                full = np.broadcast_to(m, m.shape[:-2] + (sq, skv)) if m.ndim >= 2 else np.broadcast_to(m, (sq, skv))
            except ValueError:
                return None
            if full.ndim == 2 and sq == skv:
                above = _causal_bias(sq, skv)
                if np.all(full[~above] == 0) and np.all(full[above] <= MASKED):
                    return node.inputs[1 - i], None, True, [node]
            return node.inputs[1 - i], full, False, [node]
    if node is not None and ir.is_op(node, "Where"):
        cond = ir.const_value(node.inputs[0])
        fill = ir.scalar_value(node.inputs[2])
        if cond is not None and fill is not None:
            cond = np.broadcast_to(np.asarray(cond, dtype=bool), np.asarray(cond).shape[:-2] + (sq, skv))
            flat = cond.reshape(-1, sq, skv)
            if sq == skv and fill <= MASKED and all(np.array_equal(c, ~_causal_bias(sq, skv)) for c in flat):
                return node.inputs[1], None, True, [node]
            additive = np.where(cond, 0.0, fill).astype(np.float32)
            return node.inputs[1], additive, False, [node]
    return s, None, False, []


class AttentionRule:
    name = "attention"

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "MatMul"):
            return None
        softmax = produced_by(anchor.inputs[0], "Softmax")
        if softmax is None:
            return None
        out = anchor.outputs[0]
        v, v_gather = _unrepeat(anchor.inputs[1])
        shapes = [ir.static_shape(t) for t in (softmax.inputs[0], v, out)]
        if any(sh is None or len(sh) != 4 for sh in shapes):
            return Reject("attention tensors are not 4-D with static shapes")
        b, h, sq, skv = shapes[0]
        axis = int(softmax.attrs.get("axis", -1))
        if axis not in (-1, 3):
            return Reject("softmax is not over the key axis")
        scores, mask, causal, mask_nodes = _mask(graph, softmax.inputs[0], sq, skv) or (None, None, False, [])
        if scores is None:
            return Reject("mask does not broadcast to the score shape")
        scale, scale_nodes = 1.0, []
        sn = ir.producer(scores)
        if sn is not None and ir.is_op(sn, ("Mul", "Div")):
            idx = 1 if ir.scalar_value(sn.inputs[1]) is not None else 0 if ir.is_op(sn, "Mul") else None
            c = ir.scalar_value(sn.inputs[idx]) if idx is not None else None
            if c is not None and c != 0:
                scale = c if ir.is_op(sn, "Mul") else 1.0 / c
                scale_nodes = [sn]
                scores = sn.inputs[1 - idx]
        qk = produced_by(scores, "MatMul")
        if qk is None:
            return Reject("scores are not a MatMul of queries and keys")
        kt = produced_by(qk.inputs[1], "Transpose")
        if kt is None or list(kt.attrs.get("perm", [])) != [0, 1, 3, 2]:
            return Reject("keys are not transposed with perm [0, 1, 3, 2]")
        q = qk.inputs[0]
        k, k_gather = _unrepeat(kt.inputs[0])
        qs, ks = ir.static_shape(q), ir.static_shape(k)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
            return Reject("queries/keys are not 4-D")
        if qs[1] % ks[1] or v.shape[1] != ks[1]:
            return Reject("query heads are not a multiple of key/value heads")
        nodes = [anchor, softmax] + mask_nodes + scale_nodes + [qk, kt]
        for extra in (k_gather, v_gather):
            if extra is not None and all(r in nodes for r in extra.outputs[0].outputs):
                nodes.append(extra)
        for n in nodes:
            if n is not anchor and any(r not in nodes for r in n.outputs[0].outputs):
                return Reject(f"'{n.outputs[0].name}' is read outside the attention pattern")
            if n is not anchor and n.outputs[0].name in ir.graph_outputs(graph):
                return Reject("an attention intermediate is a graph output")
        if k_gather is not None and k_gather not in nodes:
            k = kt.inputs[0]
        if v_gather is not None and v_gather not in nodes:
            v = anchor.inputs[1]
        dtype = np.dtype(q.dtype) if q.dtype is not None else np.float32

        def apply(names: ir.Namer) -> None:
            inputs = [q, k, v]
            if mask is not None:
                inputs.append(gs.Constant(names.fresh(out.name + "_attn_mask"), mask.astype(dtype)))
            attrs = {"scale": float(scale), "is_causal": int(causal)}
            replace_subgraph(graph, nodes, lambda: [
                gs.Node("Attention", name=names.fresh(anchor.name + "_attention"), attrs=attrs,
                        inputs=inputs, outputs=[out])])
        return Match(nodes, ATTENTION, apply)
