"""--attention chunked (exact, smaller score scratch) and sliding (approximate, reported)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import assert_close, independent_plan_check, run_ort, token_feed

from lmc.compiler.arena_executor import ArenaExecutor
from lmc.compiler.build import BuildOptions, build
from lmc.core.errors import LmcError
from lmc.models import LlamaConfig, build_llama
from lmc.passes.sparse_attention import AttentionKind, AttentionSpec, row_mask


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("sa") / "llama.onnx"
    onnx.save(build_llama(LlamaConfig(max_positions=64)), str(path))
    return path


def _scratch(out) -> int:
    plan = json.loads((out / "plan.json").read_text())
    return max(t["size"] for t in plan["scratch"])


def test_chunked_is_exact_with_smaller_scores(llama, tmp_path):
    build(llama, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 64)}), tmp_path / "d")
    chunked = build(llama, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 64)}, attention="chunked:16"),
                    tmp_path / "c")
    assert chunked.verification.passed
    assert _scratch(tmp_path / "c") * 4 == _scratch(tmp_path / "d")     # H·16·64 vs H·64·64 floats
    independent_plan_check(tmp_path / "c")
    feed = token_feed(1, 64)
    assert_close(run_ort(llama, feed), list(ArenaExecutor(tmp_path / "c").run(feed).values()), rel=1e-4)



def test_sliding_window_is_approximate_and_reported(llama, tmp_path):
    result = build(llama, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 64)},
                                       attention="sliding:16,sinks=2"), tmp_path / "s")
    assert not result.verification.passed          # it changes the model: reported, not failed
    assert 0.5 < result.verification.outputs[0].cosine < 1.0
    feed = token_feed(1, 64)
    assert run_ort(tmp_path / "s" / "model.onnx", feed)[0].shape == (1, 64, 256)


def test_masks_and_parsing():
    spec = AttentionSpec.parse("sliding:3,sinks=1")
    m = row_mask(spec, range(4, 6), 6, 6, True, None)
    allowed = np.isfinite(m)
    assert allowed[0].tolist() == [True, False, True, True, True, False]     # row 4: sink 0, keys 2..4
    assert allowed[1].tolist() == [True, False, False, True, True, True]     # row 5: sink 0, keys 3..5
    assert AttentionSpec.parse("chunked").kind is AttentionKind.CHUNKED
    for bad in ("sliding", "chunked:0", "sliding:4,foo=1", "sparse"):
        with pytest.raises(LmcError):
            AttentionSpec.parse(bad)
