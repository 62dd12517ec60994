"""Mixture-of-experts routing with a fixed number of rows: the per-expert ``NonZero`` becomes one row per token.

Exporters write a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) as a loop over the experts:
    sel   = TopK(router, k).indices                               [T, k]   (distinct experts per token)
    m_e   = OneHot(sel, E)ᵀ[e]  |  (Unsqueeze(sel) == arange(E))ᵀ[e]     [k, T]   (at most one true per column)
    (slot, tok) = NonZero(m_e)                                    N rows, N = how many tokens chose e
    y_e   = expert_e(x[tok]) · w[tok, slot]                       row-wise in the N rows
    acc   = Scatter(acc | zeros, tok, y_e, add)                   ScatterND(reduction=add), or into zeros
N depends on the values, so no static memory plan can hold it. Rewrite, with T tokens:
    slot  = ArgMax(m_e, axis 0)  (the slot where token t chose e, 0 if none),  tok = 0 … T−1 (CumSum)
    r     = ReduceMax(m_e, axis 0)  (1 if token t chose e, else 0)
    acc   = Scatter(acc | zeros, tok, y_e · r, …)
Every token's row is computed and the rows of tokens that did not choose e add exact zeros, so the
result is the original's (within the expert matmul's float reassociation over a different row count);
memory and work are those of a dense expert over all T tokens.

Preconditions, checked (otherwise the node is left as it is): m_e comes from TopK indices through
OneHot or Equal-with-arange, a Transpose to [E, k, T] and a Gather of one expert; the tensors between the
NonZero and the scatters are computed row by row (an allow-list of elementwise, indexing and shape ops;
MatMul/Gemm only with a constant right operand); every scatter those rows reach adds (reduction ``add``, or
no reduction into a zero-filled tensor), with its rows on its scatter axis.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

# Ops the routed rows may pass through between the NonZero and the scatters: row-wise in their first
# (data) axis or index arithmetic on the row ids.
ROW_OPS = frozenset({
    "Transpose", "Split", "Squeeze", "Unsqueeze", "Slice", "Concat", "Reshape", "Flatten", "Expand", "Shape",
    "Cast", "Identity", "Gather", "GatherND", "GatherElements", "ConstantOfShape",
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal", "Max", "Min", "Clip", "Where", "Equal",
    "Sigmoid", "Tanh", "Erf", "Relu", "Gelu", "Softplus", "Exp", "Log", "Abs", "HardSigmoid", "HardSwish",
    "MatMul", "Gemm",
})
SCATTERS = ("ScatterND", "ScatterElements")


def _const(t: gs.Tensor) -> np.ndarray | None:
    """A constant's value, also when it is still a Constant node's output (the pass runs before folding)."""
    value = ir.const_value(t)
    node = ir.producer(t) if value is None else None
    if node is not None and ir.is_op(node, "Constant") and isinstance(node.attrs.get("value"), gs.Constant):
        value = ir.const_value(node.attrs["value"])
    return value


def _topk_one_hot(mask: gs.Tensor) -> bool:
    """``mask`` is [k, T] = Gather(Transpose₂₁₀(OneHot(TopK indices) | Equal(Unsqueeze(indices), arange)), e)."""
    t = mask
    seen = []
    for _ in range(8):
        node = ir.producer(t)
        if node is None:
            return False
        seen.append(node.op)
        if ir.is_op(node, ("Cast", "Identity")):
            t = node.inputs[0]
            continue
        if ir.is_op(node, "Gather"):
            if int(node.attrs.get("axis", 0)) != 0 or _const(node.inputs[1]) is None \
                    or np.asarray(_const(node.inputs[1])).ndim != 0 or "Transpose" in seen[:-1]:
                return False
            t = node.inputs[0]
            continue
        if ir.is_op(node, "Transpose"):
            if list(node.attrs.get("perm", [])) != [2, 1, 0]:
                return False
            t = node.inputs[0]
            continue
        if ir.is_op(node, "OneHot"):
            if int(node.attrs.get("axis", -1)) not in (-1, 2):
                return False
            indices = node.inputs[0]
        elif ir.is_op(node, "Equal"):
            a, b = node.inputs
            if _const(a) is not None:
                a, b = b, a
            values = _const(b)
            if values is None or not np.array_equal(np.asarray(values).reshape(-1), np.arange(np.asarray(values).size)):
                return False
            unsq = ir.producer(a)
            if unsq is None or not ir.is_op(unsq, "Unsqueeze"):
                return False
            indices = unsq.inputs[0]
        else:
            return False
        topk = ir.producer(indices)
        return "Transpose" in seen and topk is not None and ir.is_op(topk, "TopK") and topk.outputs[1] is indices
    return False


def _rows_region(start: gs.Tensor) -> tuple[list[gs.Node], str | None]:
    """The scatters the rows of ``start`` reach, and why the region is not row-wise (None if it is)."""
    scatters, stack, seen = [], [start], set()
    while stack:
        t = stack.pop()
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if ir.is_op(node, SCATTERS):
                scatters.append(node)
                continue                     # the accumulated result is no longer per row
            if not ir.is_op(node, tuple(ROW_OPS)):
                return scatters, f"{node.op} '{node.name}' is not row-wise"
            if ir.is_op(node, ("MatMul", "Gemm")) and (node.inputs[1] in (t,) or _const(node.inputs[1]) is None
                                                       or int(node.attrs.get("transA", 0))):
                return scatters, f"{node.op} '{node.name}' mixes the rows"
            stack.extend(node.outputs)
    return scatters, None


def _row_axis(scatter: gs.Node) -> int | None:
    """The axis of the scatter's updates that holds the routed rows, if it adds into an accumulator."""
    reduction = scatter.attrs.get("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
    data = scatter.inputs[0]
    zeros = False
    fill = _const(data)
    if fill is not None:
        zeros = not np.any(np.asarray(fill))
    else:
        src = ir.producer(data)
        if src is not None and ir.is_op(src, "ConstantOfShape"):
            value = src.attrs.get("value")
            value = value.values if isinstance(value, gs.Constant) else value
            zeros = value is None or not np.any(np.asarray(value if not isinstance(value, onnx.TensorProto)
                                                           else onnx.numpy_helper.to_array(value)))
    if reduction != "add" and not (reduction == "none" and zeros):
        return None
    if ir.is_op(scatter, "ScatterElements"):
        rank = len(scatter.inputs[2].shape or [])
        return int(scatter.attrs.get("axis", 0)) % rank if rank else None
    indices = scatter.inputs[1].shape
    return 0 if indices is not None and len(indices) == 2 else None


class MoeRouting:
    name = "moe-routing"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = ir.Namer(graph)
        done, skipped = 0, []
        for node in [n for n in graph.nodes if ir.is_op(n, "NonZero")]:
            mask = node.inputs[0]
            if not _topk_one_hot(mask) or mask.shape is None or len(mask.shape) != 2:
                continue
            scatters, why = _rows_region(node.outputs[0])
            axes = [_row_axis(s) for s in scatters]
            if why is None and (not scatters or None in axes):
                why = "its rows do not end in an adding scatter"
            if why is not None:
                skipped.append(f"{node.name}: {why}")
                continue
            self._rewrite(graph, node, scatters, axes, names)
            done += 1
        if done:
            ir.topological_sort(graph)
            shapes.infer_shapes(graph)
        notes = [f"{done} expert routings with one row per token"] if done else []
        return PassResult(graph, modified=bool(done), stats={"routings": done},
                          notes=notes + [f"left: {s}" for s in skipped])

    @staticmethod
    def _rewrite(graph, nonzero: gs.Node, scatters, axes, names) -> None:
        i64, f32 = np.int64, np.float32
        mask, out = nonzero.inputs[0], nonzero.outputs[0]
        base = nonzero.name or out.name

        def var(tag, dtype):
            return gs.Variable(names.fresh(f"{base}_{tag}"), dtype=dtype)

        def const(tag, value):
            return gs.Constant(names.fresh(f"{base}_{tag}"), np.asarray(value))

        nodes = []

        def add(op, inputs, output, **attrs):
            nodes.append(gs.Node(op, name=names.fresh(output.name), inputs=inputs, outputs=[output], attrs=attrs))
            return output

        as_float = add("Cast", [mask], var("mask_float", f32), to=onnx.TensorProto.FLOAT)
        slot = add("ArgMax", [as_float], var("slot", i64), axis=0, keepdims=1)                  # [1, T]
        # tokens 0 … T−1 as a running count over the slots (all ≥ 0), not a Range of the static T: that would
        # fold into a constant fixed at one compile's length
        ones = add("Cast", [add("GreaterOrEqual", [slot, const("zero", i64(0))], var("any", np.bool_))],
                   var("ones", i64), to=onnx.TensorProto.INT64)
        count = add("CumSum", [ones, const("token_axis", i64(1))], var("count", i64))
        token = add("Sub", [count, const("one", i64(1))], var("token", i64))                     # [1, T]
        nodes.append(gs.Node("Concat", name=names.fresh(base + "_rows"), inputs=[slot, token], outputs=[out],
                             attrs={"axis": 0}))                                                  # [2, T]
        if int(graph.opset) >= 18:
            chose = add("ReduceMax", [as_float, const("axes0", [0])], var("chose", f32), keepdims=0)  # [T]
        else:
            chose = add("ReduceMax", [as_float], var("chose", f32), axes=[0], keepdims=0)
        nonzero.inputs.clear()
        nonzero.outputs.clear()
        graph.nodes.remove(nonzero)
        for scatter, axis in zip(scatters, axes):
            updates = scatter.inputs[2]
            rank = len(updates.shape) if updates.shape is not None else axis + 1
            other = [a for a in range(rank) if a != axis]
            weight = add("Unsqueeze", [chose, const("row_axes", other)], var("row_weight", f32)) if other else chose
            if updates.dtype is not None and np.dtype(updates.dtype) != np.float32:
                weight = add("Cast", [weight], var("row_weight_cast", updates.dtype), to=ir.onnx_dtype(updates.dtype))
            scatter.inputs[2] = add("Mul", [updates, weight], var("routed", updates.dtype))
        graph.nodes.extend(nodes)
