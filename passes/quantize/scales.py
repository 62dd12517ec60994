"""Symmetric weight quantization: choosing scales that minimise the (activation-weighted) error.

Per-channel int8 (DequantizeLinear per-axis): for channel c along ``axis``,
    s_c = r_c · max|w_c| / 127,   q = clip(round(w / s_c), −127, 127),   ŵ = q · s_c
Block-wise, along the last axis of a 2-D [rows, K] matrix in blocks of B (K % B == 0), b bits
(qmax = 2^(b−1) − 1, qmin = −2^(b−1)):
    s = r · max|w_block| / qmax,   q = clip(round(w / s), qmin, qmax)
The clip ratio r is searched per channel / block over ``RATIOS`` to minimise Σ_k h_k (w_k − ŵ_k)², where
h_k = E[x_k²] is the calibration second moment of the input feature k that multiplies w_k (h = 1 without
calibration). For y = Σ_k w_k x_k with uncorrelated inputs, E[(y − ŷ)²] = Σ_k (w_k − ŵ_k)² E[x_k²]: the
search minimises the expected output error, not the weight error (AWQ/HQQ-like, no retraining).
"""

from __future__ import annotations

import numpy as np

RATIOS = np.linspace(0.5, 1.0, 26)
ASYM_RATIOS = np.linspace(0.7, 1.0, 11)   # searched for both ends of the range: 121 candidates


def _search(w: np.ndarray, h: np.ndarray, qmin: int, qmax: int, ratios=RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """w: [G, n] groups; h: [G, n] or [n] weights. Returns (q int8 [G, n], scale float32 [G])."""
    amax = np.abs(w).max(axis=1)
    amax = np.where(amax == 0, 1.0, amax)
    best_err = np.full(w.shape[0], np.inf)
    best_scale = amax / qmax
    for r in ratios:
        s = (r * amax / qmax)[:, None]
        q = np.clip(np.rint(w / s), qmin, qmax)
        err = (h * (w - q * s) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, s[:, 0], best_scale)
    s = best_scale.astype(np.float32)
    q = np.clip(np.rint(w / s[:, None].astype(np.float64)), qmin, qmax).astype(np.int8)
    return q, s


def quantize_channels(w: np.ndarray, axis: int, importance: np.ndarray | None = None,
                      search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: (q int8 same shape as w, scales float32 [w.shape[axis]]).
    ``importance`` (optional) is h over the *other* axis of a 2-D weight."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    groups = moved.reshape(moved.shape[0], -1)
    h = np.ones_like(groups) if importance is None else np.broadcast_to(importance.reshape(1, -1), groups.shape)
    q, s = _search(groups, h, -127, 127, RATIOS if search else RATIOS[-1:])
    return np.moveaxis(q.reshape(moved.shape), 0, axis), s


def quantize_blocks(w: np.ndarray, block: int, bits: int = 4, importance: np.ndarray | None = None,
                    search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise along the last axis of w [rows, K]: (q int8 [rows, K] in [qmin, qmax],
    scales float32 [rows, K // block]). ``importance``: h [K]."""
    rows, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    groups = w.astype(np.float64).reshape(rows * (k // block), block)
    if importance is None:
        h = np.ones_like(groups)
    else:
        h = np.broadcast_to(importance.reshape(1, k // block, block), (rows, k // block, block)).reshape(groups.shape)
    q, s = _search(groups, h, qmin, qmax, RATIOS if search else RATIOS[-1:])
    return q.reshape(rows, k), s.reshape(rows, k // block)


def quantize_blocks_asymmetric(w: np.ndarray, block: int, bits: int = 4, importance: np.ndarray | None = None,
                               search: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block-wise along the last axis of w [rows, K]: unsigned q in [0, 2^b − 1] with a zero
    point z per block, ŵ = (q − z)·s. The range [lo, hi] of each block is shrunk towards its centre by
    ratios searched (as above) to minimise the h-weighted error. Returns (q uint8 [rows, K],
    scales float32 [rows, K/B], zero points uint8 [rows, K/B])."""
    rows, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    qmax = 2 ** bits - 1
    g = w.astype(np.float64).reshape(-1, block)
    h = np.ones_like(g) if importance is None else np.broadcast_to(
        importance.reshape(1, k // block, block), (rows, k // block, block)).reshape(g.shape)
    lo0, hi0 = g.min(axis=1), g.max(axis=1)
    lo0, hi0 = np.minimum(lo0, 0.0), np.maximum(hi0, 0.0)
    best = np.full(g.shape[0], np.inf)
    best_s = np.where(hi0 > lo0, (hi0 - lo0) / qmax, 1.0)
    best_z = np.clip(np.rint(-lo0 / best_s), 0, qmax)
    ratios = ASYM_RATIOS if search else ASYM_RATIOS[-1:]
    for r_lo in ratios:
        for r_hi in ratios:
            lo, hi = lo0 * r_lo, hi0 * r_hi
            s = np.where(hi > lo, (hi - lo) / qmax, 1.0)
            z = np.clip(np.rint(-lo / s), 0, qmax)
            q = np.clip(np.rint(g / s[:, None]) + z[:, None], 0, qmax)
            err = (h * (g - (q - z[:, None]) * s[:, None]) ** 2).sum(axis=1)
            better = err < best
            best, best_s, best_z = np.where(better, err, best), np.where(better, s, best_s), np.where(better, z, best_z)
    s, z = best_s, best_z
    s32 = s.astype(np.float32)
    q = np.clip(np.rint(g / s32[:, None].astype(np.float64)) + z[:, None], 0, qmax).astype(np.uint8)
    return q.reshape(rows, k), s32.reshape(rows, k // block), z.astype(np.uint8).reshape(rows, k // block)


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit values (last axis even) two per byte, low nibble first."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def pack_uint4_flat(values: np.ndarray) -> bytes:
    """Pack unsigned 4-bit values (flattened, row-major) two per byte, low nibble first (ONNX UINT4)."""
    flat = values.astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return pack_uint4(flat).tobytes()


def pack_int4(values: np.ndarray) -> bytes:
    """Pack signed 4-bit values (flattened, row-major) two per byte, low nibble first (ONNX INT4 layout)."""
    return pack_uint4_flat(values.astype(np.int8).astype(np.uint8) & 0x0F)   # two's complement nibbles


def gptq_blocks(w_t: np.ndarray, gram: np.ndarray, block: int, bits: int = 4, damp: float = 0.01,
                batch: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., 2022) with asymmetric block-wise scales, for y = x·Wᵀ with w_t = Wᵀ [N, K].

    Quantizes input feature k = 0..K−1 in order; the error each step leaves, divided by the inverse-Hessian
    pivot, is pushed onto the features not quantized yet (H = XᵀX from calibration, damped by
    ``damp``·mean diag). Block scales/zero points are chosen (range search, ``quantize_blocks_asymmetric``)
    on the updated weights when a block starts. Returns (q uint8 [N, K], scales [N, K/B], zeros [N, K/B])."""
    n, k = w_t.shape
    if k % block or batch % block:
        raise ValueError("K and the batch must be multiples of the block")
    w = w_t.astype(np.float64).copy()
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T          # upper factor U with H⁻¹ = UᵀU
    diag_h = np.diag(h)
    qmax = 2 ** bits - 1
    q_all = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // block), dtype=np.float32)
    zeros = np.zeros((n, k // block), dtype=np.uint8)
    for i1 in range(0, k, batch):
        i2 = min(i1 + batch, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                _, s_blk, z_blk = quantize_blocks_asymmetric(w1[:, i:i + block], block, bits,
                                                             diag_h[col:col + block])
                s, z = s_blk[:, 0].astype(np.float64), z_blk[:, 0].astype(np.float64)
                scales[:, col // block], zeros[:, col // block] = s_blk[:, 0], z_blk[:, 0]
            col_w = w1[:, i]
            q = np.clip(np.rint(col_w / s) + z, 0, qmax)
            q_all[:, col] = q
            e = (col_w - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all, scales, zeros
