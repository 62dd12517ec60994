"""Builders of the small models tests and benchmarks use (onnx.helper + numpy; no network, no torch).

``python -m lmc.models OUT_DIR`` writes them as ``.onnx`` files.
"""

from lmc.models.cnn import build_cnn
from lmc.models.ds_cnn import build_ds_cnn
from lmc.models.gpt2 import Gpt2Config, build_gpt2
from lmc.models.llama import LlamaConfig, build_llama
from lmc.models.vad import build_vad, build_vad_stateful

BUILDERS = {
    "tiny-llama": build_llama,
    "tiny-gpt2": build_gpt2,
    "small-cnn": build_cnn,
    "ds-cnn": build_ds_cnn,
}

__all__ = ["BUILDERS", "LlamaConfig", "Gpt2Config", "build_llama", "build_gpt2", "build_cnn", "build_ds_cnn", "build_vad", "build_vad_stateful"]
