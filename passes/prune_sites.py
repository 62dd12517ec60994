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

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.passes.prune_fit import unit_rows

ACTIVATIONS = ("Sigmoid", "Relu", "Tanh", "Erf", "Gelu", "Softplus", "HardSigmoid", "HardSwish", "Elu",
               "LeakyRelu", "Swish", "Mish")
MS_ACTIVATIONS = ("QuickGelu", "FastGelu", "Gelu")
ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


Layout = list[tuple[str, int, int]]      # segments along an axis, in order: (role, features per unit, units)


def kept_indices(layout: Layout, keep: dict[str, np.ndarray]) -> np.ndarray:
    """The indices along an axis of ``layout`` that stay when each role keeps the units ``keep[role]``."""
    parts, offset = [], 0
    for role, per_unit, units in layout:
        parts.append(offset + unit_rows(keep[role], per_unit))
        offset += per_unit * units
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def kept_size(layout: Layout, keep: dict[str, np.ndarray]) -> int:
    return sum(per_unit * len(keep[role]) for role, per_unit, _ in layout)


@dataclass
class Cut:
    """A constant input of ``node`` (slot) whose ``axis`` is laid out as ``layout``: its kept entries stay."""

    node: gs.Node
    slot: int
    axis: int
    layout: Layout


@dataclass
class TargetFix:
    """Entries ``indices`` of a constant shape-like input (a Reshape target, Split sizes) become the kept
    size of ``layout`` (an entry of -1 stays)."""

    node: gs.Node
    slot: int
    indices: list[int]
    layout: Layout


@dataclass
class Dim:
    """Axis ``axis`` of ``tensor`` (an intermediate, or a state input/output) is laid out as ``layout``."""

    tensor: gs.Tensor
    axis: int
    layout: Layout


@dataclass
class Site:
    """One place to prune: the units of ``roles`` read by ``reader`` (a MatMul whose weight rows are laid out
    as ``rows``), and every edit that removing units implies."""

    kind: str                       # "mlp" | "attention"
    name: str
    reader: gs.Node
    rows: Layout
    cuts: list[Cut] = field(default_factory=list)
    fixes: list[TargetFix] = field(default_factory=list)
    dims: list[Dim] = field(default_factory=list)
    attrs: list[tuple[gs.Node, str, str]] = field(default_factory=list)     # (node, attribute, role): its count
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def channels(self) -> int:
        return self.rows[0][2]

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


def match_mlp(reader: gs.Node, outputs: set[str]) -> Site:
    x = reader.inputs[0]
    width = (x.shape or [None])[-1]
    if not isinstance(width, int):
        raise Refused(f"{x.name} has no static channel count")
    mlp = [("mlp", 1, width)]
    site = Site("mlp", _name(reader), reader, mlp)
    region, seen, tensors = {id(reader)}, set(), []
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
        if id(node) in region:               # another output of a node already followed (a Split)
            site.dims.append(Dim(t, -1, mlp))
            continue
        region.add(id(node))
        if ir.is_op(node, "MatMul") and _const2d(node.inputs[1]) is not None:
            if node.inputs[1].shape[1] != width:
                raise Refused(f"{_name(node)}'s weight has {node.inputs[1].shape[1]} columns, not {width}")
            site.cuts.append(Cut(node, 1, 1, mlp))
            site.dims.append(Dim(t, -1, mlp))
            leaves += 1
        elif ir.is_op(node, "Split"):        # merged projections: MatMul(x, [W1 | W2 | …]) split in equal parts
            sizes = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            rank = len(node.inputs[0].shape or [])
            n = len(node.outputs)
            if sizes is None or list(sizes) != [width] * n or int(node.attrs.get("axis", 0)) not in (-1, rank - 1):
                raise Refused(f"{_name(node)} does not split the channels into equal parts of {width}")
            src, prod = node.inputs[0], ir.producer(node.inputs[0])
            if prod is None or not ir.is_op(prod, "MatMul") or _const2d(prod.inputs[1]) is None \
                    or prod.inputs[1].shape[1] != n * width:
                raise Refused(f"{src.name} is not a merged projection MatMul")
            _only_reader(src, outputs)
            site.cuts.append(Cut(prod, 1, 1, mlp * n))
            site.fixes.append(TargetFix(node, 1, list(range(n)), mlp))
            site.dims += [Dim(t, -1, mlp), Dim(src, -1, mlp * n)]
            stack += [o for o in node.outputs if o is not t]
            region.add(id(prod))
            leaves += 1
        elif _is_activation(node) and len(node.inputs) == 1:
            nonlinear += 1
            site.dims.append(Dim(t, -1, mlp))
            stack.append(node.inputs[0])
        elif ir.is_op(node, ELEMENTWISE):
            site.dims.append(Dim(t, -1, mlp))
            for slot, inp in enumerate(node.inputs):
                shape = list(inp.shape or [])
                if isinstance(inp, gs.Constant):
                    size = int(np.prod(shape)) if shape else 1
                    if size == 1:
                        continue
                    if shape[-1] != width or size != width:
                        raise Refused(f"{_name(node)} mixes the channels with a constant shaped {shape}")
                    site.cuts.append(Cut(node, slot, len(shape) - 1, mlp))
                elif shape and shape[-1] == 1:
                    continue                      # broadcast across the channels: not indexed by them
                elif shape and shape[-1] == width:
                    stack.append(inp)
                else:
                    raise Refused(f"{_name(node)} reads {inp.name} shaped {shape}")
        else:
            raise Refused(f"{node.op} {_name(node)} reads the channels (lmc follows only MatMul, Split of a "
                          "merged MatMul, activations and Mul/Add/Sub/Div)")
    for t in tensors:
        if t.name in outputs or any(id(n) not in region for n in t.outputs):
            raise Refused(f"{t.name} is also read outside the MLP")
    if not leaves or not nonlinear:
        raise Refused("no MatMul → activation → MatMul structure")
    return site


def _projection(t: gs.Tensor, outputs: set[str], site: Site, layout: Layout) -> None:
    """Walk q, k or v back to its projection: [Rotary] ← Transpose(0,2,1,3) ← Reshape(const) ← [Add bias] ←
    MatMul, adding the edits to ``site``."""
    (role, head_dim, heads), = layout
    node = ir.producer(t)
    if node is not None and ir.is_op(node, "RotaryEmbedding", ("", ir.MS_DOMAIN)) and "num_heads" not in node.attrs:
        _only_reader(t, outputs)
        site.dims.append(Dim(t, 1, [(role, 1, heads)]))
        t = node.inputs[0]
        node = ir.producer(t)
    if node is None or not ir.is_op(node, "Transpose") or list(node.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise Refused(f"{t.name} is not a Transpose(0,2,1,3) of the heads")
    _only_reader(t, outputs)
    _only_reader(node.inputs[0], outputs)
    site.dims += [Dim(t, 1, [(role, 1, heads)]), Dim(node.inputs[0], 2, [(role, 1, heads)])]
    reshape = ir.producer(node.inputs[0])
    target = ir.const_value(reshape.inputs[1]) if reshape is not None and ir.is_op(reshape, "Reshape") else None
    if target is None or target.shape != (4,) or int(target[2]) not in (heads, -1) or int(target[3]) not in (head_dim, -1) \
            or int(target[2]) == int(target[3]) == -1 or 0 in (int(target[2]), int(target[3])):
        raise Refused(f"{node.inputs[0].name} is not a Reshape to [.., {heads}, {head_dim}] with a constant target")
    site.fixes.append(TargetFix(reshape, 1, [2], [(role, 1, heads)]))
    _proj_matmul(reshape.inputs[0], outputs, site, layout)


def _proj_matmul(src: gs.Tensor, outputs: set[str], site: Site, layout: Layout) -> None:
    """``src`` = x · W [+ b] with W constant [D, width of layout]: its columns (and bias) are cut."""
    width = sum(p * u for _, p, u in layout)
    _only_reader(src, outputs)
    site.dims.append(Dim(src, -1, layout))
    prod = ir.producer(src)
    if prod is not None and ir.is_op(prod, "Add"):
        slot = next((i for i, inp in enumerate(prod.inputs) if isinstance(inp, gs.Constant)), None)
        if slot is None or list(prod.inputs[slot].shape) != [width]:
            raise Refused(f"{_name(prod)} is not a bias of the projection")
        site.cuts.append(Cut(prod, slot, 0, layout))
        src = prod.inputs[1 - slot]
        _only_reader(src, outputs)
        site.dims.append(Dim(src, -1, layout))
        prod = ir.producer(src)
    if prod is None or not ir.is_op(prod, "MatMul") or _const2d(prod.inputs[1]) is None \
            or prod.inputs[1].shape[1] != width:
        raise Refused(f"{src.name} is not a projection MatMul with a constant [D, {width}] weight")
    site.cuts.append(Cut(prod, 1, 1, layout))


def _output_projection(out: gs.Tensor, outputs: set[str], site: Site) -> None:
    """The attention output [B, S, H·d] read by ``MatMul(·, W_o const)``: that MatMul is the site's reader."""
    reader = _only_reader(out, outputs)
    if not ir.is_op(reader, "MatMul") or reader.inputs[0] is not out or _const2d(reader.inputs[1]) is None:
        raise Refused(f"{out.name} is not read by an output projection MatMul with a constant weight")
    site.reader, site.name = reader, _name(reader)


def match_attention(att: gs.Node, outputs: set[str]) -> Site:
    """ONNX Attention over [B, H, S, d] q/k/v (a one-shot graph)."""
    q, k, v = att.inputs[:3]
    shapes = [list(t.shape or []) for t in (q, k, v)]
    if any(len(s) != 4 or not all(isinstance(d, int) for d in s) for s in shapes):
        raise Refused("q, k and v are not static [B, H, S, d] tensors")
    heads, kv_heads, d = shapes[0][1], shapes[1][1], shapes[0][3]
    if len(att.inputs) > 4 or (len(att.inputs) == 4 and len(att.inputs[3].shape or []) == 4
                               and att.inputs[3].shape[1] != 1):
        raise Refused("its inputs hold past keys/values or a per-head mask")
    if any(o.outputs or o.name in outputs for o in att.outputs[1:]):
        raise Refused("its present keys/values or scores are read")
    q_rows = [("q", d, heads)]
    site = Site("attention", _name(att), att, q_rows, heads=heads, kv_heads=kv_heads, head_dim=d,
                attrs=[(att, "q_num_heads", "q"), (att, "kv_num_heads", "kv")])
    _projection(q, outputs, site, q_rows)
    for t in (k, v):
        _projection(t, outputs, site, [("kv", d, kv_heads)])
    out = att.outputs[0]
    tr = _only_reader(out, outputs)
    if not ir.is_op(tr, "Transpose") or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise Refused(f"{out.name} is not read by a Transpose(0,2,1,3)")
    rs = _only_reader(tr.outputs[0], outputs)
    target = ir.const_value(rs.inputs[1]) if ir.is_op(rs, "Reshape") else None
    if target is None or target.shape != (3,) or int(target[2]) not in (heads * d, -1):
        raise Refused(f"{tr.outputs[0].name} is not merged by a Reshape to [.., {heads * d}]")
    site.dims += [Dim(out, 1, [("q", 1, heads)]), Dim(tr.outputs[0], 2, [("q", 1, heads)]), Dim(rs.outputs[0], -1, q_rows)]
    site.fixes.append(TargetFix(rs, 1, [2], q_rows))
    _output_projection(rs.outputs[0], outputs, site)
    return site


def match_group_query_attention(att: gs.Node, graph: gs.Graph, outputs: set[str]) -> Site:
    """com.microsoft GroupQueryAttention (a generation graph): q/k/v packed in input 0 or apart in 0–2, the
    cache as state — graph inputs 3/4 [B, H_kv, N, d] bound to outputs 1/2 — which shrinks with the groups."""
    heads, kv_heads = int(att.attrs.get("num_heads", 0)), int(att.attrs.get("kv_num_heads", 0))
    if not heads or not kv_heads or heads % kv_heads:
        raise Refused("its num_heads / kv_num_heads are missing or do not group")
    past = [t for t in att.inputs[3:5] if t.name]
    if len(past) != 2 or any(len(t.shape or []) != 4 for t in past):
        raise Refused("it keeps no [B, H_kv, N, d] cache")
    d = int(past[0].shape[3])
    if any(t.name for t in att.inputs[9:]) or past[0].dtype != np.float32 and str(past[0].dtype) != "float32":
        raise Refused("it reads extra inputs (a bias, sinks) or a quantized cache")
    inputs = {t.name for t in graph.inputs}
    for t in past:
        if t.name not in inputs or len(t.outputs) != 1:
            raise Refused(f"its cache {t.name} is not a graph input read by it alone")
    q_rows, kv_rows = [("q", d, heads)], [("kv", d, kv_heads)]
    site = Site("attention", _name(att), att, q_rows, heads=heads, kv_heads=kv_heads, head_dim=d,
                attrs=[(att, "num_heads", "q"), (att, "kv_num_heads", "kv")])
    if att.inputs[1].name:           # q, k, v apart
        for t, layout in zip(att.inputs[:3], (q_rows, kv_rows, kv_rows)):
            _proj_matmul(t, outputs, site, layout)
    else:
        _proj_matmul(att.inputs[0], outputs, site, q_rows + kv_rows + kv_rows)
    for t in past + [o for o in att.outputs[1:3]]:
        site.dims.append(Dim(t, 1, [("kv", 1, kv_heads)]))
    out = att.outputs[0]
    site.dims.append(Dim(out, -1, q_rows))
    _output_projection(out, outputs, site)
    return site


def find_sites(graph: gs.Graph, mlp: bool, heads: bool) -> tuple[list[Site], list[Site]]:
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
            try:
                if ir.is_op(node, "Attention", ""):
                    atts.append(match_attention(node, outputs))
                elif ir.is_op(node, "GroupQueryAttention", ir.MS_DOMAIN):
                    atts.append(match_group_query_attention(node, graph, outputs))
                elif ir.is_op(node, ("MultiHeadAttention", "Attention", "PackedAttention"), ir.MS_DOMAIN):
                    raise Refused(f"{node.op} is a fused attention lmc does not prune")
            except Refused as why:
                raise LmcError(f"--prune heads: cannot prune the heads of {_name(node)}: {why}") from None
        if not atts:
            raise LmcError("--prune heads: the model has no attention lmc can prune (ONNX Attention or "
                           "GroupQueryAttention over projected heads)")
    return mlps, atts
