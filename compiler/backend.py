"""Lower a gs graph to the backend's Dataflow and plan its memory for a target.

``dataflow_of(graph)``: one Step per node (in the graph's order, which must be topological); arena
tensors are node outputs that are not graph outputs, sized from their static shapes
(ceil(numel·bits/8)); kernel scratch comes from ``lmc.compiler.scratch``.

``plan_memory(graph, target)``: choose a schedule (``lmc.targets.schedule``), reorder the graph's nodes
to it, compute liveness, place buffers with the arena planner, and return a ``MemoryPlan``.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_graphsurgeon as gs

from lmc.compiler import ir, shapes
from lmc.compiler.errors import ShapeError
from lmc.compiler.scratch import decode_scratch, scratch_bytes
from lmc.targets.arena import ArenaPlanner
from lmc.targets.dataflow import Dataflow, Step
from lmc.targets.inplace import merge_inplace
from lmc.targets.liveness import SCRATCH_SUFFIX, align_up, compute_liveness, peak_live
from lmc.targets.plan import MemoryPlan, PlannedTensor, StateBuffer
from lmc.targets.schedule import choose_schedule
from lmc.targets.target import Target, WeightsPlacement


FUSABLE_WEIGHT_READERS = ("MatMul", "Gemm")


def decoded_weight(node: gs.Node) -> bool:
    """A DequantizeLinear of constants read only by MatMul/Gemm: onnxruntime fuses the pair (MatMulNBits),
    so the float weight never exists at run time and gets no arena buffer; the consumer's scratch covers
    the decode working set."""
    return (ir.is_op(node, "DequantizeLinear") and all(isinstance(t, gs.Constant) for t in node.inputs if t.name)
            and all(ir.is_op(r, FUSABLE_WEIGHT_READERS) for r in node.outputs[0].outputs))


def _implicit_inputs(node: gs.Node) -> tuple[str, ...]:
    """Outer-scope tensors a subgraph (If/Loop/Scan body) reads: they must stay alive through the node."""
    names: list[str] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            names += [n for n, t in value._foreign_tensors().items() if isinstance(t, gs.Variable) and n]
    return tuple(dict.fromkeys(names))


def dataflow_of(graph: gs.Graph, strict: bool = True) -> Dataflow:
    """The backend view of ``graph``. With ``strict``, a tensor without a static size is a ShapeError;
    otherwise it is left out (for estimates on partly dynamic graphs). Outputs of ``decoded_weight`` nodes
    are not arena tensors."""
    outputs = ir.graph_outputs(graph)
    steps: list[Step] = []
    sizes: dict[str, int] = {}
    for node in graph.nodes:
        ins = tuple(t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name) + _implicit_inputs(node)
        outs = tuple(t.name for t in node.outputs if t.name)
        for t in node.outputs:
            if not t.name or t.name in outputs or decoded_weight(node):
                continue
            n = ir.tensor_nbytes(t)
            if n is None:
                if strict:
                    raise ShapeError(f"tensor '{t.name}' (output of {node.op} node '{node.name}') has no static "
                                     f"shape ({t.shape}); bind the model's dynamic input dims with --input-shape")
                continue
            sizes[t.name] = n
        scratch = scratch_bytes(node) + sum(
            decode_scratch(ir.producer(t), node) for t in node.inputs
            if isinstance(t, gs.Variable) and ir.producer(t) is not None and decoded_weight(ir.producer(t)))
        steps.append(Step(node.name, ins, outs, scratch, _inplace_pairs(node, sizes)))
    return Dataflow(tuple(steps), sizes)


# Ops whose output may overwrite an input of the same shape as it is computed (element i reads element i).
ELEMENTWISE = frozenset({"Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt",
                         "Reciprocal", "Softplus", "LeakyRelu", "Elu", "HardSigmoid", "HardSwish", "Clip", "Cast",
                         "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Softmax"})
MS_ELEMENTWISE = frozenset({"QuickGelu", "FastGelu", "Gelu"})
VIEWS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _inplace_pairs(node: gs.Node, sizes: dict[str, int]) -> tuple[tuple[str, str], ...]:
    """(input, output) pairs the kernel may compute in place: an elementwise op's input with the output's
    shape and byte size, or a view op's input (same bytes)."""
    if len(node.outputs) != 1 or not node.outputs[0].name:
        return ()
    out = node.outputs[0]
    if not (ir.is_op(node, ELEMENTWISE | VIEWS) or ir.is_op(node, MS_ELEMENTWISE, ir.MS_DOMAIN)):
        return ()
    pairs = []
    for t in node.inputs[:1] if ir.is_op(node, VIEWS) else node.inputs:
        if (isinstance(t, gs.Variable) and t.name in sizes and sizes.get(out.name) == sizes[t.name]
                and (ir.is_op(node, VIEWS) or ir.static_shape(t) == ir.static_shape(out))):
            pairs.append((t.name, out.name))
    return tuple(pairs)


def estimate_peak(graph: gs.Graph, alignment: int = 64) -> int | None:
    """Live-set lower bound of the intermediates over the current node order (no scratch, no in-place);
    None when no intermediate has a static size. A cheap sweep for the per-pass record."""
    outputs = ir.graph_outputs(graph)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    size: dict[str, int] = {}
    for step, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t.name in first:
                last[t.name] = step
        if ir.is_op(node, "DequantizeLinear") and decoded_weight(node):
            continue
        for t in node.outputs:
            if t.name and t.name not in outputs:
                n = ir.tensor_nbytes(t)
                if n is not None:
                    first[t.name] = last[t.name] = step
                    size[t.name] = align_up(n, alignment)
    if not size:
        return None
    return peak_live((size[n], first[n], last[n]) for n in size)[0]


def io_bytes(graph: gs.Graph, state: Sequence[tuple[str, str]] = ()) -> int:
    """Bytes of the graph's inputs and outputs, less the ``state`` pairs (counted once, as state)."""
    held = {name for pair in state for name in pair}
    return sum(ir.tensor_nbytes(t) or 0 for t in list(graph.inputs) + list(graph.outputs) if t.name not in held)


def plan_memory(graph: gs.Graph, target: Target, inplace: bool = False,
                state: Sequence[tuple[str, str]] = ()) -> MemoryPlan:
    """Schedule, reorder ``graph.nodes`` to the schedule, and place every arena tensor. With ``inplace``,
    outputs of elementwise/view ops take their dying input's bytes (``lmc.targets.inplace``). ``state``
    (input, output) pairs share one buffer (a generation bundle's cache) and are planned as state."""
    shapes.require_static_shapes(graph)
    alignment = target.memory.alignment
    flow = dataflow_of(graph)
    order, scheduler = choose_schedule(flow, alignment)
    nodes = list(graph.nodes)
    graph.nodes = [nodes[i] for i in order]
    flow = Dataflow(tuple(flow.steps[i] for i in order), flow.sizes)
    live = compute_liveness(flow, list(range(len(flow.steps))))
    planner = ArenaPlanner(alignment)
    merged: list[tuple[str, str]] = []
    if inplace:
        pairs_at = {pos: step.inplace for pos, step in enumerate(flow.steps) if step.inplace}
        buffers, owner, merged = merge_inplace(live.intervals, pairs_at, alignment)
        for b in buffers:
            planner.add_buffer(b.size, b.first, b.last)
        arena = planner.plan()
        tensors = tuple(PlannedTensor(iv.name, align_up(iv.size, alignment), arena.offsets[owner[iv.name]],
                                      iv.first, iv.last) for iv in live.intervals)
    else:
        for iv in live.intervals:
            planner.add_buffer(iv.size, iv.first, iv.last)
        arena = planner.plan()
        tensors = tuple(PlannedTensor(iv.name, size, off, iv.first, iv.last)
                        for iv, size, off in zip(live.intervals, arena.sizes, arena.offsets))
    placement = target.memory.weights_placement
    weights = {p.value: 0 for p in WeightsPlacement}
    weights[placement.value] = ir.weight_bytes(graph)
    decoded = tuple(n.outputs[0].name for n in graph.nodes if decoded_weight(n))
    by_name = {t.name: t for t in graph.inputs}
    scratch = tuple(PlannedTensor(t.name[: -len(SCRATCH_SUFFIX)], t.size, t.offset, t.first, t.last)
                    for t in tensors if t.name.endswith(SCRATCH_SUFFIX))
    tensors = tuple(t for t in tensors if not t.name.endswith(SCRATCH_SUFFIX))
    return MemoryPlan(
        decoded_weights=decoded,
        target=target.name, alignment=alignment, arena_bytes=arena.arena_bytes,
        lower_bound_bytes=arena.lower_bound_bytes, weights_bytes=weights, io_bytes=io_bytes(graph, state),
        state=tuple(StateBuffer(i, o, align_up(ir.tensor_nbytes(by_name[i]) or 0, alignment)) for i, o in state),
        scheduler=scheduler, placement_strategy=arena.strategy,
        schedule=tuple(s.name for s in flow.steps), tensors=tensors, scratch=scratch, inplace=tuple(merged))
