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


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit values (last axis even) two per byte, low nibble first."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def pack_int4(values: np.ndarray) -> bytes:
    """Pack signed 4-bit values (flattened, row-major) two per byte, low nibble first (ONNX INT4 layout)."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    return pack_uint4(flat.astype(np.uint8) & 0x0F).tobytes()
