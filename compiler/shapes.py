"""Shapes: binding input dims, onnx shape inference on the gs graph, and the static-shape checks.

``infer_shapes`` runs onnx shape inference (data propagation on) on ``ir.export_skeleton(graph)`` — large
constants are dtype+dims stubs, so no weight is copied and graphs over 2 GB infer — and writes the inferred
dtypes/shapes back onto the graph's variables. Any dim still dynamic when planning is a ``ShapeError``
naming the tensor (or the input and the dim).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
import onnx_graphsurgeon as gs

from lmc.compiler.errors import ShapeError
from lmc.compiler.ir import INPUT_ORDER, export_skeleton, graph_outputs, initializer_inputs, static_shape


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
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, var in graph.tensors().items():
        if not isinstance(var, gs.Variable) or name not in infos:
            continue
        ttype = infos[name].type.tensor_type
        if not ttype.HasField("elem_type") or ttype.elem_type == 0:
            continue
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
        var.shape = dims


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
    """Every graph input and every used intermediate must have a static shape; the first that does not
    is named."""
    require_static_inputs(graph, where)
    for node in graph.nodes:
        for out in node.outputs:
            if static_shape(out) is None and not _is_unused(out, graph):
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
