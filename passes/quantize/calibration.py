"""Calibration statistics of intermediate tensors, collected with onnxruntime.

For each requested tensor x (last axis = features) over all calibration samples:
``second_moment[k]`` = E[x_k²] (mean over every position of every sample), ``absmax[k]`` = max |x_k|.
Samples come from an ``.npz`` holding one array per model input, shaped [N, *input_shape] (sample i is
arr[i]). The graph is exported with the requested tensors as extra outputs; weights are not copied twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.compiler import ir
from lmc.compiler.errors import LmcError
from lmc.compiler.runtime import session

log = logging.getLogger(__name__)


@dataclass
class ChannelStats:
    second_moment: np.ndarray         # E[x_k²]
    absmax: np.ndarray                # max |x_k|
    gram: np.ndarray | None = None    # Σ x xᵀ over every position (for GPTQ), when collected
    rows: np.ndarray | None = None    # a deterministic sample of rows of x [R, features], when requested


def load_calibration(path: str | Path, input_names: Sequence[str], max_samples: int | None = None) -> list[dict]:
    """Feeds from a calibration ``.npz``: one dict per sample."""
    try:
        data = dict(np.load(str(path), allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise LmcError(f"{path}: cannot read calibration data ({exc})") from exc
    missing = [n for n in input_names if n not in data]
    if missing:
        raise LmcError(f"{path}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(data)})")
    n = min(len(data[name]) for name in input_names)
    if max_samples:
        n = min(n, max_samples)
    return [{name: data[name][i:i + 1] if data[name].ndim > 1 else data[name][i] for name in input_names}
            for i in range(n)]


def collect(graph: gs.Graph, tensors: Sequence[str], feeds: Sequence[dict],
            progress: Callable[[int, int], None] | None = None, gram: bool = False,
            keep_rows: int = 0) -> dict[str, ChannelStats]:
    """Second moments and absmax per last-axis feature of ``tensors`` over ``feeds`` (and XᵀX with
    ``gram``; up to ``keep_rows`` rows of x, spread evenly over the samples, with ``keep_rows``)."""
    model = ir.to_model(graph)
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(model)
    del model
    sums: dict[str, np.ndarray] = {}
    maxes: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    grams: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {}
    per_sample = -(-keep_rows // max(1, len(feeds))) if keep_rows else 0
    inputs = {i.name for i in sess.get_inputs()}
    for i, feed in enumerate(feeds):
        values = sess.run(list(tensors), {k: v for k, v in feed.items() if k in inputs})
        for name, v in zip(tensors, values):
            flat = np.asarray(v, dtype=np.float64).reshape(-1, v.shape[-1])
            sums[name] = sums.get(name, 0) + (flat ** 2).sum(axis=0)
            maxes[name] = np.maximum(maxes.get(name, 0), np.abs(flat).max(axis=0))
            counts[name] = counts.get(name, 0) + flat.shape[0]
            if gram:
                grams[name] = grams.get(name, 0) + flat.T @ flat
            if per_sample:
                step = max(1, flat.shape[0] // per_sample)
                kept.setdefault(name, []).append(flat[::step][:per_sample].astype(np.float32))
        if progress:
            progress(i + 1, len(feeds))
    return {n: ChannelStats(sums[n] / counts[n], maxes[n], grams.get(n),
                            np.concatenate(kept[n]) if n in kept else None) for n in tensors}
