"""C emitters for what decoder graphs keep after lmc's passes (family "transformer", float32 with the int64 /
bool index and mask arithmetic around it).

Ops: Gather, GatherElements, GatherND (any element type, indices checked in range at run time: an id outside
the table is ``lmc_run`` code 3), Slice / Expand / Tile (strided copies; Slice starts may be computed at run
time), Split, Where, IsNaN, Not, And/Or/Xor, Equal/Less/LessOrEqual/Greater/GreaterOrEqual (float or int64),
Cast, Sin/Cos, ReduceMean/ReduceSum/ReduceMax (one run of adjacent axes), ArgMax, TopK, CumSum, OneHot,
LayerNormalization, Range, Shape (its values are static), ConstantOfShape, Mod, TensorScatter (opset 24, the
in-place KV cache update), ScatterND / ScatterElements (a windowed cache's ring writes, expert routing) and
Attention (opset 23/24, 4-D, grouped-query heads, bool or additive mask, ``nonpad_kv_seqlen``, ``is_causal``);
and the integer cases of Add/Sub/Mul/Div/Max/Min/Neg, which the float emitters of family "cnn" leave to this
family (``extend``: tried when the first emitter refuses).

Math: as ONNX defines each op; Attention is y = softmax(scale · q kᵀ + mask) v per head, query head h
reading kv head h / (Hq / Hkv), computed in two passes over the keys (max, then exp-sum with the weighted
values accumulated in the output row), so it needs no scratch memory.

Broadcasting: each operand is read through its element strides along the output's dims (0 where broadcast),
adjacent dims merged where every operand steps contiguously (``ops_cnn.collapse``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from onnx import numpy_helper

from lmc.targets.cbundle.ops_cnn import broadcast_strides, collapse, strides_of
from lmc.targets.cbundle.registry import REGISTRY, KernelCall, OpContext, TensorRef, UnsupportedOp

FAMILY = "transformer"
MAX_DIMS = 8
F32, I64, I32, BOOL = np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.bool_)

# ONNX TensorProto element type codes of the dtypes the kernels cast between
DTYPE_CODES = {F32: 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, I32: 6, I64: 7, BOOL: 9}
BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Pow": "POW", "Max": "MAX", "Min": "MIN",
          "Mod": "MOD"}
COMPARE = {"Equal": "EQUAL", "Less": "LESS", "LessOrEqual": "LESS_OR_EQUAL", "Greater": "GREATER",
           "GreaterOrEqual": "GREATER_OR_EQUAL"}
LOGICAL = {"And": "AND", "Or": "OR", "Xor": "XOR"}
UNARY = {"Sin": "SIN", "Cos": "COS", "Neg": "NEG", "Sqrt": "SQRT", "Sigmoid": "SIGMOID", "Exp": "EXP",
         "Reciprocal": "RECIPROCAL", "Abs": "ABS", "Tanh": "TANH", "Relu": "RELU"}
REDUCE = {"ReduceMean": "MEAN", "ReduceSum": "SUM", "ReduceMax": "MAX"}


# ------------------------------------------------------------------------------------------------ helpers
def _ints(values: Sequence[int]) -> str:
    return ", ".join(str(int(v)) for v in values)


def _float(v: float) -> str:
    """A float32 C literal that round-trips (9 significant digits)."""
    text = f"{float(np.float32(v)):.9g}"
    return text + (".0f" if not any(c in text for c in ".eEn") else "f")


def _array(op: OpContext, tag: str, values: Sequence[int]) -> tuple[str, str]:
    """A static const int32_t parameter array: (its name, its definition)."""
    name = f"{op.prefix}_{tag}"
    values = list(values) or [0]
    return name, f"static const int32_t {name}[{len(values)}] = {{{_ints(values)}}};"


def _checked(call: str) -> str:
    """A kernel call whose nonzero return becomes lmc_run's."""
    return f"{{ int lmc_rc = {call}; if (lmc_rc != 0) return lmc_rc; }}"


def _broadcast(op: OpContext, y: TensorRef, *operands: TensorRef) -> tuple[str, list[str], str, int]:
    """(dims array name, stride array names, parameter definitions, rank) of y = f(operands...)."""
    dims, strides = collapse(list(y.shape) or [1], *[broadcast_strides(list(y.shape) or [1], list(x.shape))
                                                     for x in operands])
    if len(dims) > MAX_DIMS:
        raise op.unsupported(f"more than {MAX_DIMS} broadcast dims")
    dname, ddef = _array(op, "dims", dims)
    names, defs = [], [ddef]
    for i, st in enumerate(strides):
        n, d = _array(op, f"s{i}", st)
        names.append(n)
        defs.append(d)
    return dname, names, "\n".join(defs), len(dims)


def _const_ints(op: OpContext, i: int, what: str) -> list[int] | None:
    ref = op.inputs[i] if i < len(op.inputs) else None
    if ref is None:
        return None
    if ref.value is None:
        raise op.unsupported(f"{what} computed at run time are not supported (the C bundle needs static shapes)")
    return [int(v) for v in np.asarray(ref.value).reshape(-1)]


def extend(*op_types: str):
    """Register an emitter for ops another family may have registered first: tried after it, when it
    refuses (``UnsupportedOp``: e.g. an int64 Add the float kernels do not take)."""
    def register(fn):
        for op_type in op_types:
            REGISTRY.add_fallback("", op_type, fn)
        return fn
    return register


# ------------------------------------------------------------------------------------------------ elementwise
@extend(*BINARY)
def emit_binary(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(1), op.outputs[0]
    if len([t for t in op.inputs if t is not None]) != 2:
        raise op.unsupported("only two operands are supported")
    if op.op_type == "Mod" and int(op.attr("fmod", 0)) != (a.dtype == F32):
        raise op.unsupported("Mod: fmod 0 takes integers, fmod 1 floats")
    if {a.dtype, b.dtype, y.dtype} == {F32}:
        fn, ctype = "lmc_tf_binary_f32", "float"
    elif {a.dtype, b.dtype, y.dtype} == {I64}:
        fn, ctype = "lmc_tf_binary_i64", "int64_t"
    else:
        raise op.unsupported(f"dtypes {a.dtype}, {b.dtype} -> {y.dtype}: the kernels take float32 or int64")
    dims, (sa, sb), params, rank = _broadcast(op, y, a, b)
    return KernelCall(f"{fn}(LMC_TF_{BINARY[op.op_type]}, {a.ptr()}, {sa}, {b.ptr()}, {sb}, {y.out}, {dims}, "
                      f"{rank});", (FAMILY,), params)


@REGISTRY.op(*COMPARE)
def emit_compare(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(1), op.outputs[0]
    if a.dtype != b.dtype or a.dtype not in (F32, I64):
        raise op.unsupported(f"comparisons of {a.dtype} and {b.dtype}: the kernels take float32 or int64 pairs")
    fn = "lmc_tf_compare_f32" if a.dtype == F32 else "lmc_tf_compare_i64"
    dims, (sa, sb), params, rank = _broadcast(op, y, a, b)
    return KernelCall(f"{fn}(LMC_TF_{COMPARE[op.op_type]}, {a.ptr()}, {sa}, {b.ptr()}, {sb}, {y.out}, {dims}, "
                      f"{rank});", (FAMILY,), params)


@REGISTRY.op(*LOGICAL)
def emit_logical(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(1), op.outputs[0]
    op.expect_dtype([a, b, y], np.bool_)
    dims, (sa, sb), params, rank = _broadcast(op, y, a, b)
    return KernelCall(f"lmc_tf_logical(LMC_TF_{LOGICAL[op.op_type]}, {a.ptr()}, {sa}, {b.ptr()}, {sb}, {y.out}, "
                      f"{dims}, {rank});", (FAMILY,), params)


@REGISTRY.op("Where")
def emit_where(op: OpContext) -> KernelCall:
    c, x, z, y = op.input(0), op.input(1), op.input(2), op.outputs[0]
    op.expect_dtype([c], np.bool_)
    if x.dtype != y.dtype or z.dtype != y.dtype:
        raise op.unsupported("Where's branches must have the output's dtype")
    dims, (sc, sx, sz), params, rank = _broadcast(op, y, c, x, z)
    return KernelCall(f"lmc_tf_where({c.ptr()}, {sc}, {x.address}, {sx}, {z.address}, {sz}, {y.address}, {dims}, "
                      f"{rank}, {y.dtype.itemsize});", (FAMILY,), params)


@extend(*UNARY)
def emit_unary(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    if op.op_type == "Neg" and x.dtype == I64:
        return KernelCall(f"lmc_tf_neg_i64({x.ptr()}, {y.out}, {x.numel});", (FAMILY,))
    op.expect_dtype([x, y], F32)
    return KernelCall(f"lmc_tf_unary_f32(LMC_TF_{UNARY[op.op_type]}, {x.ptr()}, {y.out}, {x.numel});", (FAMILY,))


@REGISTRY.op("IsNaN")
def emit_isnan(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    op.expect_dtype([x], F32)
    return KernelCall(f"lmc_tf_isnan_f32({x.ptr()}, {y.out}, {x.numel});", (FAMILY,))


@REGISTRY.op("Not")
def emit_not(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    op.expect_dtype([x, y], np.bool_)
    return KernelCall(f"lmc_tf_not({x.ptr()}, {y.out}, {x.numel});", (FAMILY,))


@REGISTRY.op("Cast")
def emit_cast(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    for r in (x, y):
        if r.dtype not in DTYPE_CODES:
            raise op.unsupported(f"Cast of {r.dtype}: the kernel takes {', '.join(map(str, DTYPE_CODES))}")
    if x.dtype == y.dtype:
        return KernelCall(f"lmc_copy({y.address}, {x.address}, {y.nbytes}u);")
    return KernelCall(f"lmc_tf_cast({x.address}, {DTYPE_CODES[x.dtype]}, {y.address}, {DTYPE_CODES[y.dtype]}, "
                      f"{x.numel});", (FAMILY,))


# ------------------------------------------------------------------------------------------------ products
@REGISTRY.op("Attention")
def emit_attention(op: OpContext) -> KernelCall:
    q, k, v, y = op.input(0), op.input(1), op.input(2), op.outputs[0]
    mask = op.input(3, required=False)
    if op.input(4, required=False) is not None or op.input(5, required=False) is not None:
        raise op.unsupported("past_key/past_value inputs are not supported (lmc's cache is state)")
    nonpad = op.input(6, required=False)
    if len(op.outputs) > 1:
        raise op.unsupported("only the Y output is supported")
    if any(len(r.shape) != 4 for r in (q, k, v, y)):
        raise op.unsupported("only 4-D q/k/v ([batch, heads, sequence, head_dim]) are supported")
    if float(op.attr("softcap", 0.0)) != 0.0 or int(op.attr("qk_matmul_output_mode", 0)) != 0:
        raise op.unsupported("softcap and qk_matmul_output_mode are not supported")
    op.expect_dtype([q, k, v, y], F32)
    b, hq, s, d = q.shape
    _, hkv, t, dv = v.shape
    if k.shape[:3] != (b, hkv, t) or k.shape[3] != d or hq % hkv:
        raise op.unsupported(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit")
    scale = op.attr("scale", None)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    params, mask_bool, mask_f32, strides = "", "0", "0", "0"
    if mask is not None:
        if mask.dtype == BOOL:
            mask_bool = mask.ptr()
        elif mask.dtype == F32:
            mask_f32 = mask.ptr()
        else:
            raise op.unsupported(f"attn_mask of {mask.dtype}: bool or float32 only")
        strides, params = _array(op, "mask", broadcast_strides([b, hq, s, t], list(mask.shape)))
    if nonpad is not None:
        op.expect_dtype([nonpad], I64)
    call = (f"lmc_tf_attention_f32({q.ptr()}, {k.ptr()}, {v.ptr()}, {mask_bool}, {mask_f32}, {strides}, "
            f"{nonpad.ptr() if nonpad is not None else '0'}, {y.out}, {b}, {hq}, {hkv}, {s}, {t}, {d}, {dv}, "
            f"{_float(scale)}, {int(op.attr('is_causal', 0))})")
    return KernelCall(_checked(call), (FAMILY,), params, b * hq * s * t * (2 * d + dv))


@REGISTRY.op("TensorScatter")
def emit_tensor_scatter(op: OpContext) -> KernelCall:
    past, update, y = op.input(0), op.input(1), op.outputs[0]
    idx = op.input(2, required=False)
    op.expect_dtype([past, update, y], F32)
    rank = len(past.shape)
    axis = int(op.attr("axis", -2)) % rank
    if axis == 0:
        raise op.unsupported("the cache axis cannot be the batch axis")
    mode = op.attr("mode", "linear")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if idx is not None:
        op.expect_dtype([idx], I64)
    pre, post = math.prod(past.shape[1:axis]), math.prod(past.shape[axis + 1:])
    call = (f"lmc_tf_tensor_scatter_f32({past.ptr()}, {update.ptr()}, {idx.ptr() if idx is not None else '0'}, "
            f"{y.out}, {past.shape[0]}, {pre}, {past.shape[axis]}, {update.shape[axis]}, {post}, "
            f"{int(mode == 'circular')})")
    return KernelCall(_checked(call), (FAMILY,))


@REGISTRY.op("ScatterND")
def emit_scatter_nd(op: OpContext) -> KernelCall:
    data, idx, updates, y = op.input(0), op.input(1), op.input(2), op.outputs[0]
    reduction = op.attr("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    op.expect_dtype([idx], I64)
    if updates.dtype != data.dtype:
        raise op.unsupported("updates must have data's dtype")
    k = idx.shape[-1]
    n = math.prod(idx.shape[:-1])
    slice_bytes = math.prod(data.shape[k:]) * data.dtype.itemsize
    dims, params = _array(op, "dims", data.shape[:k])
    if reduction == "add" and data.dtype == F32:
        call = (f"lmc_tf_scatter_nd_add_f32({data.ptr()}, {idx.ptr()}, {updates.ptr()}, {y.out}, {dims}, {k}, {n}, "
                f"{slice_bytes // 4}, {data.numel})")
        return KernelCall(_checked(call), (FAMILY,), params)
    if reduction != "none":
        raise op.unsupported(f"reduction {reduction} (none, or add of float32)")
    call = (f"lmc_tf_scatter_nd({data.address}, {idx.ptr()}, {updates.address}, {y.address}, {dims}, {k}, {n}, "
            f"{slice_bytes}, {data.nbytes})")
    return KernelCall(_checked(call), (FAMILY,), params)


# ------------------------------------------------------------------------------------------------ reductions
@REGISTRY.op("LayerNormalization")
def emit_layer_norm(op: OpContext) -> KernelCall:
    x, scale, y = op.input(0), op.input(1), op.outputs[0]
    bias = op.input(2, required=False)
    if len(op.outputs) > 1:
        raise op.unsupported("only the Y output is supported (not Mean / InvStdDev)")
    op.expect_dtype([x, scale, bias, y], F32)
    axis = int(op.attr("axis", -1)) % len(x.shape)
    n = math.prod(x.shape[axis:])
    for r in (scale, bias):
        if r is not None and r.numel != n:
            raise op.unsupported(f"scale/bias of {r.numel} elements for rows of {n}: broadcasting is not supported")
    outer = math.prod(x.shape[:axis])
    return KernelCall(f"lmc_tf_layer_norm_f32({x.ptr()}, {scale.ptr()}, {bias.ptr() if bias is not None else '0'}, "
                      f"{y.out}, {outer}, {n}, {_float(float(op.attr('epsilon', 1e-5)))});", (FAMILY,), "",
                      outer * n * 4)


@REGISTRY.op(*REDUCE)
def emit_reduce(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    rank = len(x.shape)
    axes = _const_ints(op, 1, "reduction axes") if len(op.inputs) > 1 else None
    if axes is None:
        axes = op.attr("axes", None)
    if not axes:
        if int(op.attr("noop_with_empty_axes", 0)):
            return KernelCall(f"lmc_copy({y.address}, {x.address}, {y.nbytes}u);")
        axes = list(range(rank))
    axes = sorted(int(a) % rank for a in axes)
    if axes != list(range(axes[0], axes[-1] + 1)):
        raise op.unsupported(f"axes {axes} are not adjacent")
    outer, r, inner = (math.prod(x.shape[:axes[0]]), math.prod(x.shape[axes[0]:axes[-1] + 1]),
                       math.prod(x.shape[axes[-1] + 1:]))
    if x.dtype == I64 and op.op_type == "ReduceSum":
        return KernelCall(f"lmc_tf_reduce_sum_i64({x.ptr()}, {y.out}, {outer}, {r}, {inner});", (FAMILY,))
    op.expect_dtype([x, y], F32)
    return KernelCall(f"lmc_tf_reduce_f32(LMC_TF_REDUCE_{REDUCE[op.op_type]}, {x.ptr()}, {y.out}, {outer}, {r}, "
                      f"{inner});", (FAMILY,))


# ------------------------------------------------------------------------------------------------ data movement
@REGISTRY.op("Gather")
def emit_gather(op: OpContext) -> KernelCall:
    data, idx, y = op.input(0), op.input(1), op.outputs[0]
    if idx.dtype not in (I64, I32):
        raise op.unsupported(f"indices of {idx.dtype}: int64 or int32 only")
    axis = int(op.attr("axis", 0)) % len(data.shape)
    outer, inner = math.prod(data.shape[:axis]), math.prod(data.shape[axis + 1:]) * data.dtype.itemsize
    fn = "lmc_tf_gather_i64" if idx.dtype == I64 else "lmc_tf_gather_i32"
    call = f"{fn}({data.address}, {idx.ptr()}, {y.address}, {outer}, {data.shape[axis]}, {inner}, {max(idx.numel, 1)})"
    return KernelCall(_checked(call), (FAMILY,))


@REGISTRY.op("GatherElements")
def emit_gather_elements(op: OpContext) -> KernelCall:
    data, idx, y = op.input(0), op.input(1), op.outputs[0]
    op.expect_dtype([idx], I64)
    rank = len(data.shape)
    if rank > MAX_DIMS or len(idx.shape) != rank:
        raise op.unsupported(f"rank {rank}")
    axis = int(op.attr("axis", 0)) % rank
    sname, sdef = _array(op, "dst", strides_of(data.shape))
    dname, ddef = _array(op, "dims", idx.shape)
    call = (f"lmc_tf_gather_elements({data.address}, {sname}, {idx.ptr()}, {y.address}, {dname}, {rank}, {axis}, "
            f"{data.shape[axis]}, {y.dtype.itemsize})")
    return KernelCall(_checked(call), (FAMILY,), sdef + "\n" + ddef)


@REGISTRY.op("GatherND")
def emit_gather_nd(op: OpContext) -> KernelCall:
    data, idx, y = op.input(0), op.input(1), op.outputs[0]
    if int(op.attr("batch_dims", 0)):
        raise op.unsupported("batch_dims other than 0")
    op.expect_dtype([idx], I64)
    k = idx.shape[-1]
    dims, params = _array(op, "dims", data.shape[:k])
    slice_bytes = math.prod(data.shape[k:]) * data.dtype.itemsize
    call = (f"lmc_tf_gather_nd({data.address}, {idx.ptr()}, {y.address}, {dims}, {k}, {math.prod(idx.shape[:-1])}, "
            f"{slice_bytes})")
    return KernelCall(_checked(call), (FAMILY,), params)


@REGISTRY.op("OneHot")
def emit_onehot(op: OpContext) -> KernelCall:
    idx, depth, values, y = op.input(0), op.input(1), op.input(2), op.outputs[0]
    if idx.dtype not in (I64,):
        raise op.unsupported(f"indices of {idx.dtype}: int64 only")
    n = _const_ints(op, 1, "OneHot's depth")[0]
    if values.dtype != y.dtype or values.numel != 2:
        raise op.unsupported("values must be [off, on] of the output's dtype")
    axis = int(op.attr("axis", -1)) % len(y.shape)
    if y.shape[axis] != n:
        raise op.unsupported(f"depth {n} and output {list(y.shape)} disagree")
    outer, inner = math.prod(y.shape[:axis]), math.prod(y.shape[axis + 1:])
    return KernelCall(f"lmc_tf_onehot({idx.ptr()}, {values.address}, {y.address}, {outer}, {n}, {inner}, "
                      f"{y.dtype.itemsize});", (FAMILY,))


@REGISTRY.op("ScatterElements")
def emit_scatter_elements(op: OpContext) -> KernelCall:
    data, idx, updates, y = op.input(0), op.input(1), op.input(2), op.outputs[0]
    reduction = op.attr("reduction", "none")
    if (reduction.decode() if isinstance(reduction, bytes) else reduction) != "none":
        raise op.unsupported("only reduction none is supported")
    op.expect_dtype([idx], I64)
    rank = len(data.shape)
    if rank > MAX_DIMS or updates.dtype != data.dtype:
        raise op.unsupported("rank or dtype")
    axis = int(op.attr("axis", 0)) % rank
    sname, sdef = _array(op, "dst", strides_of(data.shape))
    dname, ddef = _array(op, "dims", idx.shape)
    call = (f"lmc_tf_scatter_elements({data.address}, {idx.ptr()}, {updates.address}, {y.address}, {sname}, "
            f"{dname}, {rank}, {axis}, {data.shape[axis]}, {y.dtype.itemsize}, {data.nbytes})")
    return KernelCall(_checked(call), (FAMILY,), sdef + "\n" + ddef)


def _axis_view(shape: Sequence[int], axis: int) -> tuple[int, int, int]:
    """(outer, n, inner) of a tensor viewed around ``axis``."""
    axis %= len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


@REGISTRY.op("TopK")
def emit_topk(op: OpContext) -> KernelCall:
    x, values, indices = op.input(0), op.outputs[0], op.outputs[1]
    op.expect_dtype([x, values], F32)
    op.expect_dtype([indices], I64)
    k = _const_ints(op, 1, "TopK's k")[0]
    outer, n, inner = _axis_view(x.shape, int(op.attr("axis", -1)))
    if not 0 < k <= n:
        raise op.unsupported(f"k {k} of {n}")
    return KernelCall(f"lmc_tf_topk_f32({x.ptr()}, {values.out}, {indices.out}, {outer}, {n}, {inner}, {k}, "
                      f"{int(op.attr('largest', 1))});", (FAMILY,))


@REGISTRY.op("ArgMax")
def emit_argmax(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    op.expect_dtype([x], F32)
    outer, n, inner = _axis_view(x.shape, int(op.attr("axis", 0)))
    return KernelCall(f"lmc_tf_argmax_f32({x.ptr()}, {y.out}, {outer}, {n}, {inner}, "
                      f"{int(op.attr('select_last_index', 0))});", (FAMILY,))


@REGISTRY.op("CumSum")
def emit_cumsum(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    axis = _const_ints(op, 1, "CumSum's axis")[0]
    outer, n, inner = _axis_view(x.shape, axis)
    if x.dtype == F32:
        fn = "lmc_tf_cumsum_f32"
    elif x.dtype == I64:
        fn = "lmc_tf_cumsum_i64"
    else:
        raise op.unsupported(f"CumSum of {x.dtype}")
    return KernelCall(f"{fn}({x.ptr()}, {y.out}, {outer}, {n}, {inner}, {int(op.attr('exclusive', 0))}, "
                      f"{int(op.attr('reverse', 0))});", (FAMILY,))


def _strided(op: OpContext, x: TensorRef, y: TensorRef, offset: int, strides: Sequence[int]) -> KernelCall:
    dims, (st,) = collapse(list(y.shape) or [1], list(strides) or [0])
    if len(dims) > MAX_DIMS:
        raise op.unsupported(f"more than {MAX_DIMS} dims")
    dname, ddef = _array(op, "dims", dims)
    sname, sdef = _array(op, "st", st)
    if not y.numel:
        return KernelCall(f"/* {y.name} is empty */")
    return KernelCall(f"lmc_tf_strided_copy({x.address}, {offset}, {sname}, {y.address}, {dname}, {len(dims)}, "
                      f"{y.dtype.itemsize});", (FAMILY,), ddef + "\n" + sdef)


@REGISTRY.op("Slice")
def emit_slice(op: OpContext) -> KernelCall:
    """Constant bounds: one strided copy. Starts computed at run time (the output's shape is static, so
    only the offset moves): the offset is computed in C from them, clamped as ONNX clamps them."""
    x, y = op.input(0), op.outputs[0]
    rank = len(x.shape)
    axes = _const_ints(op, 3, "Slice axes")
    steps = _const_ints(op, 4, "Slice steps")
    starts_ref = op.input(1)
    n = starts_ref.numel
    axes = [a % rank for a in (axes if axes is not None else range(n))]
    steps = steps or [1] * n
    if 0 in steps:
        raise op.unsupported("a step of 0")
    in_st = strides_of(x.shape)
    step = [1] * rank
    for axis, st in zip(axes, steps):
        step[axis] = st
    strides = [st * s for st, s in zip(step, in_st)]
    starts = starts_ref.value
    if starts is None:                                   # run-time starts: the offset in C
        if starts_ref.dtype not in (I64, I32):
            raise op.unsupported(f"starts of {starts_ref.dtype}")
        call = _strided(op, x, y, 0, strides)
        if not y.numel:
            return call
        lines = ["{", "    int64_t lmc_off = 0, lmc_at;"]
        for i, (axis, st) in enumerate(zip(axes, steps)):
            dim = x.shape[axis]
            hi = dim if st > 0 else dim - 1
            lines += [f"    lmc_at = (int64_t){starts_ref.ptr()}[{i}];",
                      f"    if (lmc_at < 0) lmc_at += {dim};",
                      f"    lmc_at = lmc_at < 0 ? 0 : (lmc_at > {hi} ? {hi} : lmc_at);",
                      f"    lmc_off += lmc_at * {in_st[axis]};"]
        lines += ["    " + call.code.replace(f"({x.address}, 0,", f"({x.address}, lmc_off,", 1), "}"]
        return KernelCall("\n".join(lines), call.families, call.params)
    begin = [0] * rank
    for start, axis, st in zip((int(v) for v in np.asarray(starts).reshape(-1)), axes, steps):
        dim = x.shape[axis]
        if start < 0:
            start += dim
        begin[axis] = max(0, min(start, dim)) if st > 0 else max(0, min(start, dim - 1))
    offset = sum(b * s for b, s in zip(begin, in_st)) if y.numel else 0
    return _strided(op, x, y, offset, strides)


@REGISTRY.op("Expand")
def emit_expand(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    return _strided(op, x, y, 0, broadcast_strides(list(y.shape), list(x.shape)))


@REGISTRY.op("Split")
def emit_split(op: OpContext) -> KernelCall:
    x = op.input(0)
    axis = int(op.attr("axis", 0)) % len(x.shape)
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:]) * x.dtype.itemsize
    lines, at = [], 0
    for y in op.outputs:
        block = y.shape[axis] * inner
        if block:
            lines.append(f"lmc_tf_split_part({x.address}, {y.address}, {outer}, {x.shape[axis] * inner}, {at}, "
                         f"{block});")
        at += block
    return KernelCall("\n".join(lines), (FAMILY,))


# ------------------------------------------------------------------------------------------------ shapes
@REGISTRY.op("Shape")
def emit_shape(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    rank = len(x.shape)
    start, end = int(op.attr("start", 0)), op.attr("end", None)
    dims = list(x.shape)[slice(start, rank if end is None else int(end))]
    name = f"{op.prefix}_shape"
    params = f"static const int64_t {name}[{max(len(dims), 1)}] = {{{_ints(dims) or '0'}}};"
    return KernelCall(f"lmc_copy({y.address}, {name}, {y.nbytes}u);", (), params)


@REGISTRY.op("ConstantOfShape")
def emit_constant_of_shape(op: OpContext) -> KernelCall:
    y = op.outputs[0]
    value = op.attr("value", None)
    if value is None:
        fill = np.zeros(1, y.dtype)
    elif hasattr(value, "values"):                       # a graphsurgeon Constant
        fill = np.asarray(value.values)
    else:                                                # an onnx TensorProto
        fill = numpy_helper.to_array(value)
    fill = fill.reshape(-1)[:1].astype(y.dtype)
    if not y.numel:
        return KernelCall(f"/* {y.name} is empty */")
    if not fill.any():
        return KernelCall(f"memset({y.address}, 0, {y.nbytes}u);")
    if y.dtype == F32:
        literal = _float(float(fill[0]))
    elif y.dtype == BOOL:
        literal = "1"
    elif y.dtype.kind in "iu":
        literal = f"({y.ctype}){int(fill[0])}" + ("LL" if y.dtype.itemsize == 8 else "")
    else:
        raise op.unsupported(f"fills of {y.dtype}")
    return KernelCall(f"{{ int32_t lmc_i; for (lmc_i = 0; lmc_i < {y.numel}; ++lmc_i) {y.out}[lmc_i] = {literal}; }}")


@REGISTRY.op("Tile")
def emit_tile(op: OpContext) -> KernelCall:
    """y = x repeated r_d times along each dim d: a strided copy over the dims (r_d, n_d) with strides (0, s_d)."""
    x, y = op.input(0), op.outputs[0]
    repeats = _const_ints(op, 1, "Tile repeats")
    in_st = strides_of(x.shape)
    dims, strides = [], []
    for r, n, st in zip(repeats, x.shape, in_st):
        dims += [r, n]
        strides += [0, st]
    folded, (st,) = collapse(dims, strides)
    if len(folded) > MAX_DIMS:
        raise op.unsupported(f"more than {MAX_DIMS} dims after tiling")
    if not y.numel:
        return KernelCall(f"/* {y.name} is empty */")
    dname, ddef = _array(op, "dims", folded)
    sname, sdef = _array(op, "st", st)
    return KernelCall(f"lmc_tf_strided_copy({x.address}, 0, {sname}, {y.address}, {dname}, {len(folded)}, "
                      f"{y.dtype.itemsize});", (FAMILY,), ddef + "\n" + sdef)


@REGISTRY.op("Range")
def emit_range(op: OpContext) -> KernelCall:
    start, limit, delta, y = op.input(0), op.input(1), op.input(2), op.outputs[0]
    if y.dtype == I64:
        fn = "lmc_tf_range_i64"
    elif y.dtype == F32:
        fn = "lmc_tf_range_f32"
    else:
        raise op.unsupported(f"Range of {y.dtype}: int64 or float32 only")
    op.expect_dtype([start, limit, delta], y.dtype)
    return KernelCall(_checked(f"{fn}({start.ptr()}, {limit.ptr()}, {delta.ptr()}, {y.out}, {y.numel})"),
                      (FAMILY,))


__all__ = ["FAMILY", "UnsupportedOp", "extend"]
