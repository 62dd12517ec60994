"""An original export run a segment of its graph at a time, every call through one segment before the next.

Run whole, a model of W bytes of weights holds all of W by the end of its first call: onnxruntime maps the
weights and every call reads every page. ``run_layer_major`` cuts the graph, in its topological order, into
segments of at most ``budget`` bytes of weights each (a segment holds at least one node, so one node's
weights may exceed it) and runs every call through segment 1, then every call through segment 2, …; a
segment's session is released before the next one is made. The run holds one segment's weights, plus, for
every call, the values that cross a cut (for a decoder: the hidden state, the mask, the positions).

State (``state``: an input ``past`` whose output ``present`` feeds the next call): call t reads ``past`` =
``present`` of call t − 1 (``initial`` for t = 0). The segment computing ``present`` keeps its last value for
its own next call; a later segment reading ``past`` is given the values kept for it, call by call. A cut
after a node reading ``past`` and before the node computing its ``present`` would leave nothing to read, so
none is made there; nor where a value crossing the cut has no known element type (a segment's input needs
one).

The outputs of call t are those of running the whole graph on call t's feeds: the same nodes run on the same
values (onnxruntime may fuse differently at a cut, so results agree to rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from lmc.core import ir, weights
from lmc.core.model_io import check_external_locations
from lmc.core.runtime import session

log = logging.getLogger(__name__)

SEGMENT_BYTES = 512 << 20       # weights a generation check's original holds at once


@dataclass(frozen=True)
class Segment:
    """Nodes ``start`` … ``stop`` − 1 of the graph; ``inputs``: the values they read and do not compute
    (graph inputs or earlier segments' values); ``outputs``: the values they compute that the graph's
    outputs or later segments read."""

    start: int
    stop: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers (by their dims and types, wherever they are stored)."""
    return sum(ir.proto_nbytes(t) for t in model.graph.initializer)


def split(model: onnx.ModelProto, budget: int, state: Mapping[str, str], typed: set[str]) -> list[Segment]:
    """Cut ``model``'s nodes (topologically ordered, as ONNX requires) greedily into segments of at most
    ``budget`` bytes of initializers each, cutting only where every value crossing the cut is in ``typed``
    and no ``state`` pair (past → present) has a reader of past before the cut and present's node after it."""
    graph = model.graph
    sizes = {t.name: ir.proto_nbytes(t) for t in graph.initializer}
    nodes = list(graph.node)
    reads = [ir.node_reads(n) for n in nodes]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    end = len(nodes)
    last_use: dict[str, int] = {}
    for i, names in enumerate(reads):
        for name in names:
            if name not in sizes:
                last_use[name] = i
    for out in graph.output:
        last_use[out.name] = end
    # no cut in (first reader of past, node computing present]
    blocked = np.zeros(end + 1, dtype=bool)
    for past, present in state.items():
        first = min((i for i, names in enumerate(reads) if past in names), default=None)
        if first is not None and present in producer and first < producer[present]:
            blocked[first + 1:producer[present] + 1] = True

    cuts = [0]
    live = {i.name for i in graph.input if last_use.get(i.name, -1) >= 0}
    held: set[str] = set()
    held_bytes = 0
    for i, node in enumerate(nodes):
        new = {n for n in reads[i] if n in sizes and n not in held}
        extra = sum(sizes[n] for n in new)
        if held and held_bytes + extra > budget and not blocked[i] and live <= typed:
            cuts.append(i)
            held, held_bytes = set(), 0
            new = {n for n in reads[i] if n in sizes}
            extra = sum(sizes[n] for n in new)
        held |= new
        held_bytes += extra
        live = {n for n in live if last_use[n] > i} | {o for o in node.output if o and last_use.get(o, -1) > i}
    cuts.append(end)

    segments = []
    for a, b in zip(cuts, cuts[1:]):
        inside = {o for n in nodes[a:b] for o in n.output if o}
        ins = dict.fromkeys(n for names in reads[a:b] for n in names if n not in sizes and n not in inside)
        # read at or after b: by a later node, or a graph output (last used at ``end``)
        outs = [o for n in nodes[a:b] for o in n.output if o and last_use.get(o, -1) >= b]
        held = {n for names in reads[a:b] for n in names if n in sizes}
        segments.append(Segment(a, b, tuple(ins), tuple(outs), sum(sizes[n] for n in held)))
    return segments


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Element types (shapes left open) of the graph's inputs, outputs and intermediate values (inferred by
    onnx; where inference fails, those the model records: fewer places to cut, never a wrong type)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:        # onnx raises its own errors and RuntimeError for unknown operators
        log.info("shape inference failed (%s); cutting only where the model records types", exc)
        inferred = model
    types: dict[str, onnx.TypeProto] = {}
    for info in list(inferred.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = onnx.helper.make_tensor_type_proto(info.type.tensor_type.elem_type, None)
    return types


def segment_model(model: onnx.ModelProto, segment: Segment, types: Mapping[str, onnx.TypeProto]) -> onnx.ModelProto:
    """The model of ``segment``: its nodes, the initializers they read (file-backed ones still in their
    files), its inputs and outputs typed by ``types``."""
    graph = model.graph
    nodes = graph.node[segment.start:segment.stop]
    read = {n for node in nodes for n in ir.node_reads(node)}
    inits = [t for t in graph.initializer if t.name in read]
    originals = {v.name: v for v in list(graph.input) + list(graph.output)}

    def info(name: str) -> onnx.ValueInfoProto:
        if name in originals:
            return originals[name]
        value = onnx.ValueInfoProto(name=name)
        value.type.CopyFrom(types[name])
        return value

    sub = onnx.helper.make_graph(nodes, f"{graph.name}/{segment.start}", [info(n) for n in segment.inputs],
                                 [info(n) for n in segment.outputs], initializer=inits)
    out = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def run_layer_major(path: str | Path, calls: Sequence[Mapping[str, np.ndarray]], wanted: Sequence[str],
                    state: Mapping[str, str], initial: Mapping[str, np.ndarray],
                    budget: int = SEGMENT_BYTES, resets: Collection[int] = (),
                    consume: Callable[[int, dict[str, np.ndarray]], None] | None = None
                    ) -> list[dict[str, np.ndarray]]:
    """Outputs ``wanted`` of the model at ``path`` for each of ``calls`` (the feeds of its inputs that are
    not ``state``), run one segment at a time (see the module docstring); ``state`` past → present,
    ``initial`` the pasts of the first call and of every call in ``resets`` (a new sequence starts there).
    With ``consume``, each call's outputs are handed to ``consume(t, outputs)`` in call order, not kept
    (the list returned then holds empty dicts). Sessions without prepacking (no second copy of a weight)."""
    path = Path(path)
    resets = set(resets)
    model = onnx.load(str(path), load_external_data=False)
    total = weight_bytes(model)
    if total <= budget:
        stored = {t.name for t in model.graph.initializer}
        segments = [Segment(0, len(model.graph.node), tuple(i.name for i in model.graph.input if i.name not in stored),
                            tuple(o.name for o in model.graph.output), total)]
        make = [lambda: session(path, low_memory=True)]
    else:
        check_external_locations(model, path.parent, str(path))
        weights.keep_in_file(model, path.parent)
        types = _value_types(model)
        segments = split(model, budget, state, set(types))
        make = [lambda s=s: session(segment_model(model, s, types), low_memory=True) for s in segments]
        log.info("original run in %d segments of ≤ %.0f MiB of weights (%.0f MiB in all)", len(segments),
                 max(s.weight_bytes for s in segments) / 2**20, total / 2**20)
    past_of = {present: past for past, present in state.items()}
    home = {state[p]: k for k, s in enumerate(segments) for p in s.inputs if p in state
            if state[p] in s.outputs}           # present → the segment that computes it and reads its past
    last_reader = {}
    for k, s in enumerate(segments):
        for name in s.inputs:
            last_reader[state.get(name, name)] = k
    results: list[dict[str, np.ndarray]] = [{} for _ in calls]
    carried: list[dict[str, np.ndarray]] = [dict(c) for c in calls]
    for k, (segment, create) in enumerate(zip(segments, make)):
        sess = create()
        own = {p: initial[p] for p in segment.inputs if p in state and home.get(state[p]) == k}
        for t in range(len(calls)):
            fresh = t == 0 or t in resets
            if fresh:
                own = {p: initial[p] for p in own}
            feeds = {}
            for name in segment.inputs:
                if name in own:
                    feeds[name] = own[name]
                elif name in state:
                    feeds[name] = initial[name] if fresh else carried[t - 1][state[name]]
                else:
                    feeds[name] = carried[t][name]
            outputs = {}
            for name, value in zip(segment.outputs, sess.run(list(segment.outputs), feeds)):
                if name in wanted:
                    outputs[name] = value
                if home.get(name) == k:
                    own[past_of[name]] = value
                if last_reader.get(name, -1) > k:
                    carried[t][name] = value
            if outputs and consume is not None:
                consume(t, outputs)
            elif outputs:
                results[t].update(outputs)
        for values in carried:          # after every call: call t + 1 reads call t's carried presents
            for name in [n for n in values if last_reader.get(n, -1) <= k]:
                del values[name]
        del sess, own
        weights.release_freed()
    return results
