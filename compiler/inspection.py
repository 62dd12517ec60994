"""``inspect_model``: what a model holds — ops, parameters by dtype, inputs/outputs with dynamic dims, and
(when its shapes are static or bound) the planned peak after the exact pipeline.

Also ``diff_models``: op counts, initializers and memory of two models side by side; and ``diff_bundles``:
two built bundles' plans (arena, lower bound, peak RAM, predicted runtime peak, state, profiles), the
tensors whose size or lifetime changed most, weights by dtype and op counts.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.metadata import build_metadata
from lmc.core.model_io import load_model
from lmc.targets import emit
from lmc.targets.target import load_target
from lmc.compiler.backend import plan_memory
from lmc.compiler.compilation import BuildOptions, Compilation
from lmc.compiler.pipeline import default_pipeline


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
    """(summary, initializer digests of the model as loaded — only when ``digests``). ``path`` may be a
    bundle folder: its model.onnx is inspected."""
    if Path(path).is_dir():
        if not is_bundle(path):
            raise LmcError(f"{path}: a folder that is not an lmc bundle (needs {emit.MODEL_FILE} and "
                           f"{emit.PLAN_FILE}); give a model file or a bundle folder")
        path = Path(path) / emit.MODEL_FILE
    model = load_model(path)
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}

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

    tgt = load_target(target)
    options = BuildOptions(target=target, input_shapes=dict(input_shapes or {}))
    shapes.infer_shapes(graph)
    graph, _ = Compilation(options, tgt).run(graph, default_pipeline(options, tgt))
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


# ---- bundle vs bundle ------------------------------------------------------------------------------------

def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def _graph_weights_ops(graph: onnx.GraphProto, weights: dict, ops: collections.Counter) -> None:
    """Initializers and Constant values by dtype ({"tensors", "bytes"}) and op counts, subgraphs included.
    A 4-bit MatMulNBits' packed weight and zero points (uint8 bytes, two values each) count as uint4."""
    nibbles = {name for node in graph.node if node.op_type == "MatMulNBits"
               and any(a.name == "bits" and a.i == 4 for a in node.attribute)
               for i, name in enumerate(node.input) if i in (1, 3) and name}
    for t in graph.initializer:
        dtype = "uint4" if t.name in nibbles else _dtype_name(t.data_type)
        entry = weights.setdefault(dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += ir.proto_nbytes(t)
    for node in graph.node:
        ops[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                entry = weights.setdefault(_dtype_name(attr.t.data_type), {"tensors": 0, "bytes": 0})
                entry["tensors"] += 1
                entry["bytes"] += ir.proto_nbytes(attr.t)
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _graph_weights_ops(sub, weights, ops)


@dataclass(frozen=True)
class BundleSide:
    path: str
    plan: dict                                     # plan.json as written
    weights_by_dtype: dict[str, dict[str, int]]    # dtype -> {"tensors", "bytes"} (model.onnx + model.weights)
    ops: dict[str, int]
    built_with: dict[str, str]


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / emit.PLAN_FILE).is_file() and (p / emit.MODEL_FILE).is_file()


def load_bundle_side(path: str | Path) -> BundleSide:
    """A bundle's plan, weights by dtype and op counts (the weights file is not read: sizes come from shapes)."""
    p = Path(path)
    if not is_bundle(p):
        raise LmcError(f"{p}: not an lmc bundle (needs {emit.MODEL_FILE} and {emit.PLAN_FILE})")
    try:
        plan = json.loads((p / emit.PLAN_FILE).read_text())
        model = onnx.load(str(p / emit.MODEL_FILE), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 — protobuf's DecodeError and friends
        raise LmcError(f"{p}: cannot read the bundle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(plan, dict) or "arena_bytes" not in plan:
        raise LmcError(f"{p}/{emit.PLAN_FILE}: not an lmc plan")
    weights: dict[str, dict[str, int]] = {}
    ops: collections.Counter = collections.Counter()
    _graph_weights_ops(model.graph, weights, ops)
    return BundleSide(str(p), plan, dict(sorted(weights.items())), dict(sorted(ops.items())),
                      build_metadata(model))


PLAN_KEYS = ("arena_bytes", "lower_bound_bytes", "peak_ram_bytes", "predicted_runtime_peak_bytes", "state_bytes",
             "io_bytes", "weights_mmap_bytes", "weights_flash_bytes", "weights_ram_bytes", "schedule_steps",
             "tensors", "scratch_bytes")


def plan_numbers(plan: dict) -> dict[str, int | None]:
    """The headline numbers of a plan.json (None where the plan has no such field, e.g. no runtime model)."""
    runtime = plan.get("runtime") or {}
    weights = plan.get("weights_bytes", {})
    return {"arena_bytes": plan.get("arena_bytes"), "lower_bound_bytes": plan.get("lower_bound_bytes"),
            "peak_ram_bytes": plan.get("peak_ram_bytes"),
            "predicted_runtime_peak_bytes": runtime.get("predicted_peak_bytes"),
            "state_bytes": (plan.get("state") or {}).get("bytes", 0), "io_bytes": plan.get("io_bytes"),
            "weights_mmap_bytes": weights.get("mmap", 0), "weights_flash_bytes": weights.get("flash", 0),
            "weights_ram_bytes": weights.get("ram", 0), "schedule_steps": len(plan.get("schedule", ())),
            "tensors": len(plan.get("tensors", ())),
            "scratch_bytes": max((s["size"] for s in plan.get("scratch", ())), default=0)}


@dataclass(frozen=True)
class BundleDiff:
    a: BundleSide
    b: BundleSide
    plan: dict[str, tuple]                       # key -> (a, b) for PLAN_KEYS
    profiles: dict[str, dict[str, tuple]]        # generation bundles: profile -> key -> (a, b)
    tensors_changed: list[dict]                  # top changes by name: size and lifetime in A and B
    tensors_only_a: int
    tensors_only_b: int
    weights_by_dtype: dict[str, tuple]           # dtype -> ({"tensors", "bytes"} in a, in b)
    ops: dict[str, tuple[int, int]]              # changed op counts only

    def to_dict(self) -> dict:
        return {"kind": "bundles", "a": self.a.path, "b": self.b.path,
                "built_with": {"a": self.a.built_with, "b": self.b.built_with},
                "plan": {k: {"a": a, "b": b, "delta": None if a is None or b is None else b - a}
                         for k, (a, b) in self.plan.items()},
                "profiles": {n: {k: {"a": a, "b": b} for k, (a, b) in d.items()} for n, d in self.profiles.items()},
                "tensors_changed": self.tensors_changed, "tensors_only_a": self.tensors_only_a,
                "tensors_only_b": self.tensors_only_b,
                "weights_by_dtype": {k: {"a": a, "b": b} for k, (a, b) in self.weights_by_dtype.items()},
                "ops": {k: {"a": a, "b": b} for k, (a, b) in self.ops.items()}}


def diff_bundles(a: str | Path, b: str | Path, top: int = 10) -> BundleDiff:
    """Compare two bundles: plan numbers, per-profile numbers, the tensors (by name) whose size or lifetime
    changed most, weights by dtype and op counts.

    Tensors are ranked by how much their footprint in the timeline (size × live steps) changed, then by the
    size change, the lifetime change and name."""
    sa, sb = load_bundle_side(a), load_bundle_side(b)
    na, nb = plan_numbers(sa.plan), plan_numbers(sb.plan)
    plan = {k: (na[k], nb[k]) for k in PLAN_KEYS}
    profiles: dict[str, dict[str, tuple]] = {}
    pa = {p["name"]: p for p in sa.plan.get("profiles", ())}
    pb = {p["name"]: p for p in sb.plan.get("profiles", ())}
    for name in [n for n in pa if n in pb] + [n for n in pa if n not in pb] + [n for n in pb if n not in pa]:
        x, y = pa.get(name, {}), pb.get(name, {})
        profiles[name] = {k: (x.get(k), y.get(k)) for k in ("sequence", "arena_bytes", "lower_bound_bytes",
                                                           "io_bytes", "peak_ram_bytes", "predicted_peak_bytes")}
    ta = {t["name"]: t for t in sa.plan.get("tensors", ())}
    tb = {t["name"]: t for t in sb.plan.get("tensors", ())}
    changed = []
    for name in set(ta) & set(tb):
        x, y = ta[name], tb[name]
        la, lb = x["last"] - x["first"] + 1, y["last"] - y["first"] + 1
        if x["size"] == y["size"] and (x["first"], x["last"]) == (y["first"], y["last"]):
            continue
        changed.append({"name": name, "size": [x["size"], y["size"]], "steps": [[x["first"], x["last"]],
                                                                              [y["first"], y["last"]]],
                        "size_delta": y["size"] - x["size"], "lifetime_delta": lb - la,
                        "footprint_delta": y["size"] * lb - x["size"] * la})
    changed.sort(key=lambda c: (-abs(c["footprint_delta"]), -abs(c["size_delta"]), -abs(c["lifetime_delta"]),
                                c["name"]))
    empty = {"tensors": 0, "bytes": 0}
    weights = {k: (sa.weights_by_dtype.get(k, empty), sb.weights_by_dtype.get(k, empty))
               for k in sorted(set(sa.weights_by_dtype) | set(sb.weights_by_dtype))}
    ops = {op: (sa.ops.get(op, 0), sb.ops.get(op, 0)) for op in sorted(set(sa.ops) | set(sb.ops))
           if sa.ops.get(op, 0) != sb.ops.get(op, 0)}
    return BundleDiff(sa, sb, plan, profiles, changed[:top], len(set(ta) - set(tb)), len(set(tb) - set(ta)),
                      weights, ops)
