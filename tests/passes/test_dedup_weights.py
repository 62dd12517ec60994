"""dedup_weights: identical constants of every dtype are merged; different ones are not."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_pass_exact
from onnx import helper, numpy_helper

from lmc.core import ir
from lmc.passes.cleanup import Cleanup
from lmc.passes.dedup_weights import DedupWeights


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int32, np.int64, np.uint8])
def test_identical_weights_merge_per_dtype(dtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 64)) * 10).astype(dtype)
    other = w.copy()
    other[3, 5] += dtype(1)          # differs in one element: must stay
    inits = [numpy_helper.from_array(w, "a"), numpy_helper.from_array(w.copy(), "b"),
             numpy_helper.from_array(other, "c")]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, [64, 64])
    outs = [helper.make_tensor_value_info(f"y{i}", elem, [64, 64]) for i in range(3)]
    nodes = [helper.make_node("Add", ["x", n], [f"y{i}"]) for i, n in enumerate("abc")]
    model = helper.make_model(helper.make_graph(nodes, "dedup", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": (rng.standard_normal((64, 64)) * 10).astype(dtype)}
    graph, records = assert_pass_exact(model, [DedupWeights(), Cleanup()], feeds)
    assert len(ir.constants(graph)) == 2
    assert records[0].stats["bytes_saved"] == w.nbytes


def test_llama_dedups_folded_masks(tmp_path):
    from helpers import token_feed

    from lmc.models import build_llama
    from lmc.passes.fold_constants import FoldConstants

    from lmc.core.pass_manager import FixedPoint

    graph, records = assert_pass_exact(build_llama(), [FixedPoint("fold", [FoldConstants(), Cleanup()]),
                                                       DedupWeights(), Cleanup()],
                                       token_feed(1, 16), {"input_ids": (1, 16)})
    masks = [c for c in ir.constants(graph) if tuple(c.shape) == (16, 16) and np.isinf(c.values).any()]
    assert len(masks) == 1, "each layer's causal mask folds to the same constant, stored once"
    dedup = next(r for r in records if r.name == "dedup-weights")
    assert dedup.stats["duplicates_merged"] > 0
