"""Weight quantization: scale math, GPTQ, and quantized bundles that run in stock onnxruntime with the
tied table stored once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import independent_plan_check, run_ort, token_feed

from lmc.compiler.arena_executor import ArenaExecutor
from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.core.perplexity import load_tokens, perplexity
from lmc.core.runtime import session
from lmc.compiler.verify import compare
from lmc.core.errors import LmcError
from lmc.models import LlamaConfig, build_llama
from lmc.passes.quantize.scales import gptq_blocks, quantize_blocks, quantize_blocks_asymmetric, quantize_channels


def test_channel_int8_error_is_small_and_scales_per_channel():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    q, s = quantize_channels(w, axis=1)
    assert q.dtype == np.int8 and s.shape == (32,) and np.abs(q).max() <= 127
    assert np.linalg.norm(q * s - w) / np.linalg.norm(w) < 0.01


def test_block_search_beats_plain_rounding():
    w = np.random.default_rng(1).standard_t(3, (128, 256)).astype(np.float32)
    q, s = quantize_blocks(w, 32, 4)
    q0, s0 = quantize_blocks(w, 32, 4, search=False)
    err = lambda q, s: np.linalg.norm((q.reshape(128, -1, 32) * s[..., None]).reshape(128, 256) - w)
    assert err(q, s) < err(q0, s0)
    qa, sa, za = quantize_blocks_asymmetric(w, 32, 4)
    assert qa.max() <= 15 and za.max() <= 15


def test_gptq_lowers_output_error_on_correlated_inputs():
    rng = np.random.default_rng(2)
    k, n = 128, 64
    x = rng.standard_normal((2048, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k))
    w = rng.standard_normal((n, k))
    gram = x.T @ x
    q, s, z = quantize_blocks_asymmetric(w, 32, 4, np.diag(gram) / len(x))
    q2, s2, z2 = gptq_blocks(w, gram, 32)
    deq = lambda q, s, z: ((q.reshape(n, -1, 32).astype(np.float64) - z[..., None]) * s[..., None]).reshape(n, k)
    out_err = lambda wh: np.linalg.norm(x @ (w - wh).T)
    assert out_err(deq(q2, s2, z2)) < 0.97 * out_err(deq(q, s, z))
    # symmetric: signed codes, no zero points, and the same gain over its own rounding
    qs, ss = quantize_blocks(w, 32, 4, np.diag(gram) / len(x))
    q3, s3, z3 = gptq_blocks(w, gram, 32, symmetric=True)
    assert z3 is None and q3.dtype == np.int8 and q3.min() >= -8 and q3.max() <= 7
    sym = lambda q, s: (q.reshape(n, -1, 32).astype(np.float64) * s[..., None]).reshape(n, k)
    assert out_err(sym(q3, s3)) < 0.97 * out_err(sym(qs, ss))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    path = d / "llama.onnx"
    onnx.save(build_llama(LlamaConfig(d_model=128, heads=4, kv_heads=2, mlp=256, vocab=512)), str(path))
    tokens = np.random.default_rng(0).integers(0, 512, (8, 32)).astype(np.int64)
    np.savez(d / "calib.npz", input_ids=tokens)
    return path, d / "calib.npz"


@pytest.mark.parametrize("mode", [QuantizeMode.INT8, QuantizeMode.INT4])
def test_quantized_bundle_runs_and_stays_close(tiny_llama, tmp_path, mode):
    path, calib = tiny_llama
    result = build(path, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)}, quantize=mode,
                                      calib=str(calib)), tmp_path / "out")
    feed = token_feed(1, 32, vocab=512, seed=3)
    ref = run_ort(path, feed)[0]
    got = run_ort(tmp_path / "out" / "model.onnx", feed)[0]
    err = compare(ref, got, "logits")
    assert err.cosine > (0.999 if mode is QuantizeMode.INT8 else 0.95)   # random (untrained) weights
    assert result.weight_bytes_after < result.weight_bytes_before / (3 if mode is QuantizeMode.INT8 else 4)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    ops = {n.op_type: n for n in model.graph.node}
    # the tied table: stored once, read by the lm head and the gather
    assert ops["MatMulNBits"].input[1] == ops["GatherBlockQuantized"].input[0]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if mode is QuantizeMode.INT4:      # written as the MatMulNBits onnxruntime would fuse them into
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"
                 and any(a.name == "bits" and a.i == 4 for a in n.attribute)]
        assert nbits and not dq
    else:
        assert dq, "per-channel int8 weights are DequantizeLinear → MatMul (fused by onnxruntime)"
    plan = independent_plan_check(tmp_path / "out")
    assert set(plan["decoded_weights"]) == {n.output[0] for n in dq}
    # node-by-node semantics (onnxruntime's fused MatMulNBits may also quantize activations on the fly, and
    # with int8 activations its result depends on how the work is split: one thread, as the executor runs)
    unfused = run_ort(tmp_path / "out" / "model.onnx", feed, optimize=False, threads=1)[0]
    executed = ArenaExecutor(tmp_path / "out").run(feed)["logits"]
    assert compare(unfused, executed, "logits").max_rel < 1e-4


@pytest.mark.parametrize("calib", [False, True])
def test_symmetric_int4_stores_no_zero_points_and_decodes_as_the_reference(tiny_llama, tmp_path, monkeypatch, calib):
    """--int4-scheme symmetric: every 4-bit weight, the tied table too (its codes offset by 8, the kernels'
    default zero point), without zero points; the bundle stays about as close to the original as the
    asymmetric one (a code offset the kernels read otherwise would move every row of the table)."""
    import lmc.passes.quantize.weight_only as wo
    from lmc.targets.target import Int4Scheme

    monkeypatch.setattr(wo, "TABLE_KL_BUDGET", 10.0)          # with --calib the table at 4 bits, whatever it costs
    path, calib_file = tiny_llama
    errs = {}
    for scheme in Int4Scheme:
        out = tmp_path / scheme.value
        build(path, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.INT4,
                                 int4_scheme=scheme.value, block_size=32,
                                 calib=str(calib_file) if calib else None), out)
        feed = token_feed(1, 32, vocab=512, seed=3)
        errs[scheme] = compare(run_ort(path, feed)[0], run_ort(out / "model.onnx", feed)[0], "logits")
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        four_bit = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
                    and any(a.name == "bits" and a.i == 4 for a in n.attribute)]
        assert four_bit
        gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
        assert [a.i for n in gathers for a in n.attribute if a.name == "bits"] == [4 if calib else 8]
        with_zeros = [n.name for n in four_bit if len(n.input) > 3 and n.input[3]]
        assert (with_zeros == []) == (scheme is Int4Scheme.SYMMETRIC), with_zeros
    assert errs[Int4Scheme.SYMMETRIC].cosine > 0.95
    assert errs[Int4Scheme.SYMMETRIC].max_rel < 2 * errs[Int4Scheme.ASYMMETRIC].max_rel
    with pytest.raises(LmcError, match="--int4-scheme"):
        BuildOptions(int4_scheme="signed")


def test_perplexity_reads_token_windows(tiny_llama, tmp_path):
    path, _ = tiny_llama
    stream = np.random.default_rng(4).integers(0, 512, 3 * 16 + 5).astype("<u2")
    stream.tofile(tmp_path / "val.u16")
    tokens = load_tokens(tmp_path / "val.u16", 16, 64)
    assert tokens.shape == (3, 16)
    result = perplexity(session(path), tokens)
    assert result.predictions == 3 * 15
    nll = []
    for window in tokens:
        logits = run_ort(path, {"input_ids": window[None]})[0][0].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += list(logz[:-1] - logits[np.arange(15), window[1:]])
    assert result.nll == pytest.approx(np.mean(nll), rel=1e-6)


def test_w8a8_runs_integer_gemms(tiny_llama, tmp_path):
    import onnxruntime as ort

    path, calib = tiny_llama
    build(path, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.W8A8,
                             calib=str(calib)), tmp_path / "out")
    feed = token_feed(1, 32, vocab=512, seed=5)
    err = compare(run_ort(path, feed)[0], run_ort(tmp_path / "out" / "model.onnx", feed)[0], "logits")
    assert err.cosine > 0.98          # random (untrained) weights, 8 calibration samples
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4 * 2      # q|k|v, o, gate|up, down per layer
    assert "MatMul" not in ops


def test_w8a8_smoothing_gives_each_norm_its_own_scale(tiny_llama, tmp_path):
    """The tiny Llama's norms share one deduplicated scale constant: SmoothQuant divides it by a different s
    for each norm, so each must read a constant of its own (one name for two would leave one norm with the
    other's scale, silently)."""
    from collections import Counter

    path, calib = tiny_llama
    build(path, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.W8A8,
                             calib=str(calib)), tmp_path / "out")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    initializers = Counter(t.name for t in model.graph.initializer)
    reads = Counter(i for n in model.graph.node for i in n.input if "_smoothed" in i and i in initializers)
    norms = [n for n in model.graph.node if n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization")
             and "_smoothed" in n.input[1]]
    assert len(norms) >= 3 and len({n.input[1] for n in norms}) == len(norms)
    assert all(initializers[name] == 1 and count == 1 for name, count in reads.items())


def test_w8a8_without_calibration_is_a_user_error(tiny_llama, tmp_path):
    from lmc.core.errors import LmcError

    path, _ = tiny_llama
    with pytest.raises(LmcError, match="--calib"):
        build(path, BuildOptions(input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.W8A8), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_int4_takes_gemm_weights_as_matmulnbits(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])
    model = helper.make_model(helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                                                [x], [y], [numpy_helper.from_array(w, "w"),
                                                           numpy_helper.from_array(b, "b")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    build(tmp_path / "gemm.onnx", BuildOptions(target="x86-64", quantize=QuantizeMode.INT4), tmp_path / "out")
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits", "Add"]
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    assert compare(run_ort(model, feed)[0], run_ort(tmp_path / "out" / "model.onnx", feed)[0], "y").cosine > 0.99


def test_w8a8_hf_style_gpt2_biases_stay_integer(tmp_path):
    import onnxruntime as ort

    from lmc.models import Gpt2Config, build_gpt2

    path = tmp_path / "gpt2.onnx"
    onnx.save(build_gpt2(Gpt2Config(hf_style=True, layers=2)), str(path))
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(0).integers(0, 256, (8, 16)))
    build(path, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 16)}, quantize=QuantizeMode.W8A8,
                             calib=str(tmp_path / "calib.npz")), tmp_path / "out")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4 * 2 and "Gemm" not in ops


def test_quantized_builds_are_byte_identical(tiny_llama, tmp_path):
    path, calib = tiny_llama
    opts = BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.INT4,
                        calib=str(calib))
    build(path, opts, tmp_path / "a")
    build(path, opts, tmp_path / "b")
    for f in ("model.onnx", "model.weights", "plan.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_calibration_statistics_clip_outliers():
    from lmc.passes.quantize.w8a8 import CalibMethod, _fixed_clip, entropy_threshold

    x = np.random.default_rng(0).standard_normal(200_000)
    x[:5] = 60.0                                              # a few outliers
    t = entropy_threshold(x)
    assert 2.0 < t < 30.0
    assert _fixed_clip(CalibMethod.MINMAX, x, 60.0) == 1.0
    assert _fixed_clip(CalibMethod.PERCENTILE, x, 60.0) < 0.2
    assert _fixed_clip(CalibMethod.ENTROPY, x, 60.0) < 0.5


@pytest.mark.parametrize("budget, bits", [(0.0, 8), (10.0, 4)])
def test_tied_table_precision_is_chosen_by_measured_shift(tiny_llama, tmp_path, monkeypatch, budget, bits):
    import lmc.passes.quantize.weight_only as wo

    monkeypatch.setattr(wo, "TABLE_KL_BUDGET", budget)
    path, calib = tiny_llama
    result = build(path, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.INT4,
                                      calib=str(calib)), tmp_path / "out")
    notes = [n for r in result.records for n in r.notes if "nats/token" in n]
    assert len(notes) == 1 and ("kept at 8 bits" in notes[0]) == (bits == 8)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    table = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized").input[0]
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == table)
    assert next(a.i for a in head.attribute if a.name == "bits") == bits


# ---- float16 / bfloat16 models: quantized (fp16) or refused (bf16), never silently left as they were


def _half_model(elem=None, np_dtype=np.float16):
    """ids → Gather(table) → MatMul(w1) + b → Relu → MatMul(w2) · gain (a Mul reads a large weight) → y."""
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if elem is None else elem
    rng = np.random.default_rng(0)

    def init(name, shape):
        value = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if elem == TensorProto.BFLOAT16:
            return helper.make_tensor(name, elem, list(shape), (value.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
                                      raw=True)
        return numpy_helper.from_array(value.astype(np_dtype), name)

    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["z"]),
             helper.make_node("Mul", ["z", "gain"], ["y"])]
    inits = [init("table", (256, 64)), init("w1", (64, 128)), init("b1", (128,)), init("w2", (128, 64)),
             init("gain", (16, 64, 64))]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("ids", TensorProto.INT64, [16, 64])],
                              [helper.make_tensor_value_info("y", elem, [16, 64, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("mode", [QuantizeMode.INT8, QuantizeMode.INT4])
def test_float16_weights_are_quantized_with_float16_scales(tmp_path, mode):
    onnx.save(_half_model(), str(tmp_path / "half.onnx"))
    result = build(tmp_path / "half.onnx", BuildOptions(target="x86-64", quantize=mode), tmp_path / "out")
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    inits = {t.name: t for t in out.graph.initializer}
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3                                       # w1, w2 and the (untied) table
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dq)
    assert {"w1", "w2", "table"}.isdisjoint(inits)           # no float copy left
    assert result.weight_bytes_after < result.weight_bytes_before
    feed = {"ids": np.random.default_rng(1).integers(0, 256, (16, 64))}
    err = compare(run_ort(tmp_path / "half.onnx", feed)[0], run_ort(tmp_path / "out" / "model.onnx", feed)[0], "y")
    assert err.cosine > (0.999 if mode is QuantizeMode.INT8 else 0.98)
    notes = [n for r in result.records if r.name.startswith("quantize") for n in r.notes]
    # every weight left in float is named with its reason
    assert any(n.startswith("gain ") and "Mul" in n and "unquantized" in n for n in notes)
    assert any("b1" in n and "under 4096 elements" in n for n in notes)


def test_bfloat16_weights_are_refused(tmp_path):
    from onnx import TensorProto

    from lmc.core.errors import LmcError

    onnx.save(_half_model(TensorProto.BFLOAT16), str(tmp_path / "bf16.onnx"))
    with pytest.raises(LmcError, match="bfloat16.*w1|bfloat16.*table"):
        build(tmp_path / "bf16.onnx", BuildOptions(target="x86-64", quantize=QuantizeMode.INT8, verify=False),
              tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_w8a8_refuses_float16_weights(tmp_path):
    from lmc.core.errors import LmcError

    onnx.save(_half_model(), str(tmp_path / "half.onnx"))
    np.savez(tmp_path / "calib.npz", ids=np.random.default_rng(0).integers(0, 256, (4, 16, 64)))
    with pytest.raises(LmcError, match="w8a8.*float16"):
        build(tmp_path / "half.onnx", BuildOptions(target="x86-64", quantize=QuantizeMode.W8A8,
                                                   calib=str(tmp_path / "calib.npz")), tmp_path / "out")


def test_float32_notes_name_weights_left_unquantized(tmp_path):
    onnx.save(_half_model(np_dtype=np.float32, elem=onnx.TensorProto.FLOAT), str(tmp_path / "f32.onnx"))
    result = build(tmp_path / "f32.onnx", BuildOptions(target="x86-64", quantize=QuantizeMode.INT8), tmp_path / "out")
    notes = [n for r in result.records if r.name.startswith("quantize") for n in r.notes]
    assert any(n.startswith("gain ") and "unquantized" in n for n in notes)


# ---- the scale search: pinned error, layouts, threads; GPTQ's Gram matrices in groups

# ‖W − Ŵ‖_h / ‖W‖_h (float64) of the scale search as it was before it was vectorised over candidates and the
# asymmetric one took least-squares refits (same weights, seed 123): the search may get faster, never worse.
# asym4: the one-end-at-a-time refinement (28 evaluations; 0.55x the time of the 48 that moved both ends,
# whose errors were 0.0779191298, 0.0740023530, 0.0993931393, 0.0952402893: +0.007–0.015%)
PINNED_ERRORS = {
    ("normal", False): {"asym4": 0.0779294566, "sym4": 0.0862317491, "sym8_256": 0.0068870872, "channels": 0.0073946573},
    ("normal", True): {"asym4": 0.0740136961, "sym4": 0.0817808806, "sym8_256": 0.0067957725, "channels": 0.0073150458},
    ("t3", False): {"asym4": 0.0993997603, "sym4": 0.1321300656, "sym8_256": 0.0176937729, "channels": 0.0224317620},
    ("t3", True): {"asym4": 0.0952471206, "sym4": 0.1260131373, "sym8_256": 0.0175554564, "channels": 0.0222852582},
}


def _pinned_weights():
    rng = np.random.default_rng(123)
    normal = rng.standard_normal((512, 768)).astype(np.float32)
    t3 = rng.standard_t(3, (512, 768)).astype(np.float32)
    h = rng.gamma(1.0, 1.0, 512)
    return {"normal": normal, "t3": t3}, h


def _weighted_error(w, w_hat, h, axis):
    """‖W − Ŵ‖_h / ‖W‖_h in float64, h along ``axis`` of w."""
    w = w.astype(np.float64)
    hh = 1.0 if h is None else np.expand_dims(h, 1 - axis)
    return float(np.sqrt((((w - w_hat) ** 2) * hh).sum() / ((w ** 2) * hh).sum()))


@pytest.mark.parametrize("dist", ["normal", "t3"])
@pytest.mark.parametrize("weighted", [False, True])
def test_search_error_is_pinned(dist, weighted):
    weights, h = _pinned_weights()
    w = weights[dist]                                  # a MatMul weight [K, N]; h over K
    h = h if weighted else None
    k, n = w.shape
    pinned = PINNED_ERRORS[(dist, weighted)]
    tol = 1 + 1e-7

    def blocks(q, s, z, b):                            # q [K, N], s/z [K/B, N] → Ŵ [K, N]
        centred = q.astype(np.float64).reshape(k // b, b, n) - (0 if z is None else z[:, None, :].astype(np.float64))
        return (centred * s[:, None, :].astype(np.float64)).reshape(k, n)

    q, s, z = quantize_blocks_asymmetric(w, 32, 4, h, axis=0)
    assert _weighted_error(w, blocks(q, s, z, 32), h, 0) <= pinned["asym4"] * tol
    q, s = quantize_blocks(w, 32, 4, h, axis=0)
    assert _weighted_error(w, blocks(q, s, None, 32), h, 0) <= pinned["sym4"] * tol
    q, s = quantize_blocks(w, 256, 8, h, axis=0)
    assert _weighted_error(w, blocks(q, s, None, 256), h, 0) <= pinned["sym8_256"] * tol
    q, s = quantize_channels(w, 1, h)
    assert _weighted_error(w, q.astype(np.float64) * s.astype(np.float64), h, 0) <= pinned["channels"] * tol


def test_search_error_is_pinned_through_the_pass():
    import onnx_graphsurgeon as gs

    from lmc.core.pass_manager import PassContext
    from lmc.passes.quantize.weight_only import QuantizeConfig, QuantizeWeights, WeightBits

    w = _pinned_weights()[0]["normal"]
    x, y = gs.Variable("x", np.float32, [1, 512]), gs.Variable("y", np.float32, [1, 768])
    graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, gs.Constant("w", w)], outputs=[y])], inputs=[x],
                     outputs=[y], opset=21)
    qpass = QuantizeWeights(QuantizeConfig(bits=WeightBits.INT4))
    qpass.run(graph, PassContext())
    assert qpass.reports[0].rel_error <= PINNED_ERRORS[("normal", False)]["asym4"] * (1 + 1e-6)


def test_block_layouts_and_threads_agree(monkeypatch):
    """Blocks along axis 0 of W [K, N] are the blocks along the last axis of Wᵀ, whatever the chunking (a
    narrow weight packs several block rows in a chunk) and the number of threads."""
    import lmc.passes.quantize.scales as scales

    rng = np.random.default_rng(7)
    h = rng.gamma(1.0, 1.0, 256)
    for shape in [(256, 48), (256, 3000)]:
        w = rng.standard_normal(shape).astype(np.float32)
        for hh in (None, h):
            monkeypatch.setattr(scales, "MAX_THREADS", 1)
            rows = quantize_blocks_asymmetric(np.ascontiguousarray(w.T), 32, 4, hh)
            monkeypatch.setattr(scales, "MAX_THREADS", 4)
            cols = quantize_blocks_asymmetric(w, 32, 4, hh, axis=0)
            for a, b in zip(rows, cols):
                np.testing.assert_array_equal(a.T, b)
            sym_rows = quantize_blocks(np.ascontiguousarray(w.T), 32, 4, hh)
            sym_cols = quantize_blocks(w, 32, 4, hh, axis=0)
            for a, b in zip(sym_rows, sym_cols):
                np.testing.assert_array_equal(a.T, b)
            ch0 = quantize_channels(np.ascontiguousarray(w.T), 0, hh)
            ch1 = quantize_channels(w, 1, hh)
            np.testing.assert_array_equal(ch0[0].T, ch1[0])
            np.testing.assert_array_equal(ch0[1], ch1[1])


def test_search_reads_a_read_only_weight():
    w = np.random.default_rng(8).standard_normal((128, 96)).astype(np.float32)
    w.flags.writeable = False
    before = w.copy()
    quantize_blocks_asymmetric(w, 32, 4, axis=0)
    quantize_blocks(w.T, 32, 4)
    quantize_channels(w, 1)
    np.testing.assert_array_equal(w, before)


def test_gram_groups_fit_the_budget_on_tinyllama_shapes():
    from lmc.passes.quantize.weight_only import GRAM_BUDGET_BYTES, GRAM_MIN_BYTES, gram_budget, plan_gram_groups

    layers, hidden, mlp = 22, 2048, 5632
    needs, sizes = [], {}
    for i in range(layers):
        for name, k, readers in (("attn", hidden, 3), ("o", hidden, 1), ("mlp", hidden, 2), ("down", mlp, 1)):
            needs += [f"{i}.{name}"] * readers
            sizes[f"{i}.{name}"] = k * k * 4                    # float32
    needs.append("head")
    sizes["head"] = hidden * hidden * 4
    groups = plan_gram_groups(needs, sizes, GRAM_BUDGET_BYTES)
    assert sum(sizes.values()) > 3.6 * 2**30                       # every Gram at once: 3.7 GiB
    assert max(g.peak_bytes for g in groups) <= GRAM_BUDGET_BYTES
    assert sorted(n for g in groups for n in g.names) == sorted(sizes)  # each collected exactly once
    # a pass is a forward over every calibration sample: where memory allows, one pass
    assert len(plan_gram_groups(needs, sizes, GRAM_MIN_BYTES)) == 22 and len(groups) == 1
    assert GRAM_MIN_BYTES <= gram_budget() <= GRAM_BUDGET_BYTES
    # a Gram over the budget is a group of its own
    assert [g.names for g in plan_gram_groups(["a", "b", "b", "c"], {"a": 1, "b": 10, "c": 1}, 4)] == \
        [["a"], ["b"], ["c"]]


@pytest.fixture(scope="module")
def gptq_builds(tiny_llama, tmp_path_factory):
    """int4 + calibration (GPTQ) of the tiny Llama with every Gram at once, one Gram per calibration pass,
    one per pass over a streamed (external-data) calibration session, and one per pass with the model's
    weights left in their external-data file."""
    import lmc.passes.quantize.calibration as calibration
    import lmc.passes.quantize.weight_only as weight_only

    path, calib = tiny_llama
    d = tmp_path_factory.mktemp("gptq")
    external = d / "external" / "llama.onnx"          # its large weights stay in their file (file-backed)
    external.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
              location="llama.data", size_threshold=1024)
    out = {}
    for label, budget, stream in (("at-once", 1 << 40, False), ("grouped", 1, False), ("grouped-streamed", 1, True),
                                  ("grouped-file-backed", 1, False)):
        mp = pytest.MonkeyPatch()
        mp.setattr(weight_only, "GRAM_BUDGET_BYTES", budget)
        if stream:
            mp.setattr(calibration, "STREAM_BYTES", 0)
        source = external if label == "grouped-file-backed" else path
        try:
            result = build(source, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)},
                                                quantize=QuantizeMode.INT4, calib=str(calib), verify=False), d / label)
        finally:
            mp.undo()
        stats = next(r.stats for r in result.records if r.name.startswith("quantize-weights"))
        out[label] = (stats, [(d / label / f).read_bytes() for f in ("model.onnx", "model.weights")])
    return out


def test_gram_groups_give_the_same_bytes_as_all_at_once(gptq_builds):
    at_once, grouped, streamed = gptq_builds["at-once"], gptq_builds["grouped"], gptq_builds["grouped-streamed"]
    assert at_once[0]["calibration_passes"] == 1
    assert grouped[0]["calibration_passes"] > 4 and streamed[0]["calibration_passes"] == grouped[0]["calibration_passes"]
    assert grouped[0]["gram_peak_bytes"] < at_once[0]["gram_peak_bytes"]
    assert grouped[1] == at_once[1] and streamed[1] == at_once[1]
    assert gptq_builds["grouped-file-backed"][1] == at_once[1]


def test_gptq_bytes_do_not_depend_on_the_thread_count(monkeypatch):
    """GPTQ's row slices are fixed (``GPTQ_ROWS``), not one per thread: one thread or four give the same bytes,
    and a slice quantizes as the whole weight does up to float32 rounding (codes one step apart at most)."""
    from lmc.passes.quantize import scales

    rng = np.random.default_rng(11)
    w = rng.standard_normal((300, 256)).astype(np.float32)
    x = rng.standard_normal((512, 256))
    monkeypatch.setattr(scales, "GPTQ_ROWS", 64)
    monkeypatch.setattr(scales, "threads", lambda: 1)
    one = scales.gptq_blocks(w, x.T @ x, 32)
    monkeypatch.setattr(scales, "threads", lambda: 4)
    four = scales.gptq_blocks(w, x.T @ x, 32)
    for a, b in zip(one, four):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(scales, "GPTQ_ROWS", 4096)
    whole = scales.gptq_blocks(w, x.T @ x, 32)
    assert np.abs(whole[0].astype(int) - one[0].astype(int)).max() <= 1
    assert np.mean(whole[0] == one[0]) > 0.99


def test_inverse_upper_factor_is_the_upper_cholesky_factor_of_the_inverse():
    """U upper with a positive diagonal and UᵀU = H⁻¹ (GPTQ's factor), sizes around the recursion's leaf."""
    from lmc.passes.quantize.scales import inverse_upper_factor

    rng = np.random.default_rng(3)
    for k in (7, 256, 257, 600):
        x = rng.standard_normal((2 * k, k)) * rng.uniform(0.1, 3.0, k)
        h = x.T @ x + 0.01 * np.eye(k)
        u = inverse_upper_factor(h)
        assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
        np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-8, atol=1e-10 * np.abs(np.linalg.inv(h)).max())
        f32 = inverse_upper_factor(h.astype(np.float32))
        assert f32.dtype == np.float32
        np.testing.assert_allclose(f32, u, atol=1e-3 * np.abs(u).max())


def test_quantize_pass_keeps_no_state_between_runs():
    """A pass object run twice (the two generation compiles, a --max-ram retry) gives the same result each
    time: calibration's choices (the table's bits, statistics) and the per-weight reports stay in their run."""
    import onnx_graphsurgeon as gs

    from lmc.core.pass_manager import PassContext
    from lmc.passes.quantize.weight_only import QuantizeConfig, QuantizeWeights, WeightBits

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(2)]

    def graph():
        x, y = gs.Variable("x", np.float32, [4, 64]), gs.Variable("y", np.float32, [4, 96])
        return gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, gs.Constant("w", w.copy())], outputs=[y])],
                        inputs=[x], outputs=[y], opset=21)
    config = QuantizeConfig(bits=WeightBits.INT4, block_size=16, calib_feeds=feeds)
    qpass = QuantizeWeights(config)
    first = qpass.run(graph(), PassContext())
    reports = list(qpass.reports)
    second = qpass.run(graph(), PassContext())
    assert config.table_bits is None and not config.stats           # the caller's configuration untouched
    assert qpass.reports == reports and len(reports) == 1             # reports do not pile up across runs
    assert first.stats == second.stats


def _logits(model_path, feed, int8_kept: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if int8_kept:
        opts.add_session_config_entry("session.qdqisint8allowed", "1")
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_w8a8_weights_follow_the_targets_integer_gemm(tiny_llama, tmp_path):
    """x86-64 (AVX2, no VNNI) adds u8 × s8 pairs in int16: its w8a8 GEMM weights take 7 bits, so the
    saturating kernel an x86-64 host runs gives what the exact s8 × s8 one gives, bit for bit. cortex-a55
    (SDOT, exact) keeps 8 bits and ships session.qdqisint8allowed = 1 — on an x86-64 host without it the
    same bundle saturates and computes something else, which is what the entry prevents (on a host with VNNI
    both kernels are exact and agree)."""
    from lmc.core.runtime import Int8Products, bundle_session_options
    from lmc.targets.target import host_isa

    path, calib = tiny_llama
    feed = token_feed(1, 32, vocab=512, seed=7)
    out = {}
    for target in ("x86-64", "cortex-a55"):
        out[target] = tmp_path / target
        build(path, BuildOptions(target=target, input_shapes={"input_ids": (1, 32)}, quantize=QuantizeMode.W8A8,
                                 calib=str(calib)), out[target])
    model = onnx.load(str(out["x86-64"] / "model.onnx"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}

    def dq_of(name):                      # the DequantizeLinear making ``name``, or None
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    gemm_weights = [weights[dq_of(n.input[1]).input[0]] for n in model.graph.node
                    if n.op_type == "MatMul" and dq_of(n.input[0]) is not None and dq_of(n.input[1]) is not None
                    and dq_of(n.input[0]).input[0] in quantized]
    assert len(gemm_weights) >= 4 and all(int(np.abs(w).max()) <= 63 for w in gemm_weights)
    x86 = out["x86-64"] / "model.onnx"
    np.testing.assert_array_equal(_logits(x86, feed, False), _logits(x86, feed, True))
    assert "session.qdqisint8allowed" not in bundle_session_options(x86).get("config_entries", {})

    a55 = out["cortex-a55"] / "model.onnx"
    assert bundle_session_options(a55)["config_entries"]["session.qdqisint8allowed"] == "1"
    model = onnx.load(str(a55), load_external_data=False)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if host_isa().int8_products is Int8Products.SATURATING_PAIRS:
        assert not np.array_equal(_logits(a55, feed, False), _logits(a55, feed, True))
    else:                   # a VNNI host's u8 × s8 kernel is exact too: the entry changes nothing here
        np.testing.assert_array_equal(_logits(a55, feed, False), _logits(a55, feed, True))


def test_an_interrupted_search_drops_the_work_not_started(monkeypatch):
    """Ctrl-C or SIGTERM during a weight's search: the chunks no thread has started are not run, so the
    build stops within a chunk, not after the whole weight."""
    import threading
    import time

    from lmc.passes.quantize import scales

    monkeypatch.setattr(scales, "threads", lambda: 2)
    done, lock = [], threading.Lock()

    def work(task):
        if task == 2:
            raise KeyboardInterrupt
        time.sleep(0.02)
        with lock:
            done.append(task)

    with pytest.raises(KeyboardInterrupt):
        scales._run(range(200), work)
    assert len(done) < 20
