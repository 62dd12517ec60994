"""Horizontal MatMul merging: MatMuls that read the same activation with constant weights become one.

Exact (each output column is computed by the same dot product). For x read by MatMul(x, W_1) … MatMul(x,
W_n), all W_i constant 2-D [K, N_i]:
    y = MatMul(x, [W_1 | … | W_n]);  y_1, …, y_n = Split(y, [N_1, …, N_n], axis=-1)
One larger GEMM instead of n (q/k/v after a norm, gate/up in SwiGLU). It also gives quantized graphs one
QDQ activation per GEMM, which onnxruntime needs to run them as integer kernels. Weights left in their files
(``weights.FileValues``) are joined when read (``weights.ConcatValues``), not here.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.core.weights import ConcatValues, FileValues


class MergeParallelMatMuls:
    name = "merge-parallel-matmuls"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = ir.Namer(graph)
        groups: dict[int, list[gs.Node]] = {}
        for node in graph.nodes:
            if (ir.is_op(node, "MatMul") and isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].shape) == 2
                    and not isinstance(node.inputs[0], gs.Constant) and len(node.inputs[1].outputs) == 1
                    and ir.static_shape(node.outputs[0]) is not None):
                groups.setdefault(id(node.inputs[0]), []).append(node)
        merged = 0
        for nodes in groups.values():
            if len(nodes) < 2 or len({n.inputs[1].shape[0] for n in nodes}) != 1 \
                    or len({ir.onnx_dtype(n.inputs[1].dtype) for n in nodes}) != 1:
                continue
            x = nodes[0].inputs[0]
            name = names.fresh(nodes[0].inputs[1].name + "_merged")
            widths = [int(n.inputs[1].shape[1]) for n in nodes]
            parts = [n.inputs[1]._values for n in nodes]
            if all(isinstance(p, FileValues) for p in parts):     # joined when read: no copy now
                cat = gs.Constant(name, ConcatValues(name, parts, axis=1))
            else:
                cat = gs.Constant(name, np.concatenate([ir.const_value(n.inputs[1]) for n in nodes], axis=1))
            out_shape = list(ir.static_shape(nodes[0].outputs[0]))
            out_shape[-1] = sum(widths)
            y = gs.Variable(names.fresh(nodes[0].outputs[0].name + "_merged"), dtype=nodes[0].outputs[0].dtype,
                            shape=out_shape)
            outs = [n.outputs[0] for n in nodes]
            for n in nodes:
                n.inputs.clear()
                n.outputs.clear()
            graph.nodes.append(gs.Node("MatMul", name=names.fresh(nodes[0].name + "_merged"), inputs=[x, cat],
                                       outputs=[y]))
            graph.nodes.append(gs.Node("Split", name=names.fresh(nodes[0].name + "_split"), attrs={"axis": -1},
                                       inputs=[y, gs.Constant(names.fresh(y.name + "_sizes"),
                                                              np.array(widths, dtype=np.int64))], outputs=outs))
            merged += len(nodes)
        return PassResult(graph, modified=bool(merged), stats={"matmuls_merged": merged})
