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
ASYM_RATIOS = np.linspace(0.7, 1.0, 11)   # the range of the ratios searched for both ends (asymmetric)

# The search is coarse to fine: the ratios of the first stage for every group, then offsets around each
# group's best so far (its own candidates: evaluated for all groups of a chunk at once). The last stages are
# finer than the old 26-point / 11×11 grids, so the chosen error is at most theirs almost everywhere, for
# 12 (symmetric) / 48 (asymmetric) evaluations instead of 26 / 121.
SYM_STAGES = (np.linspace(0.5, 1.0, 6), (-0.04, -0.02, 0.02, 0.04), (-0.01, 0.01))
ASYM_STAGES = ((0.7, 0.8, 0.9, 1.0), 0.025, 0.0125)     # coarse grid, then ±2 steps of 0.025, ±1 of 0.0125
CHUNK_ELEMENTS = 1 << 16                  # elements of one evaluation chunk (kept in cache)


def _chunk_groups(length: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, length))


def _sym_error(gT: np.ndarray, hT, amax: np.ndarray, r: np.ndarray, qmin: int, qmax: int,
               t: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(error [n], scale [n]) of ratio r [n] for groups gT [L, n] (columns): Σ h (w − q·s)² = s² Σ h (w/s − q)²."""
    s = r * amax / qmax
    np.multiply(gT, (1.0 / s).astype(np.float32), out=u)
    np.rint(u, out=t)
    np.clip(t, qmin, qmax, out=t)
    np.subtract(u, t, out=t)
    np.square(t, out=t)
    if hT is not None:
        t *= hT
    return np.add.reduce(t, axis=0, dtype=np.float64) * s * s, s


def _sym_search(gT: np.ndarray, hT, qmin: int, qmax: int, search: bool) -> np.ndarray:
    """Best scale [n] (float64) for the groups (columns) of gT [L, n] float32."""
    amax = np.abs(gT).max(axis=0).astype(np.float64)
    amax = np.where(amax == 0, 1.0, amax)
    if not search:
        return amax / qmax
    t, u = np.empty_like(gT), np.empty_like(gT)
    best_err = np.full(gT.shape[1], np.inf)
    best_r = np.ones(gT.shape[1])
    best_s = amax / qmax
    for stage, values in enumerate(SYM_STAGES):
        base = best_r.copy()
        for v in values:
            r = np.full_like(base, v) if stage == 0 else np.clip(base + v, RATIOS[0], 1.0)
            err, s = _sym_error(gT, hT, amax, r, qmin, qmax, t, u)
            better = err < best_err
            best_err[better], best_r[better], best_s[better] = err[better], r[better], s[better]
    return best_s


def _asym_params(lo0, hi0, rl, rh, qmax):
    lo, hi = lo0 * rl, hi0 * rh
    s = np.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, np.clip(np.rint(-lo / s), 0, qmax)


def _asym_search(gT: np.ndarray, hT, qmax: int, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, zero point) [n] (float64) for the groups (columns) of gT [L, n] float32."""
    lo0 = np.minimum(gT.min(axis=0).astype(np.float64), 0.0)
    hi0 = np.maximum(gT.max(axis=0).astype(np.float64), 0.0)
    n = gT.shape[1]
    if not search:
        return _asym_params(lo0, hi0, 1.0, 1.0, qmax)
    t, u = np.empty_like(gT), np.empty_like(gT)
    best_err = np.full(n, np.inf)
    best_rl, best_rh = np.ones(n), np.ones(n)
    low = float(ASYM_RATIOS[0])

    def evaluate(rl, rh):
        s, z = _asym_params(lo0, hi0, rl, rh, qmax)
        np.multiply(gT, (1.0 / s).astype(np.float32), out=u)
        np.rint(u, out=t)
        np.maximum(t, (-z).astype(np.float32), out=t)
        np.minimum(t, (qmax - z).astype(np.float32), out=t)
        np.subtract(u, t, out=t)
        np.square(t, out=t)
        if hT is not None:
            np.multiply(t, hT, out=t)
        err = np.add.reduce(t, axis=0, dtype=np.float64) * s * s
        better = err < best_err
        best_err[better] = err[better]
        best_rl[better] = rl[better] if np.ndim(rl) else rl
        best_rh[better] = rh[better] if np.ndim(rh) else rh

    coarse, step, fine = ASYM_STAGES
    for rl in coarse:
        for rh in coarse:
            evaluate(np.full(n, rl), np.full(n, rh))
    for d, reach in ((step, 2), (fine, 1)):
        base_l, base_h = best_rl.copy(), best_rh.copy()
        for i in range(-reach, reach + 1):
            for j in range(-reach, reach + 1):
                if i or j:
                    evaluate(np.clip(base_l + i * d, low, 1.0), np.clip(base_h + j * d, low, 1.0))
    return _asym_params(lo0, hi0, best_rl, best_rh, qmax)


def _block_chunks(w: np.ndarray, block: int, importance):
    """Row chunks of w [rows, K] as (r0, r1, gT [block, (r1−r0)·K/B] float32 columns = blocks, hT)."""
    rows, k = w.shape
    nb = k // block
    step = max(1, CHUNK_ELEMENTS // k)
    hb = None if importance is None else np.asarray(importance, np.float64).reshape(nb, block).T.astype(np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        gT = np.ascontiguousarray(np.asarray(w[r0:r1], dtype=np.float32).reshape(-1, block).T)
        hT = None if hb is None else np.ascontiguousarray(np.tile(hb, (1, r1 - r0)))
        yield r0, r1, gT, hT


def quantize_channels(w: np.ndarray, axis: int, importance: np.ndarray | None = None,
                      search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: (q int8 same shape as w, scales float32 [w.shape[axis]]).
    ``importance`` (optional) is h over the *other* axis of a 2-D weight."""
    moved = np.moveaxis(w, axis, 0)
    channels = moved.shape[0]
    groups = moved.reshape(channels, -1)                      # [C, L] (a view for axis 1 of a 2-D weight)
    length = groups.shape[1]
    h = None if importance is None else np.asarray(importance, np.float32).reshape(-1, 1)
    q = np.empty(groups.shape, dtype=np.int8)
    scales = np.empty(channels, dtype=np.float32)
    step = _chunk_groups(length)
    for c0 in range(0, channels, step):
        c1 = min(channels, c0 + step)
        gT = np.ascontiguousarray(groups[c0:c1].T, dtype=np.float32)       # [L, n]
        s32 = _sym_search(gT, h, -127, 127, search).astype(np.float32)
        scales[c0:c1] = s32
        q[c0:c1] = np.clip(np.rint(groups[c0:c1].astype(np.float64) / s32[:, None].astype(np.float64)), -127, 127)
    return np.moveaxis(q.reshape(moved.shape), 0, axis), scales


def quantize_blocks(w: np.ndarray, block: int, bits: int = 4, importance: np.ndarray | None = None,
                    search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise along the last axis of w [rows, K]: (q int8 [rows, K] in [qmin, qmax],
    scales float32 [rows, K // block]). ``importance``: h [K]."""
    rows, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    q = np.empty((rows, k), dtype=np.int8)
    scales = np.empty((rows, k // block), dtype=np.float32)
    for r0, r1, gT, hT in _block_chunks(w, block, importance):
        s32 = _sym_search(gT, hT, qmin, qmax, search).astype(np.float32)
        scales[r0:r1] = s32.reshape(r1 - r0, k // block)
        g = np.asarray(w[r0:r1], dtype=np.float64).reshape(-1, block)
        q[r0:r1] = np.clip(np.rint(g / s32[:, None].astype(np.float64)), qmin, qmax).reshape(r1 - r0, k)
    return q, scales


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
    q = np.empty((rows, k), dtype=np.uint8)
    scales = np.empty((rows, k // block), dtype=np.float32)
    zeros = np.empty((rows, k // block), dtype=np.uint8)
    for r0, r1, gT, hT in _block_chunks(w, block, importance):
        s, z = _asym_search(gT, hT, qmax, search)
        s32 = s.astype(np.float32)
        scales[r0:r1] = s32.reshape(r1 - r0, k // block)
        zeros[r0:r1] = z.astype(np.uint8).reshape(r1 - r0, k // block)
        g = np.asarray(w[r0:r1], dtype=np.float64).reshape(-1, block)
        q[r0:r1] = np.clip(np.rint(g / s32[:, None].astype(np.float64)) + z[:, None], 0, qmax).reshape(r1 - r0, k)
    return q, scales, zeros


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
