"""The default pass pipeline for a build: exact cleanups first, then folding, simplification and weight
sharing, then fusion; approximating passes only when the options ask for them.

``options.disabled_passes`` names passes to leave out (``lmc build --disable-pass NAME``); cleanup and
constant folding cannot be disabled (planning needs static shapes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmc.core.errors import LmcError
from lmc.core.pass_manager import FixedPoint
from lmc.passes.cleanup import Cleanup
from lmc.passes.cse import EliminateCommonSubexpressions
from lmc.passes.dedup_weights import DedupWeights
from lmc.passes.eliminate_noops import EliminateNoops
from lmc.passes.fold_constants import FoldConstants
from lmc.passes.fold_matmul_scale import FoldMatMulScale
from lmc.passes.merge_matmuls import MergeParallelMatMuls
from lmc.passes.moe_routing import MoeRouting
from lmc.passes.prune import Prune, PruneConfig
from lmc.passes.quantize.calibration import load_calibration
from lmc.passes.quantize.integer_matmul import IntegerMatMuls
from lmc.passes.quantize.static_int8 import QuantizeStaticInt8
from lmc.passes.quantize.w8a8 import CalibMethod, QuantizeW8A8
from lmc.passes.quantize.weight_only import QuantizeConfig, QuantizeWeights, WeightBits
from lmc.passes.fold_score_scale import FoldScoreScale
from lmc.passes.fuse.attention import AttentionRule
from lmc.passes.fuse.attention_mask import AttentionMaskRule
from lmc.passes.fuse.conv_activation import ConvActivationRule
from lmc.passes.fuse.conv_bn import ConvBatchNormRule
from lmc.passes.fuse.gelu import GeluRule
from lmc.passes.fuse.group_query_attention import GroupQueryAttentionRule
from lmc.passes.fuse.layer_norm import LayerNormRule
from lmc.passes.fuse.matmul_add import MatMulAddRule
from lmc.passes.fuse.rms_norm import RmsNormRule
from lmc.passes.fuse.rotary import RotaryRule
from lmc.passes.fuse.rotary_positions import RotaryPositionsRule
from lmc.passes.fuse.rule import FuseRules
from lmc.passes.greedy_head import GreedyHead
from lmc.passes.fuse.silu import SiluRule
from lmc.passes.share_transposed import ShareTransposedWeights
from lmc.passes.simplify_repeat import SimplifyRepeat
from lmc.passes.simplify_reshapes import SimplifyReshapes
from lmc.passes.sparse_attention import AttentionKind, SparseAttention
from lmc.passes.static_cache import StaticKVCache
from lmc.passes.upgrade_opset import UpgradeOpset
from lmc.targets.cbundle.emit import EmitFormat
from lmc.targets.target import Int4Scheme

if TYPE_CHECKING:
    from lmc.compiler.compilation import BuildOptions

REQUIRED = frozenset({"cleanup", "fold-constants"})


def optional_passes(options: BuildOptions | None, target) -> list:
    # Element-wise fusions run before scales move across MatMuls (GELU's 0.5 would be folded into the next
    # weight); attention runs after, once q·√s and kᵀ·√s have become one scale on the scores.
    return [
        SimplifyRepeat(),
        DedupWeights(),
        ShareTransposedWeights(),
        UpgradeOpset(),
        FuseRules("fuse", [ConvBatchNormRule(), LayerNormRule(), RmsNormRule(), GeluRule(), SiluRule(),
                           RotaryRule(), RotaryPositionsRule(), MatMulAddRule()]),
        FoldMatMulScale(),
        *([MergeParallelMatMuls()] if options is not None and options.context else []),
        # Conv+BN must fold before the activation joins the Conv: the second group sees the folded Conv.
        FuseRules("fuse-late", [AttentionRule(), GroupQueryAttentionRule(), ConvActivationRule()]),
        # attention left unfused (a run-time mask): one mask tensor for all layers, scale into the weights
        FuseRules("fuse-mask", [AttentionMaskRule()]),
        FoldScoreScale(),
        DedupWeights(),   # fused ops' new constants (e.g. per-layer rotary caches) are often identical
        EliminateCommonSubexpressions(),
        SimplifyReshapes(),
        EliminateNoops(),
    ]


def quantize_passes(options: BuildOptions, target, graph_inputs: list[str], feeds: list[dict] | None = None) -> list:
    """The approximating passes the options ask for (none by default); calibration ``feeds`` default to
    ``options.calib`` read for ``graph_inputs``."""
    mode = options.quantize.value
    if mode == "none":
        return []

    if feeds is None and options.calib:
        feeds = load_calibration(options.calib, graph_inputs, options.calib_samples,
                                 shapes=options.input_shapes)
    if mode in ("int8", "int4"):
        bits = WeightBits.INT8 if mode == "int8" else WeightBits.INT4
        table_bits = options.table_bits
        scheme = options.int4_scheme or target.tuning.int4_scheme
        gptq = bits is WeightBits.INT4 and bool(feeds)         # QuantizeConfig.gptq's default: on with calibration
        block = options.block_size or target.tuning.int4_block(gptq)
        return [QuantizeWeights(QuantizeConfig(bits=bits, block_size=block, table_bits=table_bits,
                                               asymmetric=scheme is Int4Scheme.ASYMMETRIC,
                                               calib_feeds=feeds)), Cleanup()]
    if mode == "w8a8":
        method = CalibMethod(options.calib_method)
        # a bundle that runs lmc's C kernels (lmc.targets.cbundle): convolutional graphs all int8, static
        # and transformers' QDQ products as integer products with int8 activations between them
        c = options.emit_format(target) is EmitFormat.C
        static = [QuantizeStaticInt8(feeds), Cleanup()] if c else []
        integer = [IntegerMatMuls(feeds), Cleanup()] if c else []
        return static + [MergeParallelMatMuls(), QuantizeW8A8(feeds, method=method), Cleanup()] + integer
    raise LmcError(f"--quantize {mode} is not available")


def prune_passes(options: BuildOptions, graph_inputs: list[str], feeds: list[dict] | None = None) -> list:
    """``--prune``: structured pruning calibrated on ``feeds`` (default: ``options.calib`` read for
    ``graph_inputs``), before any quantization (which then quantizes the smaller weights)."""
    spec = options.prune_spec
    if spec is None:
        return []
    if feeds is None:
        feeds = load_calibration(options.calib, graph_inputs, options.calib_samples, shapes=options.input_shapes)
    return [Prune(PruneConfig(spec, feeds)), DedupWeights(), Cleanup()]


def pass_names(options: BuildOptions | None = None, target=None) -> list[str]:
    greedy = [GreedyHead.name] if options is not None and options.context else []   # generation bundles' last pass
    return ["cleanup", "fold-constants", "eliminate-noops"] + [p.name for p in optional_passes(options, target)] + greedy


def default_pipeline(options: BuildOptions, target, graph_inputs: list[str] | None = None) -> list:
    disabled = set(options.disabled_passes)
    known = set(pass_names(options, target))
    unknown = disabled - known
    if unknown:
        raise LmcError(f"--disable-pass: unknown pass {', '.join(sorted(unknown))}; "
                       f"passes: {', '.join(sorted(known - REQUIRED))}")
    if disabled & REQUIRED:
        raise LmcError(f"--disable-pass: {', '.join(sorted(disabled & REQUIRED))} cannot be disabled")
    simplify = [FoldConstants()] + ([EliminateNoops()] if "eliminate-noops" not in disabled else []) + [Cleanup()]
    state = []
    if options.context:
        # shape chains are constants once the bound dims fold; the cache rewrite then sees plain scalars
        spec = options.attention_spec
        state = [StaticKVCache(options.context, options.batch, spec.window, spec.sinks, options.prefill_chunk,
                               options.kv_cache == "int8"),
                 FixedPoint("simplify-state", simplify)]
    return [
        Cleanup(),
        MoeRouting(),            # before folding: the row ids and masks it adds fold with the rest
        FixedPoint("simplify", simplify),
        *state,
        *[p for p in optional_passes(options, target) if p.name not in disabled],
        Cleanup(),
        *([] if options.context else prune_passes(options, graph_inputs or [])),
        *([] if options.context else attention_passes(options)),
        *([] if options.context else quantize_passes(options, target, graph_inputs or [])),
    ]


def attention_passes(options: BuildOptions) -> list:
    """``--attention chunked[:Q]`` (exact) or ``sliding:W[,sinks=S]`` (approximate) on fused attention."""
    spec = options.attention_spec
    if spec.kind is AttentionKind.DENSE:
        return []
    return [SparseAttention(spec), DedupWeights(), Cleanup()]   # layers share their chunk masks
