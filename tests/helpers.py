"""Shared test helpers: onnxruntime reference runs and an independent check of a bundle's plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray], optimize: bool = True,
            threads: int = 0) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_graph(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_ort(gs.export_onnx(graph), feeds)


def token_feed(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)}


def assert_close(reference: list[np.ndarray], candidate: list[np.ndarray], rel: float = 1e-4) -> None:
    assert len(reference) == len(candidate)
    for r, c in zip(reference, candidate):
        assert r.shape == c.shape
        scale = float(np.abs(r).max()) or 1.0
        err = float(np.abs(r.astype(np.float64) - c.astype(np.float64)).max()) / scale
        assert err <= rel, f"relative error {err} > {rel}"


def independent_plan_check(bundle: Path) -> dict:
    """Re-derive lifetimes from model.onnx and the schedule and check plan.json without lmc's code:
    no two tensors overlapping in bytes and lifetime, none beyond the arena, lifetimes covering producer
    and last consumer, every non-output intermediate planned at its full aligned size."""
    plan = json.loads((bundle / "plan.json").read_text())
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    step = {name: i for i, name in enumerate(plan["schedule"])}
    assert sorted(step) == sorted(nodes), "schedule must hold every node exactly once"
    outputs = {o.name for o in model.graph.output}
    infos = {vi.name: vi for vi in model.graph.value_info}
    produced, consumed = {}, {}
    for name, node in nodes.items():
        for o in node.output:
            if o:
                produced[o] = step[name]
        for i in node.input:
            if i:
                consumed.setdefault(i, []).append(step[name])
    tensors = {t["name"]: t for t in plan["tensors"]}
    align = plan["alignment"]
    decoded = set(plan.get("decoded_weights", []))
    for name, first in produced.items():
        if name in outputs or name in decoded:
            continue
        assert name in tensors, f"intermediate {name} missing from plan"
        t = tensors[name]
        assert t["first"] <= first and t["last"] >= max(consumed.get(name, [first])), name
        vi = infos[name].type.tensor_type
        numel = int(np.prod([d.dim_value for d in vi.shape.dim], dtype=np.int64))
        nbytes = numel * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.elem_type)).itemsize
        assert t["size"] >= (nbytes + align - 1) // align * align, name
    for t in plan["tensors"] + plan.get("scratch", []):
        assert 0 <= t["offset"] and t["offset"] + t["size"] <= plan["arena_bytes"], t["name"]
        assert t["offset"] % align == 0
    inplace = {tuple(p) for p in plan.get("inplace", [])}

    def handover(a, b):   # an in-place pair overlaps only at the step the output replaces the input
        return any(p in inplace and x["last"] == y["first"] and x["offset"] == y["offset"] and x["name"] == p[0]
                   and y["name"] == p[1] for x, y in ((a, b), (b, a)) for p in [(x["name"], y["name"])])

    items = sorted(plan["tensors"] + plan.get("scratch", []), key=lambda t: t["offset"])
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if b["offset"] >= a["offset"] + a["size"]:
                break
            assert not (a["first"] <= b["last"] and b["first"] <= a["last"]) or handover(a, b), \
                f"{a['name']} overlaps {b['name']}"
    return plan


def apply_passes(model: onnx.ModelProto, passes, shapes: dict | None = None, target: str = "x86-64"):
    """Import ``model``, bind ``shapes``, run ``passes`` through the PassManager; return (graph, records)."""
    from lmc.core import ir
    from lmc.core import shapes as shape_ops
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.targets.target import load_target

    graph = ir.to_graph(model)
    shape_ops.bind_input_shapes(graph, shapes or {})
    shape_ops.infer_shapes(graph)
    return PassManager(list(passes), PassContext(target=load_target(target))).run(graph)


def assert_pass_exact(model: onnx.ModelProto, passes, feeds: dict[str, np.ndarray], shapes: dict | None = None,
                      target: str = "x86-64", rel: float = 1e-5):
    """Run passes and check the rewritten graph against onnxruntime on the original; return (graph, records)."""
    graph, records = apply_passes(model, passes, shapes, target)
    from lmc.core import ir

    assert_close(run_ort(model, feeds), run_ort(ir.to_model(graph), feeds), rel=rel)
    return graph, records


def op_count(graph: gs.Graph, op: str) -> int:
    return sum(1 for n in graph.nodes if n.op == op)


def op_counts(model_path: str | Path):
    """Nodes of a saved model by op type (weights not loaded)."""
    from collections import Counter

    return Counter(n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node)


def cache_layers(model_path: str | Path) -> int:
    """Layers of a past/present decoder: its ``….key`` cache inputs."""
    return sum(1 for i in onnx.load(str(model_path), load_external_data=False).graph.input if i.name.endswith(".key"))
