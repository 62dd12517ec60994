"""ORT Mobile files for a bundle: ``model.ort`` and ``required_operators.config``.

onnxruntime's mobile/minimal builds load the ORT (flatbuffer) format and are compiled with only the
operators a config file lists. ``write_ort_files`` converts the staged ``model.onnx`` with
onnxruntime's basic (portable, hardware-independent) graph optimizations — the "Fixed" style of
onnxruntime's own converter — and writes the operator config next to it. Weights are embedded in
``model.ort`` (the format has no external data). The config is deterministic (its header names the file,
not the folder it was written in); ``model.ort`` itself is not byte-identical across builds, because
onnxruntime's flatbuffer writer orders some tables by hash.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from lmc.core.runtime import ORT_LOG_LEVEL

ORT_FILE = "model.ort"
CONFIG_FILE = "required_operators.config"


def write_ort_files(folder: Path, model_file: str = "model.onnx") -> tuple[Path, Path]:
    from onnxruntime.tools.ort_format_model import create_config_from_models

    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_LOG_LEVEL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folder / ORT_FILE)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(folder / model_file), opts, providers=["CPUExecutionProvider"])
    config = folder / CONFIG_FILE
    tool_log = logging.getLogger("ort_format_model.utils")
    level = tool_log.level
    tool_log.setLevel(logging.WARNING)      # the tool logs every file it writes at INFO
    try:
        create_config_from_models([folder / ORT_FILE], config, False)
    finally:
        tool_log.setLevel(level)
    lines = [line if not line.startswith("# - ") else f"# - {ORT_FILE}" for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")
    return folder / ORT_FILE, config
