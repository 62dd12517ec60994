"""merge_matmuls: parallel MatMuls on one activation become one MatMul + Split, exactly."""

from helpers import assert_pass_exact, op_count, token_feed

from lmc.core.pass_manager import FixedPoint
from lmc.models import build_llama
from lmc.passes.cleanup import Cleanup
from lmc.passes.fold_constants import FoldConstants
from lmc.passes.merge_matmuls import MergeParallelMatMuls


def test_qkv_and_gate_up_merge():
    model = build_llama()
    graph, records = assert_pass_exact(model, [FixedPoint("fold", [FoldConstants(), Cleanup()]),
                                               MergeParallelMatMuls(), Cleanup()],
                                       token_feed(1, 16), {"input_ids": (1, 16)}, rel=1e-5)
    merge = next(r for r in records if r.name == "merge-parallel-matmuls")
    assert merge.stats["matmuls_merged"] == 2 * (3 + 2)          # per layer: q, k, v and gate, up
    assert op_count(graph, "Split") == 2 * 2
