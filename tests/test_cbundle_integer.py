"""The C bundle's integer transformer kernels against onnxruntime, bit for bit: QLinearMul over every pair of
int8 codes, QLinearSigmoid over every code (its table is onnxruntime's), the integer SwiGLU the
quantize-integer-matmuls pass writes (QLinearMatMul, Split, QLinearSigmoid, QLinearMul, MatMulIntegerToFloat),
and the float steps between them as onnxruntime rounds them on the host: the RMS norm's (Pow 2, ReduceMean in
its order), the rotary's Cos/Sin (its own approximations), the attention's MatMul (fused multiply-adds) and
Softmax (MLAS's exp and lane sums), Sigmoid (MLAS's logistic); each beside the plain formula, which differs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.compiler.backend import plan_memory
from lmc.core import ir, shapes
from lmc.targets.cbundle.emit import emit_c
from lmc.targets.target import host_isa
from lmc.targets.cbundle.host import HostBuild, find_cc
from lmc.targets.target import load_target
from tests.passes.test_integer_matmul import integer_swiglu

pytestmark = pytest.mark.skipif(find_cc() is None, reason="no host C compiler (cc, gcc or clang) on PATH")
I8 = TensorProto.INT8


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def c_and_onnxruntime(model: onnx.ModelProto, folder: Path, feeds: list[dict]) -> list[tuple[list, list]]:
    graph = ir.to_graph(model)
    shapes.infer_shapes(graph)
    target = load_target("cortex-m7")
    plan = plan_memory(graph, target)
    folder.mkdir(parents=True)
    onnx.save(ir.to_model(graph), str(folder / "model.onnx"))
    emit_c(graph, plan, target, folder)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    with HostBuild(folder) as build:
        return [(build.run(feed), session.run(None, feed)) for feed in feeds]


def _ms(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_qlinear_mul_and_sigmoid_every_code(tmp_path):
    codes = [_c(k, v) for k, v in dict(sa=np.float32(0.0371), za=np.int8(5), sb=np.float32(0.0113), zb=np.int8(-7),
                                        sy=np.float32(0.0291), zy=np.int8(3), ss=np.float32(0.0041),
                                        zs=np.int8(-128)).items()]
    n = 256 * 256
    model = _ms([helper.make_node("QLinearMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"],
                                  domain="com.microsoft"),
                 helper.make_node("QLinearSigmoid", ["s", "sa", "za", "ss", "zs"], ["z"], domain="com.microsoft")],
                [helper.make_tensor_value_info("a", I8, [n]), helper.make_tensor_value_info("b", I8, [n]),
                 helper.make_tensor_value_info("s", I8, [256])],
                [helper.make_tensor_value_info("y", I8, [n]), helper.make_tensor_value_info("z", I8, [256])], codes)
    feed = {"a": np.repeat(np.arange(-128, 128), 256).astype(np.int8),
            "b": np.tile(np.arange(-128, 128), 256).astype(np.int8), "s": np.arange(-128, 128).astype(np.int8)}
    [(c, r)] = c_and_onnxruntime(model, tmp_path / "b", [feed])
    assert np.array_equal(c[0], r[0]) and np.array_equal(c[1], r[1])
    assert len(np.unique(r[1])) > 100              # the sigmoid table is not degenerate


def test_integer_swiglu_bit_exact(tmp_path):
    graph, _ = integer_swiglu()
    rng = np.random.default_rng(4)
    feeds = [{"x": (rng.standard_normal((1, 4, 16)) * 1.5).astype(np.float32)} for _ in range(6)]
    for c, r in c_and_onnxruntime(ir.to_model(graph), tmp_path / "b", feeds):
        assert np.array_equal(c[0], r[0])


def test_rms_norm_steps_bit_exact(tmp_path):
    """x², its mean over 64 (onnxruntime's summation order; a plain left-to-right sum differs on ~15% of rows)."""
    model = _ms([helper.make_node("Pow", ["x", "two"], ["p"]),
                 helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                [helper.make_tensor_value_info("p", TensorProto.FLOAT, [64, 64]),
                 helper.make_tensor_value_info("m", TensorProto.FLOAT, [64, 1])],
                [_c("two", np.float32(2.0)), _c("axes", np.array([-1], np.int64))])
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((64, 64)).astype(np.float32)} for _ in range(4)]
    results = c_and_onnxruntime(model, tmp_path / "b", feeds)
    for c, r in results:
        assert np.array_equal(c[0], r[0]) and np.array_equal(c[1], r[1])
    plain = [np.float32(sum(np.float32(v) for v in row)) for row in results[0][1][0]]   # left to right, float32
    sequential = np.array([np.float32(s / np.float32(64)) for s in plain], np.float32)
    assert not np.array_equal(sequential, results[0][1][1][:, 0])


LLAMA = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "mcu" / "llama260k-past-optimum.onnx"


def _llama_shapes() -> dict:
    shapes_ = {"input_ids": (1, 16), "attention_mask": (1, 16), "position_ids": (1, 16)}
    shapes_.update({f"past_key_values.{i}.{k}": (1, 4, 0, 8) for i in range(5) for k in ("key", "value")})
    return shapes_


def test_llama_w8a8_full_int8_in_c(tmp_path):
    """The 260K Llama one-shot, --quantize w8a8 --calib for cortex-m7: integer products in model.onnx, int8
    between them, an arena well under float's, and the C equal to onnxruntime bit for bit (logits and every
    present.*)."""
    from lmc.compiler.build import BuildOptions, build    # (the C-only tests above need no build)

    rng = np.random.default_rng(0)
    calib = {"input_ids": rng.integers(0, 256, (4, 1, 16)).astype(np.int64),
             "attention_mask": np.ones((4, 1, 16), np.int64),
             "position_ids": np.tile(np.arange(16, dtype=np.int64), (4, 1, 1))}
    calib.update({k: np.zeros((4, *v), np.float32) for k, v in _llama_shapes().items() if k.startswith("past")})
    np.savez(tmp_path / "calib.npz", **calib)
    float_plan = build(LLAMA, BuildOptions(target="cortex-m7", input_shapes=_llama_shapes(), verify=False),
                       tmp_path / "f32").plan
    result = build(LLAMA, BuildOptions(target="cortex-m7", input_shapes=_llama_shapes(), quantize="w8a8",
                                       calib=str(tmp_path / "calib.npz"), verify=False), tmp_path / "i8")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "i8" / "model.onnx")).graph.node]
    assert ops.count("QLinearMatMul") == 10 and ops.count("MatMulIntegerToFloat") == 10
    assert "QLinearSigmoid" in ops and "QLinearMul" in ops
    assert result.plan.arena_bytes < 0.6 * float_plan.arena_bytes
    feed = {k: v[0] for k, v in calib.items()}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "i8" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    with HostBuild(tmp_path / "i8") as host:
        got = dict(zip([s.name for s in host.outputs], host.run(feed)))
    for name, ref in zip(names, session.run(None, feed)):
        assert np.array_equal(got[name], ref), name


def test_attention_float_steps_bit_exact(tmp_path):
    """Cos/Sin of rotary angles, a score MatMul and its Softmax, Sigmoid: the C equals onnxruntime bit for bit,
    where libm's cos, a multiply-then-add sum, an expf-based softmax and 1 / (1 + e^-x) each differ from it."""
    n = 4096
    model = _ms([helper.make_node("Cos", ["t"], ["c"]), helper.make_node("Sin", ["t"], ["s"]),
                 helper.make_node("MatMul", ["q", "k"], ["sc"]), helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
                 helper.make_node("Sigmoid", ["t"], ["g"])],
                [helper.make_tensor_value_info("t", TensorProto.FLOAT, [n]),
                 helper.make_tensor_value_info("q", TensorProto.FLOAT, [8, 16, 8]),
                 helper.make_tensor_value_info("k", TensorProto.FLOAT, [8, 8, 21])],
                [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("c", "s", "sc", "p", "g")], [])
    rng = np.random.default_rng(8)
    feed = {"t": np.concatenate([rng.random(n // 2) * 40 - 20, np.outer(np.arange(64), 0.1 ** np.arange(32) * 3).ravel()[:n // 2]]).astype(np.float32),
            "q": rng.standard_normal((8, 16, 8)).astype(np.float32) * 2, "k": rng.standard_normal((8, 8, 21)).astype(np.float32)}
    [(c, r)] = c_and_onnxruntime(model, tmp_path / "b", [feed])
    for name, got, ref in zip(("c", "s", "sc", "p", "g"), c, r):
        if name == "p" and "avx512f" in host_isa().features:
            # the kernels follow AVX2/FMA3 MLAS, whose softmax sums exp in 8 lanes; AVX-512 MLAS sums in 16,
            # so the sum — and the quotient — may differ by an ulp
            np.testing.assert_allclose(got, ref, rtol=2.5e-7, atol=0)
        else:
            assert np.array_equal(got, ref), name
    assert not np.array_equal(np.cos(feed["t"]), r[0])                      # libm's cos is not onnxruntime's
    plain = np.zeros_like(r[2])
    for t in range(8):
        plain = (plain + feed["q"][:, :, t:t + 1] * feed["k"][:, t:t + 1, :]).astype(np.float32)
    assert not np.array_equal(plain, r[2])                                  # multiply then add: another rounding
    e = np.exp(r[2] - r[2].max(-1, keepdims=True))
    assert not np.array_equal((e / e.sum(-1, keepdims=True)).astype(np.float32), r[3])
    assert not np.array_equal((1 / (1 + np.exp(-feed["t"]))).astype(np.float32), r[4])
