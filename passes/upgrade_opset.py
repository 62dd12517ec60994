"""Raise the default-domain opset to the target's (e.g. 17 → 23), so fusions can emit the standard fused
ops the runtime has kernels for (Attention, RMSNormalization, RotaryEmbedding at 23; Gelu at 20).

Exact. Between the two versions each op either keeps its meaning (new versions that only add types or
optional attributes whose defaults keep the old behaviour — listed in ``UNCHANGED_MEANING``) or has an
adapter here: the Reduce* ops moved ``axes`` from an attribute to an input at opset 18, and a Split into
equal parts must name ``num_outputs`` from 18 on. An op with a
newer version that is in neither set (e.g. GroupNormalization, whose scale/bias shapes changed at 21)
blocks the upgrade: the graph keeps its opset and the report says which op blocked it.

The hand lists say what an op *means*; whether the runtime can *run* the new version is asked of the
runtime itself (``runtime_blockers``): every op whose version differs between the two opsets is loaded
once as a one-node model with the node's input types (and attributes, adapted as the upgrade would) in an
onnxruntime CPU session at both opsets; one that loads at the graph's opset but not at the target's (e.g.
RoiAlign-22, which onnxruntime 1.32 has no kernel for) blocks the upgrade, with onnxruntime's reason in the
notes. Answers are cached per (op, domain, opset, input dtypes) for the process, so a build probes each op
at most once; ops whose version does not change are never probed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import defs

from lmc.core import ir, runtime
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

AXES_TO_INPUT_AT_18 = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                                 "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})
UNCHANGED_MEANING = frozenset({
    "Reshape", "Shape", "Cast", "CastLike", "Equal", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Constant",
    "Identity", "Pad", "Size", "ConstantOfShape", "Split", "Resize", "Conv", "ConvTranspose", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "DequantizeLinear", "QuantizeLinear",
    "HardSigmoid", "Dropout", "InstanceNormalization", "Round", "IsNaN", "IsInf", "Sin", "Cos", "Tan", "Asin",
    "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Elu", "Selu", "Softplus", "Softsign", "Mish",
    "HardSwish", "ScatterND", "ScatterElements", "ThresholdedRelu", "Det", "GridSample",
    "ReduceSum", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "CenterCropPad", "Col2Im",
    "Multinomial", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
    "EyeLike", "GRU", "LSTM", "RNN", "Gelu",
    # changed between 14 and 17 only by new types or attributes whose defaults keep the old behaviour
    "Add", "Sub", "Mul", "Div", "Pow", "Relu", "LeakyRelu", "PRelu", "Where", "BatchNormalization", "CumSum",
    "ScatterElements", "ScatterND", "GreaterOrEqual", "LessOrEqual",
    # TopK-24 only adds bfloat16 (the graph is at least at MIN_SOURCE_OPSET, past TopK-11's signed axis)
    "TopK",
})
# The sets above were derived from the operator histories of opsets 14–23 (RoiAlign, whose default
# coordinate mode changed at 16, is in neither and blocks — onnxruntime 1.32 has no RoiAlign-22 kernel
# either); graphs older than 13 (Softmax, Split, Squeeze changed there) keep their opset.
MIN_SOURCE_OPSET = 13
# Constant inputs up to this size go into a probe with their values (shape inference may read them).
_PROBE_INLINE_BYTES = 4096

log = logging.getLogger(__name__)

# (op, domain, opset, input elem types) -> None when a one-node model loads in onnxruntime, else the reason.
_PROBE_CACHE: dict[tuple[str, str, int, tuple[int, ...]], str | None] = {}


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


def _since(op: str, opset: int) -> int | None:
    try:
        return defs.get_schema(op, opset).since_version
    except Exception:  # unknown op in the default domain
        return None


def _probe_model(node: gs.Node, current: int, opset: int) -> onnx.ModelProto:
    """``node`` alone at ``opset``, inputs typed as the node's (small constants with their values),
    attributes limited to those the op has at ``opset`` and adapted as ``UpgradeOpset`` would."""
    schema = defs.get_schema(node.op, opset)
    inputs, inits, names = [], [], []
    for i, t in enumerate(node.inputs):
        if not t.name:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        value = ir.const_value(t) if isinstance(t, gs.Constant) and (ir.tensor_nbytes(t) or 0) <= _PROBE_INLINE_BYTES \
            else None
        if value is not None:
            inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        else:
            inputs.append(onnx.helper.make_tensor_value_info(name, ir.onnx_dtype(t.dtype), t.shape))
    attrs = {}
    for key, value in node.attrs.items():
        if key not in schema.attributes:
            continue
        if isinstance(value, gs.Constant):
            value = onnx.numpy_helper.from_array(ir.const_value(value))
        attrs[key] = value
    if current < 18 <= opset:
        if node.op == "Split" and "num_outputs" not in attrs and (len(node.inputs) < 2 or not node.inputs[1].name):
            attrs["num_outputs"] = len(node.outputs)
        if node.op in AXES_TO_INPUT_AT_18 and "axes" in node.attrs:
            names.append("axes")
            inits.append(onnx.numpy_helper.from_array(np.asarray(node.attrs["axes"], dtype=np.int64), "axes"))
    outputs = [f"out{i}" if o.name else "" for i, o in enumerate(node.outputs)]
    proto = onnx.helper.make_node(node.op, names, outputs, **attrs)
    graph = onnx.helper.make_graph([proto], "probe", inputs,
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in outputs if o], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model


def _probe(node: gs.Node, current: int, opset: int) -> str | None:
    """None when onnxruntime loads ``node`` alone at ``opset``, else its reason (cached)."""
    key = (node.op, node.domain or "", opset, tuple(ir.onnx_dtype(t.dtype) for t in node.inputs if t.name))
    if key not in _PROBE_CACHE:
        try:
            runtime.session(_probe_model(node, current, opset), optimize=False, log_level=4)
            _PROBE_CACHE[key] = None
        except Exception as exc:  # onnxruntime raises several types; the message is the reason
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _PROBE_CACHE[key] = reason.split(" : ")[-1][:200]
    return _PROBE_CACHE[key]


def runtime_blockers(graph: gs.Graph, target_opset: int) -> dict[str, str]:
    """Ops (default domain) whose version changes between the graph's opset and ``target_opset`` and that
    onnxruntime loads at the graph's opset but not at the target's: op -> onnxruntime's reason. A probe
    that fails at both opsets says nothing about the upgrade and blocks nothing."""
    current = int(graph.opset)
    found: dict[str, str] = {}
    for node in graph.nodes:
        if (node.domain or "") not in ir.DEFAULT_DOMAINS or ir.has_subgraph(node) or node.op in found:
            continue
        new, old = _since(node.op, target_opset), _since(node.op, current)
        if new is None or new == old:
            continue
        reason = _probe(node, current, target_opset)
        if reason is not None and _probe(node, current, current) is None:
            found[node.op] = reason
    return found


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
        if ctx.target is None or getattr(ctx.target.tuning, "runtime", "onnxruntime") == "onnxruntime":
            missing = runtime_blockers(graph, target)
            if missing:
                return PassResult(graph, modified=False, notes=[
                    f"opset kept at {current}: onnxruntime has no kernel for "
                    + "; ".join(f"{op} at opset {target} ({why})" for op, why in sorted(missing.items()))])
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
