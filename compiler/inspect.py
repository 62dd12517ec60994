"""``inspect_model``: what a model holds — ops, parameters by dtype, inputs/outputs with dynamic dims, and
(when its shapes are static or bound) the planned peak after the exact pipeline.

Also ``diff_models``: op counts, initializers and memory of two models side by side.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.compiler import ir, shapes
from lmc.compiler.errors import LmcError
from lmc.compiler.model_io import load_model


@dataclass
class ModelSummary:
    path: str
    opsets: dict[str, int]
    nodes: int
    ops: dict[str, int]
    params_by_dtype: dict[str, dict[str, int]]      # dtype -> {"tensors", "elements", "bytes"}
    weight_bytes: int
    inputs: list[dict]
    outputs: list[dict]
    dynamic_dims: list[str]
    plan: dict | None = field(default=None)
    built_with: dict[str, str] = field(default_factory=dict)   # lmc.* metadata of a bundle

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _io(tensors: Sequence[gs.Tensor]) -> list[dict]:
    return [{"name": t.name, "dtype": str(t.dtype), "shape": [d if isinstance(d, int) else str(d)
                                                          for d in (t.shape or [])]} for t in tensors]


def _op_key(node: gs.Node) -> str:
    return f"{node.domain}.{node.op}" if node.domain not in ("", "ai.onnx", None) else node.op


def summarize(graph: gs.Graph, path: str, opsets: Mapping[str, int]) -> ModelSummary:
    ops = collections.Counter(_op_key(n) for n in graph.nodes)
    params: dict[str, dict[str, int]] = {}
    for const in ir.constants(graph):
        dtype = onnx.helper.tensor_dtype_to_string(ir.onnx_dtype(const.dtype)).replace("TensorProto.", "").lower()
        entry = params.setdefault(dtype, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += int(np.prod(const.shape, dtype=np.int64))
        entry["bytes"] += ir.tensor_nbytes(const) or 0
    dynamic = [f"{t.name}[{i}]={d}" for t in graph.inputs for i, d in enumerate(t.shape or [])
               if not isinstance(d, int)]
    return ModelSummary(path=path, opsets=dict(opsets), nodes=len(graph.nodes), ops=dict(sorted(ops.items())),
                        params_by_dtype=dict(sorted(params.items())), weight_bytes=ir.weight_bytes(graph),
                        inputs=_io(graph.inputs), outputs=_io(graph.outputs), dynamic_dims=dynamic)


def inspect_model(path: str | Path, input_shapes: Mapping[str, Sequence[int]] | None = None,
                  target: str = "cortex-a55", plan: bool = True) -> ModelSummary:
    """Summarize the model; with static (or bound) input shapes also plan it in memory (nothing written)."""
    return _inspect(path, input_shapes, target, plan)[0]


def _inspect(path, input_shapes, target, plan, digests: bool = False) -> tuple[ModelSummary, dict[str, tuple]]:
    """(summary, initializer digests of the model as loaded — only when ``digests``)."""
    model = load_model(path)
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    from lmc.compiler.build import build_metadata

    built_with = build_metadata(model)
    graph = ir.to_graph(model)
    del model
    summary = summarize(graph, str(path), opsets)
    summary.built_with = built_with
    found = _initializer_digest(graph) if digests else {}
    if input_shapes:
        shapes.bind_input_shapes(graph, dict(input_shapes))
    if not plan or any(ir.static_shape(t) is None for t in graph.inputs):
        return summary, found
    from lmc.compiler.backend import plan_memory
    from lmc.compiler.build import BuildOptions
    from lmc.compiler.pass_manager import PassContext, PassManager
    from lmc.compiler.pipeline import default_pipeline
    from lmc.targets.target import load_target

    tgt = load_target(target)
    options = BuildOptions(target=target, input_shapes=dict(input_shapes or {}))
    shapes.infer_shapes(graph)
    graph, _ = PassManager(default_pipeline(options, tgt), PassContext(target=tgt, options=options)).run(graph)
    try:
        mem = plan_memory(graph, tgt)
    except LmcError:
        return summary, found
    summary.plan = {"target": tgt.name, "nodes_after_passes": len(graph.nodes), "arena_bytes": mem.arena_bytes,
                    "lower_bound_bytes": mem.lower_bound_bytes, "io_bytes": mem.io_bytes,
                    "weights_bytes_after_passes": ir.weight_bytes(graph), "peak_ram_bytes": mem.peak_ram_bytes}
    return summary, found


@dataclass(frozen=True)
class ModelDiff:
    a: ModelSummary
    b: ModelSummary
    ops: dict[str, tuple[int, int]]                  # op -> (count in a, count in b), changed ones only
    initializers_only_a: list[str]
    initializers_only_b: list[str]
    initializers_changed: list[str]

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(),
                "ops": {k: list(v) for k, v in self.ops.items()},
                "initializers_only_a": self.initializers_only_a, "initializers_only_b": self.initializers_only_b,
                "initializers_changed": self.initializers_changed}


def _initializer_digest(graph: gs.Graph) -> dict[str, tuple]:
    import hashlib

    out = {}
    for const in ir.constants(graph):
        values = ir.const_value(const)
        digest = hashlib.sha256(values.tobytes()).hexdigest()[:16] if hasattr(values, "tobytes") else ""
        out[const.name] = (str(const.dtype), tuple(const.shape), digest)
    return out


def diff_models(a: str | Path, b: str | Path, input_shapes: Mapping[str, Sequence[int]] | None = None,
                target: str = "cortex-a55") -> ModelDiff:
    """Compare two models: op counts, initializers by name (added/removed/changed), sizes and plans."""
    sa, da = _inspect(a, input_shapes, target, plan=True, digests=True)
    sb, db = _inspect(b, input_shapes, target, plan=True, digests=True)
    ops = {op: (sa.ops.get(op, 0), sb.ops.get(op, 0)) for op in sorted(set(sa.ops) | set(sb.ops))
           if sa.ops.get(op, 0) != sb.ops.get(op, 0)}
    return ModelDiff(sa, sb, ops, sorted(set(da) - set(db)), sorted(set(db) - set(da)),
                     sorted(n for n in set(da) & set(db) if da[n] != db[n]))
