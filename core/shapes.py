"""Shapes: binding input dims, onnx shape inference on the gs graph, and the static-shape checks.

``infer_shapes`` runs onnx shape inference (data propagation on) on ``ir.export_skeleton(graph)`` — large
constants are dtype+dims stubs, so no weight is copied and graphs over 2 GB infer — and writes the inferred
dtypes/shapes back onto the graph's variables. Any dim still dynamic when planning is a ``ShapeError``
naming the tensor (or the input and the dim). Subgraph tensors (If branches, Loop/Scan bodies) get their
inferred shapes too. ``bind_input_values`` fixes an input's *value* (e.g. a sample-rate scalar that picks an
If branch): the input becomes a constant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core.errors import ShapeError
from lmc.core.ir import INPUT_ORDER, UPPER_SHAPE, export_skeleton, graph_outputs, initializer_inputs, static_shape


def infer_shapes(graph: gs.Graph) -> None:
    """Run onnx shape inference (data propagation on) and write dtypes/shapes back onto variables.

    Existing static shapes are kept when inference has nothing better. Raises ShapeError when onnx
    reports an inconsistency (e.g. a bound input shape the graph cannot take).
    Precondition: the graph's nodes are in topological order.
    """
    model = export_skeleton(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ShapeError(f"shape inference failed: {str(exc).splitlines()[0]}") from exc
    _write_back(graph, inferred.graph)


def _write_back(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Copy inferred dtypes/shapes from ``proto`` (the export of ``graph``, same node order) onto the
    graph's variables, then into each subgraph from the matching node attribute; a Loop's loop-carried
    outputs get the shape their initial value and the body's output agree on."""
    infos = {vi.name: vi for vi in list(proto.value_info) + list(proto.output)}
    for name, var in graph.tensors().items():
        if isinstance(var, gs.Variable) and name in infos:
            _apply(var, infos[name].type.tensor_type)
    for var in graph.outputs:
        if isinstance(var, gs.Variable) and var.name in infos:
            _apply(var, infos[var.name].type.tensor_type)
    if len(proto.node) != len(graph.nodes):
        return
    for node, node_proto in zip(graph.nodes, proto.node):
        attrs = {a.name: a for a in node_proto.attribute}
        for key, value in node.attrs.items():
            if isinstance(value, gs.Graph) and key in attrs and attrs[key].type == onnx.AttributeProto.GRAPH:
                _write_back(value, attrs[key].g)
        if node.op == "Loop" and (node.domain or "") in ("", "ai.onnx") and isinstance(node.attrs.get("body"), gs.Graph):
            body = node.attrs["body"]
            for i, out in enumerate(node.outputs[:max(0, len(node.inputs) - 2)]):
                initial = node.inputs[2 + i]
                body_out = body.outputs[1 + i] if 1 + i < len(body.outputs) else None
                shape = static_shape(initial)
                if (shape is not None and body_out is not None and static_shape(body_out) == shape
                        and static_shape(out) is None):
                    out.shape = list(shape)
                    if out.dtype is None:
                        out.dtype = initial.dtype


def _apply(var: gs.Variable, ttype) -> None:
    if not ttype.HasField("elem_type") or ttype.elem_type == 0:
        return
    if ttype.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
        old = var.shape
        if old is None or static_shape(var) is None or all(isinstance(d, int) for d in dims):
            var.shape = dims
    if var.dtype is None:
        try:
            var.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        except (KeyError, TypeError):
            var.dtype = ttype.elem_type


def bind_input_shapes(graph: gs.Graph, shapes: dict[str, Sequence[int]]) -> None:
    """Set the shapes of named graph inputs. Unknown input names and rank mismatches are user errors;
    a bound dim must agree with a dim that was already static."""
    inputs = {t.name: t for t in graph.inputs}
    overridable = initializer_inputs(graph)
    for name, dims in shapes.items():
        if name not in inputs and name in overridable:
            inputs[name] = _initializer_to_input(graph, name)
        if name not in inputs:
            raise ShapeError(
                f"--input-shape names '{name}', but the model's inputs are: {', '.join(inputs) or '(none)'}")
        var = inputs[name]
        dims = [int(d) for d in dims]
        if var.shape is not None and len(var.shape) != len(dims):
            raise ShapeError(f"input '{name}' has rank {len(var.shape)} ({_fmt(var.shape)}), "
                             f"--input-shape gives rank {len(dims)} ({_fmt(dims)})")
        if var.shape is not None:
            for axis, (old, new) in enumerate(zip(var.shape, dims)):
                if isinstance(old, int) and old >= 0 and old != new:
                    raise ShapeError(f"input '{name}' dim {axis} is fixed at {old}; --input-shape gives {new}")
        if any(d < 0 for d in dims):
            raise ShapeError(f"input '{name}': dims must be ≥ 0, got {_fmt(dims)}")
        if 0 in dims and not is_cache_input(name):
            raise ShapeError(f"input '{name}': --input-shape gives dim {dims.index(0)} as 0 ({_fmt(dims)}); an empty "
                             "tensor is accepted only for a cache input (a name with 'past', e.g. an empty "
                             "past_key_values), a model computes nothing on an empty input otherwise")
        var.shape = dims


def is_cache_input(name: str) -> bool:
    """A past key/value cache input (exporters name them past_key_values.*, past.*, past_key.*): the only
    inputs that may be bound with a 0 dim (an empty cache)."""
    return "past" in name.lower()


def bind_input_values(graph: gs.Graph, values: Mapping[str, np.ndarray]) -> None:
    """Fix named graph inputs to the given values: each becomes a constant (same name) that every reader
    reads instead — inside If/Loop/Scan bodies too — and leaves ``graph.inputs``. Constant folding then
    folds what depends on it (an ``If`` on ``sr == 16000`` becomes its chosen branch).

    A value is converted to the input's dtype (a value that changes when converted is refused) and must
    have the input's rank, and its shape must match every static dim (dynamic dims take the value's).
    Unknown names, inputs that are also graph outputs and mismatches raise ``ShapeError`` (a user error).
    """
    inputs = {t.name: t for t in graph.inputs}
    bound: list[gs.Tensor] = []
    for name, given in values.items():
        if name not in inputs:
            raise ShapeError(f"--input-value names '{name}', but the model's inputs are: "
                             f"{', '.join(inputs) or '(none)'}")
        var = inputs[name]
        if name in graph_outputs(graph):
            raise ShapeError(f"--input-value: input '{name}' is also a model output; it cannot be fixed")
        raw = np.asarray(given)
        dtype = np.dtype(var.dtype) if var.dtype is not None else raw.dtype
        try:
            value = raw.astype(dtype)
            same = raw.dtype == dtype or bool(np.all(value.astype(raw.dtype) == raw))
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ShapeError(f"--input-value {name}: {raw.tolist()!r} is not representable as the input's "
                             f"dtype {dtype}")
        if var.shape is not None:
            if len(var.shape) != value.ndim:
                raise ShapeError(f"--input-value {name}: the input has rank {len(var.shape)} ({_fmt(var.shape)}), "
                                 f"the value has shape {_fmt(value.shape)}")
            for axis, (dim, got) in enumerate(zip(var.shape, value.shape)):
                if isinstance(dim, int) and dim >= 0 and dim != got:
                    raise ShapeError(f"--input-value {name}: dim {axis} is fixed at {dim}, the value has "
                                     f"shape {_fmt(value.shape)}")
        const = gs.Constant(name, np.ascontiguousarray(value))
        for reader in list(var.outputs):          # body nodes reading it are in var.outputs as well
            for i, t in enumerate(reader.inputs):
                if t is var:
                    reader.inputs[i] = const
        var.name = f"{name}__bound"
        bound.append(var)
    graph.inputs = [t for t in graph.inputs if not any(t is b for b in bound)]


def _initializer_to_input(graph: gs.Graph, name: str) -> gs.Variable:
    """Make the initializer ``name``, which the model also listed as a graph input, a run-time input again
    (the user bound its shape): its readers read a new input variable, placed where the model listed it."""
    _, info = initializer_inputs(graph)[name]
    const = next((t for t in graph.tensors().values() if t.name == name and isinstance(t, gs.Constant)), None)
    ttype = info.type.tensor_type
    dtype = const.dtype if const is not None else onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    if ttype.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
    else:
        shape = list(const.shape) if const is not None else None
    var = gs.Variable(name, dtype=dtype, shape=shape)
    if const is not None:
        for node in list(const.outputs):
            for i, t in enumerate(node.inputs):
                if t is const:
                    node.inputs[i] = var
    graph.inputs.append(var)
    order = getattr(graph, INPUT_ORDER, None) or {}
    graph.inputs.sort(key=lambda t: order.get(t.name, len(order)))    # stable: where the model listed it
    return var


def require_static_inputs(graph: gs.Graph, where: str = "planning") -> None:
    """Every graph input must be fully static; the first dynamic one is named with its dims."""
    for var in graph.inputs:
        if static_shape(var) is None:
            dynamic = [f"dim {i} ('{d}')" for i, d in enumerate(var.shape or []) if not isinstance(d, int)]
            raise ShapeError(
                f"input '{var.name}' has dynamic {', '.join(dynamic) or 'shape'} ({_fmt(var.shape)}); "
                f"bind it for {where} with --input-shape {var.name}={'x'.join('N' for _ in (var.shape or [0]))}")


def require_static_shapes(graph: gs.Graph, where: str = "planning") -> None:
    """Every graph input and every used intermediate must have a static shape (or, data-dependent, a
    recorded largest one: ``ir.set_upper_shape``); the first that does not is named."""
    require_static_inputs(graph, where)
    for node in graph.nodes:
        for out in node.outputs:
            if static_shape(out) is None and not hasattr(out, UPPER_SHAPE) and not _is_unused(out, graph):
                raise ShapeError(f"tensor '{out.name}' (output of {node.op} node '{node.name}') has no static "
                                 f"shape ({_fmt(out.shape)}) after binding the inputs: either the model does not "
                                 f"accept these input shapes, or the size depends on input values, which a static "
                                 f"memory plan cannot know ({where})")


def _is_unused(var: gs.Tensor, graph: gs.Graph) -> bool:
    return not var.outputs and var.name not in graph_outputs(graph)


def _fmt(shape: Iterable | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join(str(d) for d in shape) + "]"
