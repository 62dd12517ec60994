"""Verification that knows onnxruntime's own numerics: a bundle is held to max(tolerance, k × the original's
spread between onnxruntime optimisation levels), and both numbers are reported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.core.errors import LmcError
from lmc.compiler.verify import (SPREAD_FACTOR, OutputError, VerificationFailed, VerifyReport, compare_models,
                                 measure_spread, random_inputs, verify, with_values)

D = 768


def _layer_norm(square: str = "Pow", eps: float = 1e-5) -> onnx.ModelProto:
    """A decomposed LayerNorm. With ``Pow`` onnxruntime fuses it (all optimisations on) into its
    LayerNormalization kernel, which rounds differently; with ``Mul`` (d·d) it is left as written."""
    rng = np.random.default_rng(0)
    square_node = (helper.make_node("Pow", ["d", "two"], ["d2"]) if square == "Pow"
                   else helper.make_node("Mul", ["d", "d"], ["d2"]))
    nodes = [helper.make_node("ReduceMean", ["x", "ax"], ["m"]), helper.make_node("Sub", ["x", "m"], ["d"]),
             square_node, helper.make_node("ReduceMean", ["d2", "ax"], ["v"]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
             helper.make_node("Add", ["ng", "b"], ["y"])]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "ax"),
             numpy_helper.from_array(np.array(2, np.float32), "two"),
             numpy_helper.from_array(np.array(eps, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def models(tmp_path):
    paths = {}
    for name, model in {"original": _layer_norm("Pow"), "unfused": _layer_norm("Mul"),
                        "wrong": _layer_norm("Mul", eps=1e3)}.items():
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    feeds = [{"x": (np.random.default_rng(1).standard_normal((4, D)) * 100 + 1000).astype(np.float32)}]
    return paths, feeds


def test_the_original_has_a_measurable_spread(models):
    paths, feeds = models
    spread = measure_spread(paths["original"], feeds)
    assert 0 < spread["y"] < 1e-4


def test_a_bundle_within_k_times_the_spread_passes_and_reports_both(models):
    paths, feeds = models
    spread = measure_spread(paths["original"], feeds)["y"]
    tolerance = spread / 10          # tighter than onnxruntime agrees with itself
    report = compare_models(paths["original"], paths["unfused"], feeds, tolerance)
    out = report.outputs[0]
    assert out.max_rel > tolerance                         # over the plain tolerance …
    assert report.passed                                   # … but within k × the original's own spread
    assert out.spread == pytest.approx(spread) and out.allowed == pytest.approx(SPREAD_FACTOR * spread)
    data = report.to_dict()
    assert data["spread"] == pytest.approx(spread) and data["spread_factor"] == SPREAD_FACTOR
    assert data["outputs"][0]["spread"] == pytest.approx(spread) and data["outputs"][0]["limit"] >= out.max_rel


def test_a_real_difference_still_fails_with_an_explanation(models):
    paths, feeds = models
    report = compare_models(paths["original"], paths["wrong"], feeds, 1e-4)
    assert not report.passed and report.outputs[0].spread is not None
    assert "'y'" in report.explain() and "spread" in report.explain() and "tolerance 0.0001" in report.explain()


def test_spread_is_measured_lazily_unless_asked(models):
    paths, feeds = models
    lazy = compare_models(paths["original"], paths["original"], feeds, 1e-4)
    assert lazy.passed and lazy.outputs[0].spread is None and lazy.to_dict()["spread"] is None
    eager = compare_models(paths["original"], paths["original"], feeds, 1e-4, spread=True)
    assert eager.outputs[0].spread is not None


def test_verify_always_reports_the_spread(models, tmp_path):
    paths, _ = models
    report = verify(paths["unfused"], paths["original"])
    assert report.passed and report.outputs[0].spread is not None and report.spread is not None


def test_old_callers_keep_working():
    err = OutputError("y", 1.0, 0.5, 0.9)                  # positional, as before
    report = VerifyReport((err,), 1, 1e-4)
    assert not report.passed and report.max_rel == 0.5 and report.spread is None
    assert VerifyReport((OutputError("y", 0.0, 3e-3, 1.0, 4e-3),), 1, 1e-4).passed   # fp16 tolerance


def test_verification_failed_is_a_user_facing_error():
    report = VerifyReport((OutputError("y", 1.0, 0.5, 0.9),), 1, 1e-4)
    exc = VerificationFailed(report.explain(), report)
    assert isinstance(exc, LmcError) and exc.report is report and "0.5" in str(exc)


def _scaled(tmp_path):
    """y = x * s with a float input x and an int64 scalar input s."""
    graph = helper.make_graph([helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
                               helper.make_node("Mul", ["x", "sf"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fixed = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(3.0, np.float32), "three")]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(original, str(tmp_path / "original.onnx"))
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    return tmp_path / "original.onnx", tmp_path / "fixed.onnx"


def test_bound_values_are_fed_to_the_original_only(tmp_path):
    """A bundle built with --input-value s=3 has no input s: feeds are made for the bundle's inputs and the
    original gets the bound value too, converted to its input's dtype."""
    original, fixed = _scaled(tmp_path)
    feeds = random_inputs(fixed, {}, samples=2, seed=1)
    assert all(set(f) == {"x"} for f in feeds)
    assert set(random_inputs(original, {}, values={"s": np.array(3)})[0]) == {"x"}
    assert compare_models(original, fixed, feeds, reference_values={"s": np.array(3.0)}).passed
    assert not compare_models(original, fixed, feeds, reference_values={"s": np.array(2)}).passed
    with pytest.raises(LmcError, match="inputs missing a value: s"):
        compare_models(original, fixed, feeds)
    assert with_values(original, feeds, {"s": [3]})[0]["s"].dtype == np.int64


def test_random_inputs_refuse_an_element_type_without_values(tmp_path):
    original, _ = _scaled(tmp_path)
    model = onnx.load(str(original))
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.UNDEFINED
    onnx.save(model, str(tmp_path / "untyped.onnx"))
    with pytest.raises(LmcError, match="element type 0"):
        random_inputs(tmp_path / "untyped.onnx", {})


def test_checks_run_a_bundle_under_its_own_config_entries(tmp_path):
    """A bundle's session_options.json config entries (they pick kernels, e.g. MatMulNBits' accuracy level)
    apply to the sessions verification opens on it; a plain model gets none."""
    import json

    import onnx

    from lmc.compiler import verify as verify_module
    from lmc.models import build_cnn

    onnx.save(build_cnn(), str(tmp_path / "model.onnx"))
    plain = verify_module._load_session(tmp_path / "model.onnx", low_memory=True)
    key = "session.qdq_matmulnbits_accuracy_level"
    with pytest.raises(RuntimeError):
        plain.get_session_options().get_session_config_entry(key)
    (tmp_path / "session_options.json").write_text(json.dumps({"config_entries": {key: "0"}}))
    sess = verify_module._load_session(tmp_path / "model.onnx", low_memory=True)
    assert sess.get_session_options().get_session_config_entry(key) == "0"
    assert sess.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"


def test_quantized_tables_give_token_ids_over_the_whole_vocabulary(tmp_path):
    """An int4 bundle gathers its embedding through GatherBlockQuantized: the check's random ids still span
    the table's rows (they were 0 and 1 only, checking a quantized bundle on a trivial input)."""
    import onnx as _onnx

    import lmc
    from lmc.compiler.verify import random_inputs
    from lmc.models import build_llama

    _onnx.save(build_llama(), str(tmp_path / "m.onnx"))
    lmc.build(tmp_path / "m.onnx", lmc.BuildOptions(input_shapes={"input_ids": (1, 16)}, quantize="int4",
                                                    block_size=16), tmp_path / "out")
    model = _onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert "GatherBlockQuantized" in {n.op_type for n in model.graph.node}
    ids = random_inputs(tmp_path / "out" / "model.onnx", {"input_ids": [1, 16]}, samples=1, seed=0)[0]["input_ids"]
    assert ids.max() > 16
