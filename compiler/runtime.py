"""onnxruntime sessions as lmc opens them: CPU provider, quiet logs, optional thread count, optimizations
on or off, and a low-memory mode without weight prepacking."""

from __future__ import annotations

from pathlib import Path

import json

import onnx
import onnxruntime as ort

from lmc.compiler import weights

SESSION_OPTIONS_FILE = "session_options.json"


def apply_session_options(opts: ort.SessionOptions, settings: dict) -> ort.SessionOptions:
    """Apply a bundle's ``session_options.json``: SessionOptions attributes by name, plus
    ``config_entries`` for ``add_session_config_entry``."""
    for key, value in settings.items():
        if key == "config_entries":
            for entry, text in value.items():
                opts.add_session_config_entry(entry, str(text))
        else:
            setattr(opts, key, value)
    return opts


def bundle_session_options(model_path: str | Path) -> dict:
    """The session options a bundle's plan assumes (empty for a model lmc did not build)."""
    path = Path(model_path).parent / SESSION_OPTIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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
        try:
            size = model.ByteSize()
        except Exception:  # protobuf's EncodeError: the message is over 2 GiB
            size = PROTOBUF_LIMIT + 1
        if size > PROTOBUF_LIMIT or weights.file_backed(model):
            return _session_via_file(model, opts)
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


PROTOBUF_LIMIT = (2 << 30) - (64 << 20)      # one protobuf message holds at most 2 GiB


def _session_via_file(model: onnx.ModelProto, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A session on a model too large for one protobuf, or whose weights are still in the files it was
    loaded from: written to a temporary folder (removed once onnxruntime has read it) with its in-memory
    weights as external data and its file-backed ones linked there (``weights.link_external``), so
    onnxruntime maps them instead of lmc copying them."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmc-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        linked = weights.link_external(model, Path(tmp))
        try:
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.data", size_threshold=1024)
        finally:
            weights.restore_external(linked)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
