"""The cache and its attentions in a past/present decoder: which graph inputs/outputs form *cache pairs*
(``present = Concat(past, new, axis=2)``), the decoder's roles (ids, positions, mask), and the attention site
each pair feeds, matched as exporters write it:
    K' = repeat_kv(present_k)            Unsqueeze(2)→Expand→Reshape, Gather(axis 1, repeat(arange)), or none
    s  = MatMul(Q·c_q, Transpose(K')·c_k) · c_s      (the scalars c may sit on either side, as Mul or Div)
    s  = s + M  |  Where(C, s, f)        M or (C, f) a mask built at run time (judged by ``cache_masks``);
                                         several (GPT-Neo) are judged as one, scalars may follow (CodeGen)
    p  = Softmax(s, axis=-1) [→ Where(IsNaN(p), 0, p)] [Cast]
    y  = MatMul(p, repeat_kv(present_v))
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import AttentionSinksFound, LmcError
from lmc.passes.cross_attention import is_fixed_input
from lmc.passes.fuse.attention import probabilities

log = logging.getLogger(__name__)
SINKS = "attention sinks"        # the reason a sink attention gives (find_sites raises AttentionSinksFound)

MASKED = -1e4            # an additive mask entry at or below this removes the key (softmax weight 0)
CROSS_STATE = "reads fixed cross-attention state"      # _to_cache: an operand that is not cache but fixed state


@dataclass
class CachePair:
    past: gs.Variable
    present: gs.Variable
    concat: gs.Node
    new: gs.Tensor


@dataclass
class AttentionSite:
    q: gs.Tensor
    key: CachePair
    value: CachePair
    scale: float
    out: gs.Tensor
    mask: gs.Tensor          # additive mask, or the boolean condition of a Where
    mask_kind: str           # "additive" | "keep-where-true" | "keep-where-false"
    nodes: list[gs.Node] = field(default_factory=list)
    masks: list[tuple[gs.Tensor, str]] = field(default_factory=list)   # the parts of a combined mask


@dataclass(frozen=True)
class Roles:
    """The decoder's interface: which graph inputs are ids, positions, mask."""

    input_ids: str
    position_ids: str | None
    attention_mask: str | None
    fixed: tuple[str, ...] = ()      # inputs the same at every step: an encoder–decoder's cross state


def _drop_output_casts(graph: gs.Graph) -> None:
    """``present = Cast(Concat(past, new))`` with a Cast to the type it already has (GPT-J, CodeGen, GPT-Neo
    write one on the key): the Concat writes ``present`` itself and the Cast goes — it changes nothing."""
    inputs = {t.name for t in graph.inputs}
    for out in graph.outputs:
        cast = ir.producer(out)
        if cast is None or not ir.is_op(cast, "Cast") or out.dtype is None:
            continue
        inner = cast.inputs[0]
        concat = ir.producer(inner)
        if concat is None or not ir.is_op(concat, "Concat") or len(concat.inputs) != 2 or \
                concat.inputs[0].name not in inputs or inner in graph.outputs:
            continue
        past = concat.inputs[0].dtype            # a Concat's type is its inputs'
        if past is None or np.dtype(past) != np.dtype(out.dtype) or \
                int(cast.attrs.get("to", -1)) != ir.onnx_dtype(np.dtype(past)):
            continue
        for reader in list(inner.outputs):
            if reader is not cast:
                reader.inputs[list(reader.inputs).index(inner)] = out
        cast.inputs.clear()
        cast.outputs.clear()
        graph.nodes.remove(cast)
        concat.outputs[0] = out


def find_cache_pairs(graph: gs.Graph) -> list[CachePair]:
    """Graph outputs written as Concat(graph input, new, axis=2 | -2) of 4-D tensors (a same-type Cast after
    the Concat is dropped first: ``_drop_output_casts``)."""
    _drop_output_casts(graph)
    inputs = {t.name for t in graph.inputs}
    pairs = []
    for out in graph.outputs:
        node = ir.producer(out)
        if node is None or not ir.is_op(node, "Concat") or len(node.inputs) != 2:
            continue
        past = node.inputs[0]
        rank = len(past.shape) if past.shape is not None else 0
        if past.name in inputs and rank == 4 and int(node.attrs.get("axis", 0)) % 4 == 2:
            pairs.append(CachePair(past, out, node, node.inputs[1]))
    return pairs


# In-place state writers: op -> {input index: output index} of buffers updated in place.
STATE_WRITERS = {("TensorScatter", ""): {0: 0}, ("ScatterND", ""): {0: 0},
                 ("GroupQueryAttention", ir.MS_DOMAIN): {3: 1, 4: 2}}


def state_pairs(graph: gs.Graph) -> list[tuple[str, str]]:
    """(graph input, graph output) pairs a node updates in place: the generation bundle's state."""
    inputs, outputs = {t.name for t in graph.inputs}, ir.graph_outputs(graph)
    pairs = []
    for node in graph.nodes:
        for i, o in STATE_WRITERS.get((node.op, node.domain or ""), {}).items():
            if len(node.inputs) > i and node.inputs[i].name in inputs and node.outputs[o].name in outputs:
                pairs.append((node.inputs[i].name, node.outputs[o].name))
    return sorted(pairs)


def find_roles(graph: gs.Graph) -> Roles:
    def named(*keys: str) -> str | None:
        for t in graph.inputs:
            if any(k in t.name for k in keys) and not is_fixed_input(t.name):
                return t.name
        return None
    ids = named("input_ids")
    if ids is None:
        raise LmcError("--context: the model has cache inputs but no 'input_ids' input")
    return Roles(ids, named("position_ids"), named("attention_mask"),
                 tuple(t.name for t in graph.inputs if is_fixed_input(t.name)))


def _scalar_factor(node: gs.Node, t: gs.Tensor) -> float | None:
    """For Mul/Div of ``t`` by a scalar constant: the factor it applies to ``t``."""
    if ir.is_op(node, "Mul"):
        other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
        return ir.scalar_value(other)
    if ir.is_op(node, "Div") and node.inputs[0] is t:
        c = ir.scalar_value(node.inputs[1])
        return None if not c else 1.0 / c
    return None


def _through_scalars(t: gs.Tensor) -> tuple[gs.Tensor, float, list[gs.Node]]:
    """Walk back through Mul/Div by scalar constants and same-type Casts."""
    scale, nodes = 1.0, []
    while True:
        node = ir.producer(t)
        if node is None:
            return t, scale, nodes
        if ir.is_op(node, ("Mul", "Div")):
            for x in node.inputs:
                if ir.const_value(x) is None:
                    c = _scalar_factor(node, x)
                    break
            else:
                c = None
            if c is None:
                return t, scale, nodes
            scale *= c
            nodes.append(node)
            t = next(x for x in node.inputs if ir.const_value(x) is None)
        elif ir.is_op(node, "Cast") and node.inputs[0].dtype == t.dtype and t.dtype is not None:
            nodes.append(node)
            t = node.inputs[0]
        else:
            return t, scale, nodes


def _to_cache(t: gs.Tensor, presents: dict[str, CachePair]) -> tuple[CachePair, int, float, list[gs.Node]] | str:
    """Walk from an attention operand back to a cache ``present``: (pair, transposes of the last two axes,
    scalar factor, nodes) or the reason it is not one."""
    transposes, scale, nodes = 0, 1.0, []
    for _ in range(12):
        if t.name in presents:
            return presents[t.name], transposes, scale, nodes
        node = ir.producer(t)
        if node is None and is_fixed_input(t.name):
            return CROSS_STATE
        if node is None:
            return f"'{t.name}' does not come from a cache present"
        if ir.is_op(node, "Transpose"):
            if list(node.attrs.get("perm", [])) not in ([0, 1, 3, 2], [0, 2, 1]):
                return f"transpose {list(node.attrs.get('perm', []))} is not a swap of the last two axes"
            transposes += 1
        elif ir.is_op(node, ("Mul", "Div")):
            src = next((x for x in node.inputs if ir.const_value(x) is None), None)
            c = _scalar_factor(node, src) if src is not None else None
            if c is None:
                return f"{node.op} '{node.name}' is not a scalar scale"
            scale *= c
            t = src
            nodes.append(node)
            continue
        elif _head_fold(node):           # heads folded into the batch: the site unfolds q and the output
            pass
        elif ir.is_op(node, "Reshape") and _folded_transpose(node) is not None:
            inner, y = _folded_transpose(node)
            nodes += [node, inner]
            transposes += 1
            t = y
            continue
        elif ir.is_op(node, "Reshape"):
            inner = ir.producer(node.inputs[0])
            expand = inner if inner is not None and ir.is_op(inner, "Expand") else None
            unsq = ir.producer(expand.inputs[0]) if expand is not None else None
            axes = _axes(unsq) if unsq is not None and ir.is_op(unsq, "Unsqueeze") else None
            if axes != [2]:
                return "a Reshape that is not repeat_kv (Unsqueeze(2) → Expand → Reshape)"
            nodes += [node, expand]
            t = unsq.inputs[0]
            node = unsq
        elif ir.is_op(node, "Gather") and int(node.attrs.get("axis", 0)) == 1:
            idx = ir.const_value(node.inputs[1])
            if idx is None or idx.ndim != 1 or idx.size == 0 or idx[0] != 0 or np.any(np.diff(idx) < 0):
                return "a head Gather that is not repeat_kv"
            r = int(np.sum(idx == 0))
            if not np.array_equal(idx, np.repeat(np.arange(idx.size // r), r)):
                return "a head Gather that is not repeat_kv"
        elif ir.is_op(node, "Cast") and node.inputs[0].dtype == t.dtype:
            pass
        else:
            return f"{node.op} '{node.name}' between the cache and the attention"
        nodes.append(node)
        t = node.inputs[0]
    return "too long a chain between the cache and the attention"


def _head_fold(node: gs.Node, fold: bool = True) -> bool:
    """A Reshape folding heads into the batch, [B, H, T, D] → [B·H, T, D] (``fold``), or back (Bloom,
    XGLM write attention as 3-D batched MatMuls so): static shapes, the other dims unchanged."""
    if not ir.is_op(node, "Reshape"):
        return False
    x, y = node.inputs[0].shape, node.outputs[0].shape
    if fold and (y is None or len(y) != 3 or not isinstance(y[0], int)):    # the target, if the shape is unknown
        y = ir.const_value(node.inputs[1])
        y = None if y is None or int(node.attrs.get("allowzero", 0)) == 0 and 0 in y.tolist() else \
            [int(d) for d in y.reshape(-1)]
    four, three = (x, y) if fold else (y, x)
    known = lambda *ds: all(isinstance(d, int) and d >= 0 for d in ds)  # noqa: E731  (a length may be free)
    return (four is not None and three is not None and len(four) == 4 and len(three) == 3
            and known(four[0], four[1], three[0]) and three[0] == four[0] * four[1]
            and all(not known(a, b) or a == b for a, b in zip(four[2:], three[1:]))
            and sum(known(d) for d in (*four[2:], *three[1:])) >= 2)


def _folded_transpose(node: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """For Reshape(Transpose₀₂₁(Reshape(y [B, H, T, D] → [B·H, T, D])) → [B, H, D, T]) — the last two axes of
    y swapped through 3-D, as the dynamo exporter writes kᵀ: (the transpose, y)."""
    tr = ir.producer(node.inputs[0])
    if tr is None or not ir.is_op(tr, "Transpose") or list(tr.attrs.get("perm", [])) != [0, 2, 1]:
        return None
    flat = ir.producer(tr.inputs[0])
    if flat is None or not ir.is_op(flat, "Reshape"):
        return None
    y, mid, out = flat.inputs[0].shape, flat.outputs[0].shape, node.outputs[0].shape
    if y is None or mid is None or out is None or (len(y), len(mid), len(out)) != (4, 3, 4):
        return None
    fixed = lambda d: isinstance(d, int) and d >= 0  # noqa: E731  (the key length may still be free)
    if not all(fixed(d) for d in (y[0], y[1], y[3], out[0], out[1], out[2], mid[2])) or \
            (out[0], out[1], out[2], mid[2]) != (y[0], y[1], y[3], y[3]) or (fixed(mid[0]) and mid[0] != y[0] * y[1]):
        return None
    return tr, flat.inputs[0]


def _axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    v = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if v is None else [int(a) for a in v.reshape(-1)]


def _reaches_scores(t: gs.Tensor, depth: int = 6) -> bool:
    """Whether ``t`` is the scores: a MatMul, through scalar scales, masks added or applied by Where."""
    t, _, _ = _through_scalars(t)
    node = ir.producer(t)
    if node is None or depth == 0:
        return False
    if ir.is_op(node, "MatMul"):
        return True
    if _head_fold(node) or _head_fold(node, fold=False) or _clamp(node):
        return _reaches_scores(node.inputs[0], depth - 1)
    if ir.is_op(node, "Add"):
        return any(_reaches_scores(x, depth - 1) for x in node.inputs)
    if ir.is_op(node, "Where"):
        return any(_reaches_scores(x, depth - 1) for x in node.inputs[1:])
    return False


def _clamp(node: gs.Node) -> bool:
    """Max(x, c) with c ≤ MASKED (XGLM, Bloom clamp masked scores at finfo.min): changes masked entries only."""
    if not ir.is_op(node, "Max") or len(node.inputs) != 2:
        return False
    c = ir.scalar_value(node.inputs[1])
    return c is not None and c <= MASKED


def _peel_masks(s: gs.Tensor):
    """From the softmax input back to the scores MatMul: the masks on the way — (tensor, kind) with kind
    "additive" (Add), "keep-where-true"/"keep-where-false" (Where with a fill ≤ MASKED) — their nodes, the
    product of the scalar scales on the way (before or after a mask: CodeGen divides the masked scores), the
    scale nodes, and the tensor reached (the scores, if a MatMul)."""
    masks, mask_nodes, scale, scale_nodes = [], [], 1.0, []
    for _ in range(8):
        s, c, nodes = _through_scalars(s)
        scale *= c
        scale_nodes += nodes
        node = ir.producer(s)
        if node is None or ir.is_op(node, "MatMul"):
            break
        if _head_fold(node) or _head_fold(node, fold=False) or _clamp(node):
            scale_nodes.append(node)              # heads folded/unfolded around the mask, masked entries clamped
            s = node.inputs[0]
            continue
        if ir.is_op(node, "Add"):
            sides = [i for i in (0, 1) if _reaches_scores(node.inputs[i])]
            if len(sides) != 1:
                break
            masks.append((node.inputs[1 - sides[0]], "additive"))
            s = node.inputs[sides[0]]
        elif ir.is_op(node, "Where"):
            for i, keep in ((1, "keep-where-true"), (2, "keep-where-false")):
                fill = ir.scalar_value(node.inputs[3 - i])
                if fill is not None and fill <= MASKED and _reaches_scores(node.inputs[i]):
                    masks.append((node.inputs[0], keep))
                    s = node.inputs[i]
                    break
            else:
                break
        else:
            break
        mask_nodes.append(node)
    return masks, mask_nodes, scale, scale_nodes, s


def _combined_mask(graph: gs.Graph, masks: list[tuple[gs.Tensor, str]], base: str) -> gs.Tensor:
    """One additive mask for an attention with several (GPT-Neo: a causal table applied by Where, then the
    padding mask added): the additive masks summed, each Where's condition as 0 where kept and −inf where
    not. Additive, so the mask checks still see any bias an additive one carries (ALiBi) and refuse it.
    Made once per graph (the nodes are appended; nothing reads them but the mask checks)."""
    parts = ",".join(f"{t.name}:{kind}" for t, kind in masks)
    name = f"{base}_lmc_mask_{hashlib.sha1(parts.encode()).hexdigest()[:8]}"   # a new one if a part changes
    found = graph.tensors().get(name)
    if found is not None:
        return found
    dtype = next((np.dtype(t.dtype) for t, kind in masks if kind == "additive" and t.dtype is not None),
                 np.dtype(np.float32))
    zero, removed = np.array(0, dtype), np.array(-np.inf, dtype)
    nodes, terms = [], []
    for k, (t, kind) in enumerate(masks):
        if kind == "additive":
            terms.append(t)
            continue
        flag = gs.Variable(f"{name}_{k}_bool", dtype=np.bool_)
        term = gs.Variable(f"{name}_{k}", dtype=dtype)
        kept, dropped = (zero, removed) if kind == "keep-where-true" else (removed, zero)
        nodes += [gs.Node("Cast", name=flag.name, inputs=[t], outputs=[flag], attrs={"to": 9}),
                  gs.Node("Where", name=term.name, inputs=[flag, gs.Constant(term.name + "_kept", kept),
                                                           gs.Constant(term.name + "_dropped", dropped)],
                          outputs=[term])]
        terms.append(term)
    total = terms[0]
    for k, other in enumerate(terms[1:]):
        both = gs.Variable(name if k == len(terms) - 2 else f"{name}_sum{k}", dtype=dtype)
        nodes.append(gs.Node("Add", name=both.name, inputs=[total, other], outputs=[both]))
        total = both
    graph.nodes.extend(nodes)
    return total


def _sink_column(t: gs.Tensor) -> bool:
    """gpt-oss: p = Slice(Softmax(Concat([scores, sinks], −1) [− max]))[..., :−1] — a softmax over the keys
    and one learned logit per head, whose column is dropped."""
    node = ir.producer(t)
    if node is None or not ir.is_op(node, "Slice"):
        return False
    found = probabilities(node.inputs[0])
    x = found[0].inputs[0] if found is not None else None
    for _ in range(3):
        inner = ir.producer(x) if x is not None else None
        if inner is None:
            return False
        if ir.is_op(inner, "Concat") and int(inner.attrs.get("axis", 0)) in (-1, 3):
            return True
        x = inner.inputs[0] if ir.is_op(inner, ("Sub", "Cast")) else None
    return False


def match_site(anchor: gs.Node, presents: dict[str, CachePair], graph: gs.Graph | None = None
               ) -> AttentionSite | str | None:
    """The attention ending at MatMul ``anchor`` (None: not an attention output; str: why not rewritable).
    With ``graph``, several masks on the scores become one additive mask appended to it (``_combined_mask``)."""
    if not ir.is_op(anchor, "MatMul"):
        return None
    found = probabilities(anchor.inputs[0])
    if found is None:
        return SINKS + " (a learned logit column concatenated before the softmax, dropped after it)" \
            if _sink_column(anchor.inputs[0]) else None
    softmax, prob_nodes = found
    if int(softmax.attrs.get("axis", -1)) not in (-1, 3):
        return "softmax is not over the key axis"
    value = _to_cache(anchor.inputs[1], presents)
    if value == CROSS_STATE:         # cross-attention over an encoder–decoder's fixed state: not a cache site
        return None
    if isinstance(value, str):
        return f"values: {value}"
    v_pair, v_transposes, v_scale, v_nodes = value
    if v_transposes or v_scale != 1.0:
        return "values are transposed or scaled"
    masks, mask_nodes, s_scale, s_nodes, scores = _peel_masks(softmax.inputs[0])
    if not masks:
        return "the scores carry no mask (a causal mask is required)"
    if s_scale <= 0:
        return "the scores are scaled by a negative factor"
    if len(masks) == 1:
        mask, kind = masks[0]
    elif graph is None:
        return "the scores carry several masks"
    else:
        mask, kind = _combined_mask(graph, masks, mask_nodes[0].name), "additive"
    qk = ir.producer(scores)
    if qk is None or not ir.is_op(qk, "MatMul"):
        return "scores are not a MatMul of queries and keys"
    q, q_scale, q_nodes = _through_scalars(qk.inputs[0])
    key = _to_cache(qk.inputs[1], presents)
    if isinstance(key, str):
        return f"keys: {key}"
    k_pair, k_transposes, k_scale, k_nodes = key
    if k_transposes != 1:
        return "keys are not transposed once"
    out = anchor.outputs[0]
    folded = [n for n in k_nodes + v_nodes if _head_fold(n)]
    if folded:                         # 3-D attention over heads folded into the batch: q and y unfolded
        fold = ir.producer(q)
        unfold = out.outputs[0] if len(out.outputs) == 1 else None
        if fold is None or not _head_fold(fold) or unfold is None or not _head_fold(unfold, fold=False) or \
                len(folded) != 2:
            return "heads are folded into the batch but the queries or the output are not"
        q, more, more_nodes = _through_scalars(fold.inputs[0])
        q_scale *= more
        q_nodes += [fold] + more_nodes
        prob_nodes = prob_nodes + [unfold]
        out = unfold.outputs[0]
    nodes = [anchor, softmax, qk] + prob_nodes + mask_nodes + s_nodes + q_nodes + k_nodes + v_nodes
    return AttentionSite(q, k_pair, v_pair, q_scale * k_scale * s_scale, out, mask, kind, nodes,
                         masks if len(masks) > 1 else [])


def find_sites(graph: gs.Graph, pairs: list[CachePair]) -> list[AttentionSite]:
    """One attention per layer, reading one key pair and one value pair; LmcError naming the first cache
    output no recognised attention reads (with the first reason a candidate was refused)."""
    presents = {p.present.name: p for p in pairs}
    sites, reasons = [], []
    for node in list(graph.nodes):
        site = match_site(node, presents, graph)
        if isinstance(site, AttentionSite):
            sites.append(site)
        elif isinstance(site, str):
            reasons.append(site)
    used = [id(s.key) for s in sites] + [id(s.value) for s in sites]
    missing = [p.present.name for p in pairs if id(p) not in used]
    if missing or len(set(used)) != len(used):
        why = f" ({reasons[0]})" if reasons else ""
        error = AttentionSinksFound if any(r.startswith(SINKS) for r in reasons) else LmcError
        raise error(f"--context: no attention recognised for cache output '{missing[0] if missing else '?'}'"
                       f"{why}")
    return sites

