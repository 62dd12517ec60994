"""simplify_repeat and fold_matmul_scale on export-shaped graphs, checked against onnxruntime."""

from __future__ import annotations

from helpers import assert_pass_exact, op_count, token_feed

from lmc.core.pass_manager import FixedPoint
from lmc.models import LlamaConfig, build_gpt2, build_llama
from lmc.passes.cleanup import Cleanup
from lmc.passes.fold_constants import FoldConstants
from lmc.passes.fold_matmul_scale import FoldMatMulScale
from lmc.passes.simplify_repeat import SimplifyRepeat


def test_repeat_kv_becomes_one_gather():
    cfg = LlamaConfig(heads=6, kv_heads=2, d_model=96)
    graph, records = assert_pass_exact(build_llama(cfg), [FixedPoint("fold", [FoldConstants(), Cleanup()]),
                                                             SimplifyRepeat(), Cleanup()],
                                       token_feed(2, 8), {"input_ids": (2, 8)})
    assert op_count(graph, "Tile") == 0
    rec = next(r for r in records if r.name == "simplify-repeat")
    assert rec.stats["repeats_to_gather"] == 2 * cfg.layers


def test_attention_scales_merge():
    graph, records = assert_pass_exact(build_llama(), [FixedPoint("fold", [FoldConstants(), Cleanup()]),
                                                        FoldMatMulScale(), Cleanup()],
                                       token_feed(1, 12), {"input_ids": (1, 12)})
    rec = next(r for r in records if r.name == "fold-matmul-scale")
    assert rec.stats["scales_merged"] == 2


def test_nothing_to_do_on_gpt2_is_a_no_op():
    graph, records = assert_pass_exact(build_gpt2(), [FixedPoint("fold", [FoldConstants(), Cleanup()]), SimplifyRepeat()],
                                       token_feed(1, 8), {"input_ids": (1, 8)})
    assert not records[-1].modified
