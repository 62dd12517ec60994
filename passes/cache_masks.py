"""Attention masks judged by evaluation: a mask's construction is not matched op by op; its cone is run
under onnxruntime on probe inputs (batch, past P, sequence S) with a full ``attention_mask``, and the keys it
keeps must be those of a known pattern for every probe.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.errors import LmcError
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
