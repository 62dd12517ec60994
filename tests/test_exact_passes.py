"""A pass that says it is exact is held to it: the default pipeline runs one pass at a time on the unit tests'
models, and after every run of a pass whose kind is ``PassKind.EXACT`` that did not report an approximation,
the graph's outputs under onnxruntime equal the original's (max relative error ≤ 1e-4; fused kernels
reassociate sums)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lmc.compiler.compilation import BuildOptions, Compilation
from lmc.compiler.pipeline import default_pipeline
from lmc.core import ir, shapes
from lmc.core.pass_manager import FixedPoint, PassKind
from lmc.models import BUILDERS
from lmc.targets.target import load_target

SHAPES = {"tiny-llama": {"input_ids": (1, 16)}, "tiny-gpt2": {"input_ids": (1, 16)}, "small-cnn": {"image": (1, 3, 32, 32)},
          "ds-cnn": {"input": (1, 1, 49, 10)}}


def _feeds(model: onnx.ModelProto, bound: dict) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in model.graph.input:
        dims = bound.get(inp.name) or [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[inp.name] = rng.integers(0, 64, dims).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _flat(pipeline) -> list:
    out = []
    for item in pipeline:
        out += list(item.passes) if isinstance(item, FixedPoint) else [item]
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_exact_pass_keeps_the_outputs(name):
    original = BUILDERS[name]()
    feeds = _feeds(original, SHAPES[name])
    expected = _run(original, feeds)
    options = BuildOptions(target="cortex-a55", input_shapes=SHAPES[name])
    target = load_target(options.target)
    graph = ir.to_graph(original)
    shapes.bind_input_shapes(graph, dict(options.input_shapes))
    shapes.infer_shapes(graph)
    compilation = Compilation(options, target)
    checked = 0
    for pass_ in _flat(default_pipeline(options, target, [t.name for t in graph.inputs])):
        graph, records = compilation.run(graph, [pass_])
        if getattr(pass_, "kind", PassKind.EXACT) is not PassKind.EXACT or records[-1].approximation \
                or not records[-1].modified:
            continue
        got = _run(ir.to_model(graph), feeds)
        for e, g in zip(expected, got):
            scale = max(float(np.max(np.abs(e))), 1e-12)
            assert float(np.max(np.abs(e - g))) / scale <= 1e-4, f"{pass_.name} changed {name}'s outputs"
        checked += 1
    assert checked >= 3          # the pipeline did rewrite these models



def test_a_wrong_exact_pass_is_caught(monkeypatch):
    """Near miss: dedup that nudges one weight by 1% still says exact — the check above must catch it."""
    import lmc.passes.dedup_weights as dedup
    from lmc.core.pass_manager import PassResult

    def nudged(self, graph, ctx=None):
        weight = max(ir.constants(graph), key=lambda c: int(np.prod(c.shape)) if c.shape else 0)
        weight.values = np.asarray(ir.const_value(weight)) * np.float32(1.01)
        return PassResult(graph, modified=True)
    monkeypatch.setattr(dedup.DedupWeights, "run", nudged)
    with pytest.raises(AssertionError, match="dedup"):
        test_every_exact_pass_keeps_the_outputs("tiny-llama")
