"""A small helper to write ONNX graphs the way exporters do (onnx.helper + numpy, no torch).

``GraphBuilder`` emits nodes with unique names, Constant nodes for scalars (as ``torch.onnx.export``
does), initializers for weights, and the shape chains exporters write for dynamic dims
(Shape → Gather → Unsqueeze → Concat).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, name: str, seed: int = 0, opset: int = 17):
        self.name = name
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def _fresh(self, base: str) -> str:
        self._count += 1
        return f"/{base}_{self._count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        name = self._fresh(op_type)
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        """A Constant node (exporters emit scalars and small shape vectors this way)."""
        arr = np.asarray(value, dtype=dtype)
        name = self._fresh("Constant")
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node("Constant", [], [out], name=name,
                                           value=numpy_helper.from_array(arr)))
        return out

    def weight(self, name: str, shape, scale: float | None = None, value=None, dtype=np.float32) -> str:
        if value is None:
            fan_in = shape[0] if len(shape) > 1 else 1
            std = scale if scale is not None else 1.0 / np.sqrt(fan_in)
            value = (self.rng.standard_normal(shape) * std).astype(dtype)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def rename_last_output(self, name: str) -> str:
        node = self.nodes[-1]
        node.output[0] = name
        return name

    def dim(self, tensor: str, axis: int) -> str:
        """Exporter-style dynamic dim: Shape → Gather(axis) → Unsqueeze, as a 1-element int64 vector."""
        shape = self.op("Shape", [tensor])
        d = self.op("Gather", [shape, self.const(axis, np.int64)], axis=0)
        return self.op("Unsqueeze", [d, self.const([0], np.int64)])

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="lmc.models")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
