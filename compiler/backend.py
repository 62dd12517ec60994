"""Lower a gs graph to the backend's Dataflow and plan its memory for a target.

``dataflow_of(graph)``: one Step per node (in the graph's order, which must be topological); arena
tensors are node outputs that are not graph outputs, sized from their static shapes
(ceil(numel·bits/8)); kernel scratch comes from ``lmc.compiler.scratch``.

``plan_memory(graph, target)``: choose a schedule (``lmc.targets.schedule``), reorder the graph's nodes
to it, compute liveness, place buffers with the arena planner, and return a ``MemoryPlan``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import ShapeError
from lmc.core.runtime import Int8Products
from lmc.compiler.scratch import decode_scratch, scratch_bytes
from lmc.targets.arena import ArenaPlanner
from lmc.targets.dataflow import Dataflow, Step
from lmc.targets.inplace import merge_inplace
from lmc.targets.liveness import SCRATCH_SUFFIX, align_up, compute_liveness, lower_bound, peak_live
from lmc.targets.plan import MemoryPlan, PlannedTensor, StateBuffer
from lmc.targets.runtime_model import DECODED_MATMUL, DecodedMatMul, RuntimeModel, merge_session_options
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
    """Outer-scope tensors a subgraph (If/Loop/Scan body, at any depth) reads: they must stay alive through
    the node, so they are inputs of its step."""
    return tuple(dict.fromkeys(t.name for t in ir.outer_reads(node) if isinstance(t, gs.Variable) and t.name))


# Bodies are planned at this alignment when the caller gives none (the largest any target uses: a body's
# live set is then never under-counted).
_BODY_ALIGNMENT = 64


def _subgraph_scratch(node: gs.Node, strict: bool, alignment: int) -> int:
    """Working memory of a node's subgraphs while it runs: the largest live set of a body's own
    intermediates (the same liveness sweep as the main graph, over the body's node order, nested bodies
    counted as scratch of their nodes), the maximum over the node's bodies (one If branch runs at a time).
    A Loop/Scan body's outputs are per-iteration buffers beside the node's outputs, so they count too; an
    If branch's outputs are the If's outputs, already planned."""
    best = 0
    for body in ir.subgraphs(node):
        flow = dataflow_of(body, strict, alignment)
        peak = lower_bound(compute_liveness(flow, list(range(len(flow.steps)))).intervals, alignment)
        if not ir.is_op(node, "If"):
            for t in body.outputs:
                n = ir.tensor_nbytes(t)
                if n is None and strict:
                    raise ShapeError(f"tensor '{t.name}' (an output of the body of {node.op} node '{node.name}') "
                                     f"has no static shape ({t.shape}); bind the model's dynamic input dims "
                                     f"with --input-shape")
                peak += align_up(n or 0, alignment)
        best = max(best, peak)
    return best


def dataflow_of(graph: gs.Graph, strict: bool = True, alignment: int | None = None) -> Dataflow:
    """The backend view of ``graph``. With ``strict``, a tensor without a static size is a ShapeError;
    otherwise it is left out (for estimates on partly dynamic graphs). Outputs of ``decoded_weight`` nodes
    are not arena tensors. A node holding subgraphs reads every outer tensor they read (at any depth), and
    its step's scratch includes the peak of its bodies' own intermediates (``_subgraph_scratch``, planned at
    ``alignment``, 64 bytes when not given)."""
    body_alignment = alignment or _BODY_ALIGNMENT
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
        if ir.has_subgraph(node):
            scratch += _subgraph_scratch(node, strict, body_alignment)
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


def _reader_name(node: gs.Node) -> str:
    """The kernel kind of a reader: ``domain.op``; MatMulNBits at accuracy level 0 (float activations, the
    attribute's default) is the variant ``com.microsoft.MatMulNBits@0``."""
    name = f"{node.domain}.{node.op}" if node.domain and node.domain not in ir.DEFAULT_DOMAINS else node.op
    if ir.is_op(node, "MatMulNBits", ir.MS_DOMAIN) and int(node.attrs.get("accuracy_level", 0)) == 0:
        return name + "@0"
    return name


def _decoded_kernel(dq: gs.Node) -> str:
    """The kernel onnxruntime makes of DequantizeLinear(weight) → MatMul: with a quantized activation too
    (QDQ on both sides, w8a8) an integer GEMM on the int8 weight itself; else ``DECODED_MATMUL``, whose
    kernel the target's runtime model names (MatMulNBits, at the accuracy level its session options set)."""
    for mm in dq.outputs[0].outputs:
        other = [t for t in mm.inputs if t is not dq.outputs[0]]
        if other and ir.producer(other[0]) is not None and ir.is_op(ir.producer(other[0]), "DequantizeLinear"):
            return f"{ir.MS_DOMAIN}.MatMulIntegerToFloat"
    return DECODED_MATMUL


def _rows(tensor: gs.Tensor) -> int:
    """Rows a MatMul multiplies for activation ``tensor``: the product of its leading dims, a dimension left
    symbolic (a generation bundle's sequence length) or unknown counting as 1 — its smallest value."""
    dims = list(tensor.shape or [])[:-1]
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in dims)


def written_decoded_matmul(node: gs.Node) -> bool:
    """A MatMulNBits written for a decoded weight (``lmc.compiler.lower_matmulnbits``): its packed weight is
    a constant no other node reads (a tied head's table is also its embedding's GatherBlockQuantized)."""
    return (ir.is_op(node, "MatMulNBits", ir.MS_DOMAIN) and len(node.inputs) > 1
            and isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].outputs) == 1)


def decoded_matmuls(graph: gs.Graph) -> list[DecodedMatMul]:
    """Weight bits and rows of every MatMul whose weight lmc decodes into it with its activation left in
    float (``_decoded_kernel`` is ``DECODED_MATMUL``, or the MatMulNBits written for one): what the runtime
    model's choices read."""
    out = []
    for node in graph.nodes:
        if written_decoded_matmul(node):
            out.append(DecodedMatMul(int(node.attrs["bits"]), _rows(node.inputs[0])))
            continue
        if not decoded_weight(node) or _decoded_kernel(node) != DECODED_MATMUL:
            continue
        bits = ir.itemsize_bits(ir.onnx_dtype(node.inputs[0].dtype))
        for mm in node.outputs[0].outputs:
            other = [t for t in mm.inputs if t is not node.outputs[0]]
            out.append(DecodedMatMul(bits, _rows(other[0]) if other else 1))
    return out


INT8_ACTIVATIONS_KEPT = {"config_entries": {"session.qdqisint8allowed": "1"}}


def int8_activations(graph: gs.Graph) -> bool:
    """True when the graph quantizes an activation to int8 (w8a8's QuantizeLinear with an int8 zero point)."""
    return any(ir.is_op(n, "QuantizeLinear") and len(n.inputs) > 2 and n.inputs[2].dtype == np.int8
               for n in graph.nodes)


def runtime_for(graph: gs.Graph, target: Target) -> RuntimeModel:
    """The target's runtime model under the session configuration it chooses for ``graph``'s bundle (the
    first of its ``choices`` that applies to the graph's decoded MatMuls; ``session_options`` is what the
    bundle carries). A bundle with int8 activations for a target whose integer GEMM is exact on int8
    (``Int8Products.EXACT``: Arm's SDOT, where onnxruntime keeps them int8 by default) carries
    ``session.qdqisint8allowed = 1``, so that every machine that runs or checks it — an x86-64 host too,
    which would otherwise shift them to uint8 for a kernel that saturates — computes what the device does."""
    model = target.runtime.choose(decoded_matmuls(graph))
    if target.isa.int8_products is Int8Products.EXACT and int8_activations(graph):
        model = dataclasses.replace(model, session_options=merge_session_options(model.session_options,
                                                                                  INT8_ACTIVATIONS_KEPT))
    return model


def _integer_gemm_input(dq: gs.Node) -> bool:
    """An activation's DequantizeLinear read only by MatMuls whose weight is decoded (w8a8): onnxruntime
    fuses it, with them, into the integer GEMM."""
    readers = dq.outputs[0].outputs if ir.is_op(dq, "DequantizeLinear") and dq.outputs else []
    return bool(readers) and all(
        ir.is_op(mm, "MatMul") and any(ir.producer(t) is not None and decoded_weight(ir.producer(t))
                                       for t in mm.inputs if t is not dq.outputs[0])
        for mm in readers)


def weight_readers(graph: gs.Graph) -> list[tuple[int, list[str]]]:
    """(bytes, reader op names) per constant; a weight decoded inside its MatMul (``decoded_weight``) is
    read by the fused kernel onnxruntime makes of the pair (``_decoded_kernel``), and so are the scales of
    the activation's DequantizeLinear fused into an integer GEMM (``_integer_gemm_input``)."""
    out = []
    for const in ir.constants(graph):
        readers = []
        for node in const.outputs:
            if decoded_weight(node):
                readers.append(_decoded_kernel(node))
            elif _integer_gemm_input(node):
                readers.append(f"{ir.MS_DOMAIN}.MatMulIntegerToFloat")
            else:
                readers.append(_reader_name(node))
        out.append((ir.tensor_nbytes(const) or 0, readers))
    return out


def predict_runtime(graph: gs.Graph, plan: MemoryPlan, target: Target, runtime: RuntimeModel | None = None) -> dict:
    """The target runtime model's prediction for ``plan`` (see ``lmc.targets.runtime_model``), under
    ``runtime`` (the model as chosen for the bundle; ``runtime_for(graph, target)`` when not given)."""
    model = runtime if runtime is not None else runtime_for(graph, target)
    held = {name for b in plan.state for name in (b.input, b.output)}
    inputs = sum(ir.tensor_nbytes(t) or 0 for t in graph.inputs if t.name not in held)
    outputs = sum(ir.tensor_nbytes(t) or 0 for t in graph.outputs if t.name not in held)
    prediction = model.predict(weight_readers(graph), plan.arena_bytes, inputs, outputs, plan.state_bytes,
                               nodes=len(graph.nodes))
    return prediction.to_dict()


def io_bytes(graph: gs.Graph, state: Sequence[tuple[str, str]] = ()) -> int:
    """Bytes of the graph's inputs and outputs, less the ``state`` pairs (counted once, as state)."""
    held = {name for pair in state for name in pair}
    return sum(ir.tensor_nbytes(t) or 0 for t in list(graph.inputs) + list(graph.outputs) if t.name not in held)


def plan_memory(graph: gs.Graph, target: Target, inplace: bool = False,
                state: Sequence[tuple[str, str]] = (), runtime: RuntimeModel | None = None) -> MemoryPlan:
    """Schedule, reorder ``graph.nodes`` to the schedule, and place every arena tensor. With ``inplace``,
    outputs of elementwise/view ops take their dying input's bytes (``lmc.targets.inplace``). ``state``
    (input, output) pairs share one buffer (a generation bundle's cache) and are planned as state.
    ``runtime``: the runtime model the bundle was chosen under (``runtime_for``), for a graph bound to one
    of several profiles; by default chosen for ``graph`` as it is."""
    shapes.require_static_shapes(graph)
    alignment = target.memory.alignment
    flow = dataflow_of(graph, alignment=alignment)
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
    plan = MemoryPlan(
        decoded_weights=decoded,
        target=target.name, alignment=alignment, arena_bytes=arena.arena_bytes,
        lower_bound_bytes=arena.lower_bound_bytes, weights_bytes=weights, io_bytes=io_bytes(graph, state),
        state=tuple(StateBuffer(i, o, align_up(ir.tensor_nbytes(by_name[i]) or 0, alignment)) for i, o in state),
        scheduler=scheduler, placement_strategy=arena.strategy,
        schedule=tuple(s.name for s in flow.steps), tensors=tensors, scratch=scratch, inplace=tuple(merged))
    return dataclasses.replace(plan, runtime=predict_runtime(graph, plan, target, runtime))
