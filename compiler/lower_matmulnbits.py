"""Write the kernel onnxruntime makes of a decoded weight into the bundle: a block-quantized
DequantizeLinear → MatMul pair becomes ``com.microsoft.MatMulNBits``.

onnxruntime fuses DequantizeLinear(W_q, s, z; axis 0, block_size B) → MatMul(A, ·) into MatMulNBits when it
loads a model (at the accuracy level of ``session.qdq_matmulnbits_accuracy_level``, 4 by default). The
fusion builds the kernel's transposed weight, scales and zero points as new in-memory tensors while the
originals are still loaded, and prepacking then copies them again: for a 1.1B-parameter int4 decoder that is
~185 MiB of transient heap above the steady state and 3 s of load. Written here, at build time, the bundle
holds what the fusion would make (the runtime maps it and packs it directly) and computes the same numbers.

Layout (W_q [K, N] with K = nb·B, scales s [nb, N], zero points z [nb, N] of W_q's type):
    B        uint8 [N, nb, B·bits/8]   column n, block b: W_q[bB:(b+1)B, n] as unsigned, two 4-bit values
                                       per byte low nibble first (bits = 4), one per byte (bits = 8)
    scales   float32 [N·nb]            s[b, n] at n·nb + b
    zeros    uint8 [N·⌈nb/2⌉] (4-bit, two blocks per byte, low nibble first) or [N·nb] (8-bit)
Signed weights are stored shifted by 2^(bits−1) (their zero point, or MatMulNBits' default one when the
DequantizeLinear has none); unsigned weights without zero points get explicit zeros.

Preconditions for a pair to be lowered: 2-D constant weight of int4/uint4/int8/uint8, float32 scales,
``axis`` 0, ``block_size`` a power of two ≥ 16 dividing K, read only as the second input of one MatMul whose
first input is a float activation (not w8a8's quantized one, which onnxruntime runs as an integer GEMM). A
weight read by several MatMuls stays a pair: onnxruntime does not fuse it either (it computes the float
weight), so writing MatMulNBits there would change the numbers.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.compiler.backend import DECODED_MATMUL, _decoded_kernel, decoded_weight

log = logging.getLogger(__name__)

ACCURACY_LEVEL_ENTRY = "session.qdq_matmulnbits_accuracy_level"
ORT_DEFAULT_ACCURACY_LEVEL = 4          # onnxruntime's fusion level when the session entry is absent
_BITS = {onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False),
         onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False)}


def accuracy_level(session_options: dict) -> int:
    """The level onnxruntime fuses DequantizeLinear → MatMul at under a bundle's session options."""
    entry = session_options.get("config_entries", {}).get(ACCURACY_LEVEL_ENTRY)
    return ORT_DEFAULT_ACCURACY_LEVEL if entry is None else int(entry)


def _unsigned(const: gs.Constant, bits: int, signed: bool) -> np.ndarray:
    """The constant's values as unsigned integers (signed ones shifted by 2^(bits−1)), shape as stored."""
    raw = np.frombuffer(ir.constant_bytes(const), dtype=np.uint8)
    count = int(np.prod(const.shape))
    if bits == 4:
        values = np.empty(raw.size * 2, dtype=np.uint8)
        values[0::2] = raw & 0x0F
        values[1::2] = raw >> 4
        values = values[:count]
        if signed:
            values ^= 0x08                        # two's complement nibble + 8 (mod 16)
    else:
        values = raw[:count] ^ 0x80 if signed else raw[:count]
    return values.reshape(const.shape)


def _pack_pairs(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis (even length), low nibble first."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def lowerable(dq: gs.Node) -> bool:
    """The pair's preconditions (module docstring)."""
    if not decoded_weight(dq) or _decoded_kernel(dq) != DECODED_MATMUL:
        return False
    weight, scales = dq.inputs[0], dq.inputs[1]
    if ir.onnx_dtype(weight.dtype) not in _BITS or len(weight.shape) != 2 or scales.dtype != np.float32:
        return False
    block = int(dq.attrs.get("block_size", 0))
    axis = int(dq.attrs.get("axis", 1))
    k = int(weight.shape[0])
    if axis not in (0, -2) or block < 16 or block & (block - 1) or k % block:
        return False
    readers = dq.outputs[0].outputs
    return (len(readers) == 1 and ir.is_op(readers[0], "MatMul") and readers[0].inputs[1] is dq.outputs[0]
            and readers[0].inputs[0] is not dq.outputs[0])


def lower_pair(dq: gs.Node, level: int, names: ir.Namer) -> int:
    """Replace one lowerable DequantizeLinear and its MatMul by MatMulNBits (``level``: its accuracy
    level). Returns the MatMuls lowered."""
    weight, scales = dq.inputs[0], dq.inputs[1]
    zeros = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    bits, signed = _BITS[ir.onnx_dtype(weight.dtype)]
    block = int(dq.attrs["block_size"])
    k, n = (int(d) for d in weight.shape)
    nb = k // block
    q = _unsigned(weight, bits, signed).T.reshape(n, nb, block)          # [N, nb, B]
    data = _pack_pairs(q) if bits == 4 else np.ascontiguousarray(q)
    del q
    s = np.ascontiguousarray(np.asarray(scales.values, dtype=np.float32).reshape(nb, n).T).reshape(-1)
    if zeros is not None:
        z = _unsigned(zeros, bits, signed).reshape(nb, n).T             # [N, nb]
    elif not signed:
        z = np.zeros((n, nb), dtype=np.uint8)                            # unsigned, no zero point: 0
    else:
        z = None                                                         # MatMulNBits' default 2^(bits−1)
    inputs = [gs.Constant(names.fresh(weight.name + "_nbits"), data),
              gs.Constant(names.fresh(scales.name + "_nbits"), s)]
    if z is not None:
        if bits == 4:
            padded = np.zeros((n, nb + nb % 2), dtype=np.uint8)
            padded[:, :nb] = z
            z = _pack_pairs(padded)
        inputs.append(gs.Constant(names.fresh((zeros.name if zeros is not None else weight.name) + "_nbits_zp"),
                                  np.ascontiguousarray(z).reshape(-1)))
    readers = list(dq.outputs[0].outputs)
    for mm in readers:
        mm.op, mm.domain = "MatMulNBits", ir.MS_DOMAIN
        mm.attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": int(level)}
        activation = mm.inputs[0]
        mm.inputs.clear()
        mm.inputs.extend([activation] + inputs)
    dq.outputs.clear()
    dq.inputs.clear()
    return len(readers)


def lower_decoded_matmuls(graph: gs.Graph, level: int, spill=None) -> int:
    """Lower every lowerable pair of ``graph`` (``lower_pair``); the emptied DequantizeLinear nodes are
    removed. With ``spill`` (a ``weights.SpillFile``), the new weights leave the process every few pairs.
    Returns the MatMuls lowered."""
    names = ir.Namer(graph)
    lowered, done = 0, set()
    for node in list(graph.nodes):
        if ir.is_op(node, "DequantizeLinear") and lowerable(node):
            lowered += lower_pair(node, level, names)
            done.add(id(node))
            if spill is not None and len(done) % 8 == 0:
                ir.spill_constants(graph, spill)
    if done:
        graph.nodes = [n for n in graph.nodes if id(n) not in done]
        if spill is not None:
            ir.spill_constants(graph, spill)
        log.info("%d MatMuls written as MatMulNBits (accuracy level %d)", lowered, level)
    return lowered
