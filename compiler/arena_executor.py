"""Arena executor: run a bundle step by step with every intermediate living inside one byte buffer.

Proof, not trust: for each node of ``plan.schedule`` in order, its inputs are read from the arena (at their
planned offsets), from the feeds, or from the weights; the node runs alone in onnxruntime; its outputs are
written into the arena at their planned offsets (graph outputs are kept aside). A scratch buffer planned
for the node is filled with a poison pattern while it runs. If the plan let two live tensors overlap, a
later write clobbers an earlier value that is still needed and the outputs come out wrong — which tests
detect by comparing with onnxruntime on the original model.

Preconditions: the bundle's ``model.onnx`` holds value_info (dtype and static shape) for every planned
tensor; nodes have no subgraphs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lmc.core.errors import LmcError
from lmc.core.runtime import session
from lmc.targets.plan import MemoryPlan

_POISON = 0xA5


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    return {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def _shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)


class ArenaExecutor:
    """Executes ``bundle_dir`` (model.onnx + plan.json) with a single arena of ``plan.arena_bytes``."""

    def __init__(self, bundle_dir: str | Path, plan: MemoryPlan | None = None):
        bundle = Path(bundle_dir)
        self.model = onnx.load(str(bundle / "model.onnx"))
        self.plan = plan or MemoryPlan.from_dict(json.loads((bundle / "plan.json").read_text()))
        self.infos = _value_infos(self.model)
        for t in self.model.graph.initializer:
            self.infos.setdefault(t.name, onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        self.weights = {t.name: t for t in self.model.graph.initializer}
        self.nodes = {n.name: n for n in self.model.graph.node}
        self.opsets = list(self.model.opset_import)
        self.placement = {t.name: t for t in self.plan.tensors}
        self.scratch = {t.name: t for t in self.plan.scratch}
        missing = [name for name in self.plan.schedule if name not in self.nodes]
        if missing:
            raise LmcError(f"plan schedules unknown nodes: {', '.join(missing[:5])}")
        self._sessions: dict[str, ort.InferenceSession] = {}

    def _session(self, node: onnx.NodeProto) -> ort.InferenceSession:
        if node.name not in self._sessions:
            names = list(dict.fromkeys(n for n in node.input if n))
            weights = [self.weights[n] for n in names if n in self.weights]   # kept as initializers
            fed = [n for n in names if n not in self.weights]
            unknown = [n for n in fed if n not in self.infos]
            if unknown:
                raise LmcError(f"node '{node.name}': no type information for {unknown}")
            inputs = [self.infos[n] for n in fed]
            outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
            graph = onnx.helper.make_graph([node], node.name or "step", inputs, outputs, weights)
            model = onnx.helper.make_model(graph, opset_imports=self.opsets)
            model.ir_version = self.model.ir_version
            self._sessions[node.name] = session(model, threads=1)
        return self._sessions[node.name]

    def _view(self, arena: np.ndarray, name: str) -> np.ndarray:
        vi = self.infos[name]
        dtype, shape = _np_dtype(vi), _shape(vi)
        t = self.placement[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > t.size:
            raise LmcError(f"tensor '{name}' needs {nbytes} bytes but the plan gives it {t.size}")
        return arena[t.offset:t.offset + nbytes].view(dtype).reshape(shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arena = np.full(self.plan.arena_bytes, _POISON, dtype=np.uint8)
        outputs: dict[str, np.ndarray] = {}
        graph_outputs = [o.name for o in self.model.graph.output]
        for name in self.plan.schedule:
            node = self.nodes[name]
            scratch = self.scratch.get(name)
            if scratch is not None:
                arena[scratch.offset:scratch.offset + scratch.size] = _POISON
            feed = {}
            for inp in node.input:
                if not inp or inp in feed:
                    continue
                if inp in self.placement:
                    feed[inp] = self._view(arena, inp).copy()
                elif inp in feeds:
                    feed[inp] = np.asarray(feeds[inp])
                elif inp in self.weights:
                    continue
                elif inp in outputs:
                    feed[inp] = outputs[inp]
                else:
                    raise LmcError(f"node '{name}' reads '{inp}', which is neither planned, fed nor a weight")
            results = self._session(node).run(None, feed)
            for out, value in zip([o for o in node.output if o], results):
                if out in self.placement:
                    self._view(arena, out)[...] = value
                else:
                    outputs[out] = value
        return {name: outputs[name] for name in graph_outputs}
