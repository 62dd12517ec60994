"""A GPT-2 written as transformers exports it (LayerNormalization, Conv1D as Reshape → Gemm → Reshape,
tanh GELU, an attention_mask input): the full exact pipeline keeps outputs equal, including padded rows,
and removes what it can."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from helpers import assert_close, run_ort, token_feed

from lmc.compiler.build import BuildOptions, build
from lmc.models import Gpt2Config, build_gpt2


@pytest.mark.parametrize("mask", [False, True])
def test_hf_style_gpt2_exact_build(tmp_path, mask):
    cfg = Gpt2Config(hf_style=True, attention_mask=mask, layers=2)
    path = tmp_path / "gpt2.onnx"
    onnx.save(build_gpt2(cfg), str(path))
    shapes = {"input_ids": (2, 12)} | ({"attention_mask": (2, 12)} if mask else {})
    result = build(path, BuildOptions(target="x86-64", input_shapes=shapes), tmp_path / "out")
    feed = token_feed(2, 12)
    if mask:
        feed["attention_mask"] = np.ones((2, 12), dtype=np.int64)
        feed["attention_mask"][1, :4] = 0                       # left padding: fully masked query rows
    assert_close(run_ort(path, feed), run_ort(tmp_path / "out" / "model.onnx", feed), rel=1e-4)
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"),
                                                            load_external_data=False).graph.node)
    assert ops["Tanh"] == 0 and ops["Pow"] == 0 and ops["Gelu"] == cfg.layers
    stats = {k: v for r in result.records for k, v in r.stats.items()}
    if mask:
        assert ops["Where"] == 0 and ops["Div"] == 0            # mask combined once; scale folded into c_attn
        assert stats["attention-mask.applied"] == cfg.layers and stats["scales_folded_into_weights"] == cfg.layers
    else:
        assert ops["Attention"] == cfg.layers and ops["Softmax"] == 0
    assert stats["reshape_pairs_removed"] == cfg.layers         # the pair around each GELU
