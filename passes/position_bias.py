"""Relative position bias (T5) in a past/present decoder's self-attention, carried into the static cache.

T5's decoder adds to its scores, besides the causal mask, a learned bias of the query–key distance:
    s[b, h, i, j] = q_i · k_j + T[h, (P + i) − j] + C[i, j]      (query i at position P + i after P cached)
exported as one additive mask M = bias + C (C: 0 where key j is kept, ≤ MASKED where not), which the state
rewrite does not take (it replaces masks, not biases). ``measure_bias`` evaluates M's cone under onnxruntime
on probes (past P, sequence S) and reads the table T[h, d], d = 0 … N − 1 (N = the state's slots), off the
probe P = N − 1, S = 1; then every probe — S = 1 at every P < N, and S = ``chunk`` at P = 0 and N − chunk —
must satisfy M[0, h, i, j] = T[h, P + i − j] where j ≤ P + i and M ≤ MASKED elsewhere, or it is refused.
``split_bias`` (on the model, before it is compiled) gives the site the mask C = Where(M > MASKED, 0, −inf), the
causal mask the state rewrite recognises; ``RestorePositionBias`` (right after ``StaticKVCache``) gives the
Attention over that state the float mask
    A[b, h, i, j] = T[h, p[b, i] − j] where the state's boolean mask keeps slot j, else finfo.min
from the positions p (``position_ids``): every slot the original had gets the original's score.
Precondition: batch rows at the same positions are not assumed; one table serves every row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.model_io import load_model
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.core.runtime import session
from lmc.passes.cache_sites import MASKED, AttentionSite, CachePair, find_cache_pairs, find_roles, find_sites
from lmc.passes.fold_constants import fold_to_fixed_point

log = logging.getLogger(__name__)

FILL = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class BiasTable:
    """T[h, d]: the bias a query adds to the key d positions before it (d = 0 … slots − 1), per head."""

    values: np.ndarray            # [heads, slots] float32

    @property
    def slots(self) -> int:
        return int(self.values.shape[1])


def _shape_readers(pairs: list[CachePair]) -> list[tuple[gs.Tensor, CachePair, bool]]:
    found = []
    for pair in pairs:
        for tensor, is_present in ((pair.past, False), (pair.present, True)):
            found += [(n.outputs[0], pair, is_present) for n in tensor.outputs if ir.is_op(n, "Shape") and n.outputs]
    return found


def _feeds(graph: gs.Graph, wanted: set[str], pairs: list[CachePair], ids: str, p: int, s: int) -> dict:
    """Probe inputs: zero tokens [1, S], empty-valued cache [1, H, P, D], cache shapes as the original
    sees them, zeros for fixed inputs (their static shapes)."""
    feeds: dict[str, np.ndarray] = {}
    for tensor, pair, is_present in _shape_readers(pairs):
        node = ir.producer(tensor)
        full = np.array([1, int(pair.past.shape[1]), p + s if is_present else p, int(pair.past.shape[3])], np.int64)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        feeds[tensor.name] = full[start:(int(end) if end is not None else None)]
    pasts = {pair.past.name: pair for pair in pairs}
    mask = find_roles(graph).attention_mask
    for t in graph.inputs:
        if t.name not in wanted:
            continue
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.float32
        if t.name == ids:
            feeds[t.name] = np.zeros((1, s), dtype)
        elif t.name == mask:              # a decoder-only model's padding mask: every token real
            feeds[t.name] = np.ones((1, p + s), dtype)
        elif t.name in pasts:
            feeds[t.name] = np.zeros((1, int(t.shape[1]), p, int(t.shape[3])), dtype)
        elif ir.static_shape(t) is not None:
            feeds[t.name] = np.zeros(ir.static_shape(t), dtype)
        else:
            raise LmcError(f"--context: the position bias reads input '{t.name}' of unknown shape")
    return {k: v for k, v in feeds.items() if k in wanted}


def _biased(value: np.ndarray, p: int, s: int) -> bool:
    keep = np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None]
    full = np.broadcast_to(value, value.shape[:-2] + (s, p + s))
    return bool(np.any(full[..., keep] != 0))


def measure_bias(graph: gs.Graph, slots: int, chunk: int) -> dict[str, BiasTable]:
    """The bias table of every self-attention whose additive mask carries one, by its key ``present``
    name (empty when none does); LmcError when a bias is not a function of the query–key distance."""
    pairs = find_cache_pairs(graph)
    sites = [x for x in find_sites(graph, pairs) if x.mask_kind == "additive"]
    if not sites:
        return {}
    masks = list({id(x.mask): x.mask for x in sites}.values())
    cut = [t for t, _, _ in _shape_readers(pairs)]
    sess = session(ir.cone_model(graph, masks, free_dims=True, cut=cut), optimize=False)
    wanted = {i.name for i in sess.get_inputs()}
    ids = find_roles(graph).input_ids

    def run(p: int, s: int) -> list[np.ndarray]:
        return [np.asarray(v) for v in sess.run([m.name for m in masks], _feeds(graph, wanted, pairs, ids, p, s))]

    last = run(slots - 1, 1)
    tables: dict[int, BiasTable] = {}
    for mask, value in zip(masks, last):
        if value.ndim != 4 or not _biased(value, slots - 1, 1):
            continue
        row = np.broadcast_to(value, value.shape[:-2] + (1, slots))[0, :, 0, :]            # [H | 1, N]
        tables[id(mask)] = BiasTable(np.ascontiguousarray(row[:, ::-1]).astype(np.float32))
    if not tables:
        return {}
    probes = [(p, 1) for p in range(slots)]
    if 1 < chunk <= slots:
        probes += [(0, chunk), (slots - chunk, chunk)]
    for p, s in probes:
        for mask, value in zip(masks, run(p, s)):
            if id(mask) in tables:
                _check(mask, value, tables[id(mask)], p, s)
    found = {x.key.present.name: tables[id(x.mask)] for x in sites if id(x.mask) in tables}
    log.info("relative position bias on %d attentions (%d distinct tables, %d slots)", len(found),
             len(tables), slots)
    return found


def _check(mask: gs.Tensor, value: np.ndarray, table: BiasTable, p: int, s: int) -> None:
    heads = table.values.shape[0]
    try:
        full = np.broadcast_to(value, (1, heads, s, p + s))
    except ValueError:
        raise LmcError(f"--context: attention mask '{mask.name}' has shape {value.shape}, not "
                       f"[1, {heads}, {s}, {p + s}] (past {p}, sequence {s})") from None
    distance = (p + np.arange(s))[:, None] - np.arange(p + s)[None, :]                     # [S, P+S]
    keep = distance >= 0
    expected = table.values[:, np.clip(distance, 0, table.slots - 1)]                      # [H, S, P+S]
    got = full[0]
    if not np.all(got[:, keep] == expected[:, keep]):   # up to a constant per query, which softmax removes:
        rows = np.arange(s)                              # MPT's ALiBi is relative to the last key, not the query
        got = got - got[:, rows, p + rows][:, :, None] + expected[:, rows, p + rows][:, :, None]
    if not np.all(got[:, keep] == expected[:, keep]) or np.any(full[0][:, ~keep] > MASKED):
        raise LmcError(f"--context: the attention mask '{mask.name}' adds a bias that is not a function of "
                       f"the query–key distance (probe: past {p}, sequence {s}); lmc cannot carry it into "
                       f"the static cache")


def split_bias(graph: gs.Graph, tables: dict[str, BiasTable]) -> int:
    """Give every biased site the causal mask of its bias-carrying mask M: Where(M > MASKED, 0, −inf).
    Returns how many sites changed. (Exact only together with ``RestorePositionBias``.)"""
    if not tables:
        return 0
    pairs = find_cache_pairs(graph)
    names = ir.Namer(graph)
    made: dict[int, gs.Tensor] = {}
    changed = 0
    for site in find_sites(graph, pairs):
        if site.key.present.name not in tables:
            continue
        parts = [t for t, kind in (site.masks or [(site.mask, site.mask_kind)]) if kind == "additive"]
        for part in parts:            # several masks (MPT: ALiBi added, then Where masks): each added one
            add = next((n for n in site.nodes if ir.is_op(n, "Add") and part in n.inputs), None)
            if add is None:
                raise LmcError(f"--context: the biased mask of '{site.key.present.name}' is not added to the scores")
            if id(part) not in made:
                made[id(part)] = _causal_of(graph, part, names)
            add.inputs[list(add.inputs).index(part)] = made[id(part)]
        changed += 1
    ir.topological_sort(graph)
    return changed


def _causal_of(graph: gs.Graph, mask: gs.Tensor, names: ir.Namer) -> gs.Tensor:
    keep = gs.Variable(names.fresh(mask.name + "_keep"), dtype=np.bool_)
    causal = gs.Variable(names.fresh(mask.name + "_causal"), dtype=np.float32)
    graph.nodes += [
        gs.Node("Greater", name=keep.name, inputs=[mask, gs.Constant(names.fresh("lmc_masked"), np.array(MASKED, np.float32))],
                outputs=[keep]),
        gs.Node("Where", name=causal.name, inputs=[keep, gs.Constant(names.fresh("lmc_zero"), np.array(0.0, np.float32)),
                                                   gs.Constant(names.fresh("lmc_minus_inf"), np.array(-np.inf, np.float32))],
                outputs=[causal])]
    return causal


class RestorePositionBias:
    """After ``StaticKVCache``: the Attention over each biased site's state gets its bias table back, as a
    float mask computed from the positions (see the module docstring)."""

    name = "restore-position-bias"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = False

    def __init__(self, tables: dict[str, BiasTable], positions: str = "position_ids"):
        self.tables = tables
        self.positions = positions

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        if not self.tables:
            return PassResult(graph, modified=False)
        inputs = {t.name: t for t in graph.inputs}
        if self.positions not in inputs:
            raise LmcError(f"--context: the state rewrite left no '{self.positions}' input for the position bias")
        positions = inputs[self.positions]
        names = ir.Namer(graph)
        made: dict[tuple[int, str], gs.Tensor] = {}
        done = set()
        for node in list(graph.nodes):
            if not ir.is_op(node, "Attention") or len(node.inputs) < 4 or node.inputs[1].name not in self.tables:
                continue
            table = self.tables[node.inputs[1].name]
            keep = node.inputs[3]
            if not keep.name or (keep.dtype is not None and np.dtype(keep.dtype) != np.bool_):
                raise LmcError(f"--context: the attention over '{node.inputs[1].name}' has no boolean state mask "
                               "to carry its position bias")
            key = (id(table), keep.name)
            if key not in made:
                made[key] = self._float_mask(graph, table, positions, keep, names)
            node.inputs[3] = made[key]
            done.add(node.inputs[1].name)
        missing = sorted(set(self.tables) - done)
        if missing:
            raise LmcError(f"--context: no attention over the state '{missing[0]}' to carry its position bias "
                           f"(the state rewrite did not give it a boolean mask)")
        ir.topological_sort(graph)
        return PassResult(graph, modified=True, stats={"biased_attentions": len(done)},
                          notes=[f"relative position bias restored on {len(done)} attentions "
                                 f"({len({id(t) for t in self.tables.values()})} tables)"])

    @staticmethod
    def _float_mask(graph, table: BiasTable, positions: gs.Tensor, keep: gs.Tensor, names: ir.Namer) -> gs.Tensor:
        """Where(keep, T[h, p[b, i] − j], FILL): [B, H, S, N]."""
        i64, n = np.int64, table.slots

        def var(base, dtype):
            return gs.Variable(names.fresh(base), dtype=dtype)

        def const(base, value):
            return gs.Constant(names.fresh(base), np.asarray(value))

        def add(op, inputs, out, **attrs):
            graph.nodes.append(gs.Node(op, name=out.name, attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        q = add("Unsqueeze", [positions, const("lmc_bias_axis", np.array([2], i64))], var("lmc_bias_query", i64))
        distance = add("Sub", [q, const("lmc_bias_slots", np.arange(n, dtype=i64))], var("lmc_bias_distance", i64))
        low = add("Max", [distance, const("lmc_bias_zero", np.array(0, i64))], var("lmc_bias_distance0", i64))
        clipped = add("Min", [low, const("lmc_bias_last", np.array(n - 1, i64))], var("lmc_bias_index", i64))
        table_t = const("lmc_position_bias_table", np.ascontiguousarray(table.values.T))           # [N, H]
        rows = add("Gather", [table_t, clipped], var("lmc_bias_rows", np.float32), axis=0)       # [B, S, N, H]
        bias = add("Transpose", [rows], var("lmc_position_bias", np.float32), perm=[0, 3, 1, 2])  # [B, H, S, N]
        return add("Where", [keep, bias, const("lmc_bias_fill", np.array(FILL, np.float32))],
                   var("lmc_biased_mask", np.float32))


SINGLE_FILE_BYTES = 1 << 30


def split_decoder_bias(model_path, context: int, chunk: int, work) -> tuple[object, dict[str, BiasTable]] | None:
    """A decoder-only past/present model whose self-attention masks carry a position bias (MPT's ALiBi):
    the model with each bias split off (``split_bias``), saved in folder ``work`` for the generation compile,
    and the tables ``RestorePositionBias`` puts back after the state rewrite; None when no mask carries one
    (the model is then compiled as it is). The saved model holds its weights (up to 1 GiB)."""
    graph = ir.to_graph(load_model(model_path))
    shapes.infer_shapes(graph)
    fold_to_fixed_point(graph)
    try:
        tables = measure_bias(graph, context, chunk)
    except LmcError:
        return None                    # not measurable here: the compile says what it finds
    if not tables:
        return None
    split_bias(graph, tables)
    ir.remove_dead_nodes(graph)
    model = ir.to_model(graph)
    if model.ByteSize() >= SINGLE_FILE_BYTES:
        raise LmcError("--context: a position bias (ALiBi) is carried into the state only for models under "
                       f"{SINGLE_FILE_BYTES >> 30} GiB")
    path = Path(work) / "decoder-split-bias.onnx"
    path.write_bytes(model.SerializeToString())
    return path, tables
