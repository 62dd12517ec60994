"""Where structured pruning (``lmc.passes.prune``) can cut: MLP and attention sites matched on the fused graph
(static shapes), each with the constants to slice, the Reshape targets to retarget and the intermediate
tensors whose shapes change.

- MLP: ``MatMul(h, W_down[I, N])`` where h comes from MatMuls ``x · W[D, I]`` (their constant columns) through
  channel-wise ops only — activations (Sigmoid, QuickGelu, Gelu, Relu, …) and Mul/Add/Sub/Div of such tensors
  or of constants [I] / scalars — each intermediate read only inside the MLP.
- Attention: ONNX ``Attention`` over [B, H, S, d] q/k/v, each ``Transpose(0,2,1,3)(Reshape(x · W [+ b]))`` with
  an optional ``RotaryEmbedding`` (its tables are per position, shared by every head), read by
  ``Reshape(Transpose(·)) · W_o[H·d, N]``; no past keys/values, no per-head mask.
A candidate (an MLP-looking MatMul, an attention node) that does not fit, or whose pruned dimension is read
by anything else, is an ``LmcError`` with the reason: never pruned half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError

ACTIVATIONS = ("Sigmoid", "Relu", "Tanh", "Erf", "Gelu", "Softplus", "HardSigmoid", "HardSwish", "Elu",
               "LeakyRelu", "Swish", "Mish")
MS_ACTIVATIONS = ("QuickGelu", "FastGelu", "Gelu")
ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


@dataclass
class Cut:
    """A constant input of ``node`` (slot) holding pruned features along ``axis``."""

    node: gs.Node
    slot: int
    axis: int


@dataclass
class TargetFix:
    """Entry ``index`` of a Reshape's constant target becomes kept units × ``per_unit`` (unless it is -1)."""

    node: gs.Node
    index: int
    per_unit: int


@dataclass
class Dim:
    """Axis ``axis`` of ``tensor`` holds the pruned units × ``per_unit`` (``role``: "q", "kv" or "mlp")."""

    tensor: gs.Tensor
    axis: int
    per_unit: int
    role: str


@dataclass
class MlpSite:
    name: str
    reader: gs.Node
    channels: int
    cuts: list[Cut]
    dims: list[Dim]


@dataclass
class AttentionSite:
    name: str
    reader: gs.Node
    attention: gs.Node
    heads: int
    kv_heads: int
    head_dim: int
    q_cuts: list[Cut]
    kv_cuts: list[Cut]
    q_fixes: list[TargetFix]
    kv_fixes: list[TargetFix]
    dims: list[Dim]

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


class Refused(Exception):
    """A candidate site that cannot be pruned soundly (the message says why)."""


def _name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _only_reader(t: gs.Tensor, outputs: set[str]) -> gs.Node:
    if t.name in outputs or len(t.outputs) != 1:
        raise Refused(f"{t.name} is read by {len(t.outputs)} nodes{' and is a graph output' if t.name in outputs else ''}")
    return t.outputs[0]


def _const2d(t: gs.Tensor) -> np.ndarray | None:
    value = ir.const_value(t) if isinstance(t, gs.Constant) else None
    return value if value is not None and value.ndim == 2 else None


# --------------------------------------------------------------------------------------------- matching
def _is_activation(node: gs.Node) -> bool:
    return ir.is_op(node, ACTIVATIONS) or ir.is_op(node, MS_ACTIVATIONS, ir.MS_DOMAIN)


def mlp_candidate(node: gs.Node) -> bool:
    """A MatMul with a constant weight whose input comes from a channel-wise activation or product."""
    if not ir.is_op(node, "MatMul") or _const2d(node.inputs[1]) is None or isinstance(node.inputs[0], gs.Constant):
        return False
    src = ir.producer(node.inputs[0])
    return src is not None and (_is_activation(src) or ir.is_op(src, "Mul"))


def match_mlp(reader: gs.Node, outputs: set[str]) -> MlpSite:
    x = reader.inputs[0]
    width = (x.shape or [None])[-1]
    if not isinstance(width, int):
        raise Refused(f"{x.name} has no static channel count")
    cuts, tensors, region, seen = [], [], {id(reader)}, set()
    stack, leaves, nonlinear = [x], 0, 0
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        tensors.append(t)
        node = ir.producer(t)
        if node is None:
            raise Refused(f"{t.name} carries the channels from outside the MLP (a graph input)")
        region.add(id(node))
        if ir.is_op(node, "MatMul") and _const2d(node.inputs[1]) is not None:
            if node.inputs[1].shape[1] != width:
                raise Refused(f"{_name(node)}'s weight has {node.inputs[1].shape[1]} columns, not {width}")
            cuts.append(Cut(node, 1, 1))
            leaves += 1
        elif _is_activation(node) and len(node.inputs) == 1:
            nonlinear += 1
            stack.append(node.inputs[0])
        elif ir.is_op(node, ELEMENTWISE):
            for slot, inp in enumerate(node.inputs):
                shape = list(inp.shape or [])
                if isinstance(inp, gs.Constant):
                    size = int(np.prod(shape)) if shape else 1
                    if size == 1:
                        continue
                    if shape[-1] != width or size != width:
                        raise Refused(f"{_name(node)} mixes the channels with a constant shaped {shape}")
                    cuts.append(Cut(node, slot, len(shape) - 1))
                elif shape and shape[-1] == 1:
                    continue                      # broadcast across the channels: not indexed by them
                elif shape and shape[-1] == width:
                    stack.append(inp)
                else:
                    raise Refused(f"{_name(node)} reads {inp.name} shaped {shape}")
        else:
            raise Refused(f"{node.op} {_name(node)} reads the channels (lmc follows only MatMul, activations "
                          "and Mul/Add/Sub/Div)")
    for t in tensors:
        if t.name in outputs or any(id(n) not in region for n in t.outputs):
            raise Refused(f"{t.name} is also read outside the MLP")
    if not leaves or not nonlinear:
        raise Refused("no MatMul → activation → MatMul structure")
    return MlpSite(_name(reader), reader, int(width), cuts, [Dim(t, -1, 1, "mlp") for t in tensors])


def _projection(t: gs.Tensor, outputs: set[str], heads: int, head_dim: int, dims: list, role: str
                ) -> tuple[list[Cut], TargetFix]:
    """Walk q, k or v back to its projection: [Rotary] ← Transpose(0,2,1,3) ← Reshape(const) ← [Add bias] ← MatMul."""
    node = ir.producer(t)
    if node is not None and ir.is_op(node, "RotaryEmbedding", ("", ir.MS_DOMAIN)):
        dims.append(Dim(t, 1, 1, role))
        _only_reader(t, outputs)
        t = node.inputs[0]
        node = ir.producer(t)
    if node is None or not ir.is_op(node, "Transpose") or list(node.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise Refused(f"{t.name} is not a Transpose(0,2,1,3) of the heads")
    _only_reader(t, outputs)
    _only_reader(node.inputs[0], outputs)
    dims += [Dim(t, 1, 1, role), Dim(node.inputs[0], 2, 1, role)]
    reshape = ir.producer(node.inputs[0])
    target = ir.const_value(reshape.inputs[1]) if reshape is not None and ir.is_op(reshape, "Reshape") else None
    if target is None or target.shape != (4,) or int(target[2]) not in (heads, -1) or int(target[3]) not in (head_dim, -1) \
            or int(target[2]) == int(target[3]) == -1 or 0 in (int(target[2]), int(target[3])):
        raise Refused(f"{node.inputs[0].name} is not a Reshape to [.., {heads}, {head_dim}] with a constant target")
    src = reshape.inputs[0]
    _only_reader(src, outputs)
    dims.append(Dim(src, -1, head_dim, role))
    cuts = []
    prod = ir.producer(src)
    if prod is not None and ir.is_op(prod, "Add"):
        slot = next((i for i, inp in enumerate(prod.inputs) if isinstance(inp, gs.Constant)), None)
        if slot is None or list(prod.inputs[slot].shape) != [heads * head_dim]:
            raise Refused(f"{_name(prod)} is not a bias of the projection")
        cuts.append(Cut(prod, slot, 0))
        src = prod.inputs[1 - slot]
        _only_reader(src, outputs)
        dims.append(Dim(src, -1, head_dim, role))
        prod = ir.producer(src)
    if prod is None or not ir.is_op(prod, "MatMul") or _const2d(prod.inputs[1]) is None \
            or prod.inputs[1].shape[1] != heads * head_dim:
        raise Refused(f"{src.name} is not a projection MatMul with a constant [D, {heads * head_dim}] weight")
    cuts.append(Cut(prod, 1, 1))
    return cuts, TargetFix(reshape, 2, 1)


def match_attention(att: gs.Node, outputs: set[str]) -> AttentionSite:
    q, k, v = att.inputs[:3]
    shapes = [list(t.shape or []) for t in (q, k, v)]
    if any(len(s) != 4 or not all(isinstance(d, int) for d in s) for s in shapes):
        raise Refused("q, k and v are not static [B, H, S, d] tensors")
    heads, kv_heads, head_dim = shapes[0][1], shapes[1][1], shapes[0][3]
    if len(att.inputs) > 4 or (len(att.inputs) == 4 and len(att.inputs[3].shape or []) == 4
                               and att.inputs[3].shape[1] != 1):
        raise Refused("its inputs hold past keys/values or a per-head mask")
    if any(o.outputs or o.name in outputs for o in att.outputs[1:]):
        raise Refused("its present keys/values or scores are read")
    dims: list[Dim] = []
    q_cuts, q_fix = _projection(q, outputs, heads, head_dim, dims, "q")
    kv_cuts, kv_fixes = [], []
    for t in (k, v):
        cuts, fix = _projection(t, outputs, kv_heads, head_dim, dims, "kv")
        kv_cuts += cuts
        kv_fixes.append(fix)
    out = att.outputs[0]
    dims.append(Dim(out, 1, 1, "q"))
    tr = _only_reader(out, outputs)
    if not ir.is_op(tr, "Transpose") or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise Refused(f"{out.name} is not read by a Transpose(0,2,1,3)")
    dims.append(Dim(tr.outputs[0], 2, 1, "q"))
    rs = _only_reader(tr.outputs[0], outputs)
    target = ir.const_value(rs.inputs[1]) if ir.is_op(rs, "Reshape") else None
    if target is None or target.shape != (3,) or int(target[2]) not in (heads * head_dim, -1):
        raise Refused(f"{tr.outputs[0].name} is not merged by a Reshape to [.., {heads * head_dim}]")
    dims.append(Dim(rs.outputs[0], -1, head_dim, "q"))
    reader = _only_reader(rs.outputs[0], outputs)
    if not ir.is_op(reader, "MatMul") or reader.inputs[0] is not rs.outputs[0] or _const2d(reader.inputs[1]) is None:
        raise Refused(f"{rs.outputs[0].name} is not read by an output projection MatMul with a constant weight")
    return AttentionSite(_name(reader), reader, att, heads, kv_heads, head_dim, q_cuts, kv_cuts,
                         [q_fix, TargetFix(rs, 2, head_dim)], kv_fixes, dims)


def find_sites(graph: gs.Graph, mlp: bool, heads: bool) -> tuple[list[MlpSite], list[AttentionSite]]:
    """Every MLP and attention site; a candidate that does not fit is an LmcError naming why."""
    outputs = ir.graph_outputs(graph)
    mlps, atts = [], []
    if mlp:
        for node in graph.nodes:
            if mlp_candidate(node):
                try:
                    mlps.append(match_mlp(node, outputs))
                except Refused as why:
                    raise LmcError(f"--prune mlp: cannot prune the channels read by {_name(node)}: {why}") from None
        if not mlps:
            raise LmcError("--prune mlp: the model has no MLP lmc can prune (MatMul → activation → MatMul)")
    if heads:
        for node in graph.nodes:
            if ir.is_op(node, "Attention", ""):
                try:
                    atts.append(match_attention(node, outputs))
                except Refused as why:
                    raise LmcError(f"--prune heads: cannot prune the heads of {_name(node)}: {why}") from None
            elif ir.is_op(node, ("GroupQueryAttention", "MultiHeadAttention", "Attention"), ir.MS_DOMAIN):
                raise LmcError(f"--prune heads: {node.op} {_name(node)} is a fused attention lmc cannot prune yet")
        if not atts:
            raise LmcError("--prune heads: the model has no attention lmc can prune (ONNX Attention over "
                           "projected heads)")
    return mlps, atts
