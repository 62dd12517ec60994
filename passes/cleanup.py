"""Dead-code elimination: remove nodes whose outputs reach no graph output, and unused initializers.

Exact. A node is live iff one of its outputs is a graph output or is read by a live node (reverse
reachability from the outputs). Graph inputs are kept even when unused: they are the model's interface.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.compiler.pass_manager import PassContext, PassKind, PassResult, Requirement


class Cleanup:
    name = "cleanup"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = len(graph.nodes)
        consts_before = {id(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        consts_after = {id(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        removed_nodes = nodes_before - len(graph.nodes)
        removed_consts = len(consts_before - consts_after)
        return PassResult(graph, modified=bool(removed_nodes or removed_consts),
                          stats={"nodes_removed": removed_nodes, "initializers_removed": removed_consts})
