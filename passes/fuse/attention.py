"""Scaled-dot-product attention → ONNX ``Attention`` (opset 23), with GQA and causal masking.

Pattern (anchor: the second MatMul), on 4-D [B, H, S, Dh] tensors as exporters write them:
    K' = K | Gather(K, [0..0, 1..1, …], axis=1)          (GQA: kv heads repeated r times)
    s  = MatMul(Q, Transpose(K', perm=[0,1,3,2]))
    s  = s · c | s / c | s                                (scale; absent → 1)
    s  = s + M | Where(C, s, f) | s                       (M, C, f constants)
    y  = MatMul(Softmax(s, axis=-1), V')                  (V' like K')
Rewrite: y = Attention(Q, K, V[, mask], scale=…, is_causal=…). A mask that is exactly causal (0 / ≤ −1e30
below/above the diagonal, or a lower-triangular boolean with a fill ≤ −1e30) with Sq = Skv becomes
``is_causal=1``; any other constant mask is passed as an additive float ``attn_mask``. A run-time mask
(an ``attention_mask`` input) is recognised but not fused: onnxruntime's kernel maps −inf to the lowest
float, so fully masked rows would differ from the original. Exact up to
float reassociation (masked scores contribute exactly 0 either way). The kernel's S×S score matrix is
accounted for as scratch by the memory plan (``lmc.compiler.scratch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext
from lmc.core.runtime import session
from lmc.passes.fuse.rule import Match, OpRef, Reject, produced_by, replace_subgraph

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


def _runtime_mask(t: gs.Tensor, sq: int, skv: int) -> bool:
    """True when ``t`` is a non-constant rank-4 float tensor that broadcasts to [B, H, Sq, Skv]."""
    shape = ir.static_shape(t)
    return (not isinstance(t, gs.Constant) and shape is not None and len(shape) == 4
            and shape[2] in (1, sq) and shape[3] == skv)


def _leads_to_scores(t: gs.Tensor, depth: int = 4) -> bool:
    """True when ``t`` comes from a MatMul through at most ``depth`` Where/Mul/Div steps."""
    node = ir.producer(t)
    if node is None or depth == 0:
        return False
    if ir.is_op(node, "MatMul"):
        return True
    if ir.is_op(node, "Where"):
        return _leads_to_scores(node.inputs[1], depth - 1)
    if ir.is_op(node, ("Mul", "Div")):
        return any(ir.const_value(i) is None and _leads_to_scores(i, depth - 1) for i in node.inputs)
    return False


def probabilities(t: gs.Tensor) -> tuple[gs.Node, list[gs.Node]] | None:
    """The Softmax behind an attention's probabilities, through Where(IsNaN(p), 0, p) and Casts."""
    nodes = []
    for _ in range(4):
        node = ir.producer(t)
        if node is None:
            return None
        if ir.is_op(node, "Softmax"):
            return node, nodes
        if ir.is_op(node, "Cast"):
            t = node.inputs[0]
        elif ir.is_op(node, "Where"):
            isnan = ir.producer(node.inputs[0])
            if isnan is None or not ir.is_op(isnan, "IsNaN") or ir.scalar_value(node.inputs[1]) != 0.0:
                return None
            t = node.inputs[2]
            if isnan.inputs[0] is not t:
                return None
            nodes.append(isnan)
        else:
            return None
        nodes.append(node)
    return None



@dataclass
class MaskMatch:
    """How the scores are masked: ``additive`` is the constant additive mask equal to the constant part
    (None when there is none), ``causal`` says it is exactly the causal mask, ``runtime`` a non-constant
    additive mask tensor added on top."""

    scores: gs.Tensor
    additive: np.ndarray | None = None
    causal: bool = False
    runtime: gs.Tensor | None = None
    nodes: list[gs.Node] = field(default_factory=list)


def constant_value(graph: gs.Graph, t: gs.Tensor, cache: dict | None = None) -> np.ndarray | None:
    """The value of ``t`` when it is a constant, or computed from constants alone (a mask the fold size
    policy left as run-time ops, e.g. a causal mask of a long sequence): evaluated here, never stored."""
    value = ir.const_value(t)
    if value is not None or isinstance(t, gs.Constant) or ir.producer(t) is None:
        return value
    if cache is not None and t.name in cache:
        return cache[t.name]
    nodes, leaves = ir.cone([t], graph)
    value = None
    if not leaves and not any(ir.has_subgraph(n) or n.op.startswith("Random") for n in nodes):
        try:
            value = np.asarray(session(ir.cone_model(graph, [t], inputs=[]), optimize=False).run(None, {})[0])
        except Exception:  # onnxruntime's own errors: the mask stays unknown, the rule says why
            value = None
    if cache is not None:
        cache[t.name] = value
    return value


def _mask(graph: gs.Graph, s: gs.Tensor, sq: int, skv: int, cache: dict | None = None) -> MaskMatch | None:
    """Match the masking of the scores ``s`` (None when a constant mask does not broadcast).

    A run-time additive mask (e.g. built from an ``attention_mask`` input) over a constant mask M becomes
    attn_mask = M + runtime, which reproduces the original exactly: where the original replaced a score
    by the fill f (Where form), w + f == f in float since |w| ≪ ulp(f) for f ≤ −1e30."""
    node = ir.producer(s)
    value = lambda t: constant_value(graph, t, cache)  # noqa: E731
    if node is not None and ir.is_op(node, "Add") and all(value(t) is None for t in node.inputs):
        for i in (0, 1):
            if (_runtime_mask(node.inputs[i], sq, skv) and _leads_to_scores(node.inputs[1 - i])
                    and not _leads_to_scores(node.inputs[i]) and len(node.outputs[0].outputs) == 1):
                inner = _mask(graph, node.inputs[1 - i], sq, skv, cache)
                if inner is None or inner.runtime is not None:
                    return None
                return MaskMatch(inner.scores, inner.additive, False, node.inputs[i], inner.nodes + [node])
        return MaskMatch(s)
    if node is not None and ir.is_op(node, "Add"):
        for i in (0, 1):
            m = value(node.inputs[i])
            if m is None:
                continue
            m = np.asarray(m, dtype=np.float32)
            try:
                full = np.broadcast_to(m, m.shape[:-2] + (sq, skv)) if m.ndim >= 2 else np.broadcast_to(m, (sq, skv))
            except ValueError:
                return None
            causal = False
            if sq == skv:             # every leading (batch, head) slice the same causal bias
                above = _causal_bias(sq, skv)
                flat = full.reshape(-1, sq, skv)
                causal = bool(np.all(flat[:, ~above] == 0) and np.all(flat[:, above] <= MASKED))
            return MaskMatch(node.inputs[1 - i], np.ascontiguousarray(full), causal, None, [node])
    if node is not None and ir.is_op(node, "Where"):
        cond = value(node.inputs[0])
        for kept, filled, keep_when in ((1, 2, True), (2, 1, False)):    # Where(c, s, f) or Where(c, f, s)
            fill_value = value(node.inputs[filled])
            fill = float(fill_value.reshape(())) if fill_value is not None and fill_value.size == 1 else None
            if cond is None or fill is None or value(node.inputs[kept]) is not None:
                continue
            keep = np.asarray(cond, dtype=bool) if keep_when else ~np.asarray(cond, dtype=bool)
            try:
                keep = np.broadcast_to(keep, keep.shape[:-2] + (sq, skv) if keep.ndim >= 2 else (sq, skv))
            except ValueError:
                return None
            flat = keep.reshape(-1, sq, skv)
            causal = sq == skv and fill <= MASKED and all(np.array_equal(c, ~_causal_bias(sq, skv)) for c in flat)
            additive = np.where(keep, 0.0, fill).astype(np.float32)
            return MaskMatch(node.inputs[kept], additive, causal, None, [node])
    return MaskMatch(s)


def _stored(masking: MaskMatch) -> bool:
    """The mask is already a stored constant (fusing adds nothing to the weights)."""
    node = masking.nodes[0] if masking.nodes else None
    return node is not None and any(isinstance(t, gs.Constant) and t.size == masking.additive.size
                                    for t in node.inputs)


class AttentionRule:
    name = "attention"
    report_each = True          # the report says, per layer, what was recognised or why not

    def __init__(self):
        self.values: dict[str, np.ndarray | None] = {}     # masks evaluated from constants, by tensor

    def match(self, graph: gs.Graph, anchor: gs.Node, ctx: PassContext) -> Match | Reject | None:
        if not ir.is_op(anchor, "MatMul"):
            return None
        found = probabilities(anchor.inputs[0])        # Softmax [→ Where(IsNaN(p), 0, p)] [→ Cast]
        if found is None:
            return None
        softmax, fixups = found
        out = anchor.outputs[0]
        v, v_gather = _unrepeat(anchor.inputs[1])
        shapes = [ir.static_shape(t) for t in (softmax.inputs[0], v, out)]
        if any(sh is None or len(sh) != 4 for sh in shapes):
            return Reject("attention tensors are not 4-D with static shapes")
        b, h, sq, skv = shapes[0]
        axis = int(softmax.attrs.get("axis", -1))
        if axis not in (-1, 3):
            return Reject("softmax is not over the key axis")
        masking = _mask(graph, softmax.inputs[0], sq, skv, self.values)
        if masking is None:
            return Reject("mask does not broadcast to the score shape")
        if masking.runtime is not None:
            # onnxruntime's kernel treats −inf in attn_mask like the lowest float, so a query row whose
            # every key is masked (a padded position) would come out different: not exact, not fused.
            return Reject("run-time attention mask: fully masked rows would differ under the fused kernel")
        scores, mask_nodes = masking.scores, masking.nodes
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
        perm = list(kt.attrs.get("perm", [])) if kt is not None else []
        if perm not in ([0, 1, 3, 2], [0, 2, 3, 1]):
            return Reject("keys are not transposed with perm [0, 1, 3, 2] (or [0, 2, 3, 1] from [B, S, H, D])")
        q = qk.inputs[0]
        # [0, 2, 3, 1]: the exporter merged the heads transpose of [B, S, H, D] keys into kᵀ's
        k, k_gather = _unrepeat(kt.inputs[0]) if perm == [0, 1, 3, 2] else (kt.inputs[0], None)
        qs, ks = ir.static_shape(q), ir.static_shape(k)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
            return Reject("queries/keys are not 4-D")
        if perm == [0, 2, 3, 1]:
            ks = (ks[0], ks[2], ks[1], ks[3])
        if qs[1] % ks[1] or v.shape[1] != ks[1]:
            return Reject("query heads are not a multiple of key/value heads")
        vs = ir.static_shape(v)
        if vs is None or len(vs) != 4 or vs[0] != qs[0] or vs[2] != ks[2] or qs[0] != ks[0] or qs[3] != ks[3]:
            return Reject("q, k, v do not agree on batch, key length and head size ([B, H, S, D] each)")
        # a row of a causal or constant mask always keeps a key: the NaN guard is the identity there
        nodes = [anchor, softmax] + fixups + mask_nodes + scale_nodes + [qk, kt]
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

        if masking.additive is not None and not masking.causal:
            limit = ctx.target.memory.fold_max_bytes if ctx is not None and ctx.target is not None else None
            if limit is not None and masking.additive.nbytes > limit and not _stored(masking):
                return Reject(f"a {masking.additive.nbytes}-byte mask that is not causal would have to be stored "
                              f"(over the target's fold_max_bytes {limit})")

        def apply(names: ir.Namer) -> None:
            keys, extra = k, []
            if perm == [0, 2, 3, 1]:
                bshd = ir.static_shape(k)
                keys = gs.Variable(names.fresh(k.name + "_heads"), dtype=k.dtype,
                                   shape=[bshd[0], bshd[2], bshd[1], bshd[3]])
                extra = [gs.Node("Transpose", name=names.fresh(k.name + "_heads"), attrs={"perm": [0, 2, 1, 3]},
                                 inputs=[k], outputs=[keys])]
            inputs = [q, keys, v]
            causal = masking.causal
            if masking.additive is not None and not causal:
                inputs.append(gs.Constant(names.fresh(out.name + "_attn_mask"), masking.additive.astype(dtype)))
            attrs = {"scale": float(scale), "is_causal": int(causal)}
            replace_subgraph(graph, nodes, lambda: extra + [
                gs.Node("Attention", name=names.fresh(anchor.name + "_attention"), attrs=attrs,
                        inputs=inputs, outputs=[out])])
        what = ("causal mask" if masking.causal else "constant additive mask" if masking.additive is not None
                else "no mask")
        if masking.additive is not None and not any(isinstance(t, gs.Constant) for n in mask_nodes for t in n.inputs
                                                   if ir.const_value(t) is not None and ir.const_value(t).size > 1):
            what += " (evaluated from its constant inputs, not stored)"
        groups = f", {qs[1]} query heads on {ks[1]} kv heads" if qs[1] != ks[1] else ""
        return Match(nodes, ATTENTION, apply, note=f"{what}, scale {scale:.4g}{groups} → Attention"
                                                   + ("(is_causal=1)" if masking.causal else ""))
