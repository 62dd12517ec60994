"""onnxruntime sessions as lmc opens them: CPU provider, quiet logs, optional thread count, optimizations
on or off, and a low-memory mode without weight prepacking."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort


def session(model: str | Path | bytes | onnx.ModelProto, threads: int = 0, optimize: bool = True,
            low_memory: bool = False, log_level: int = 3) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``low_memory`` turns weight prepacking off (no second copy of the
    weights; used for verification, where speed matters less than fitting)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = log_level
    if low_memory:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
