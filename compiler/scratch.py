"""Kernel scratch memory: working bytes a fused op needs beyond its inputs and outputs.

The plan places them as buffers alive for that one step, so fusing never hides memory. Estimates (fp32
kernels, onnxruntime 1.32 CPU; B batch, H query heads, Sq/Skv query/key lengths, Dh head dim):
- ``Attention`` (ONNX 23), ``com.microsoft.MultiHeadAttention`` / ``GroupQueryAttention``: the score
  matrix B·H·Sq·Skv·4 bytes (softmax is computed in place on it);
- ``com.microsoft.MatMulNBits`` (and a DequantizeLinear → MatMul pair onnxruntime fuses into one): the
  activation A [M, K] quantized block-wise to int8 for the integer path, M·K·(1 + 4/block) bytes (the
  weights are prepacked at load, not expanded per run); 0 for ``GatherBlockQuantized``;
- everything else: 0.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir


def scratch_bytes(node: gs.Node) -> int:
    if ir.is_op(node, "GroupQueryAttention", ir.MS_DOMAIN) and len(node.inputs) > 3 and node.inputs[3].name:
        q, past = ir.static_shape(node.inputs[0]), ir.static_shape(node.inputs[3])   # scores over the cache
        if q is None or past is None:
            return 0
        return q[0] * int(node.attrs.get("num_heads", 1)) * q[1] * past[2] * 4
    if ir.is_op(node, "Attention") or ir.is_op(node, ("MultiHeadAttention", "GroupQueryAttention"), ir.MS_DOMAIN):
        q = ir.static_shape(node.inputs[0])
        k = ir.static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        if q is None or k is None:
            return 0
        heads = int(node.attrs.get("q_num_heads", node.attrs.get("num_heads", 1)))
        if len(q) == 4:  # [B, H, S, Dh]
            b, heads, sq = q[0], q[1], q[2]
            skv = k[2]
        else:            # [B, S, H*Dh]
            b, sq = q[0], q[1]
            skv = k[1]
        return b * heads * sq * skv * 4
    if ir.is_op(node, "MatMulNBits", ir.MS_DOMAIN):
        return _quantized_activation_bytes(node.inputs[0], int(node.attrs.get("block_size", 32)))
    return 0


def _quantized_activation_bytes(a: gs.Tensor, block: int) -> int:
    shape = ir.static_shape(a)
    if shape is None:
        return 0
    numel = 1
    for d in shape:
        numel *= d
    return numel + numel * 4 // max(block, 1)


def decode_scratch(dq: gs.Node, consumer: gs.Node) -> int:
    """Working bytes of a DequantizeLinear that onnxruntime fuses with its MatMul (into MatMulNBits): the
    consumer's activation quantized as above (block = block_size, or 32 for per-channel weights)."""
    block = int(dq.attrs.get("block_size", 0)) or 32
    return _quantized_activation_bytes(consumer.inputs[0], block)
