"""Dead-code elimination: remove nodes whose outputs reach no graph output, and unused initializers.

Exact. A node is live iff one of its outputs is a graph output or is read by a live node (reverse
reachability from the outputs). Graph inputs are kept even when unused: they are the model's interface.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement


class Cleanup:
    name = "cleanup"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        consts_before = {id(t) for t in ir.constants(graph)}
        removed_nodes = ir.remove_dead_nodes(graph)
        removed_consts = len(consts_before - {id(t) for t in ir.constants(graph)})
        return PassResult(graph, modified=bool(removed_nodes or removed_consts),
                          stats={"nodes_removed": removed_nodes, "initializers_removed": removed_consts})
