"""Symmetric weight quantization: choosing scales that minimise the (activation-weighted) error.

Per-channel int8 (DequantizeLinear per-axis): for channel c along ``axis``,
    s_c = r_c · max|w_c| / 127,   q = clip(round(w / s_c), −127, 127),   ŵ = q · s_c
Block-wise, along one axis of a 2-D matrix in blocks of B (the last axis of [rows, K], or the first of a
MatMul weight [K, N] with ``axis=0``; K % B == 0), b bits (qmax = 2^(b−1) − 1, qmin = −2^(b−1)):
    s = r · max|w_block| / qmax,   q = clip(round(w / s), qmin, qmax)
The clip ratio r is searched per channel / block over ``RATIOS`` to minimise Σ_k h_k (w_k − ŵ_k)², where
h_k = E[x_k²] is the calibration second moment of the input feature k that multiplies w_k (h = 1 without
calibration). For y = Σ_k w_k x_k with uncorrelated inputs, E[(y − ŷ)²] = Σ_k (w_k − ŵ_k)² E[x_k²]: the
search minimises the expected output error, not the weight error (AWQ/HQQ-like, no retraining).

How it runs: a weight is cut into chunks of ``CHUNK_ELEMENTS`` (a few hundred blocks, or a few channels),
each copied once into a float32 array of groups — blocks as columns [B, n], channels as rows [n, L] — and
every stage of the search evaluates all its candidates for all groups of the chunk in a few numpy calls
(candidates stacked on a leading axis, ``BUFFER_ELEMENTS`` per call so the working set stays in cache).
Chunks are independent and run on ``threads()`` threads (numpy releases the GIL in its loops); results do
not depend on the number of threads. The input weight is only read (it may be a read-only memmap).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lmc.passes.quantize.products import TransposedProducts

RATIOS = np.linspace(0.5, 1.0, 26)
ASYM_RATIOS = np.linspace(0.7, 1.0, 11)   # the range of the ratios searched for both ends (asymmetric)

# The search is coarse to fine: the ratios of the first stage for every group, then offsets around each
# group's best so far (its own candidates: evaluated for all groups of a chunk at once). The last stages are
# finer than the old 26-point / 11×11 grids, so the chosen error is at most theirs almost everywhere, for
# 12 (symmetric) / 28 (asymmetric) evaluations instead of 26 / 121. The asymmetric refinement moves one end
# at a time (±2 steps of 0.025 of either ratio, then ±1 of 0.0125): the 1.1B's MatMul shapes lose 1e-5 of
# relative error against moving both ends over the 5×5 and 3×3 squares (48 evaluations), in 0.55× the time.
SYM_STAGES = (np.linspace(0.5, 1.0, 6), (-0.04, -0.02, 0.02, 0.04), (-0.01, 0.01))
ASYM_STAGES = ((0.7, 0.8, 0.9, 1.0), 0.025, 0.0125)     # coarse grid, then ±2 steps of 0.025, ±1 of 0.0125
CHUNK_ELEMENTS = 1 << 16                  # weight elements of one chunk (its groups are searched together)
BUFFER_ELEMENTS = 1 << 17                 # candidates × chunk elements evaluated per numpy call (in L2)
MAX_THREADS = 4


def threads() -> int:
    """Worker threads of the search: the CPUs this process may run on, at most ``MAX_THREADS``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, n))


def _chunk_groups(length: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, length))


_local = threading.local()


def _buffers(elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 scratch arrays of at least ``elements``, one pair per thread (reused across chunks, so
    no chunk pays for fresh pages)."""
    bufs = getattr(_local, "buffers", None)
    if bufs is None or bufs[0].size < elements:
        bufs = (np.empty(elements, np.float32), np.empty(elements, np.float32))
        _local.buffers = bufs
    return bufs


class _Groups:
    """The quantization groups of one chunk: ``g`` float32, contiguous, laid out [L, n] (n groups as
    columns: blocks) or, with ``rows``, [n, L] (groups as rows: channels); ``h`` broadcastable to ``g`` or
    None. ``errors`` gives Σ h (u − clip(rint(u), lo, hi))² per candidate and group, u = g · inv."""

    def __init__(self, g: np.ndarray, h: np.ndarray | None, rows: bool):
        self.g, self.h, self.rows = g, h, rows
        self.n = g.shape[0] if rows else g.shape[1]
        self.axis = -1 if rows else -2
        self._squares = "cnl,cnl->cn" if rows else "cln,cln->cn"

    def _param(self, p: np.ndarray) -> np.ndarray:
        return p[:, :, None] if self.rows else p[:, None, :]

    def absmax(self) -> np.ndarray:
        return np.abs(self.g).max(axis=self.axis).astype(np.float64)

    def low_high(self) -> tuple[np.ndarray, np.ndarray]:
        return self.g.min(axis=self.axis).astype(np.float64), self.g.max(axis=self.axis).astype(np.float64)

    def errors(self, inv: np.ndarray, lo, hi) -> np.ndarray:
        """inv [C, n] float32; lo, hi: [C, n] float32 bounds or scalars. Returns [C, n] float64 (the sum over a
        group runs in float32)."""
        c = inv.shape[0]
        size = self.g.size
        step = max(1, min(c, BUFFER_ELEMENTS // size))
        bu, bt = _buffers(step * size)
        out = np.empty((c, self.n))
        arrays = np.ndim(lo) > 0
        for c0 in range(0, c, step):
            c1 = min(c, c0 + step)
            shape = (c1 - c0,) + self.g.shape
            u = bu[:(c1 - c0) * size].reshape(shape)
            t = bt[:(c1 - c0) * size].reshape(shape)
            np.multiply(self.g, self._param(inv[c0:c1]), out=u)
            np.rint(u, out=t)
            if arrays:
                np.maximum(t, self._param(lo[c0:c1]), out=t)
                np.minimum(t, self._param(hi[c0:c1]), out=t)
            else:
                np.clip(t, lo, hi, out=t)
            np.subtract(u, t, out=t)
            if self.h is None:
                out[c0:c1] = np.einsum(self._squares, t, t)
            else:
                np.square(t, out=t)
                np.multiply(t, self.h, out=t)
                out[c0:c1] = np.add.reduce(t, axis=self.axis)
        return out


def _pick(best_err: np.ndarray, err: np.ndarray, best: tuple, cands: tuple) -> tuple:
    """Per group, the first of (best so far, candidates 0..C−1) with the least error — what evaluating the
    candidates one after another, keeping a strictly better one, gives. Returns (error, *values)."""
    idx = np.argmin(err, axis=0)[None]
    least = np.take_along_axis(err, idx, axis=0)[0]
    better = least < best_err              # a NaN error (non-finite weights) never wins
    out = [np.where(better, least, best_err)]
    for b, c in zip(best, cands):
        out.append(np.where(better, np.take_along_axis(c, idx, axis=0)[0], b))
    return tuple(out)


def _sym_search(grp: _Groups, qmin: int, qmax: int, search: bool) -> np.ndarray:
    """Best scale [n] (float64) of each group."""
    amax = grp.absmax()
    amax = np.where(amax == 0, 1.0, amax)
    if not search:
        return amax / qmax
    n = grp.n
    unit = (amax / qmax).astype(np.float32)            # the scale at ratio 1
    best_err = np.full(n, np.inf, dtype=np.float32)
    best_r = np.ones(n, dtype=np.float32)
    for stage, values in enumerate(SYM_STAGES):
        v = np.asarray(values, dtype=np.float32)[:, None]
        r = np.repeat(v, n, axis=1) if stage == 0 else np.clip(best_r[None] + v, np.float32(RATIOS[0]), 1.0)
        s = r * unit
        err = grp.errors(np.reciprocal(s), qmin, qmax)
        err *= s
        err *= s
        best_err, best_r = _pick(best_err, err, (best_r,), (r,))
    return best_r.astype(np.float64) * amax / qmax


def _asym_params(lo0, hi0, rl, rh, qmax):
    lo, hi = lo0 * rl, hi0 * rh
    s = np.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, np.clip(np.rint(-lo / s), 0, qmax)


def _lattice(values) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([v[0] for v in values], np.float32)[:, None],
            np.array([v[1] for v in values], np.float32)[:, None])


_COARSE, _STEP, _FINE = ASYM_STAGES
ASYM_GRID = _lattice([(a, b) for a in _COARSE for b in _COARSE])         # (rl, rh) of the first stage
ASYM_OFFSETS = [_lattice([(i * d, 0) for i in range(-reach, reach + 1) if i] +
                         [(0, j * d) for j in range(-reach, reach + 1) if j]) for d, reach in ((_STEP, 2), (_FINE, 1))]


def _asym_search(grp: _Groups, qmax: int, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, zero point) [n] (float64) of each group. The search runs in float32; the scale and zero
    point of the chosen ratios are then computed in float64."""
    lo0, hi0 = grp.low_high()
    lo0, hi0 = np.minimum(lo0, 0.0), np.maximum(hi0, 0.0)
    n = grp.n
    if not search:
        return _asym_params(lo0, hi0, 1.0, 1.0, qmax)
    # s = (hi0·rh − lo0·rl)/qmax, z = clip(rint(−lo0·rl / s), 0, qmax) — in float32 from these:
    hq = (hi0 / qmax).astype(np.float32)
    lq = (lo0 / qmax).astype(np.float32)
    nlo = (-lo0).astype(np.float32)
    empty = hq == lq                                   # an all-zero block: any ratios (all give error 0)
    hq[empty] = 1.0
    best_err = np.full(n, np.inf, dtype=np.float32)
    best_rl, best_rh = np.ones(n, dtype=np.float32), np.ones(n, dtype=np.float32)
    low = np.float32(ASYM_RATIOS[0])
    top = np.float32(qmax)

    def evaluate(rl, rh):                 # rl, rh [C, n] float32
        nonlocal best_err, best_rl, best_rh
        s = hq * rh
        s -= lq * rl
        inv = np.reciprocal(s)
        z = nlo * rl
        z *= inv
        np.rint(z, out=z)
        np.clip(z, 0, top, out=z)
        err = grp.errors(inv, np.negative(z), np.subtract(top, z))
        err *= s
        err *= s
        best_err, best_rl, best_rh = _pick(best_err, err, (best_rl, best_rh), (rl, rh))

    rl, rh = ASYM_GRID
    evaluate(np.repeat(rl, n, axis=1), np.repeat(rh, n, axis=1))
    for dl, dh in ASYM_OFFSETS:
        evaluate(np.clip(best_rl[None] + dl, low, 1.0), np.clip(best_rh[None] + dh, low, 1.0))
    return _asym_params(lo0, hi0, best_rl.astype(np.float64), best_rh.astype(np.float64), qmax)


# ------------------------------------------------------------------------------------------- chunking
def _run(tasks, work) -> None:
    """``work(task)`` for every task, on ``threads()`` threads when there are several tasks."""
    tasks = list(tasks)
    workers = min(threads(), len(tasks))
    if workers <= 1:
        for task in tasks:
            work(task)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        for _ in pool.map(work, tasks):     # re-raises a worker's exception
            pass
    finally:        # interrupted (Ctrl-C, SIGTERM) or failed: the tasks not started are dropped, not run
        pool.shutdown(wait=True, cancel_futures=True)


def _block_tasks(w: np.ndarray, block: int, axis: int):
    """Chunks of a 2-D weight blocked along ``axis`` (0 or 1) as (index, count) pairs: for axis 1, rows
    [i, i + count); for axis 0, block rows [i, i + count) (B weight rows each) — at least one."""
    rows, k = w.shape
    if axis == 1:
        step = max(1, CHUNK_ELEMENTS // k)
        return [(r0, min(rows, r0 + step) - r0) for r0 in range(0, rows, step)]
    per = max(1, CHUNK_ELEMENTS // (block * k))          # block rows per chunk (narrow weights)
    nb = rows // block
    if per > 1 or k * block <= CHUNK_ELEMENTS:
        return [(b0, min(nb, b0 + per) - b0, 0, k) for b0 in range(0, nb, per)]
    cols = max(1, CHUNK_ELEMENTS // block)
    return [(b0, 1, c0, min(k, c0 + cols)) for b0 in range(nb) for c0 in range(0, k, cols)]


def _blocked(w: np.ndarray, block: int, axis: int, importance, search_fn, outputs):
    """Run ``search_fn(groups, source [B, n] (w's dtype, at least float32)) -> (q [B, n], per-group values…)``
    on every chunk of w's blocks along ``axis`` and write q into ``outputs[0]`` (w's shape) and the
    per-group values into ``outputs[1:]`` (w's shape with the blocked axis divided by B)."""
    if axis not in (0, 1) or w.ndim != 2:
        raise ValueError("block quantization takes a 2-D weight, blocked along axis 0 or 1")
    length = w.shape[axis]
    if length % block:
        raise ValueError(f"K={length} is not a multiple of block {block}")
    src_dtype = np.float64 if w.dtype == np.float64 else np.float32
    h = None if importance is None else np.asarray(importance, np.float64).astype(np.float32)
    if axis == 1:
        rows, k = w.shape
        nb = k // block
        hb = None if h is None else np.ascontiguousarray(h.reshape(nb, block).T)     # [B, nb]

        def work(task):
            r0, count = task
            src = np.asarray(w[r0:r0 + count], dtype=src_dtype).reshape(-1, block).T      # [B, count·nb]
            src = np.ascontiguousarray(src)
            g = src if src.dtype == np.float32 else src.astype(np.float32)
            hT = None if hb is None else np.tile(hb, (1, count))
            q, *values = search_fn(_Groups(g, hT, rows=False), src)
            outputs[0][r0:r0 + count] = q.T.reshape(count, k)
            for out, v in zip(outputs[1:], values):
                out[r0:r0 + count] = v.reshape(count, nb)
    else:
        _, n_cols = w.shape

        def work(task):
            b0, count, c0, c1 = task
            width = c1 - c0
            part = np.asarray(w[b0 * block:(b0 + count) * block, c0:c1], dtype=src_dtype)
            # [count·B, width] → [B, count·width]: column j·width + c is block (b0 + j, c0 + c)
            src = np.ascontiguousarray(part.reshape(count, block, width).transpose(1, 0, 2)).reshape(block, -1)
            g = src if src.dtype == np.float32 else src.astype(np.float32)
            if h is None:
                hT = None
            elif count == 1:
                hT = h[b0 * block:(b0 + 1) * block, None]
            else:
                hT = np.repeat(h[b0 * block:(b0 + count) * block].reshape(count, block).T, width, axis=1)
            q, *values = search_fn(_Groups(g, hT, rows=False), src)
            outputs[0][b0 * block:(b0 + count) * block, c0:c1] = \
                q.reshape(block, count, width).transpose(1, 0, 2).reshape(count * block, width)
            for out, v in zip(outputs[1:], values):
                out[b0:b0 + count, c0:c1] = v.reshape(count, width)
    _run(_block_tasks(w, block, axis), work)


def quantize_channels(w: np.ndarray, axis: int, importance: np.ndarray | None = None,
                      search: bool = True, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: (q int8 in [-qmax, qmax], same shape as w; scales float32
    [w.shape[axis]]). ``importance`` (optional) is h over the *other* axis of a 2-D weight. ``qmax`` < 127
    narrows the range (63: 7-bit weights, whose products with uint8 activations never saturate a pair sum
    in int16: 2 · 255 · 63 = 32130 ≤ 32767)."""
    if not 1 <= qmax <= 127:
        raise ValueError(f"qmax must be in 1..127, got {qmax}")
    axis = axis % w.ndim
    columns = w.ndim == 2 and axis == 1
    groups = w if columns else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)    # a view for axis 0
    channels = w.shape[axis]
    length = groups.shape[0] if columns else groups.shape[1]
    h = None if importance is None else np.asarray(importance, np.float32).reshape(-1)
    q = np.empty(w.shape if columns else groups.shape, dtype=np.int8)
    scales = np.empty(channels, dtype=np.float32)
    step = _chunk_groups(length)
    src_dtype = np.float64 if w.dtype == np.float64 else np.float32

    def work(c0):
        c1 = min(channels, c0 + step)
        part = groups[:, c0:c1].T if columns else groups[c0:c1]
        src = np.ascontiguousarray(part, dtype=src_dtype)                    # [n, L]
        g = src if src.dtype == np.float32 else src.astype(np.float32)
        s32 = _sym_search(_Groups(g, h, rows=True), -qmax, qmax, search).astype(np.float32)
        scales[c0:c1] = s32
        qc = _round(src.T, s32, 0, -qmax, qmax).T.astype(np.int8)
        if columns:
            q[:, c0:c1] = qc.T
        else:
            q[c0:c1] = qc

    _run(range(0, channels, step), work)
    if columns:
        return q, scales
    return np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis), scales


def _round(src: np.ndarray, s32: np.ndarray, z, qmin: int, qmax: int) -> np.ndarray:
    """clip(rint(src / s) + z, qmin, qmax) for groups as columns of src [L, n] (s, z [n]): in float32 for a
    float32 source (the division is correctly rounded), float64 for a float64 one."""
    t = np.divide(src, s32.astype(src.dtype))
    np.rint(t, out=t)
    if np.ndim(z):
        t += z.astype(src.dtype)
    return np.clip(t, qmin, qmax, out=t)


def _blocked_shapes(w: np.ndarray, block: int, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rows, k = w.shape
    if w.shape[axis] % block:
        raise ValueError(f"K={w.shape[axis]} is not a multiple of block {block}")
    return (rows, k), ((rows, k // block) if axis == 1 else (rows // block, k))


def quantize_blocks(w: np.ndarray, block: int, bits: int = 4, importance: np.ndarray | None = None,
                    search: bool = True, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise along ``axis`` of a 2-D w (default the last: w [rows, K] → q int8 [rows, K] in [qmin, qmax],
    scales float32 [rows, K // block]; ``axis=0``: w [K, N] → q [K, N], scales [K // block, N]).
    ``importance``: h [K] (the blocked axis)."""
    axis = axis % 2
    shape, sshape = _blocked_shapes(w, block, axis)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    q = np.empty(shape, dtype=np.int8)
    scales = np.empty(sshape, dtype=np.float32)

    def search_fn(grp, src):
        s32 = _sym_search(grp, qmin, qmax, search).astype(np.float32)
        return _round(src, s32, 0, qmin, qmax).astype(np.int8), s32

    _blocked(w, block, axis, importance, search_fn, (q, scales))
    return q, scales


def quantize_blocks_asymmetric(w: np.ndarray, block: int, bits: int = 4, importance: np.ndarray | None = None,
                               search: bool = True, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block-wise along ``axis`` of a 2-D w: unsigned q in [0, 2^b − 1] with a zero point z per
    block, ŵ = (q − z)·s. The range [lo, hi] of each block is shrunk towards its centre by ratios searched
    (as above) to minimise the h-weighted error. Returns (q uint8 shaped as w, scales float32 and zero points
    uint8 [rows, K/B] — or [K/B, N] with ``axis=0``)."""
    axis = axis % 2
    shape, sshape = _blocked_shapes(w, block, axis)
    qmax = 2 ** bits - 1
    q = np.empty(shape, dtype=np.uint8)
    scales = np.empty(sshape, dtype=np.float32)
    zeros = np.empty(sshape, dtype=np.uint8)

    def search_fn(grp, src):
        s, z = _asym_search(grp, qmax, search)
        s32 = s.astype(np.float32)
        return _round(src, s32, z, 0, qmax).astype(np.uint8), s32, z.astype(np.uint8)

    _blocked(w, block, axis, importance, search_fn, (q, scales, zeros))
    return q, scales, zeros


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit values (last axis even) two per byte, low nibble first."""
    v = np.asarray(values, dtype=np.uint8)
    out = np.left_shift(v[..., 1::2], 4)
    out |= v[..., 0::2]
    return out


def pack_uint4_flat(values: np.ndarray) -> bytes:
    """Pack unsigned 4-bit values (flattened, row-major) two per byte, low nibble first (ONNX UINT4)."""
    flat = np.asarray(values, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return pack_uint4(flat).tobytes()


def pack_int4(values: np.ndarray) -> bytes:
    """Pack signed 4-bit values (flattened, row-major) two per byte, low nibble first (ONNX INT4 layout)."""
    return pack_uint4_flat(np.asarray(values, dtype=np.int8).view(np.uint8) & 0x0F)   # two's complement nibbles


@dataclass
class GptqFactor:
    """What GPTQ needs of a (damped) Gram matrix H, computed once for every weight reading the same input:
    the upper factor U with H⁻¹ = UᵀU, diag(H), and the dead features (never active in calibration)."""
    hinv: np.ndarray
    diag: np.ndarray
    dead: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.hinv.nbytes + self.diag.nbytes + self.dead.nbytes


# GPTQ's factor of the damped Gram (float32, as GPTQ's reference computes it: the damping of 1% of the mean
# diagonal keeps the Cholesky well conditioned; half the time of float64). The factor is the input's, shared by
# every row of every weight reading it, so slices of a weight's rows still quantize as the whole weight does.
FACTOR_DTYPE = np.float32


def gptq_prepare(gram: np.ndarray | list[np.ndarray], damp: float = 0.01) -> GptqFactor:
    """Damp H = ``gram`` by ``damp``·mean diag (a dead feature's diagonal set to 1) and factor its inverse.
    An array is only read (copied first). A one-element list hands its Gram over: it is popped and damped in
    place, so no copy stands beside it and it is freed as soon as its inverse exists (numpy's inverse and
    Cholesky each hold their input, a work copy and their result: three K×K matrices, not four)."""
    if isinstance(gram, list):
        h = gram.pop()
        if h.dtype != FACTOR_DTYPE:
            h = h.astype(FACTOR_DTYPE)
    else:
        h = gram.astype(FACTOR_DTYPE)                        # a copy
    del gram
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    diag_h = np.diag(h).copy()
    return GptqFactor(inverse_upper_factor(h), diag_h, dead)


def inverse_upper_factor(h: np.ndarray, leaf: int = 256) -> np.ndarray:
    """The upper-triangular U (positive diagonal) with H⁻¹ = UᵀU, for symmetric positive definite H [K, K],
    without forming H⁻¹: U = V⁻¹ for the upper V with H = VVᵀ (a Cholesky factorisation from the last
    row up), both built at once by halves in matrix products (``_upper_factor_into``)."""
    out = np.empty_like(h)
    _upper_factor_into(h, out, leaf)
    return out


def _upper_factor_into(h: np.ndarray, out: np.ndarray, leaf: int) -> None:
    """Write U = V⁻¹ (H = VVᵀ, V upper) of H [n, n] into ``out``. With H = [[A, B], [Bᵀ, C]] and
    V = [[V₁, P], [0, V₂]]: V₂V₂ᵀ = C, P = B V₂⁻ᵀ, V₁V₁ᵀ = A − PPᵀ, and
    U = [[V₁⁻¹, −V₁⁻¹ P V₂⁻¹], [0, V₂⁻¹]]. Below ``leaf``: LAPACK on the reversed block (JHJ = LLᵀ gives
    V = JLJ, so U = J L⁻¹ J)."""
    n = h.shape[0]
    if n <= leaf:
        lower = np.linalg.cholesky(h[::-1, ::-1])
        out[...] = np.triu(np.linalg.inv(lower)[::-1, ::-1])
        return
    m = n // 2
    u2 = out[m:, m:]
    _upper_factor_into(h[m:, m:], u2, leaf)
    panel = h[:m, m:] @ u2.T                                 # P = B V₂⁻ᵀ = B U₂ᵀ
    schur = panel @ panel.T
    np.subtract(h[:m, :m], schur, out=schur)                 # A − PPᵀ
    _upper_factor_into(schur, out[:m, :m], leaf)
    del schur
    np.matmul(out[:m, :m] @ panel, u2, out=out[:m, m:])
    np.negative(out[:m, m:], out=out[:m, m:])
    out[m:, :m] = 0.0


_PRODUCTS = TransposedProducts()   # its sessions (one Gemm each, per thread count) serve every GPTQ call
GPTQ_ROWS = 2048     # output rows GPTQ updates at once: a fixed slicing, so the bytes do not depend on the threads
GPTQ_DTYPE = np.float32   # as GPTQ's reference computes; its products round by shape, hence the fixed slices


def gptq_blocks(w_t: np.ndarray, gram: np.ndarray | GptqFactor, block: int, bits: int = 4, damp: float = 0.01,
                batch: int = 128, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ (Frantar et al., 2022) with block-wise scales, for y = x·Wᵀ with w_t = Wᵀ [N, K].

    Quantizes input feature k = 0..K−1 in order; the error each step leaves, divided by the inverse-Hessian
    pivot, is pushed onto the features not quantized yet (H = XᵀX from calibration, damped by
    ``damp``·mean diag; or ``gram`` is already ``gptq_prepare``'s factor). Block scales/zero points are
    chosen (range search, ``quantize_blocks_asymmetric``, or ``quantize_blocks`` when ``symmetric``) on the
    updated weights when a block starts. Returns (q [N, K], scales [N, K/B], zeros [N, K/B]): q uint8 in
    [0, 2^b − 1] with uint8 zero points, or with ``symmetric`` int8 in [−2^(b−1), 2^(b−1) − 1] and zeros None
    (ŵ = q·s)."""
    n, k = w_t.shape
    if k % block or batch % block:
        raise ValueError("K and the batch must be multiples of the block")
    factor = gram if isinstance(gram, GptqFactor) else gptq_prepare(gram, damp)
    q_all = np.zeros((n, k), dtype=np.int8 if symmetric else np.uint8)
    scales = np.zeros((n, k // block), dtype=np.float32)
    zeros = None if symmetric else np.zeros((n, k // block), dtype=np.uint8)
    # every step is row-wise: slices of ``GPTQ_ROWS`` rows run on ``threads()`` threads (a slice's Python step
    # per input column overlaps the other's numpy work); the slicing is fixed, so the thread count changes no byte
    # (one slice: the batch products take every thread; several: each slice's products take one)
    rows = GPTQ_ROWS
    slices = range(0, n, rows)
    product_threads = threads() if len(slices) == 1 else 1

    def work(r1: int) -> None:
        r2 = min(r1 + rows, n)
        _gptq_rows(w_t[r1:r2], factor, block, bits, batch, q_all[r1:r2], scales[r1:r2],
                   None if symmetric else zeros[r1:r2], product_threads)
    _run(slices, work)
    return q_all, scales, zeros


def _gptq_rows(w_t: np.ndarray, factor: GptqFactor, block: int, bits: int, batch: int, q_all: np.ndarray,
               scales: np.ndarray, zeros: np.ndarray | None, product_threads: int = 1) -> None:
    """``gptq_blocks`` on a slice of output rows, writing into the given slices of its results (``zeros``
    None: symmetric). Works on a copy of Wᵀ [K, rows] (each input feature a contiguous row, updated in
    place); each batch's error reaches the later rows by one product on MLAS (``products``) with
    ``product_threads`` threads."""
    n, k = w_t.shape
    hinv = np.asarray(factor.hinv, dtype=GPTQ_DTYPE)              # only read: no copy of a float32 factor
    diag_h = factor.diag
    w = np.ascontiguousarray(w_t.T, dtype=GPTQ_DTYPE)        # a copy [K, rows]: the weight is only read
    w[factor.dead] = 0.0
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if zeros is None else (0, 2 ** bits - 1)
    codes = np.empty((k, n), dtype=q_all.dtype)
    q = np.empty(n, GPTQ_DTYPE)
    row = np.empty(n, GPTQ_DTYPE)
    product = np.empty((max(k - batch, 0), n), GPTQ_DTYPE)   # one buffer for every batch's update
    for i1 in range(0, k, batch):
        i2 = min(i1 + batch, k)
        w1 = w[i1:i2]                                        # a view: rows i1..i2 are only read after
        err1 = np.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        cols1 = np.ascontiguousarray(hinv1.T)                # cols1[i, j] = hinv1[j, i], read contiguously
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0 and zeros is None:
                _, s_blk = quantize_blocks(w1[i:i + block], block, bits, diag_h[col:col + block], axis=0)
                s, z = s_blk[0].astype(GPTQ_DTYPE), GPTQ_DTYPE(0.0)
                scales[:, col // block] = s_blk[0]
            elif col % block == 0:
                _, s_blk, z_blk = quantize_blocks_asymmetric(w1[i:i + block], block, bits,
                                                             diag_h[col:col + block], axis=0)
                s, z = s_blk[0].astype(GPTQ_DTYPE), z_blk[0].astype(GPTQ_DTYPE)
                scales[:, col // block], zeros[:, col // block] = s_blk[0], z_blk[0]
            j1 = i - i % block                               # this column's block starts (in w1)
            if i > j1:                                       # the block's earlier errors, applied lazily
                np.matmul(cols1[i, j1:i], err1[j1:i], out=row)
                np.subtract(w1[i], row, out=row)
            else:
                row[...] = w1[i]
            np.divide(row, s, out=q)
            np.rint(q, out=q)
            q += z
            np.clip(q, qmin, qmax, out=q)
            codes[col] = q
            e = err1[i]
            np.subtract(q, z, out=e)
            e *= s
            np.subtract(row, e, out=e)
            e /= hinv1[i, i]
            if i + 1 == j1 + block and i + 1 < i2 - i1:      # the block's error onto the batch's later rows
                w1[i + 1:] -= hinv1[j1:i + 1, i + 1:].T @ err1[j1:i + 1]
        if i2 < k:                                           # the batch's error onto the later rows
            later = product[:k - i2]
            _PRODUCTS.into(np.ascontiguousarray(hinv[i1:i2, i2:]), err1, later, product_threads)
            w[i2:] -= later
    q_all[...] = codes.T
