"""An original export run a segment at a time (``compiler.segmented``): the same logits as the plain
present → past loop for every real exporter's layout, cuts that respect the budget and the state, state
carried to a later segment, and a generation check over a segmented original that still fails a broken
bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lmc.compiler.segmented as segmented
import lmc.passes.static_cache as static_cache
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.drivers import LOW_MEMORY, PastDecoder, past_logits, past_perplexity
from lmc.compiler.verify import VerificationFailed
from lmc.core.perplexity import streaming_perplexity
from lmc.passes.cache_masks import MaskPattern

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"
EXPORTS = ["llama-past-optimum.onnx", "qwen2-past-optimum.onnx", "gpt2-past-optimum.onnx",
           "llama-past-torchscript.onnx", "llama-past-dynamo.onnx"]
MISTRAL = FIXTURES / "families" / "mistral-sw-past-optimum.onnx"
SPANS = [(0, 6), (6, 9)] + [(i, i + 1) for i in range(9, 14)]


def _plain(model: Path, tokens: np.ndarray) -> list[np.ndarray]:
    decoder = PastDecoder(model, batch=tokens.shape[0], session_options=LOW_MEMORY)
    return [decoder.forward(tokens[:, a:b]) for a, b in SPANS]


def _split(model: Path, budget: int) -> tuple[onnx.ModelProto, list[segmented.Segment]]:
    m = onnx.load(str(model))
    pairs = {i.name: i.name.replace("past_key_values", "present") for i in m.graph.input
             if i.name.startswith("past")}
    return m, segmented.split(m, budget, pairs, set(segmented._value_types(m)))


@pytest.mark.parametrize("name", EXPORTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_segmented_logits_equal_the_plain_loop(name, batch):
    model = FIXTURES / name
    budget = segmented.weight_bytes(onnx.load(str(model))) // 5
    tokens = np.random.default_rng(batch).integers(0, 256, (batch, SPANS[-1][1]))
    _, segments = _split(model, budget)
    assert len(segments) >= 4
    ours = past_logits(model, tokens, SPANS, budget=budget)
    for a, b in zip(ours, _plain(model, tokens)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # one segment (the budget holds every weight): the export itself under the same options, the same numbers
    whole = past_logits(model, tokens, SPANS, budget=1 << 40)
    for a, b in zip(whole, _plain(model, tokens)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", EXPORTS)
def test_cuts_keep_the_budget_and_the_state(name):
    model, segments = _split(FIXTURES / name, budget := 40_000)
    assert segments[0].start == 0 and segments[-1].stop == len(model.graph.node)
    assert all(s.stop == t.start for s, t in zip(segments, segments[1:]))
    sizes = {t.name: len(t.raw_data) for t in model.graph.initializer}
    for s in segments:          # over budget only where one node holds more, or a state range forbids a cut
        largest = max(sum(sizes.get(x, 0) for x in n.input) for n in model.graph.node[s.start:s.stop])
        assert s.weight_bytes <= budget or largest > budget or _holds_state_range(model, s)
    segment_of = {}
    for k, s in enumerate(segments):
        for node in model.graph.node[s.start:s.stop]:
            segment_of.update({o: k for o in node.output})
            for x in node.input:
                if x.startswith("past"):
                    # every reader of a past runs in or after the segment computing its present
                    present = x.replace("past_key_values", "present")
                    assert k >= segment_of.get(present, k) or present not in _producers(model)


def _producers(model):
    return {o for n in model.graph.node for o in n.output}


def _holds_state_range(model, segment) -> bool:
    nodes = model.graph.node[segment.start:segment.stop]
    return any(x.startswith("past") for n in nodes for x in n.input)


def _late_reader_model() -> onnx.ModelProto:
    """present = Concat(past, x) in the first layer; the last layer (after a cut) reads past again."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(2))
    nodes = [
        helper.make_node("Concat", ["past", "x"], ["present"], axis=1),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("ReduceSum", ["present", "axis1"], ["s"], keepdims=1),
        helper.make_node("MatMul", ["h", "w2"], ["h2"]),
        helper.make_node("ReduceMean", ["past", "axis1"], ["late"], keepdims=1),
        helper.make_node("Add", ["h2", "late"], ["y0"]),
        helper.make_node("Add", ["y0", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "late", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4]),
                        helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_state_read_by_a_later_segment_is_carried(tmp_path):
    import onnxruntime as ort

    path = tmp_path / "late.onnx"
    onnx.save(_late_reader_model(), path)
    model = onnx.load(str(path))
    segments = segmented.split(model, 64, {"past": "present"}, set(segmented._value_types(model)))
    assert len(segments) >= 2 and "past" in segments[-1].inputs and "present" in segments[0].outputs
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 1, 4)).astype(np.float32) for _ in range(4)]
    initial = {"past": np.full((1, 1, 4), 0.5, np.float32)}
    ours = segmented.run_layer_major(path, [{"x": x} for x in xs], ["y"], {"past": "present"}, initial,
                                     budget=64)
    sess, past = ort.InferenceSession(str(path)), initial["past"]
    for x, got in zip(xs, ours):
        y, past = sess.run(["y", "present"], {"x": x, "past": past})
        np.testing.assert_allclose(got["y"], y, rtol=1e-6, atol=1e-6)
    # the same run with the carried state dropped (every later segment reading the initial past) differs
    broken = segmented.run_layer_major(path, [{"x": x, "past": initial["past"]} for x in xs], ["y"], {},
                                       {}, budget=64)
    assert not np.allclose(broken[-1]["y"], ours[-1]["y"])


@pytest.mark.skipif(not MISTRAL.exists(), reason="family fixtures absent")
def test_dropped_window_fails_the_build_against_a_segmented_original(tmp_path, monkeypatch):
    monkeypatch.setattr(segmented, "SEGMENT_BYTES", segmented.weight_bytes(onnx.load(str(MISTRAL))) // 4)
    build(MISTRAL, BuildOptions(target="cortex-a55", context=40), tmp_path / "good")
    original = static_cache.layout_for
    monkeypatch.setattr(static_cache, "layout_for", lambda pattern, *rest: original(MaskPattern(), *rest))
    with pytest.raises(VerificationFailed, match="logits"):
        build(MISTRAL, BuildOptions(target="cortex-a55", context=40), tmp_path / "broken")


def test_without_shape_inference_the_run_is_still_the_plain_loop(monkeypatch):
    """Inference failing (an operator onnx does not know) leaves only recorded types: fewer cuts, the same
    logits."""
    def fail(*_, **__):
        raise onnx.shape_inference.InferenceError("unknown operator")
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    model = FIXTURES / EXPORTS[0]
    tokens = np.random.default_rng(4).integers(0, 256, (1, SPANS[-1][1]))
    budget = segmented.weight_bytes(onnx.load(str(model))) // 5
    for a, b in zip(past_logits(model, tokens, SPANS, budget=budget), _plain(model, tokens)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-past-optimum.onnx", "gpt2-past-optimum.onnx", "llama-past-dynamo.onnx"])
@pytest.mark.parametrize("chunk", [1, 5, 12])
def test_segmented_perplexity_is_the_streamed_one(name, chunk):
    """Windows run one segment at a time, each from an empty cache (the state reset between windows), give
    the perplexity of the plain loop; without the reset they would not."""
    model = FIXTURES / name
    windows = np.random.default_rng(chunk).integers(0, 256, (3, 12))
    budget = segmented.weight_bytes(onnx.load(str(model))) // 5
    want = streaming_perplexity(PastDecoder(model, session_options=LOW_MEMORY), windows, chunk)
    got = past_perplexity(model, windows, chunk, budget=budget)
    assert got.predictions == want.predictions == 3 * 11
    assert abs(got.nll - want.nll) < 1e-5 * want.nll
    whole = past_perplexity(model, windows, chunk, budget=1 << 40)
    assert abs(whole.nll - want.nll) < 1e-9 * want.nll


def test_perplexity_without_the_reset_differs(monkeypatch):
    model = FIXTURES / EXPORTS[0]
    windows = np.random.default_rng(0).integers(0, 256, (3, 12))
    budget = segmented.weight_bytes(onnx.load(str(model))) // 5
    right = past_perplexity(model, windows, 4, budget=budget)
    original = segmented.run_layer_major
    monkeypatch.setattr(segmented, "run_layer_major", lambda *a, resets=(), **k: original(*a, resets={0}, **k))
    try:                    # the second window would start on the first one's cache: an error or other numbers
        wrong = past_perplexity(model, windows, 4, budget=budget)
    except Exception:
        return
    assert abs(wrong.nll - right.nll) > 1e-3 * right.nll
