"""C emitters for quantization ops (family "quant"): QuantizeLinear, DequantizeLinear, and MatMul whose
weight is an int8 DequantizeLinear the plan leaves without a buffer (``plan.decoded_weights``).

QuantizeLinear: y = saturate(round_half_even(x / s) + z); DequantizeLinear: y = (x − z) · s; scales per
tensor or per ``axis`` (no blocks), x viewed as [outer, axis_len, inner]. A DequantizeLinear whose output
is decoded in its consumer emits nothing; the MatMul reads the int8 weight, scale and zero point itself:
y = A · ((B_q − z) · s) with s, z per column of B [K, N] (axis 1) or per tensor.
"""

from __future__ import annotations

import math

import numpy as np

from lmc.targets.cbundle.registry import REGISTRY, KernelCall, OpContext, Placement, TensorRef

FAMILY = "quant"
FAMILIES = (FAMILY, "cnn")     # lmc_kernels_quant.h includes lmc_kernels_cnn.h (lmc_gemm_params)
SUFFIX = {np.dtype(np.int8): "s8", np.dtype(np.uint8): "u8", np.dtype(np.int32): "s32"}


def _axis_view(op: OpContext, x: TensorRef, scale: TensorRef) -> tuple[int, int, int]:
    if scale.numel == 1:
        return 1, 1, x.numel
    if len(scale.shape) != 1 or int(op.attr("block_size", 0)):
        raise op.unsupported("only per-tensor or per-axis scales are supported (no blocks)")
    axis = int(op.attr("axis", 1)) % len(x.shape)
    if x.shape[axis] != scale.numel:
        raise op.unsupported(f"scale of {scale.numel} values along axis {axis} of {list(x.shape)}")
    return math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])


@REGISTRY.op("DequantizeLinear")
def emit_dequantize(op: OpContext) -> KernelCall:
    y = op.outputs[0]
    if y.placement is Placement.DECODED:
        return KernelCall(f"/* {y.name}: decoded by its consumer (no buffer) */")
    x, scale, zp = op.input(0), op.input(1), op.input(2, required=False)
    op.expect_dtype([y, scale], np.float32)
    if x.dtype not in SUFFIX or (zp is not None and zp.dtype != x.dtype):
        raise op.unsupported(f"DequantizeLinear of {x.dtype} is not supported (int8, uint8, int32)")
    outer, axis_len, inner = _axis_view(op, x, scale)
    params = f"static const lmc_qaxis {op.prefix} = {{{outer}, {axis_len}, {inner}}};"
    return KernelCall(f"lmc_dequantize_{SUFFIX[x.dtype]}({x.ptr()}, {scale.ptr()}, "
                      f"{zp.ptr() if zp is not None else '0'}, {y.out}, &{op.prefix});", FAMILIES, params)


@REGISTRY.op("QuantizeLinear")
def emit_quantize(op: OpContext) -> KernelCall:
    x, scale, zp, y = op.input(0), op.input(1), op.input(2, required=False), op.outputs[0]
    op.expect_dtype([x, scale], np.float32)
    if y.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise op.unsupported(f"QuantizeLinear to {y.dtype} is not supported (int8, uint8)")
    if int(op.attr("saturate", 1)) != 1:
        raise op.unsupported("saturate 0 is not supported")
    outer, axis_len, inner = _axis_view(op, x, scale)
    params = f"static const lmc_qaxis {op.prefix} = {{{outer}, {axis_len}, {inner}}};"
    return KernelCall(f"lmc_quantize_{SUFFIX[y.dtype]}({x.ptr()}, {scale.ptr()}, "
                      f"{zp.ptr() if zp is not None else '0'}, {y.out}, &{op.prefix});", FAMILIES, params)


def decoded_weight_matmul(op: OpContext, a: TensorRef, y: TensorRef) -> KernelCall:
    """MatMul(A, DequantizeLinear(B_q, s[, z])) with the weight decoded inside the kernel."""
    dq = op.node.inputs[1].inputs[0]
    bq, scale = op.ref(dq.inputs[0]), op.ref(dq.inputs[1])
    zp = op.ref(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if bq.dtype != np.dtype(np.int8) or len(bq.shape) != 2:
        raise op.unsupported(f"a decoded weight must be a 2-D int8 matrix (got {bq.dtype} {list(bq.shape)})")
    k, n = bq.shape
    if scale.numel == 1:
        per_col = 0
    elif scale.numel == n and int(dq.attrs.get("axis", 1)) % 2 == 1 and not int(dq.attrs.get("block_size", 0)):
        per_col = 1
    else:
        raise op.unsupported("a decoded weight needs per-tensor or per-column (axis 1) scales")
    op.expect_dtype([a, y, scale], np.float32)
    if a.shape[-1] != k:
        raise op.unsupported(f"inner dims differ ({list(a.shape)} x {list(bq.shape)})")
    rows = math.prod(a.shape[:-1])
    return KernelCall(f"lmc_matmul_f32_w8({a.ptr()}, {bq.ptr()}, {scale.ptr()}, {zp.ptr() if zp else '0'}, "
                      f"{y.out}, {rows}, {k}, {n}, 1, {per_col});", FAMILIES, "", rows * k * n)


def decoded_weight_gemm(op: OpContext, a: TensorRef, c: TensorRef | None, y: TensorRef, gemm_params: str,
                        trans_b: int) -> KernelCall:
    """Gemm(A, DequantizeLinear(B_q, s[, z]), C) with the weight decoded inside the kernel (``gemm_params``:
    the lmc_gemm_params definition named ``op.prefix``)."""
    dq = op.node.inputs[1].inputs[0]
    bq, scale = op.ref(dq.inputs[0]), op.ref(dq.inputs[1])
    zp = op.ref(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if bq.dtype != np.dtype(np.int8) or len(bq.shape) != 2:
        raise op.unsupported(f"a decoded weight must be a 2-D int8 matrix (got {bq.dtype} {list(bq.shape)})")
    n = bq.shape[0] if trans_b else bq.shape[1]
    column_axis = 0 if trans_b else 1
    if scale.numel == 1:
        per_col = 0
    elif scale.numel == n and int(dq.attrs.get("axis", 1)) % 2 == column_axis and not int(dq.attrs.get("block_size", 0)):
        per_col = 1
    else:
        raise op.unsupported("a decoded Gemm weight needs per-tensor or per-output-column scales")
    op.expect_dtype([a, y, scale, c], np.float32)
    m, k = a.shape
    return KernelCall(f"lmc_gemm_f32_w8({a.ptr()}, {bq.ptr()}, {scale.ptr()}, {zp.ptr() if zp else '0'}, "
                      f"{c.ptr() if c is not None else '0'}, {y.out}, &{op.prefix}, {per_col});", FAMILIES,
                      gemm_params, m * n * k)
