"""Raise the default-domain opset to the target's (e.g. 17 → 23), so fusions can emit the standard fused
ops the runtime has kernels for (Attention, RMSNormalization, RotaryEmbedding at 23; Gelu at 20).

Exact. Between the two versions each op either keeps its meaning (new versions that only add types or
optional attributes whose defaults keep the old behaviour — listed in ``UNCHANGED_MEANING``) or has an
adapter here: the Reduce* ops moved ``axes`` from an attribute to an input at opset 18, and a Split into
equal parts must name ``num_outputs`` from 18 on. An op with a
newer version that is in neither set (e.g. GroupNormalization, whose scale/bias shapes changed at 21)
blocks the upgrade: the graph keeps its opset and the report says which op blocked it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import defs

from lmc.compiler import ir
from lmc.compiler.pass_manager import PassContext, PassKind, PassResult, Requirement

AXES_TO_INPUT_AT_18 = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                                 "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})
UNCHANGED_MEANING = frozenset({
    "Reshape", "Shape", "Cast", "CastLike", "Equal", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Constant",
    "Identity", "Pad", "Size", "ConstantOfShape", "Split", "Resize", "Conv", "ConvTranspose", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "DequantizeLinear", "QuantizeLinear",
    "HardSigmoid", "Dropout", "InstanceNormalization", "Round", "IsNaN", "IsInf", "Sin", "Cos", "Tan", "Asin",
    "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Elu", "Selu", "Softplus", "Softsign", "Mish",
    "HardSwish", "ScatterND", "ScatterElements", "ThresholdedRelu", "Det", "RoiAlign", "GridSample",
    "ReduceSum", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "CenterCropPad", "Col2Im",
    "Multinomial", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
    "EyeLike", "GRU", "LSTM", "RNN", "Gelu",
    # changed between 14 and 17 only by new types or attributes whose defaults keep the old behaviour
    "Add", "Sub", "Mul", "Div", "Pow", "Relu", "LeakyRelu", "PRelu", "Where", "BatchNormalization", "CumSum",
    "ScatterElements", "ScatterND", "GreaterOrEqual", "LessOrEqual",
})
# The sets above were derived from the operator histories of opsets 14–23 (RoiAlign, whose default
# coordinate mode changed at 16, blocks); graphs older than 13 (Softmax, Split, Squeeze changed there) keep
# their opset.
MIN_SOURCE_OPSET = 13


def blockers(graph: gs.Graph, target_opset: int) -> list[str]:
    """Ops whose meaning may change between the graph's opset and ``target_opset`` with no adapter."""
    current = int(graph.opset)
    found = set()
    for node in graph.nodes:
        if (node.domain or "") not in ir.DEFAULT_DOMAINS or ir.has_subgraph(node):
            if ir.has_subgraph(node):
                found.add(node.op)
            continue
        try:
            newest = defs.get_schema(node.op, target_opset).since_version
        except Exception:  # unknown op in the default domain
            found.add(node.op)
            continue
        if newest > current and node.op not in UNCHANGED_MEANING and node.op not in AXES_TO_INPUT_AT_18:
            found.add(node.op)
    return sorted(found)


class UpgradeOpset:
    name = "upgrade-opset"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def __init__(self, opset: int | None = None):
        self.opset = opset

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        target = self.opset or (ctx.target.tuning.max_opset if ctx.target else int(graph.opset))
        current = int(graph.opset)
        if target <= current:
            return PassResult(graph, modified=False)
        if current < MIN_SOURCE_OPSET:
            return PassResult(graph, modified=False, notes=[
                f"opset kept at {current}: upgrades are validated from opset {MIN_SOURCE_OPSET} up"])
        blocked = blockers(graph, target)
        if blocked:
            return PassResult(graph, modified=False, notes=[
                f"opset kept at {current}: {', '.join(blocked)} changed meaning before opset {target}"])
        names = ir.Namer(graph)
        moved = 0
        for node in graph.nodes:
            if (current < 18 <= target and ir.is_op(node, "Split") and "num_outputs" not in node.attrs
                    and (len(node.inputs) < 2 or not node.inputs[1].name)):
                node.attrs["num_outputs"] = len(node.outputs)    # equal parts: named explicitly from 18 on
            if current < 18 <= target and ir.is_op(node, tuple(AXES_TO_INPUT_AT_18)) and "axes" in node.attrs:
                axes = gs.Constant(names.fresh(node.name + "_axes"), np.asarray(node.attrs.pop("axes"), dtype=np.int64))
                node.inputs.append(axes)
                moved += 1
        graph.opset = target
        return PassResult(graph, modified=True, stats={"from_opset": current, "to_opset": target,
                                                       "reduce_axes_moved": moved})
