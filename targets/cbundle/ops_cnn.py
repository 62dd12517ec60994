"""C emitters for the float32 ops CNN and keyword-spotting graphs keep after lmc's passes (family "cnn").

Conv (1-D and 2-D: group/depthwise, strides, pads or auto_pad, dilations) and com.microsoft FusedConv (its
activation applied in the epilogue); MatMul (2-D and batched with broadcast batch dims, 1-D operands as
ONNX promotes them), Gemm (transA/transB, alpha, beta, C broadcast to [M, N]); MaxPool / AveragePool /
GlobalAveragePool / GlobalMaxPool; BatchNormalization (inference, as a per-channel affine); Add/Sub/Mul/Div/Max/Min/Pow with numpy broadcasting; Relu, Clip,
Sigmoid, Tanh, LeakyRelu, HardSigmoid, Exp, Log, Sqrt, Neg, Abs, Reciprocal, Erf; Softmax (opset ≥ 13: one
axis); Reshape/Flatten/Squeeze/Unsqueeze/Identity (a copy, or nothing when the plan put the output on its
input's bytes); Concat; Transpose.

Broadcasting: output dims d, operand strides s_a, s_b in elements (0 along a broadcast dim); adjacent dims
are merged when both operands step through them contiguously, so most graphs need one or two dims.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmc.targets.cbundle.emit import c_array
from lmc.targets.cbundle.ops_quant import decoded_weight_gemm, decoded_weight_matmul
from lmc.targets.cbundle.registry import REGISTRY, KernelCall, OpContext, Placement, TensorRef

FAMILY = "cnn"
F32 = np.float32
MAX_DIMS = 8


# ------------------------------------------------------------------------------------------------ helpers
def _flt(v: float) -> str:
    if math.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    text = f"{float(np.float32(v)):.9g}"
    return text + (".0f" if not any(c in text for c in ".en") else "f")


def act_init(kind: str = "NONE", a: float = 0.0, b: float = 0.0) -> str:
    return f"{{LMC_ACT_{kind}, {_flt(a)}, {_flt(b)}}}"


def strides_of(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def broadcast_strides(out_shape: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Element strides of an operand of ``shape`` read at each index of ``out_shape`` (numpy broadcasting)."""
    shape = [1] * (len(out_shape) - len(shape)) + list(shape)
    st = strides_of(shape)
    return [0 if d == 1 and o != 1 else s for d, o, s in zip(shape, out_shape, st)]


def collapse(dims: Sequence[int], *strides: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims where every operand steps contiguously (s[i] = s[i+1]·d[i+1]); drop size-1 dims."""
    keep = [i for i, d in enumerate(dims) if d != 1]
    if not keep:
        return [1], [[0] for _ in strides]
    out_dims = [dims[keep[0]]]
    out_strides = [[s[keep[0]]] for s in strides]
    for i in keep[1:]:
        if all(s_out[-1] == s[i] * dims[i] for s_out, s in zip(out_strides, strides)):
            out_dims[-1] *= dims[i]
            for s_out, s in zip(out_strides, strides):
                s_out[-1] = s[i]
        else:
            out_dims.append(dims[i])
            for s_out, s in zip(out_strides, strides):
                s_out.append(s[i])
    return out_dims, out_strides


def bcast_init(dims: Sequence[int], sa: Sequence[int], sb: Sequence[int] = ()) -> str:
    sb = list(sb) or [0] * len(dims)

    def arr(v):
        return "{" + ", ".join(str(int(x)) for x in v) + "}"
    return f"{{{len(dims)}, {arr(dims)}, {arr(sa)}, {arr(sb)}}}"


def _ints(values: Sequence[int]) -> str:
    return ", ".join(str(int(v)) for v in values)


def _float_only(op: OpContext, refs: Sequence[TensorRef | None]) -> None:
    op.expect_dtype(refs, F32)


# ------------------------------------------------------------------------------------------------ Conv
ACTIVATION_KINDS = {"Relu": "RELU", "Clip": "CLIP", "Sigmoid": "SIGMOID", "Tanh": "TANH",
                    "LeakyRelu": "LEAKY_RELU", "HardSigmoid": "HARD_SIGMOID"}


def _conv_pads(op: OpContext, in_sp: Sequence[int], out_sp: Sequence[int], k: Sequence[int], strides, dil) -> list[int]:
    auto = op.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    n = len(in_sp)
    if auto in ("NOTSET", ""):
        pads = list(op.attr("pads", [0] * (2 * n)))
        return pads
    if auto == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for i in range(n):
        total = max((out_sp[i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - in_sp[i], 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def conv_geometry(op: OpContext, x: TensorRef, w: TensorRef, y: TensorRef) -> dict:
    """The 2-D view of a 1-D or 2-D convolution: dims, kernel, strides, pads, dilations, group."""
    if len(x.shape) not in (3, 4) or len(w.shape) != len(x.shape):
        raise op.unsupported(f"only 1-D and 2-D convolutions are supported (input {list(x.shape)})")
    spatial = len(x.shape) - 2
    k = list(op.attr("kernel_shape", w.shape[2:]))
    strides = list(op.attr("strides", [1] * spatial))
    dil = list(op.attr("dilations", [1] * spatial))
    pads = _conv_pads(op, x.shape[2:], y.shape[2:], k, strides, dil)
    group = int(op.attr("group", 1))
    if x.shape[1] % group or w.shape[0] % group or w.shape[1] * group != x.shape[1]:
        raise op.unsupported(f"group {group} does not divide channels {x.shape[1]} -> {w.shape[0]}")
    if spatial == 1:                          # [N, C, L] as [N, C, 1, L]
        k, strides, dil = [1] + k, [1] + strides, [1] + dil
        pads = [0, pads[0], 0, pads[1]]
        h_in, w_in, h_out, w_out = 1, x.shape[2], 1, y.shape[2]
    else:
        h_in, w_in, h_out, w_out = x.shape[2], x.shape[3], y.shape[2], y.shape[3]
    return dict(n=x.shape[0], c_in=x.shape[1], h_in=h_in, w_in=w_in, c_out=w.shape[0], h_out=h_out, w_out=w_out,
                kh=k[0], kw=k[1], stride_h=strides[0], stride_w=strides[1], pad_top=pads[0], pad_left=pads[1],
                pad_bottom=pads[2], pad_right=pads[3], dil_h=dil[0], dil_w=dil[1], group=group)


def conv_macs(g: dict) -> int:
    return g["n"] * g["c_out"] * g["h_out"] * g["w_out"] * (g["c_in"] // g["group"]) * g["kh"] * g["kw"]


def _fused_act(op: OpContext) -> str:
    name = op.attr("activation", None)
    if name is None:
        return act_init()
    name = name.decode() if isinstance(name, bytes) else name
    if name not in ACTIVATION_KINDS:
        raise op.unsupported(f"fused activation {name} has no C kernel")
    params = list(op.attr("activation_params", []))
    return act_init(ACTIVATION_KINDS[name], *(params + [0.0, 0.0])[:2])


@REGISTRY.op("Conv")
@REGISTRY.op("FusedConv", domain="com.microsoft")
def emit_conv(op: OpContext) -> KernelCall:
    x, w, b = op.input(0), op.input(1), op.input(2, required=False)
    if len(op.inputs) > 3 and op.inputs[3] is not None:
        raise op.unsupported("FusedConv's residual input Z is not supported")
    y = op.outputs[0]
    _float_only(op, [x, w, b, y])
    g = conv_geometry(op, x, w, y)
    fields = ("n", "c_in", "h_in", "w_in", "c_out", "h_out", "w_out", "kh", "kw", "stride_h", "stride_w",
              "pad_top", "pad_left", "dil_h", "dil_w", "group")
    params = (f"static const lmc_conv2d_params {op.prefix} = {{{_ints(g[f] for f in fields)}, "
              f"{_fused_act(op)}}};")
    bias = b.ptr() if b is not None else "0"
    return KernelCall(f"lmc_conv2d_f32({x.ptr()}, {w.ptr()}, {bias}, {y.out}, &{op.prefix});", (FAMILY,),
                      params, conv_macs(g))


# ------------------------------------------------------------------------------------------------ pooling
def pool_geometry(op: OpContext, x: TensorRef, y: TensorRef) -> dict:
    if len(x.shape) not in (3, 4):
        raise op.unsupported(f"only 1-D and 2-D pooling is supported (input {list(x.shape)})")
    spatial = len(x.shape) - 2
    k = list(op.attr("kernel_shape"))
    strides = list(op.attr("strides", [1] * spatial))
    dil = list(op.attr("dilations", [1] * spatial))
    pads = _conv_pads(op, x.shape[2:], y.shape[2:], k, strides, dil)
    if spatial == 1:
        k, strides, dil, pads = [1] + k, [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
        h_in, w_in, h_out, w_out = 1, x.shape[2], 1, y.shape[2]
    else:
        h_in, w_in, h_out, w_out = x.shape[2], x.shape[3], y.shape[2], y.shape[3]
    return dict(n=x.shape[0], c=x.shape[1], h_in=h_in, w_in=w_in, h_out=h_out, w_out=w_out, kh=k[0], kw=k[1],
                stride_h=strides[0], stride_w=strides[1], pad_top=pads[0], pad_left=pads[1], pad_bottom=pads[2],
                pad_right=pads[3], dil_h=dil[0], dil_w=dil[1],
                count_include_pad=int(op.attr("count_include_pad", 0)))


POOL_FIELDS = ("n", "c", "h_in", "w_in", "h_out", "w_out", "kh", "kw", "stride_h", "stride_w", "pad_top",
               "pad_left", "pad_bottom", "pad_right", "dil_h", "dil_w", "count_include_pad")


@REGISTRY.op("MaxPool", "AveragePool")
def emit_pool(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    if len(op.outputs) > 1:
        raise op.unsupported("MaxPool's Indices output is not supported")
    _float_only(op, [x, y])
    if int(op.attr("storage_order", 0)):
        raise op.unsupported("storage_order 1 is not supported")
    g = pool_geometry(op, x, y)
    params = f"static const lmc_pool2d_params {op.prefix} = {{{_ints(g[f] for f in POOL_FIELDS)}}};"
    fn = "lmc_maxpool2d_f32" if op.op_type == "MaxPool" else "lmc_avgpool2d_f32"
    return KernelCall(f"{fn}({x.ptr()}, {y.out}, &{op.prefix});", (FAMILY,), params)


@REGISTRY.op("GlobalAveragePool", "GlobalMaxPool")
def emit_global_pool(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    _float_only(op, [x, y])
    nc, hw = x.shape[0] * x.shape[1], math.prod(x.shape[2:])
    fn = "lmc_global_avgpool_f32" if op.op_type == "GlobalAveragePool" else "lmc_global_maxpool_f32"
    return KernelCall(f"{fn}({x.ptr()}, {y.out}, {nc}, {hw});", (FAMILY,))


# ------------------------------------------------------------------------------------------------ products
def matmul_batches(op: OpContext, a_shape, b_shape) -> tuple[int, int, int, list[int], list[int]]:
    """(m, k, n, a offsets, b offsets) of ONNX MatMul (numpy matmul) over the broadcast batch dims."""
    a_shape, b_shape = list(a_shape), list(b_shape)
    if len(a_shape) == 1:
        a_shape = [1] + a_shape
    if len(b_shape) == 1:
        b_shape = b_shape + [1]
    m, k = a_shape[-2:]
    k2, n = b_shape[-2:]
    if k != k2:
        raise op.unsupported(f"inner dims differ ({a_shape} x {b_shape})")
    batch = list(np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))
    count = math.prod(batch)
    a_st = broadcast_strides(batch, a_shape[:-2]) if batch else []
    b_st = broadcast_strides(batch, b_shape[:-2]) if batch else []
    a_off, b_off = [], []
    for flat in range(count):
        idx = np.unravel_index(flat, batch) if batch else ()
        a_off.append(int(sum(i * s for i, s in zip(idx, a_st))) * m * k)
        b_off.append(int(sum(i * s for i, s in zip(idx, b_st))) * k * n)
    return m, k, n, a_off, b_off


@REGISTRY.op("MatMul")
def emit_matmul(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(1), op.outputs[0]
    if a.placement is Placement.DECODED:
        raise op.unsupported("the decoded weight must be the MatMul's second operand")
    if b.placement is Placement.DECODED:
        return decoded_weight_matmul(op, a, y)
    _float_only(op, [a, b, y])
    m, k, n, a_off, b_off = matmul_batches(op, a.shape, b.shape)
    batch = len(a_off)
    params, a_arg, b_arg = "", "0", "0"
    if batch > 1 and any(a_off):
        params += f"static const int32_t {op.prefix}_a[{batch}] = {{{_ints(a_off)}}};\n"
        a_arg = f"{op.prefix}_a"
    if batch > 1 and any(b_off):
        params += f"static const int32_t {op.prefix}_b[{batch}] = {{{_ints(b_off)}}};\n"
        b_arg = f"{op.prefix}_b"
    return KernelCall(f"lmc_matmul_f32({a.ptr()}, {b.ptr()}, {y.out}, {m}, {k}, {n}, {batch}, {a_arg}, {b_arg});",
                      (FAMILY,), params, batch * m * k * n)


@REGISTRY.op("Gemm")
def emit_gemm(op: OpContext) -> KernelCall:
    a, b, c, y = op.input(0), op.input(1), op.input(2, required=False), op.outputs[0]
    decoded = b.placement is Placement.DECODED
    _float_only(op, [a, c, y] if decoded else [a, b, c, y])
    ta, tb = int(op.attr("transA", 0)), int(op.attr("transB", 0))
    if decoded and ta:
        raise op.unsupported("transA with a decoded weight is not supported")
    m, k = (a.shape[1], a.shape[0]) if ta else a.shape
    n = b.shape[0] if tb else b.shape[1]
    c_rs = c_cs = 0
    if c is not None:
        cs = [1] * (2 - len(c.shape)) + list(c.shape)
        c_rs = 0 if cs[0] == 1 else cs[1]
        c_cs = 0 if cs[1] == 1 else 1
    alpha, beta = float(op.attr("alpha", 1.0)), float(op.attr("beta", 1.0))
    params = (f"static const lmc_gemm_params {op.prefix} = {{{m}, {n}, {k}, {ta}, {tb}, {c_rs}, {c_cs}, "
              f"{_flt(alpha)}, {_flt(beta)}, {act_init()}}};")
    if decoded:
        return decoded_weight_gemm(op, a, c, y, params, tb)
    return KernelCall(f"lmc_gemm_f32({a.ptr()}, {b.ptr()}, {c.ptr() if c is not None else '0'}, {y.out}, "
                      f"&{op.prefix});", (FAMILY,), params, m * n * k)


# ------------------------------------------------------------------------------------------------ elementwise
BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAX", "Min": "MIN", "Pow": "POW"}


@REGISTRY.op(*BINARY)
def emit_binary(op: OpContext) -> KernelCall:
    if len([t for t in op.inputs if t is not None]) != 2:
        raise op.unsupported("only two operands are supported")
    a, b, y = op.input(0), op.input(1), op.outputs[0]
    _float_only(op, [a, b, y])
    dims, (sa, sb) = collapse(list(y.shape), broadcast_strides(y.shape, a.shape), broadcast_strides(y.shape, b.shape))
    if len(dims) > MAX_DIMS:
        raise op.unsupported(f"more than {MAX_DIMS} broadcast dims")
    params = f"static const lmc_bcast {op.prefix} = {bcast_init(dims, sa, sb)};"
    return KernelCall(f"lmc_binary_f32(LMC_BIN_{BINARY[op.op_type]}, {a.ptr()}, {b.ptr()}, {y.out}, &{op.prefix});",
                      (FAMILY,), params)


def _clip_bounds(op: OpContext) -> tuple[float, float]:
    if "min" in op.node.attrs or "max" in op.node.attrs:          # opset < 11
        return float(op.attr("min", -np.inf)), float(op.attr("max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        ref = op.inputs[i] if i < len(op.inputs) else None
        if ref is None:
            bounds.append(default)
        elif ref.value is not None and ref.value.size == 1:
            bounds.append(float(ref.value.reshape(())))
        else:
            raise op.unsupported("Clip bounds computed at run time are not supported")
    return bounds[0], bounds[1]


@REGISTRY.op("Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "HardSigmoid")
def emit_activation(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    _float_only(op, [x, y])
    kind = ACTIVATION_KINDS[op.op_type]
    if op.op_type == "Clip":
        a, b = _clip_bounds(op)
    elif op.op_type == "LeakyRelu":
        a, b = float(op.attr("alpha", 0.01)), 0.0
    elif op.op_type == "HardSigmoid":
        a, b = float(op.attr("alpha", 0.2)), float(op.attr("beta", 0.5))
    else:
        a = b = 0.0
    params = f"static const lmc_act {op.prefix} = {act_init(kind, a, b)};"
    return KernelCall(f"lmc_activation_f32({x.ptr()}, {y.out}, {x.numel}, &{op.prefix});", (FAMILY,), params)


UNARY = {"Exp": "EXP", "Log": "LOG", "Sqrt": "SQRT", "Neg": "NEG", "Abs": "ABS", "Reciprocal": "RECIPROCAL",
         "Erf": "ERF"}


@REGISTRY.op(*UNARY)
def emit_unary(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    _float_only(op, [x, y])
    return KernelCall(f"lmc_unary_f32(LMC_UN_{UNARY[op.op_type]}, {x.ptr()}, {y.out}, {x.numel});", (FAMILY,))


@REGISTRY.op("Softmax")
def emit_softmax(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    _float_only(op, [x, y])
    if op.opset < 13:
        raise op.unsupported("Softmax before opset 13 (2-D coercion) is not supported; lmc upgrades the opset")
    axis = int(op.attr("axis", -1)) % len(x.shape)
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    return KernelCall(f"lmc_softmax_f32({x.ptr()}, {y.out}, {outer}, {x.shape[axis]}, {inner});", (FAMILY,))


@REGISTRY.op("BatchNormalization")
def emit_batch_norm(op: OpContext) -> KernelCall:
    """Inference BatchNormalization with constant statistics: y = x·a[c] + b[c], a = scale / sqrt(var + ε),
    b = B − mean·a (float32, computed here; the two vectors are parameters in flash)."""
    x, y = op.input(0), op.outputs[0]
    _float_only(op, [x, y])
    if len(op.outputs) > 1 or int(op.attr("training_mode", 0)):
        raise op.unsupported("only inference mode (one output) is supported")
    values = [op.const(i) for i in range(1, 5)]
    if any(v is None for v in values):
        raise op.unsupported("scale, bias, mean and variance must be constants")
    scale, bias, mean, var = (np.asarray(v, np.float32).reshape(-1) for v in values)
    c = x.shape[1] if len(x.shape) > 1 else 1
    eps = np.float32(op.attr("epsilon", 1e-5))
    a = (scale / np.sqrt(var + eps)).astype(np.float32)
    b = (bias - mean * a).astype(np.float32)
    params = (f"static const float {op.prefix}_a[{c}] = {{{', '.join(_flt(v) for v in a)}}};\n"
              f"static const float {op.prefix}_b[{c}] = {{{', '.join(_flt(v) for v in b)}}};")
    inner = math.prod(x.shape[2:])
    return KernelCall(f"lmc_channel_affine_f32({x.ptr()}, {op.prefix}_a, {op.prefix}_b, {y.out}, {x.shape[0]}, {c}, "
                      f"{inner});", (FAMILY,), params)


# ------------------------------------------------------------------------------------------------ data movement
@REGISTRY.op("Constant")
def emit_constant(op: OpContext) -> KernelCall:
    """A Constant node left in the graph: its value as a const parameter array (flash), copied to its tensor."""
    y = op.outputs[0]
    value = op.node.attrs.get("value")
    value = getattr(value, "values", value)
    if value is None:
        raise op.unsupported("only a Constant with a tensor 'value' is supported")
    value = np.asarray(value).astype(y.dtype).reshape(-1)
    if value.size != y.numel:
        raise op.unsupported(f"value of {value.size} elements for an output of {y.numel}")
    if not value.size:
        return KernelCall(f"/* {y.name}: empty */")
    params = f"static const {y.ctype} {op.prefix}_value[{value.size}] = {{{c_array(value)}}};"
    return KernelCall(f"lmc_copy({y.address}, {op.prefix}_value, {y.nbytes}u);", (), params)


@REGISTRY.op("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
def emit_view(op: OpContext) -> KernelCall:
    """A view: the same bytes. Nothing to do when the plan put the output on the input (in place)."""
    x, y = op.input(0), op.outputs[0]
    if x.nbytes != y.nbytes or x.dtype != y.dtype:
        raise op.unsupported("a view must keep its dtype and byte size")
    if x.address == y.address:
        return KernelCall(f"/* {y.name}: the bytes of {x.name} (planned in place) */")
    return KernelCall(f"lmc_copy({y.address}, {x.address}, {y.nbytes}u);")


@REGISTRY.op("Concat")
def emit_concat(op: OpContext) -> KernelCall:
    y = op.outputs[0]
    axis = int(op.attr("axis")) % len(y.shape)
    outer = math.prod(y.shape[:axis])
    inner = math.prod(y.shape[axis + 1:]) * y.dtype.itemsize
    lines, at = [], 0
    for i in range(len(op.inputs)):
        x = op.input(i)
        if x.dtype != y.dtype:
            raise op.unsupported("inputs of different dtypes")
        if x.numel:
            block = x.shape[axis] * inner
            lines.append(f"lmc_copy_blocks((uint8_t *){y.address} + {at}, {x.address}, {outer}, {block}u, "
                         f"{y.shape[axis] * inner}u);")
        at += x.shape[axis] * inner
    return KernelCall("\n".join(lines))


@REGISTRY.op("Transpose")
def emit_transpose(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    perm = list(op.attr("perm", list(range(len(x.shape)))[::-1]))
    in_st = strides_of(x.shape)
    dims, (sa,) = collapse([x.shape[p] for p in perm], [in_st[p] for p in perm])
    if len(dims) > MAX_DIMS:
        raise op.unsupported(f"more than {MAX_DIMS} dims")
    if x.address == y.address:
        raise op.unsupported("a Transpose cannot run in place")
    params = f"static const lmc_bcast {op.prefix} = {bcast_init(dims, sa)};"
    return KernelCall(f"lmc_gather_strided({y.address}, {x.address}, {y.dtype.itemsize}u, &{op.prefix});",
                      (), params)
