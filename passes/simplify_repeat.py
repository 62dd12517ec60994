"""Head repetition as one Gather: ``Unsqueeze → Tile|Expand → Reshape`` becomes ``Gather`` on the head axis.

Exact (a pure copy). Exporters write GQA's ``repeat_kv`` (and similar broadcasts) as
x [.., n, ..] → Unsqueeze(axis a) → [.., n, 1, ..] → Tile(r at a) or Expand(r at a) → [.., n, r, ..]
→ Reshape to [.., n·r, ..]. Element (h·r + j) of the result is element h of x, so the chain equals
Gather(x, indices = [0]*r + [1]*r + … + [n-1]*r, axis = a-1). Checked: static shapes, the tile/expand
repeats only at axis a, and the reshape's output shape is x's with axis a-1 multiplied by r.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement


def match_repeat(graph: gs.Graph, reshape: gs.Node) -> tuple[gs.Tensor, int, int, int] | str:
    """(x, axis, n, r) when ``reshape`` ends a repeat chain, else the reason it does not."""
    if not ir.is_op(reshape, "Reshape"):
        return "not a Reshape"
    mid = ir.producer(reshape.inputs[0])
    if mid is None or not ir.is_op(mid, ("Tile", "Expand")):
        return "Reshape input is not produced by Tile/Expand"
    unsq = ir.producer(mid.inputs[0])
    if unsq is None or not ir.is_op(unsq, "Unsqueeze"):
        return "Tile/Expand input is not produced by Unsqueeze"
    if ir.sole_reader(unsq.outputs[0], graph) is not mid or ir.sole_reader(mid.outputs[0], graph) is not reshape:
        return "intermediate tensors have other readers"
    x, u, t, out = unsq.inputs[0], unsq.outputs[0], mid.outputs[0], reshape.outputs[0]
    xs, us, ts, os_ = (ir.static_shape(v) for v in (x, u, t, out))
    if None in (xs, us, ts, os_):
        return "shapes are not static"
    if len(us) != len(xs) + 1:
        return "Unsqueeze inserts more than one axis"
    axis = next((i for i in range(len(us)) if i >= len(xs) or us[i] != xs[i]), len(xs))
    if us[axis] != 1 or axis == 0:
        return "no leading axis to repeat into"
    if any(ts[i] != us[i] for i in range(len(us)) if i != axis):
        return "Tile/Expand changes an axis other than the inserted one"
    r, n = ts[axis], xs[axis - 1]
    expected = list(xs)
    expected[axis - 1] = n * r
    if list(os_) != expected:
        return f"Reshape output {list(os_)} is not the input with axis {axis - 1} repeated ({expected})"
    return x, axis - 1, n, r


class SimplifyRepeat:
    name = "simplify-repeat"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        count = 0
        names = ir.Namer(graph)
        for node in list(graph.nodes):
            if not node.outputs or not ir.is_op(node, "Reshape"):
                continue
            m = match_repeat(graph, node)
            if isinstance(m, str):
                continue
            x, axis, n, r = m
            indices = gs.Constant(names.fresh(node.name + "_repeat_indices"),
                                  np.repeat(np.arange(n, dtype=np.int64), r))
            node.op, node.attrs = "Gather", {"axis": axis}
            node.inputs.clear()
            node.inputs.extend([x, indices])
            count += 1
        return PassResult(graph, modified=bool(count), stats={"repeats_to_gather": count})
