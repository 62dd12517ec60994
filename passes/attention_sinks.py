"""Attention sinks (gpt-oss) carried into the static cache, as a decomposed attention over the state.

gpt-oss adds one learned logit per head to every query's softmax and drops its column afterwards:
    p = Softmax(Concat([s, σ_h], −1) [− ReduceMax(.)])[..., :−1],    y = p · V
(s the masked, scaled scores; σ [H] constant). onnx Attention-24 has no such input, so:
``split_sinks`` (on the model, before it is compiled) reads σ per layer, makes the softmax the plain
``Softmax(s)`` and reads p straight from it — the attention the state rewrite recognises; then
``RestoreSinks`` (right after ``StaticKVCache``) replaces each Attention-24 over a sink layer's state by the
same computation written out over the in-place cache:
    s = (q · repeat(K)ᵀ) · scale masked by the state's mask,   p = Softmax(Concat([s, σ], −1))[..., :N]
    y = p · repeat(V)
Exact (the max subtraction is softmax's own); no per-token copies (K, V are the state buffers).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.model_io import load_model
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.cache_sites import find_cache_pairs, match_site
from lmc.passes.fold_constants import fold_to_fixed_point
from lmc.passes.fuse.attention import probabilities

log = logging.getLogger(__name__)

SINGLE_FILE_BYTES = 1 << 30
FILL = float(np.finfo(np.float32).min)


def _sink_site(anchor: gs.Node):
    """For the probabilities MatMul ``anchor`` of a sink attention: (slice, softmax, concat, sinks [H]) or None."""
    cut = ir.producer(anchor.inputs[0])
    if cut is None or not ir.is_op(cut, "Slice"):
        return None
    params = [ir.const_value(t) for t in cut.inputs[1:]]
    if len(params) < 3 or any(p is None or p.size != 1 for p in params[:3]) or int(params[0].reshape(-1)[0]) != 0 \
            or int(params[1].reshape(-1)[0]) != -1 or int(params[2].reshape(-1)[0]) not in (-1, 3) \
            or (len(params) > 3 and (params[3] is None or int(params[3].reshape(-1)[0]) != 1)):
        return None
    found = probabilities(cut.inputs[0])
    if found is None:
        return None
    softmax = found[0]
    x = softmax.inputs[0]
    shift = ir.producer(x)
    if shift is not None and ir.is_op(shift, "Sub"):          # − ReduceMax(x, −1): softmax's own shift
        peak = ir.producer(shift.inputs[1])
        if peak is None or not ir.is_op(peak, "ReduceMax") or peak.inputs[0] is not shift.inputs[0]:
            return None
        x = shift.inputs[0]
    concat = ir.producer(x)
    if concat is None or not ir.is_op(concat, "Concat") or len(concat.inputs) != 2 or \
            int(concat.attrs.get("axis", 0)) not in (-1, 3):
        return None
    column = concat.inputs[1]
    expand = ir.producer(column)
    values = ir.const_value(expand.inputs[0]) if expand is not None and ir.is_op(expand, "Expand") \
        else ir.const_value(column)
    if values is None or values.ndim != 4 or values.shape[0] != 1 or values.shape[2:] != (1, 1):
        return None
    return cut, softmax, concat, np.ascontiguousarray(values.reshape(-1), dtype=np.float32)


def split_sinks(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Every sink attention made plain (see the module docstring); returns σ by the key ``present`` name."""
    pairs = find_cache_pairs(graph)
    presents = {p.present.name: p for p in pairs}
    found: dict[str, np.ndarray] = {}
    for node in list(graph.nodes):
        sink = _sink_site(node) if ir.is_op(node, "MatMul") else None
        if sink is None:
            continue
        cut, softmax, concat, sinks = sink
        softmax.inputs[0] = concat.inputs[0]                   # the softmax over the keys alone …
        node.inputs[0] = cut.inputs[0]                         # … read whole: no sink column to drop
        site = match_site(node, presents, graph)
        if isinstance(site, str) or site is None:
            raise LmcError(f"--context: an attention with sinks is not recognised without them ({site})")
        found[site.key.present.name] = sinks
    if found:
        ir.remove_dead_nodes(graph)
        ir.topological_sort(graph)
    return found


def split_decoder_sinks(model_path, work) -> tuple[Path, dict[str, np.ndarray]] | None:
    """The model with its sinks split off (``split_sinks``), saved in folder ``work`` for the generation
    compile, and σ per layer for ``RestoreSinks``; None when it has none. The saved model holds its
    weights (up to 1 GiB)."""
    graph = ir.to_graph(load_model(model_path))
    shapes.infer_shapes(graph)
    fold_to_fixed_point(graph)
    sinks = split_sinks(graph)
    if not sinks:
        return None
    model = ir.to_model(graph)
    if model.ByteSize() >= SINGLE_FILE_BYTES:
        raise LmcError(f"--context: attention sinks are carried into the state only for models under "
                       f"{SINGLE_FILE_BYTES >> 30} GiB")
    path = Path(work) / "decoder-split-sinks.onnx"
    path.write_bytes(model.SerializeToString())
    return path, sinks


class RestoreSinks:
    """After ``StaticKVCache``: each Attention-24 over a sink layer's state becomes the decomposed attention
    with the sink column (see the module docstring)."""

    name = "restore-attention-sinks"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = False

    def __init__(self, sinks: dict[str, np.ndarray]):
        self.sinks = sinks

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        if not self.sinks:
            return PassResult(graph, modified=False)
        names = ir.Namer(graph)
        done = set()
        for node in list(graph.nodes):
            if not ir.is_op(node, "Attention") or len(node.inputs) < 4 or node.inputs[1].name not in self.sinks:
                continue
            key = node.inputs[1].name
            self._decompose(graph, node, self.sinks[key], names)
            done.add(key)
        missing = sorted(set(self.sinks) - done)
        if missing:
            raise LmcError(f"--context: no attention over the state '{missing[0]}' to carry its sinks")
        ir.remove_dead_nodes(graph)
        ir.topological_sort(graph)
        return PassResult(graph, modified=True, stats={"sink_attentions": len(done)},
                          notes=[f"attention sinks on {len(done)} attentions, decomposed over the state"])

    @staticmethod
    def _decompose(graph, node: gs.Node, sinks: np.ndarray, names: ir.Namer) -> None:
        q, k, v, mask = node.inputs[:4]
        out = node.outputs[0]
        key = k.name
        heads, kv_heads = len(sinks), int(k.shape[1]) if k.shape is not None else None
        if kv_heads is None or heads % kv_heads:
            raise LmcError(f"--context: the sink attention over '{key}' has {heads} heads and a state of "
                           f"{kv_heads} heads")
        f32 = np.float32
        nodes = []

        def var(tag, dtype=f32):
            return gs.Variable(names.fresh(f"{key}_sink_{tag}"), dtype=dtype)

        def const(tag, value):
            return gs.Constant(names.fresh(f"{key}_sink_{tag}"), np.asarray(value))

        def add(op, inputs, output, **attrs):
            nodes.append(gs.Node(op, name=output.name, inputs=inputs, outputs=[output], attrs=attrs))
            return output

        repeat = np.repeat(np.arange(kv_heads, dtype=np.int64), heads // kv_heads)
        if heads != kv_heads:
            k = add("Gather", [k, const("heads", repeat)], var("keys"), axis=1)
            v = add("Gather", [v, const("heads_v", repeat)], var("values"), axis=1)
        kt = add("Transpose", [k], var("keys_t"), perm=[0, 1, 3, 2])
        scores = add("MatMul", [q, kt], var("qk"))
        scale = float(node.attrs.get("scale", 1.0 / np.sqrt(int(q.shape[-1]))))
        scores = add("Mul", [scores, const("scale", np.array(scale, f32))], var("scores"))
        if mask.dtype is not None and np.dtype(mask.dtype) == np.bool_:
            scores = add("Where", [mask, scores, const("fill", np.array(FILL, f32))], var("masked"))
        elif mask.name:
            scores = add("Add", [scores, mask], var("masked"))
        shape = add("Shape", [scores], var("shape", np.int64), start=0, end=3)
        column_shape = add("Concat", [shape, const("one", np.array([1], np.int64))], var("column_shape", np.int64),
                           axis=0)
        column = add("Expand", [const("logits", sinks.reshape(1, heads, 1, 1)), column_shape], var("column"))
        both = add("Concat", [scores, column], var("with_sinks"), axis=-1)
        probs = add("Softmax", [both], var("probs"), axis=-1)
        keys = add("Shape", [k], var("slots", np.int64), start=2, end=3)
        kept = add("Slice", [probs, const("start", np.array([0], np.int64)), keys,
                             const("axis", np.array([3], np.int64))], var("probs_keys"))
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        nodes.append(gs.Node("MatMul", name=names.fresh(f"{key}_sink_out"), inputs=[kept, v], outputs=[out]))
        graph.nodes.extend(nodes)
