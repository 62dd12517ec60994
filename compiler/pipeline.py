"""The default pass pipeline for a build: exact cleanups first, then folding and weight sharing, then
fusion; approximating passes only when the options ask for them."""

from __future__ import annotations

from lmc.compiler.pass_manager import FixedPoint
from lmc.passes.cleanup import Cleanup
from lmc.passes.eliminate_noops import EliminateNoops
from lmc.passes.dedup_weights import DedupWeights
from lmc.passes.fold_constants import FoldConstants
from lmc.passes.fold_matmul_scale import FoldMatMulScale
from lmc.passes.simplify_repeat import SimplifyRepeat
from lmc.passes.share_transposed import ShareTransposedWeights


def default_pipeline(options, target) -> list:
    return [
        Cleanup(),
        FixedPoint("simplify", [FoldConstants(), EliminateNoops(), Cleanup()]),
        SimplifyRepeat(),
        FoldMatMulScale(),
        DedupWeights(),
        ShareTransposedWeights(),
        Cleanup(),
    ]
