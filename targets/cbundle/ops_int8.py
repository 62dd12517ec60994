"""C emitters for integer operators on int8 activations (family "int8"): QLinearConv, com.microsoft QGemm,
QLinearAdd and QLinearGlobalAveragePool, and MaxPool on int8 (a fallback beside the float MaxPool); for
transformers QLinearMatMul and com.microsoft MatMulIntegerToFloat (constant 2-D int8 B, A of any rank),
com.microsoft QLinearMul (same shapes) and QLinearSigmoid.

Requantization scales are float32 and computed here in onnxruntime's order, so the C rounds as onnxruntime
does on the host: QLinearConv (x_s · w_s[c]) / y_s; QGemm a_s · b_s[c] (float output) or (a_s · b_s[c]) / y_s;
QLinearMatMul (a_s · b_s[c]) / y_s; MatMulIntegerToFloat a_s · b_s[c] (y = float(acc) · that);
QLinearMul (a_s · b_s) / y_s applied to the exact integer product (q_a − z_a)(q_b − z_b);
QLinearAdd a_s / y_s and b_s / y_s; QLinearGlobalAveragePool x_s / (y_s · hw). QLinearSigmoid is a table of
the 256 codes that onnxruntime itself computes at emission (its sigmoid is its own approximation of
1 / (1 + e^−x), so the table is what makes the C equal it). Only int8 activations and weights (uint8 is
refused), per-tensor activation codes, per-tensor or per-channel weight codes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort

from lmc.targets.cbundle.ops_cnn import POOL_FIELDS, _flt, _ints, conv_geometry, conv_macs, pool_geometry
from lmc.targets.cbundle.registry import REGISTRY, KernelCall, OpContext

FAMILIES = ("int8", "cnn")
I8, I32, F32 = np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.float32)


def _scalar(op: OpContext, i: int, dtype) -> float | int:
    """A per-tensor scale or zero point, a constant (emission time)."""
    ref = op.inputs[i] if i < len(op.inputs) else None
    if ref is None:
        return 0
    if ref.value is None or ref.value.size != 1:
        raise op.unsupported(f"input {i} must be a constant scalar")
    if ref.dtype != np.dtype(dtype):
        raise op.unsupported(f"input {i} is {ref.dtype}, not {np.dtype(dtype)}")
    return ref.value.reshape(()).item()


def _vector(op: OpContext, i: int, n: int, dtype) -> np.ndarray | None:
    ref = op.inputs[i] if i < len(op.inputs) else None
    if ref is None:
        return None
    if ref.value is None or ref.value.size not in (1, n) or ref.dtype != np.dtype(dtype):
        raise op.unsupported(f"input {i} must be a constant {np.dtype(dtype)} scalar or {n}-vector")
    return np.broadcast_to(ref.value.reshape(-1), (n,)).astype(dtype)


def _floats(name: str, values: np.ndarray) -> str:
    return f"static const float {name}[{values.size}] = {{{', '.join(_flt(float(v)) for v in values)}}};"


def _int8s(name: str, values: np.ndarray) -> str:
    return f"static const int8_t {name}[{values.size}] = {{{_ints(values)}}};"


@REGISTRY.op("QLinearConv")
def emit_qlinear_conv(op: OpContext) -> KernelCall:
    x, w, y = op.input(0), op.input(3), op.outputs[0]
    bias = op.input(8, required=False)
    op.expect_dtype([x, w, y], I8)
    op.expect_dtype([bias], I32)
    xs, xz = np.float32(_scalar(op, 1, F32)), int(_scalar(op, 2, I8))
    ys, yz = np.float32(_scalar(op, 6, F32)), int(_scalar(op, 7, I8))
    c_out = w.shape[0]
    ws = _vector(op, 4, c_out, F32)
    wz = _vector(op, 5, c_out, I8)
    scale = ((xs * ws).astype(np.float32) / ys).astype(np.float32)
    g = conv_geometry(op, x, w, y)
    fields = ("n", "c_in", "h_in", "w_in", "c_out", "h_out", "w_out", "kh", "kw", "stride_h", "stride_w",
              "pad_top", "pad_left", "dil_h", "dil_w", "group")
    params = [f"static const lmc_qconv_params {op.prefix} = {{{{{_ints(g[f] for f in fields)}, "
              f"{{LMC_ACT_NONE, 0.0f, 0.0f}}}}, {xz}, {yz}}};", _floats(f"{op.prefix}_scale", scale)]
    wz_arg = "0"
    if wz is not None and wz.any():
        params.append(_int8s(f"{op.prefix}_wzero", wz))
        wz_arg = f"{op.prefix}_wzero"
    return KernelCall(f"lmc_qlinear_conv_s8({x.ptr()}, {w.ptr()}, {wz_arg}, {bias.ptr() if bias is not None else '0'}, "
                      f"{op.prefix}_scale, {y.out}, &{op.prefix});", FAMILIES, "\n".join(params), conv_macs(g))


@REGISTRY.op("QGemm", domain="com.microsoft")
def emit_qgemm(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(3), op.outputs[0]
    bias = op.input(6, required=False)
    op.expect_dtype([a, b], I8)
    op.expect_dtype([bias], I32)
    if int(op.attr("transA", 0)) or len(a.shape) != 2:
        raise op.unsupported("only a 2-D A without transA is supported")
    if float(op.attr("alpha", 1.0)) != 1.0:
        raise op.unsupported("alpha other than 1 is not supported")
    trans_b = int(op.attr("transB", 0))
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    sa, za = np.float32(_scalar(op, 1, F32)), int(_scalar(op, 2, I8))
    sb = _vector(op, 4, n, F32)
    bz = _vector(op, 5, n, I8)
    quantized_out = op.input(7, required=False) is not None
    if quantized_out:
        op.expect_dtype([y], I8)
        ys, yz = np.float32(_scalar(op, 7, F32)), int(_scalar(op, 8, I8))
        scale = ((sa * sb).astype(np.float32) / ys).astype(np.float32)
    else:
        op.expect_dtype([y], F32)
        yz = 0
        scale = (sa * sb).astype(np.float32)
    return _gemm_call(op, a, b, y, bz, scale, m, n, k, za, yz, quantized_out, trans_b, bias)


def _binary_operands(op: OpContext):
    """A com.microsoft QLinear binary op's (A, B, Y) and their (scale, zero point) codes, checked: int8 all,
    both operands of the output's shape (no broadcasting)."""
    a, b, y = op.input(0), op.input(3), op.outputs[0]
    op.expect_dtype([a, b, y], I8)
    if a.shape != y.shape or b.shape != y.shape:
        raise op.unsupported("only operands of the output's shape are supported (no broadcasting)")
    codes = [(np.float32(_scalar(op, i, F32)), int(_scalar(op, i + 1, I8))) for i in (1, 4, 6)]
    return (a, b, y, *codes)


@REGISTRY.op("QLinearAdd", domain="com.microsoft")
def emit_qlinear_add(op: OpContext) -> KernelCall:
    a, b, y, (sa, za), (sb, zb), (sy, zy) = _binary_operands(op)
    ra, rb = np.float32(sa / sy), np.float32(sb / sy)
    return KernelCall(f"lmc_qlinear_add_s8({a.ptr()}, {za}, {_flt(ra)}, {b.ptr()}, {zb}, {_flt(rb)}, {y.out}, {zy}, "
                      f"{y.numel});", FAMILIES)


@REGISTRY.op("QLinearGlobalAveragePool", domain="com.microsoft")
def emit_qglobal_avgpool(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    op.expect_dtype([x, y], I8)
    if int(op.attr("channels_last", 0)):
        raise op.unsupported("channels_last 1 is not supported")
    xs, xz = np.float32(_scalar(op, 1, F32)), int(_scalar(op, 2, I8))
    ys, yz = np.float32(_scalar(op, 3, F32)), int(_scalar(op, 4, I8))
    nc, hw = x.shape[0] * x.shape[1], math.prod(x.shape[2:])
    scale = np.float32(xs / np.float32(ys * np.float32(hw)))
    return KernelCall(f"lmc_qglobal_avgpool_s8({x.ptr()}, {xz}, {_flt(scale)}, {y.out}, {yz}, {nc}, {hw});", FAMILIES)


def emit_maxpool_s8(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    op.expect_dtype([x, y], I8)
    if len(op.outputs) > 1:
        raise op.unsupported("MaxPool's Indices output is not supported")
    g = pool_geometry(op, x, y)
    params = f"static const lmc_pool2d_params {op.prefix} = {{{_ints(g[f] for f in POOL_FIELDS)}}};"
    return KernelCall(f"lmc_maxpool2d_s8({x.ptr()}, {y.out}, &{op.prefix});", FAMILIES, params)


REGISTRY.add_fallback("", "MaxPool", emit_maxpool_s8)


def _matmul_geometry(op: OpContext, a, b, y) -> tuple[int, int, int]:
    if b.value is None or len(b.shape) != 2:
        raise op.unsupported("B must be a constant 2-D matrix")
    k, n = b.shape
    if not a.shape or a.shape[-1] != k or y.shape[-1] != n:
        raise op.unsupported(f"inner dims differ ({list(a.shape)} x {list(b.shape)})")
    return a.numel // k, n, k


@REGISTRY.op("QLinearMatMul")
def emit_qlinear_matmul(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(3), op.outputs[0]
    op.expect_dtype([a, b, y], I8)
    m, n, k = _matmul_geometry(op, a, b, y)
    sa, za = np.float32(_scalar(op, 1, F32)), int(_scalar(op, 2, I8))
    sb, bz = _vector(op, 4, n, F32), _vector(op, 5, n, I8)
    ys, yz = np.float32(_scalar(op, 6, F32)), int(_scalar(op, 7, I8))
    scale = ((sa * sb).astype(np.float32) / ys).astype(np.float32)
    return _gemm_call(op, a, b, y, bz, scale, m, n, k, za, yz, quantized=True)


@REGISTRY.op("MatMulIntegerToFloat", domain="com.microsoft")
def emit_matmul_integer_to_float(op: OpContext) -> KernelCall:
    a, b, y = op.input(0), op.input(1), op.outputs[0]
    op.expect_dtype([a, b], I8)
    op.expect_dtype([y], F32)
    if op.input(6, required=False) is not None:
        raise op.unsupported("a bias is not supported")
    m, n, k = _matmul_geometry(op, a, b, y)
    sa, sb = np.float32(_scalar(op, 2, F32)), _vector(op, 3, n, F32)
    za, bz = int(_scalar(op, 4, I8)), _vector(op, 5, n, I8)
    return _gemm_call(op, a, b, y, bz, (sa * sb).astype(np.float32), m, n, k, za, 0, quantized=False)


def _gemm_call(op: OpContext, a, b, y, bz, scale, m: int, n: int, k: int, za: int, yz: int,
               quantized: bool, trans_b: int = 0, bias=None) -> KernelCall:
    """One ``lmc_qgemm_s8`` call: int8 A [m, k] × int8 B ([k, n], or [n, k] with ``trans_b``) with B's zero
    points ``bz`` (none when all 0), an optional int32 bias, per-column ``scale``; int8 output with zero point
    ``yz`` when ``quantized``, else float."""
    params = [f"static const lmc_qgemm_params {op.prefix} = {{{m}, {n}, {k}, {trans_b}, {za}, {yz}}};",
              _floats(f"{op.prefix}_scale", scale)]
    bz_arg = "0"
    if bz is not None and bz.any():
        params.append(_int8s(f"{op.prefix}_bzero", bz))
        bz_arg = f"{op.prefix}_bzero"
    outs = f"0, {y.out}" if quantized else f"{y.out}, 0"
    return KernelCall(f"lmc_qgemm_s8({a.ptr()}, {b.ptr()}, {bz_arg}, {bias.ptr() if bias is not None else '0'}, "
                      f"{op.prefix}_scale, {outs}, &{op.prefix});", FAMILIES, "\n".join(params), m * n * k)


@REGISTRY.op("QLinearMul", domain="com.microsoft")
def emit_qlinear_mul(op: OpContext) -> KernelCall:
    a, b, y, (sa, za), (sb, zb), (sy, zy) = _binary_operands(op)
    ratio = np.float32(np.float32(sa * sb) / sy)
    return KernelCall(f"lmc_qlinear_mul_s8({a.ptr()}, {za}, {b.ptr()}, {zb}, {_flt(ratio)}, {y.out}, {zy}, "
                      f"{y.numel});", FAMILIES)


def onnxruntime_table(op_type: str, xs: float, xz: int, ys: float, yz: int) -> np.ndarray:
    """The int8 output onnxruntime computes for each of the 256 int8 inputs (index q + 128) of a unary
    com.microsoft QLinear operator with these codes."""
    consts = [onnx.numpy_helper.from_array(np.array(v, dtype=t), name) for name, v, t in
              (("xs", xs, np.float32), ("xz", xz, np.int8), ("ys", ys, np.float32), ("yz", yz, np.int8))]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op_type, ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft")], "table",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT8, [256])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT8, [256])], consts)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.arange(-128, 128, dtype=np.int8)})[0]


@REGISTRY.op("QLinearSigmoid", domain="com.microsoft")
def emit_qlinear_sigmoid(op: OpContext) -> KernelCall:
    x, y = op.input(0), op.outputs[0]
    op.expect_dtype([x, y], I8)
    xs, xz = float(_scalar(op, 1, F32)), int(_scalar(op, 2, I8))
    ys, yz = float(_scalar(op, 3, F32)), int(_scalar(op, 4, I8))
    table = onnxruntime_table("QLinearSigmoid", xs, xz, ys, yz)
    return KernelCall(f"lmc_lookup_s8({x.ptr()}, {op.prefix}_table, {y.out}, {y.numel});", FAMILIES,
                      _int8s(f"{op.prefix}_table", table))
