"""Static KV cache: a decoder exported with past/present key-values becomes one whose cache is a fixed-size
state updated in place.

Precondition (as optimum / transformers / torch.onnx export decoders): for every layer a *cache pair* — a
graph input ``past`` [B, Hkv, P, D] and a graph output ``present = Concat(past, new, axis=2)`` — feeding
one scaled-dot-product attention, written in any of the exporters' forms:
    K' = repeat_kv(present_k)            Unsqueeze(2)→Expand→Reshape, Gather(axis 1, repeat(arange)), or none
    s  = MatMul(Q·c_q, Transpose(K')·c_k) · c_s      (the scalars c may sit on either side, as Mul or Div)
    s  = s + M  |  Where(C, s, f)        M or (C, f) a causal mask built at run time from ``attention_mask``
    p  = Softmax(s, axis=-1) [→ Where(IsNaN(p), 0, p)] [Cast]
    y  = MatMul(p, repeat_kv(present_v))
The mask's construction is not matched op by op: its cone is evaluated under onnxruntime for several
(batch, past, sequence) probes with a full ``attention_mask`` and must equal the causal mask
(key j visible from query i iff j ≤ P + i); any exporter's way of building it (Trilu, Range and
comparisons, Where, Expand, −inf or finfo.min) passes.

Rewrite, with N = context (cache slots) and ``position_ids`` [B, S] the absolute positions of the new
tokens (slot = position):
    present_k = TensorScatter(past_k [B, Hkv, N, D], k_new, write_indices = position_ids[:, 0])
    y = Attention(Q, present_k, present_v, attn_mask = (j ≤ position_ids[b, i]),
                  nonpad_kv_seqlen = position_ids[:, -1] + 1, scale = c_q·c_k·c_s)        (opset 24)
Bound to one buffer for ``past`` and ``present``, onnxruntime writes the new rows in place: no step
copies the cache and memory does not grow with the number of tokens. Exact: for a full attention_mask
the original and the rewritten graph compute the same scores over the same keys. The ``attention_mask``
input is dropped (a reader left elsewhere, e.g. positions from its cumulative sum, gets an all-ones mask
of length position_ids[:, -1] + 1); ``Shape`` readers of ``past``/``present`` get the shapes the
original would have seen ([B, Hkv, P, D] / [B, Hkv, P + S, D]).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.errors import LmcError
from lmc.compiler.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.fuse.attention import probabilities

log = logging.getLogger(__name__)

STATE_OPSET = 24
MASKED = -1e4            # an additive mask entry at or below this removes the key (softmax weight 0)


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


@dataclass(frozen=True)
class Roles:
    """The decoder's interface: which graph inputs are ids, positions, mask."""

    input_ids: str
    position_ids: str | None
    attention_mask: str | None


def find_cache_pairs(graph: gs.Graph) -> list[CachePair]:
    """Graph outputs written as Concat(graph input, new, axis=2 | -2) of 4-D tensors."""
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
            if any(k in t.name for k in keys):
                return t.name
        return None
    ids = named("input_ids")
    if ids is None:
        raise LmcError("--context: the model has cache inputs but no 'input_ids' input")
    return Roles(ids, named("position_ids"), named("attention_mask"))


# ------------------------------------------------------------------------------------------ matching
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
        if node is None:
            return f"'{t.name}' does not come from a cache present"
        if ir.is_op(node, "Transpose"):
            if list(node.attrs.get("perm", [])) != [0, 1, 3, 2]:
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


def match_site(anchor: gs.Node, presents: dict[str, CachePair]) -> AttentionSite | str | None:
    """The attention ending at MatMul ``anchor`` (None: not an attention output; str: why not rewritable)."""
    if not ir.is_op(anchor, "MatMul"):
        return None
    found = probabilities(anchor.inputs[0])
    if found is None:
        return None
    softmax, prob_nodes = found
    if int(softmax.attrs.get("axis", -1)) not in (-1, 3):
        return "softmax is not over the key axis"
    value = _to_cache(anchor.inputs[1], presents)
    if isinstance(value, str):
        return f"values: {value}"
    v_pair, v_transposes, v_scale, v_nodes = value
    if v_transposes or v_scale != 1.0:
        return "values are transposed or scaled"
    s = softmax.inputs[0]
    node = ir.producer(s)
    mask, kind, mask_nodes = None, "", []
    if node is not None and ir.is_op(node, "Add"):
        for i in (0, 1):
            inner, _, _ = _through_scalars(node.inputs[i])
            if ir.producer(inner) is not None and ir.is_op(ir.producer(inner), "MatMul"):
                mask, kind, s = node.inputs[1 - i], "additive", node.inputs[i]
                mask_nodes = [node]
                break
    elif node is not None and ir.is_op(node, "Where"):
        for i, keep in ((1, "keep-where-true"), (2, "keep-where-false")):
            inner, _, _ = _through_scalars(node.inputs[i])
            fill = ir.scalar_value(node.inputs[3 - i])
            if ir.producer(inner) is not None and ir.is_op(ir.producer(inner), "MatMul") and fill is not None \
                    and fill <= MASKED:
                mask, kind, s = node.inputs[0], keep, node.inputs[i]
                mask_nodes = [node]
                break
    if mask is None:
        return "the scores carry no mask (a causal mask is required)"
    scores, s_scale, s_nodes = _through_scalars(s)
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
    nodes = [anchor, softmax, qk] + prob_nodes + mask_nodes + s_nodes + q_nodes + k_nodes + v_nodes
    return AttentionSite(q, k_pair, v_pair, q_scale * k_scale * s_scale, anchor.outputs[0], mask, kind, nodes)


def find_sites(graph: gs.Graph, pairs: list[CachePair]) -> list[AttentionSite]:
    """One attention per layer, reading one key pair and one value pair; LmcError naming the first cache
    output no recognised attention reads (with the first reason a candidate was refused)."""
    presents = {p.present.name: p for p in pairs}
    sites, reasons = [], []
    for node in list(graph.nodes):
        site = match_site(node, presents)
        if isinstance(site, AttentionSite):
            sites.append(site)
        elif isinstance(site, str):
            reasons.append(site)
    used = [id(s.key) for s in sites] + [id(s.value) for s in sites]
    missing = [p.present.name for p in pairs if id(p) not in used]
    if missing or len(set(used)) != len(used):
        why = f" ({reasons[0]})" if reasons else ""
        raise LmcError(f"--context: no attention recognised for cache output '{missing[0] if missing else '?'}'"
                       f"{why}")
    return sites


# ------------------------------------------------------------------------------------ mask evaluation
def _cache_shapes(pairs: list[CachePair]) -> list[tuple[gs.Tensor, CachePair, bool]]:
    """Shape readers of the cache tensors: (output, pair, reads the present (past + new) rather than the past)."""
    found = []
    for pair in pairs:
        for tensor, is_present in ((pair.past, False), (pair.present, True)):
            found += [(n.outputs[0], pair, is_present) for n in tensor.outputs
                      if ir.is_op(n, "Shape") and n.outputs]
    return found


def _cone_model(graph: gs.Graph, outputs: list[gs.Tensor], pairs: list[CachePair]) -> onnx.ModelProto:
    """A model computing ``outputs`` from the graph's inputs, whose dims the probes choose. The cache
    tensors' shapes are inputs of their own (fed from the probe's lengths): a mask sliced to a present's
    length would otherwise reach back through every layer to compute it."""
    return ir.cone_model(graph, outputs, free_dims=True, cut=[t for t, _, _ in _cache_shapes(pairs)])


PROBE_WEIGHT_LIMIT = 64 << 20


def _cone_weight_bytes(graph: gs.Graph, outputs: list[gs.Tensor], pairs: list[CachePair]) -> int:
    nodes, _ = ir.cone(outputs, graph, frozenset(t.name for t, _, _ in _cache_shapes(pairs)))
    consts = {id(t): t for n in nodes for t in n.inputs if isinstance(t, gs.Constant)}
    return sum(ir.tensor_nbytes(t) or 0 for t in consts.values())


def _fed(sess, feeds: dict) -> dict:
    """The feeds a probe session takes (a cone reads only some inputs and cache shapes)."""
    wanted = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def _probe_feeds(graph: gs.Graph, roles: Roles, pairs: list[CachePair], b: int, p: int, s: int) -> dict:
    past_names = {pair.past.name for pair in pairs}
    feeds = {}
    for tensor, pair, is_present in _cache_shapes(pairs):
        node = ir.producer(tensor)
        full = np.array([b, int(pair.past.shape[1]), p + s if is_present else p, int(pair.past.shape[3])], np.int64)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        feeds[tensor.name] = full[start:(int(end) if end is not None else None)]
    for t in graph.inputs:
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.float32
        if t.name == roles.input_ids:
            feeds[t.name] = np.zeros((b, s), dtype)
        elif t.name == roles.position_ids:
            feeds[t.name] = np.broadcast_to(np.arange(p, p + s, dtype=dtype), (b, s)).copy()
        elif t.name == roles.attention_mask:
            feeds[t.name] = np.ones((b, p + s), dtype)
        elif t.name in past_names:
            feeds[t.name] = np.zeros((b, int(t.shape[1]), p, int(t.shape[3])), dtype)
        else:
            raise LmcError(f"--context: input '{t.name}' is neither ids, positions, attention mask nor cache; "
                           f"lmc cannot drive it during generation")
    return feeds


PROBE_PAST = (0, 3, 4)
DECODE_PROBE_PAST = 4


def _bound(t: gs.Tensor, axis: int) -> int | None:
    d = t.shape[axis] if t.shape is not None and len(t.shape) > axis else None
    return d if isinstance(d, int) and d >= 0 else None


def _probes(graph: gs.Graph, roles: Roles, pairs: list[CachePair]) -> list[tuple[int, int, int]]:
    """(batch, past, sequence) probes: the graph's bound dims, past lengths 0, 3, 4 where free."""
    ids = next(t for t in graph.inputs if t.name == roles.input_ids)
    past = _bound(pairs[0].past, 2)
    return [(_bound(ids, 0) or 1, p, _bound(ids, 1) or 1) for p in ((past,) if past is not None else PROBE_PAST)]


def position_ranges(graph: gs.Graph, roles: Roles, pairs: list[CachePair]) -> list[gs.Tensor]:
    """Range outputs that compute the new tokens' positions P … P+S−1 from the cache length (exports
    without a ``position_ids`` input, e.g. Gemma's): checked on the probes, to be read from the positions
    instead (their length would otherwise depend on input values)."""
    from lmc.compiler.runtime import session

    pasts = {p.past.name for p in pairs}
    candidates = [n.outputs[0] for n in graph.nodes if ir.is_op(n, "Range") and ir.scalar_value(n.inputs[2]) == 1
                  and ir.cone([n.outputs[0]])[1] & pasts]
    if not candidates:
        return []
    sess = session(_cone_model(graph, candidates, pairs), optimize=False)
    found = list(candidates)
    for b, p, s in _probes(graph, roles, pairs):
        values = sess.run([t.name for t in candidates], _fed(sess, _probe_feeds(graph, roles, pairs, b, p, s)))
        found = [t for t, v in zip(candidates, values) if t in found and np.array_equal(v, np.arange(p, p + s))]
    return found


def check_masks(graph: gs.Graph, roles: Roles, pairs: list[CachePair], sites: list[AttentionSite]) -> None:
    """Evaluate every site's mask on probes (batch, past, sequence) — the graph's bound dims, and past
    lengths 0, 3, 4 where the cache length is free; raise LmcError unless each is the causal mask."""
    from lmc.compiler.runtime import session

    masks = list({id(s.mask): s.mask for s in sites}.values())
    if _cone_weight_bytes(graph, masks, pairs) > PROBE_WEIGHT_LIMIT:
        # the masks read shapes that only running the layers gives (e.g. of repeated keys); the build
        # checked them on fully bound copies, where those shapes fold (``generation.precheck_masks``)
        log.info("mask probes skipped here: their cones hold more than %d bytes of weights", PROBE_WEIGHT_LIMIT)
        return
    sess = session(_cone_model(graph, masks, pairs), optimize=False)
    for b, p, s in _probes(graph, roles, pairs):
        values = sess.run([m.name for m in masks], _fed(sess, _probe_feeds(graph, roles, pairs, b, p, s)))
        allowed = np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None]          # [S, P+S]
        for site_mask, value in zip(masks, values):
            kind = next(x.mask_kind for x in sites if x.mask is site_mask)
            value = np.asarray(value)
            try:
                full = np.broadcast_to(value, value.shape[:-2] + (s, p + s)) if value.ndim >= 2 else None
            except ValueError:
                full = None
            if full is None:
                raise LmcError(f"--context: attention mask '{site_mask.name}' has shape {value.shape}, "
                               f"not [.., {s}, {p + s}] for sequence {s} after {p} cached tokens")
            if kind == "additive":
                keep = full > MASKED
                ok = np.all(full[..., allowed] == 0) and not np.any(keep[..., ~allowed])
            else:
                keep = full.astype(bool) if kind == "keep-where-true" else ~full.astype(bool)
                ok = np.all(keep == allowed)
            if not ok:
                raise LmcError(f"--context: the attention mask '{site_mask.name}' is not causal over the cache "
                               f"(probe: batch {b}, past {p}, sequence {s}); lmc cannot replace it exactly")


# ------------------------------------------------------------------------------------------- rewrite
class StaticKVCache:
    """Rewrite past/present cache pairs into fixed-size, in-place state of ``context`` slots."""

    name = "static-kv-cache"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = False

    def __init__(self, context: int, batch: int = 1, window: int = 0, sinks: int = 0, chunk: int = 1,
                 kv_int8: bool = False):
        self.context = int(context)
        self.kv_int8 = bool(kv_int8)
        self.batch = int(batch)
        self.window, self.sinks = int(window), int(sinks)
        # a ring of sinks + W + (chunk − 1) slots: a prefill chunk never overwrites a key an earlier
        # query of the same chunk still sees; decoding one token at a time needs exactly sinks + W
        ring = self.sinks + self.window + max(1, int(chunk)) - 1
        self.slots = ring if self.window and ring < self.context else self.context

    @property
    def ring(self) -> bool:
        return self.slots < self.context

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        pairs = find_cache_pairs(graph)
        if not pairs:
            raise LmcError("--context: the model has no past/present key-value inputs and outputs "
                           "(a decoder exported with past, e.g. optimum's text-generation-with-past)")
        roles = find_roles(graph)
        sites = find_sites(graph, pairs)
        check_masks(graph, roles, pairs, sites)
        ranges = position_ranges(graph, roles, pairs)
        self._require_opset(graph, ctx)
        names = ir.Namer(graph)
        positions = self._positions(graph, roles, names)
        i64 = np.int64
        def c(name, v):    # an int64 constant (booleans stay boolean)
            v = np.asarray(v)
            return gs.Constant(names.fresh(name), v if v.dtype == np.bool_ else v.astype(i64))
        nodes: list[gs.Node] = []

        def var(name, dtype, shape=None):
            return gs.Variable(names.fresh(name), dtype=dtype, shape=shape)

        def add(op, inputs, out, **attrs):
            nodes.append(gs.Node(op, name=names.fresh(out.name), attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        b = self.batch
        write_at = add("Gather", [positions, c("lmc_first", 0)], var("lmc_write_index", i64, [b]), axis=1)
        last = add("Gather", [positions, c("lmc_last", -1)], var("lmc_last_position", i64, [b]), axis=1)
        total = add("Add", [last, c("lmc_one", 1)], var("lmc_kv_length", i64, [b]))
        qpos = add("Unsqueeze", [positions, c("lmc_axes13", [1, 3])], var("lmc_query_position", i64))
        nonpad = total
        if self.ring:        # the slots are not in position order: the mask alone says what is valid
            mask, indices = self._ring(positions, last, qpos, add, c, var)
            nonpad = gs.Variable.empty()
        else:
            slots = c("lmc_slots", np.arange(self.context))
            mask = add("LessOrEqual", [slots, qpos], var("lmc_attn_mask", np.bool_))
        # Shape readers of past/present see the shapes of the original: [B, Hkv, P, D], [B, Hkv, P+S, D]
        # (row 0's lengths: Shape readers describe one tensor for all rows)
        past_len = add("Slice", [write_at, c("lmc_row0", [0]), c("lmc_row1", [1])], var("lmc_past_length", i64, [1]))
        total_len = add("Slice", [total, c("lmc_row0b", [0]), c("lmc_row1b", [1])], var("lmc_total_length", i64, [1]))
        for site in sites:
            for n in site.nodes:
                n.inputs.clear()
                n.outputs.clear()
            nodes.append(gs.Node("Attention", name=names.fresh(site.out.name + "_attention"),
                                 attrs={"scale": float(site.scale)},
                                 inputs=[site.q, site.key.present, site.value.present, mask, gs.Variable.empty(),
                                         gs.Variable.empty(), nonpad],
                                 outputs=[site.out]))
        for pair in pairs:
            d = pair.past.shape
            heads, depth = int(d[1]), int(d[3])
            pair.past.shape = [b, heads, self.slots, depth]
            pair.concat.inputs.clear()
            pair.concat.outputs.clear()
            for length, tensor in ((past_len, pair.past), (total_len, pair.present)):
                self._redirect_shapes(tensor, length, b, heads, depth, add, c, var)
            def write(past, update, present):
                if self.ring:
                    return add("ScatterND", [past, indices(heads), update], present)
                return add("TensorScatter", [past, update, write_at], present, axis=2, mode="linear")
            if self.kv_int8:
                readable = self._int8_state(graph, pair, heads, depth, write, add, c, var)
                for n in nodes:
                    for i, t in enumerate(n.inputs):
                        if ir.is_op(n, "Attention") and t is pair.present:
                            n.inputs[i] = readable
            else:
                write(pair.past, pair.new, pair.present)
            pair.present.shape = list(pair.past.shape)
        for t in ranges:          # positions P … P+S−1 computed from the cache length: row 0 of the positions
            row = add("Gather", [positions, c("lmc_row_zero", 0)], var(t.name + "_positions", i64, [positions.shape[1]]),
                      axis=0)
            ir.replace_tensor(graph, t, row)
        graph.nodes.extend(nodes)
        if roles.attention_mask is not None:
            self._replace_attention_mask(graph, roles, total, names, c, var)
        ir.topological_sort(graph)
        ir.remove_dead_nodes(graph)
        return PassResult(graph, modified=True, stats={"cache_pairs": len(pairs), "attention_sites": len(sites)},
                          notes=[f"{len(pairs)} cache pairs → fixed state of {self.slots} slots"
                                 + (f" (ring: {self.sinks} sinks + window {self.window})" if self.ring else "")
                                 + f", {len(sites)} attentions → Attention-24"])

    def _ring(self, positions, last, qpos, add, c, var):
        """Ring-buffer masking and write indices (StreamingLLM: ``sinks`` first tokens kept, the rest in a
        ring). Position p lives in slot(p) = p if p < sinks else sinks + (p − sinks) mod r, r = slots − sinks.
        After writing up to position L (= p[:, −1]), ring slot j = sinks + k holds
        p_j = sinks + k + r·⌊(L − sinks − k) / r⌋ (written iff L − sinks − k ≥ 0); sink slot j holds j
        (iff j ≤ L). Query q sees slot j iff written, p_j ≤ q, and (j < sinks or q − p_j < window)."""
        i64, b, r, sinks = np.int64, self.batch, self.slots - self.sinks, self.sinks
        j = np.arange(self.slots)
        last2 = add("Unsqueeze", [last, c("lmc_ax1", [1])], var("lmc_last_2d", i64, [b, 1]))
        num = add("Sub", [last2, c("lmc_ring_offset", sinks + np.maximum(j - sinks, 0))], var("lmc_ring_num", i64))
        written_ring = add("GreaterOrEqual", [num, c("lmc_zero", 0)], var("lmc_ring_written", np.bool_))
        laps = add("Div", [add("Max", [num, c("lmc_zero_b", 0)], var("lmc_ring_num0", i64)), c("lmc_r", r)],
                   var("lmc_ring_laps", i64))
        p_ring = add("Add", [add("Mul", [laps, c("lmc_r_b", r)], var("lmc_ring_base", i64)),
                             c("lmc_ring_first", sinks + np.maximum(j - sinks, 0))], var("lmc_ring_pos", i64))
        is_sink = c("lmc_is_sink", j < sinks)
        written_sink = add("LessOrEqual", [c("lmc_sink_pos", j), last2], var("lmc_sink_written", np.bool_))
        p_slot = add("Where", [is_sink, c("lmc_sink_pos_b", j), p_ring], var("lmc_slot_position", i64))   # [B, R]
        written = add("Or", [add("And", [written_sink, is_sink], var("lmc_sink_seen", np.bool_)),
                             add("And", [written_ring, c("lmc_is_ring", j >= sinks)], var("lmc_ring_seen0", np.bool_))],
                      var("lmc_slot_written", np.bool_))        # onnxruntime has no boolean Where
        p4 = add("Unsqueeze", [p_slot, c("lmc_ax12", [1, 2])], var("lmc_slot_position_4d", i64))   # [B,1,1,R]
        w4 = add("Unsqueeze", [written, c("lmc_ax12b", [1, 2])], var("lmc_slot_written_4d", np.bool_))
        causal = add("LessOrEqual", [p4, qpos], var("lmc_ring_causal", np.bool_))                  # [B,1,S,R]
        age = add("Sub", [qpos, p4], var("lmc_ring_age", i64))
        recent = add("Less", [age, c("lmc_window", self.window)], var("lmc_ring_recent", np.bool_))
        keep = add("Or", [recent, c("lmc_is_sink_4d", (j < sinks).reshape(1, 1, 1, -1))], var("lmc_ring_keep", np.bool_))
        mask = add("And", [add("And", [w4, causal], var("lmc_ring_seen", np.bool_)), keep],
                   var("lmc_attn_mask", np.bool_))
        # write slots of the new tokens, as ScatterND indices (b, head, slot) per row
        rel = add("Sub", [positions, c("lmc_sinks", sinks)], var("lmc_rel", i64))
        wrapped = add("Add", [add("Mod", [rel, c("lmc_r_c", r)], var("lmc_rel_mod", i64)), c("lmc_sinks_b", sinks)],
                      var("lmc_wrapped", i64))
        slot = add("Where", [add("Less", [positions, c("lmc_sinks_c", sinks)], var("lmc_in_sink", np.bool_)),
                             positions, wrapped], var("lmc_write_slot", i64))                    # [B, S]
        made: dict[int, gs.Tensor] = {}

        def indices(heads: int) -> gs.Tensor:
            """[B, H, S, 3] (b, h, slot) by broadcasting arithmetic alone: no shape depends on S."""
            if heads not in made:
                s4 = add("Unsqueeze", [slot, c("lmc_ax13b", [1, 3])], var("lmc_slot_4d", i64))          # [B,1,S,1]
                full = add("Add", [s4, c(f"lmc_zero_h{heads}", np.zeros((1, heads, 1, 1), np.int64))],
                           var(f"lmc_slot_{heads}h", i64))                                            # [B,H,S,1]
                zero = add("Mul", [full, c("lmc_zero_c", 0)], var(f"lmc_zeros_{heads}h", i64))
                grid = [add("Add", [zero, c(f"lmc_grid_{k}_{heads}", g)], var(f"lmc_grid_{k}_{heads}h", i64))
                        for k, g in enumerate((np.arange(b).reshape(b, 1, 1, 1), np.arange(heads).reshape(1, heads, 1, 1)))]
                made[heads] = add("Concat", grid + [full], var(f"lmc_scatter_index_{heads}h", i64), axis=3)
            return made[heads]
        return mask, indices

    @staticmethod
    def _int8_state(graph, pair, heads, depth, write, add, c, var) -> gs.Tensor:
        """``--kv-cache int8``: the state holds int8 rows q = round(x / s) with one scale per (token, head),
        s = max|x| / 127, in a second state buffer; attention reads q · s. Returns that float tensor."""
        f32, shape = np.float32, [pair.past.shape[0], heads, pair.past.shape[2]]
        pair.past.dtype, pair.present.dtype = np.int8, np.int8
        past_s = gs.Variable(pair.past.name + "_scale", dtype=f32, shape=shape + [1])
        present_s = gs.Variable(pair.present.name + "_scale", dtype=f32, shape=shape + [1])
        graph.inputs.insert(graph.inputs.index(pair.past) + 1, past_s)
        graph.outputs.insert(graph.outputs.index(pair.present) + 1, present_s)
        x = pair.new
        amax = add("ReduceMax", [add("Abs", [x], var(x.name + "_abs", f32)), c("lmc_last_axis", [-1])],
                   var(x.name + "_amax", f32), keepdims=1)
        scale = add("Max", [add("Div", [amax, gs.Constant(x.name + "_127", np.array(127.0, f32))],
                                var(x.name + "_scale0", f32)), gs.Constant(x.name + "_tiny", np.array(1e-12, f32))],
                    var(x.name + "_scale", f32))
        q = add("Cast", [add("Round", [add("Div", [x, scale], var(x.name + "_scaled", f32))], var(x.name + "_round", f32))],
                var(x.name + "_int8", np.int8), to=onnx.TensorProto.INT8)
        write(pair.past, q, pair.present)
        write(past_s, scale, present_s)
        wide = add("Cast", [pair.present], var(pair.present.name + "_float", f32), to=onnx.TensorProto.FLOAT)
        return add("Mul", [wide, present_s], var(pair.present.name + "_dequantized", f32))

    @staticmethod
    def _require_opset(graph: gs.Graph, ctx: PassContext | None) -> None:
        """TensorScatter and Attention with ``nonpad_kv_seqlen`` are opset 24: upgrade, or say why not."""
        from lmc.passes.upgrade_opset import UpgradeOpset

        target = getattr(ctx, "target", None)
        if target is not None and "TensorScatter" not in target.tuning.fused_ops:
            raise LmcError(f"--context: target {target.name} has no in-place cache kernel (TensorScatter-24); "
                           f"generation bundles need an onnxruntime target")
        result = UpgradeOpset(STATE_OPSET).run(graph, ctx or PassContext())
        if int(graph.opset) < STATE_OPSET:
            raise LmcError(f"--context: the model cannot move to opset {STATE_OPSET}: "
                           f"{'; '.join(result.notes) or 'unknown reason'}")

    def _positions(self, graph, roles: Roles, names: ir.Namer) -> gs.Tensor:
        inputs = {t.name: t for t in graph.inputs}
        if roles.position_ids is not None:
            return inputs[roles.position_ids]
        ids = inputs[roles.input_ids]
        pos = gs.Variable(names.fresh("position_ids"), dtype=np.int64, shape=list(ids.shape))
        graph.inputs.append(pos)
        return pos

    @staticmethod
    def _redirect_shapes(tensor, length, b, heads, d, add, c, var):
        """Shape readers of a resized cache tensor get the shape the original graph gave them."""
        readers = [n for n in tensor.outputs if ir.is_op(n, "Shape")]
        others = [n for n in tensor.outputs if not ir.is_op(n, ("Shape", "Attention"))]
        if others:
            raise LmcError(f"--context: cache tensor '{tensor.name}' is read by {others[0].op} "
                           f"'{others[0].name}' outside its attention")
        if not readers:
            return
        shape = add("Concat", [c("lmc_bh", [b, heads]), length, c("lmc_d", [d])],
                    var(tensor.name + "_orig_shape", np.int64, [4]), axis=0)
        for r in readers:
            start, end = int(r.attrs.get("start", 0)), r.attrs.get("end")
            out = r.outputs[0]
            r.inputs.clear()
            r.outputs.clear()
            if start == 0 and end is None:
                add("Identity", [shape], out)
            else:
                add("Slice", [shape, c("lmc_s0", [start]), c("lmc_s1", [end if end is not None else 4])], out)

    @staticmethod
    def _replace_attention_mask(graph, roles: Roles, total, names, c, var) -> None:
        mask = next(t for t in graph.inputs if t.name == roles.attention_mask)
        graph.inputs.remove(mask)
        if not mask.outputs:
            return
        b_len = gs.Variable(names.fresh("lmc_mask_shape"), dtype=np.int64, shape=[2])
        ones = gs.Variable(names.fresh("attention_mask_full"), dtype=mask.dtype, shape=None)
        first = gs.Variable(names.fresh("lmc_kv_length0"), dtype=np.int64, shape=[1])
        graph.nodes += [
            gs.Node("Slice", name=names.fresh("lmc_kv_length0"), inputs=[total, c("z", [0]), c("o", [1])],
                    outputs=[first]),
            gs.Node("Concat", name=names.fresh("lmc_mask_shape"), attrs={"axis": 0},
                    inputs=[c("lmc_batch", [int(mask.shape[0]) if isinstance(mask.shape[0], int) else 1]), first],
                    outputs=[b_len]),
            gs.Node("ConstantOfShape", name=names.fresh("attention_mask_full"),
                    attrs={"value": onnx.numpy_helper.from_array(np.ones(1, dtype=np.dtype(mask.dtype)))},
                    inputs=[b_len], outputs=[ones])]
        for reader in list(mask.outputs):
            for i, t in enumerate(reader.inputs):
                if t is mask:
                    reader.inputs[i] = ones
