"""Attention masks judged by evaluation: a mask's construction is not matched op by op; its cone is run
under onnxruntime on probe inputs (batch, past P, sequence S) with a full ``attention_mask``, and the keys it
keeps must be those of a known pattern for every probe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError, PositionBiasFound
from lmc.core.runtime import session
from lmc.passes.cache_sites import MASKED, AttentionSite, CachePair, Roles

log = logging.getLogger(__name__)


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
        elif t.name in roles.fixed and ir.static_shape(t) is not None:    # cross state: fixed while decoding
            feeds[t.name] = np.zeros([b] + list(ir.static_shape(t)[1:]), dtype)
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


@dataclass(frozen=True)
class MaskPattern:
    """The keys an attention mask keeps: key position j is visible from query position q iff
    j ≤ q and q − j < ``window`` (``window`` None: every earlier key — the causal mask)."""

    window: int | None = None

    def keep(self, past: int, sequence: int) -> np.ndarray:
        """[S, P+S] booleans for queries P … P+S−1 over keys 0 … P+S−1."""
        q = past + np.arange(sequence)[:, None]
        j = np.arange(past + sequence)[None, :]
        keep = j <= q
        return keep & (q - j < self.window) if self.window is not None else keep

    def describe(self) -> str:
        return "causal" if self.window is None else f"sliding window {self.window}"


def classify(keep: np.ndarray, past: int) -> MaskPattern | None:
    """The pattern a mask's last query row (position P+S−1, keys 0 … P+S−1) shows: causal, or a sliding window
    of W keys (the W latest, contiguous); None when it is neither."""
    row = np.asarray(keep)[-1]
    q = row.size - 1
    if row.all():
        return MaskPattern()
    visible = np.flatnonzero(row)
    if visible.size and visible[-1] == q and np.array_equal(visible, np.arange(visible[0], q + 1)):
        return MaskPattern(int(visible.size))
    return None


def horizon(context: int, sequence: int, windows: set[int], dense: bool = True) -> list[int]:
    """Past lengths P (0 ≤ P ≤ context − S) a mask is probed at for S new tokens: every P when ``dense``, else
    the start, the end, powers of two and both sides of every window edge (W and 2W for each window W) — the
    positions where a windowed and a causal mask, or two windows, first differ."""
    last = context - sequence
    if last < 0:
        return []
    if dense:
        return list(range(last + 1))
    points = {0, 1, 2, 3, 4, last, last // 2} | {1 << k for k in range(last.bit_length())}
    for w in windows:
        for edge in (w, 2 * w):
            points |= {edge - sequence + d for d in (-1, 0, 1)} | {edge + d for d in (-1, 0, 1)}
    return sorted(p for p in points if 0 <= p <= last)


DENSE_WEIGHT_LIMIT = 1 << 20     # a cone this light is pure index arithmetic: probe every past length
DENSE_CONTEXT = 1024


def probeable(graph: gs.Graph, pairs: list[CachePair], sites: list[AttentionSite]) -> bool:
    """Whether the masks' cone is light enough to evaluate on its own (``PROBE_WEIGHT_LIMIT``)."""
    masks = list({id(s.mask): s.mask for s in sites}.values())
    return _cone_weight_bytes(graph, masks, pairs) <= PROBE_WEIGHT_LIMIT


def dense_probing(graph: gs.Graph, pairs: list[CachePair], sites: list[AttentionSite], context: int) -> bool:
    """Whether to probe every past length (``horizon(dense=True)``): the context is at most ``DENSE_CONTEXT``
    and the masks' cone holds no more than ``DENSE_WEIGHT_LIMIT`` of weights — some exports slice the mask
    to the length of the repeated keys, so their cone runs every layer; those are probed at ``horizon``'s
    sparse points (window edges, powers of two, the ends)."""
    masks = list({id(s.mask): s.mask for s in sites}.values())
    return context <= DENSE_CONTEXT and _cone_weight_bytes(graph, masks, pairs) <= DENSE_WEIGHT_LIMIT


def mask_keeps(graph: gs.Graph, roles: Roles, pairs: list[CachePair], sites: list[AttentionSite],
               probes: list[tuple[int, int]]):
    """Yield ((past, sequence), {key present name: keep [.., S, P+S]}) for each probe, evaluating the masks'
    cone under onnxruntime (the batch is the graph's bound batch). An additive mask must be exactly 0 where
    it keeps a key; anything else (a position bias) is refused here. None when the cone is too heavy to
    probe (its weights exceed ``PROBE_WEIGHT_LIMIT``: the masks read shapes only running the layers gives)."""
    if not probeable(graph, pairs, sites):
        return None
    masks = list({id(s.mask): s.mask for s in sites}.values())
    sess = session(_cone_model(graph, masks, pairs), optimize=False)
    ids = next(t for t in graph.inputs if t.name == roles.input_ids)
    b = _bound(ids, 0) or 1

    def run():
        for p, s in probes:
            values = sess.run([m.name for m in masks], _fed(sess, _probe_feeds(graph, roles, pairs, b, p, s)))
            by_mask = {id(m): _keep(m, v, site_kind(m), b, p, s) for m, v in zip(masks, values)}
            yield (p, s), {site.key.present.name: by_mask[id(site.mask)] for site in sites}

    def site_kind(mask):
        return next(x.mask_kind for x in sites if x.mask is mask)
    return run()


def _keep(mask: gs.Tensor, value, kind: str, b: int, p: int, s: int) -> np.ndarray:
    value = np.asarray(value)
    try:
        full = np.broadcast_to(value, value.shape[:-2] + (s, p + s)) if value.ndim >= 2 else None
    except ValueError:
        full = None
    if full is None:
        raise LmcError(f"--context: attention mask '{mask.name}' has shape {value.shape}, "
                       f"not [.., {s}, {p + s}] for sequence {s} after {p} cached tokens")
    if kind == "additive":
        keep = full > MASKED
        if np.any(full[keep] != 0):
            raise PositionBiasFound(f"--context: the attention mask '{mask.name}' adds a bias to the scores it keeps "
                           f"(a position bias, e.g. ALiBi); lmc cannot replace it exactly")
        return keep
    return full.astype(bool) if kind == "keep-where-true" else ~full.astype(bool)


def judge_masks(keeps_at, context: int, sequences: tuple[int, ...], dense: bool = True) -> dict[str, MaskPattern]:
    """Prove every attention's mask causal or a sliding window over the whole horizon, by evaluation.

    ``keeps_at(probes)`` yields ((P, S), {site: keep}) as ``mask_keeps`` does. Each site's pattern is read off
    its last query row at the largest past (P = context − S: a window W < context shows as W visible keys),
    then every probe — S in ``sequences``, P over ``horizon`` (every past length when ``dense``) — must keep
    exactly the pattern's keys, in every batch row and head. Raises LmcError naming the first mask and
    probe that differ; returns {key present name: pattern}."""
    patterns: dict[str, MaskPattern] = {}
    for s in sequences:
        if s > context:
            continue
        for (p, s_), keeps in keeps_at([(context - s, s)]):
            for name, keep in keeps.items():
                found = classify(keep.reshape(-1, s_, p + s_)[0], p)
                if found is None:
                    raise LmcError(f"--context: the attention mask of '{name}' is neither causal nor a sliding "
                                   f"window (probe: past {p}, sequence {s_}); lmc cannot replace it exactly")
                if patterns.setdefault(name, found) != found:
                    raise LmcError(f"--context: the attention mask of '{name}' is {patterns[name].describe()} for "
                                   f"one prompt length and {found.describe()} for another")
    windows = {w.window for w in patterns.values() if w.window is not None}
    for s in sequences:
        probes = [(p, s) for p in horizon(context, s, windows, dense)]
        for (p, s_), keeps in keeps_at(probes):
            for name, keep in keeps.items():
                expected = patterns[name].keep(p, s_)
                if not np.all(keep == expected):
                    raise LmcError(f"--context: the attention mask of '{name}' is not {patterns[name].describe()} "
                                   f"at past {p}, sequence {s_}; lmc cannot replace it exactly")
    return patterns


def check_masks(graph: gs.Graph, roles: Roles, pairs: list[CachePair], sites: list[AttentionSite],
                context: int, known: dict[str, MaskPattern] | None = None) -> dict[str, MaskPattern]:
    """Every site's mask pattern over the graph's bound sequence length and every past length up to
    ``context``; when the cone cannot be probed here, the ``known`` patterns (judged on bound copies of the
    model before the passes ran) are taken, and a site without one is refused."""
    ids = next(t for t in graph.inputs if t.name == roles.input_ids)
    s = _bound(ids, 1) or 1
    if not probeable(graph, pairs, sites):
        known = known or {}
        missing = [site.key.present.name for site in sites if site.key.present.name not in known]
        if missing:
            raise LmcError(f"--context: the attention mask of '{missing[0]}' could not be evaluated")
        log.info("mask probes skipped here: their cones hold more than %d bytes of weights", PROBE_WEIGHT_LIMIT)
        return {site.key.present.name: known[site.key.present.name] for site in sites}
    patterns = judge_masks(lambda probes: mask_keeps(graph, roles, pairs, sites, probes), context, (s,),
                           dense=known is None)      # judged densely before, when known
    for name, pattern in (known or {}).items():
        if name in patterns and patterns[name] != pattern:
            raise LmcError(f"--context: the attention mask of '{name}' is {pattern.describe()} for a decode step "
                           f"and {patterns[name].describe()} for a prefill")
    return patterns
