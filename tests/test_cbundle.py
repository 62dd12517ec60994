"""The C bundle (lmc.targets.cbundle): per-op kernels against onnxruntime, the plan obeyed (offsets, in place),
DS-CNN end to end, determinism, unsupported ops, and lmc verify failing on broken bundles.

Every C check compiles with the host C compiler (skipped without one); a module-scoped "op zoo" graph holds
one output per op case, so the kernels are compiled once.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.compiler.backend import plan_memory
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.cbundle_check import compare_c, plan_conformance, verify_cbundle
from lmc.compiler.cli import main
from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.models import build_cnn, build_ds_cnn
from lmc.targets.cbundle.emit import emit_c
from lmc.targets.cbundle.host import HostBuild, find_cc
from lmc.targets.cbundle.registry import UnsupportedOp
from lmc.targets.target import load_target

pytestmark = pytest.mark.skipif(find_cc() is None, reason="no host C compiler (cc, gcc or clang) on PATH")

F = TensorProto.FLOAT
RNG = np.random.default_rng(7)


def _w(name: str, shape, scale: float = 0.5, dtype=np.float32, value=None) -> onnx.TensorProto:
    arr = value if value is not None else (RNG.standard_normal(shape) * scale)
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


def emit_bundle(model: onnx.ModelProto, folder: Path, target: str = "cortex-m55", inplace: bool = False):
    """Plan ``model`` as it is (no passes) for ``target`` and write its C bundle with model.onnx; (plan, CBundle)."""
    graph = ir.to_graph(model)
    shapes.infer_shapes(graph)
    plan = plan_memory(graph, load_target(target), inplace=inplace)
    folder.mkdir(parents=True)
    onnx.save(ir.to_model(graph), str(folder / "model.onnx"))
    (folder / "plan.json").write_text(plan.to_json())
    return plan, emit_c(graph, plan, load_target(target), folder)


# ----------------------------------------------------------------------------------------------- the op zoo
def _zoo() -> tuple[onnx.ModelProto, list[str]]:
    """One graph, one output per case. Inputs: x [1,4,9,8], s [1,3,20], m [2,3,5,7], v [7]."""
    nodes, inits, outs = [], [], []

    def node(op, ins, out, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out + "_node", domain=domain, **attrs))
        return out

    def case(name, op, ins, domain="", **attrs):
        outs.append(name)
        return node(op, ins, name, domain, **attrs)

    inits += [_w("w_conv", [6, 4, 3, 3]), _w("b_conv", [6]), _w("w_dil", [5, 4, 3, 2]), _w("w_dw", [8, 1, 3, 3]),
              _w("b_dw", [8]), _w("w_same", [3, 4, 4, 4]), _w("w_1d", [5, 3, 5]), _w("w_mm", [7, 3]),
              _w("w_mm4", [7, 4]), _w("w_bmm", [3, 7, 4]), _w("w_gemm", [6, 7]), _w("c_gemm", [6]),
              _w("c_col", [5, 1]), _w("bias4", [4, 1, 1]), _w("row8", [8]), _w("clip_lo", [], value=-0.5),
              _w("clip_hi", [], value=0.7), _w("shape_r", [2], dtype=np.int64, value=[4, 72]),
              _w("axes0", [1], dtype=np.int64, value=[0]), _w("q_scale", [], value=0.02),
              _w("q_zero", [], dtype=np.int8, value=3), _w("qc_scale", [4], value=[0.01, 0.02, 0.03, 0.04]),
              _w("qc_zero", [4], dtype=np.int8, value=[0, 1, -2, 5]), _w("u_zero", [], dtype=np.uint8, value=128),
              _w("wq", [7, 3], dtype=np.int8, value=RNG.integers(-127, 128, (7, 3))),
              _w("wq_scale", [3], value=[0.01, 0.005, 0.02])]
    case("conv", "Conv", ["x", "w_conv", "b_conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    case("conv_dilated", "Conv", ["x", "w_dil"], kernel_shape=[3, 2], strides=[2, 1], dilations=[2, 1],
         pads=[1, 0, 2, 1])
    case("conv_depthwise", "Conv", ["x", "w_dw", "b_dw"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         group=4)
    case("conv_same", "Conv", ["x", "w_same"], kernel_shape=[4, 4], strides=[2, 2], auto_pad="SAME_UPPER")
    case("conv_1d", "Conv", ["s", "w_1d"], kernel_shape=[5], strides=[2], pads=[2, 2])
    case("fused_conv_clip", "FusedConv", ["x", "w_conv", "b_conv"], domain="com.microsoft", kernel_shape=[3, 3],
         pads=[1, 1, 1, 1], activation="Clip", activation_params=[-0.5, 0.5])
    case("maxpool", "MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    case("avgpool", "AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    case("avgpool_pad", "AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0],
         count_include_pad=1, ceil_mode=1)         # the last column's window runs past the input
    case("global_avg", "GlobalAveragePool", ["x"])
    case("global_max", "GlobalMaxPool", ["x"])
    case("matmul", "MatMul", ["m", "w_mm4"])
    case("matmul_bcast", "MatMul", [node("Reshape", ["m", _shape(inits, "r_bm", [2, 1, 15, 7])], "bm"), "w_bmm"])
    case("matmul_1d", "MatMul", ["v", "w_mm"])
    case("matmul_act", "MatMul", ["m", node("Transpose", ["m"], "mt", perm=[0, 1, 3, 2])])
    case("gemm", "Gemm", [node("Reshape", ["m", _shape(inits, "r_g", [30, 7])], "g2"), "w_gemm", "c_gemm"],
         transB=1, alpha=0.5, beta=2.0)
    case("gemm_col", "Gemm", [node("Reshape", ["m", _shape(inits, "r_gc", [7, 30])], "gt"), "w_gemm"], transA=1,
         transB=1)
    case("add_bcast", "Add", ["x", "bias4"])
    case("sub_bcast", "Sub", ["row8", "x"])
    case("mul_scalar", "Mul", ["x", "clip_hi"])
    case("div_same", "Div", ["x", node("Add", [node("Abs", ["x"], "ax"), "clip_hi"], "ax1")])
    case("max2", "Max", ["x", "bias4"])
    case("min2", "Min", ["x", "row8"])
    case("pow", "Pow", ["ax1", "clip_hi"])
    case("relu", "Relu", ["x"])
    case("sigmoid", "Sigmoid", ["x"])
    case("tanh", "Tanh", ["x"])
    case("clip", "Clip", ["x", "clip_lo", "clip_hi"])
    case("clip_min", "Clip", ["x", "clip_lo"])
    case("leaky", "LeakyRelu", ["x"], alpha=0.1)
    case("hard_sigmoid", "HardSigmoid", ["x"], alpha=0.3, beta=0.4)
    case("exp", "Exp", ["x"])
    case("sqrt", "Sqrt", ["ax1"])
    case("softmax_c", "Softmax", ["x"], axis=1)
    case("softmax_last", "Softmax", ["x"], axis=-1)
    case("reshape", "Reshape", [node("Relu", ["x"], "rx"), "shape_r"])
    case("flatten", "Flatten", [node("Sigmoid", ["x"], "sx")], axis=2)
    case("unsqueeze", "Unsqueeze", [node("Tanh", ["x"], "tx"), "axes0"])
    case("squeeze", "Squeeze", [node("Exp", ["s"], "es"), "axes0"])
    case("concat_c", "Concat", ["x", "rx", "sx"], axis=1)
    case("concat_w", "Concat", ["x", "tx"], axis=3)
    case("transpose", "Transpose", ["x"], perm=[0, 2, 3, 1])
    inits += [_w("bn_scale", [4]), _w("bn_bias", [4]), _w("bn_mean", [4]), _w("bn_var", [4], value=RNG.random(4) + 0.5)]
    case("batch_norm", "BatchNormalization", ["x", "bn_scale", "bn_bias", "bn_mean", "bn_var"], epsilon=1e-3)
    case("quant_s8", "QuantizeLinear", ["x", "q_scale", "q_zero"])
    case("quant_axis", "QuantizeLinear", ["x", "qc_scale", "qc_zero"], axis=1)
    case("quant_u8", "QuantizeLinear", ["x", "q_scale", "u_zero"])
    case("dequant_axis", "DequantizeLinear", [node("QuantizeLinear", ["x", "qc_scale", "qc_zero"], "qx", axis=1),
                                              "qc_scale", "qc_zero"], axis=1)
    case("matmul_decoded", "MatMul", ["m", node("DequantizeLinear", ["wq", "wq_scale"], "wdq", axis=1)])
    inits += [_w("gq", [6, 7], dtype=np.int8, value=RNG.integers(-127, 128, (6, 7))),
              _w("gq_scale", [6], value=RNG.random(6) * 0.02 + 0.001),
              _w("gq_zero", [6], dtype=np.int8, value=RNG.integers(-5, 5, 6))]
    case("gemm_decoded", "Gemm", ["g2", node("DequantizeLinear", ["gq", "gq_scale", "gq_zero"], "gdq", axis=0),
                                  "c_gemm"], transB=1, alpha=0.5, beta=2.0)
    graph = helper.make_graph(
        nodes, "op-zoo",
        [helper.make_tensor_value_info("x", F, [1, 4, 9, 8]), helper.make_tensor_value_info("s", F, [1, 3, 20]),
         helper.make_tensor_value_info("m", F, [2, 3, 5, 7]), helper.make_tensor_value_info("v", F, [7])],
        [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, outs


def _shape(inits: list, name: str, dims) -> str:
    inits.append(_w(name, [len(dims)], dtype=np.int64, value=dims))
    return name


ZOO_INPUTS = {"x": RNG.standard_normal((1, 4, 9, 8)).astype(np.float32),
              "s": RNG.standard_normal((1, 3, 20)).astype(np.float32),
              "m": RNG.standard_normal((2, 3, 5, 7)).astype(np.float32),
              "v": RNG.standard_normal(7).astype(np.float32)}
ZOO_CASES = _zoo()[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    model, names = _zoo()
    folder = tmp_path_factory.mktemp("zoo") / "bundle"
    ref = ort_run_model(model, ZOO_INPUTS)
    for o in model.graph.output:         # the outputs' types as onnxruntime computes them (FusedConv included)
        arr = ref[o.name]
        o.CopyFrom(helper.make_tensor_value_info(o.name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    plan, bundle = emit_bundle(model, folder)
    with HostBuild(folder) as hb:
        got = dict(zip([s.name for s in hb.outputs], hb.run(ZOO_INPUTS)))
    return ref, got, (folder / "model.c").read_text(), bundle


def ort_run_model(model: onnx.ModelProto, feeds: dict) -> dict:
    """onnxruntime node by node (graph optimisations off: the ONNX semantics, as the C runs the nodes; on,
    it would run DequantizeLinear + MatMul as MatMulNBits with its activations rounded to int8)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("case", ZOO_CASES)
def test_kernel_matches_onnxruntime(zoo, case):
    ref, got, _, _ = zoo
    r, c = ref[case], got[case]
    assert r.shape == c.shape and r.dtype == c.dtype
    if r.dtype.kind in "iu":                # requantized: onnxruntime's rounding (half to even), saturated
        assert np.abs(r.astype(np.int32) - c.astype(np.int32)).max() == 0
    else:
        np.testing.assert_allclose(c, r, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(r).max())))


def test_zoo_counts_macs_and_uses_arena_offsets(zoo):
    _, _, model_c, bundle = zoo
    assert bundle.macs > 0 and "cnn" in bundle.families and "quant" in bundle.families
    assert "static _Alignas(16) uint8_t lmc_arena[LMC_ARENA_BYTES" in model_c
    assert "lmc_matmul_f32_w8(" in model_c          # the decoded weight is read as int8 from flash
    assert "malloc" not in model_c


# ----------------------------------------------------------------------------------------------- plan and aliasing
def _chain_model() -> onnx.ModelProto:
    """x → Conv → Relu → Sigmoid → Add(·, Conv) → Reshape → Softmax → y: elementwise steps and a view that an
    in-place plan puts on their inputs' bytes."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["r"], ["s"], name="sigmoid"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["s", "c2"], ["a"], name="add"),
             helper.make_node("Reshape", ["a", "shape"], ["rs"], name="reshape"),
             helper.make_node("Softmax", ["rs"], ["sm"], name="softmax", axis=-1),
             helper.make_node("Tanh", ["sm"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 4, 64])],
                              [_w("w", [4, 3, 3, 3]), _w("shape", [3], dtype=np.int64, value=[1, 4, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_inplace_plan_is_obeyed_and_correct(tmp_path):
    model = _chain_model()
    plan, _ = emit_bundle(model, tmp_path / "b", inplace=True)
    assert len(plan.inplace) >= 3
    offsets = {t.name: t.offset for t in plan.tensors}
    model_c = (tmp_path / "b" / "model.c").read_text()
    for a, o in plan.inplace:        # each in-place step reads and writes the same arena bytes
        assert offsets[a] == offsets[o]
    assert "(planned in place)" in model_c       # the Reshape over its input is no copy at all
    assert re.search(rf"lmc_activation_f32\(\(\(const float \*\)\(lmc_arena \+ {offsets['c']}\)\), "
                     rf"\(\(float \*\)\(lmc_arena \+ {offsets['c']}\)\)", model_c)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    with HostBuild(tmp_path / "b") as hb:
        (got,) = hb.run([x])
    np.testing.assert_allclose(got, ort_run_model(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_every_intermediate_is_at_its_planned_offset(tmp_path):
    plan, _ = emit_bundle(_chain_model(), tmp_path / "b")
    model_c = (tmp_path / "b" / "model.c").read_text()
    used = {int(v) for v in re.findall(r"lmc_arena \+ (\d+)\)", model_c)}
    assert used == {t.offset for t in plan.tensors}
    assert f"#define LMC_ARENA_BYTES {plan.arena_bytes}u" in (tmp_path / "b" / "model.h").read_text()


# ----------------------------------------------------------------------------------------------- DS-CNN end to end
@pytest.fixture(scope="module")
def ds_cnn_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("ds")
    onnx.save(build_ds_cnn(), str(work / "ds_cnn.onnx"))
    result = build(work / "ds_cnn.onnx", BuildOptions(target="cortex-m55"), work / "out")
    return work, result


def test_ds_cnn_float_bundle_matches_onnxruntime(ds_cnn_bundle):
    work, result = ds_cnn_bundle
    assert result.cbundle is not None and (work / "out" / "model.c").is_file()
    assert (work / "out" / "model.onnx").is_file()
    assert 2_000_000 < result.cbundle.macs < 3_500_000      # MLPerf Tiny's DS-CNN: about 2.7 M MACs
    report_md = (work / "out" / "report.md").read_text()
    assert "## C bundle" in report_md and f"{result.cbundle.macs:,} multiply-accumulates" in report_md
    report = verify_cbundle(work / "out", work / "ds_cnn.onnx", samples=2)
    assert report.passed, report.explain()
    assert all(o.max_rel < 1e-5 for o in report.outputs)


def test_verify_cli_on_c_bundle_passes(ds_cnn_bundle, capsys):
    work, _ = ds_cnn_bundle
    code, out, err = lmc(["verify", str(work / "out"), "--against", str(work / "ds_cnn.onnx")], capsys)
    assert code == 0, err
    assert "[C vs model.onnx]" in out and "PASS" in out


def lmc(args, capsys) -> tuple[int, str, str]:
    """Run the command line as a user does: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _broken_copy(work: Path, name: str) -> Path:
    broken = work / name
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(work / "out", broken)
    return broken


def test_verify_fails_on_a_wrong_offset(ds_cnn_bundle, capsys):
    work, result = ds_cnn_bundle
    broken = _broken_copy(work, "wrong-offset")
    model_c = (broken / "model.c").read_text()
    step = model_c.index("/* step 0:")
    call = model_c[step:model_c.index("/* step 1:")]
    out_offset = re.findall(r"\(\(float \*\)\(lmc_arena \+ (\d+)\)\)", call)[0]
    wrong = call.replace(f"((float *)(lmc_arena + {out_offset}))", f"((float *)(lmc_arena + {int(out_offset) + 16}))")
    (broken / "model.c").write_text(model_c.replace(call, wrong))
    code, out, err = lmc(["verify", str(broken), "--against", str(work / "ds_cnn.onnx")], capsys)
    assert code == 3 and "FAIL" in out and "C vs model.onnx" in err
    assert f"lmc_arena + {int(out_offset) + 16}, where plan.json places no tensor" in err


def test_verify_fails_on_an_arena_other_than_the_plans(ds_cnn_bundle):
    work, result = ds_cnn_bundle
    broken = _broken_copy(work, "wrong-arena")
    header = (broken / "model.h").read_text()
    (broken / "model.h").write_text(header.replace(f"LMC_ARENA_BYTES {result.plan.arena_bytes}u",
                                                   f"LMC_ARENA_BYTES {result.plan.arena_bytes + 4096}u"))
    assert plan_conformance(broken) == [f"model.h LMC_ARENA_BYTES {result.plan.arena_bytes + 4096} != plan "
                                        f"arena_bytes {result.plan.arena_bytes}"]
    assert plan_conformance(work / "out") == []


def test_verify_fails_on_a_flipped_weight(ds_cnn_bundle):
    work, _ = ds_cnn_bundle
    broken = _broken_copy(work, "flipped-weight")
    weights_c = (broken / "weights.c").read_text()
    m = re.search(r"lmc_w_stem_weight\w*\[\d+\] = \{\n    (-?[0-9.e+-]+f)", weights_c)
    assert m, "the stem's weights are in weights.c"
    value = float(m.group(1)[:-1])
    flipped = weights_c[:m.start(1)] + f"{-value + 0.5:.9g}f" + weights_c[m.end(1):]
    (broken / "weights.c").write_text(flipped)
    report = verify_cbundle(broken, work / "ds_cnn.onnx")
    assert not report.passed
    assert any("[C vs model.onnx]" in o.name for o in report.failures)


def test_same_model_and_flags_give_byte_identical_c(ds_cnn_bundle, tmp_path):
    work, _ = ds_cnn_bundle
    build(work / "ds_cnn.onnx", BuildOptions(target="cortex-m55", verify=False), tmp_path / "again")
    for name in sorted(p.name for p in (work / "out").iterdir()):
        if name.endswith((".c", ".h", ".txt", ".json")):
            assert (tmp_path / "again" / name).read_bytes() == (work / "out" / name).read_bytes(), name


def test_emit_option_and_default_follow_the_target(ds_cnn_bundle, tmp_path):
    work, _ = ds_cnn_bundle
    onnx_only = build(work / "ds_cnn.onnx", BuildOptions(target="cortex-m55", emit="onnx", verify=False),
                      tmp_path / "onnx")
    assert onnx_only.cbundle is None and not (tmp_path / "onnx" / "model.c").exists()
    host = build(work / "ds_cnn.onnx", BuildOptions(target="x86-64", verify=False), tmp_path / "x86")
    assert host.cbundle is None                                   # weights mmap'd: ONNX by default
    host_c = build(work / "ds_cnn.onnx", BuildOptions(target="x86-64", emit="c", verify=False), tmp_path / "x86c")
    assert host_c.cbundle is not None and "lmc_conv2d_f32(" in (tmp_path / "x86c" / "model.c").read_text()
    with pytest.raises(LmcError, match="--emit"):
        BuildOptions(emit="elf")


# ----------------------------------------------------------------------------------------------- errors
def test_unsupported_op_is_a_clear_error_and_leaves_nothing(tmp_path, capsys):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Hardmax", ["r"], ["values"], name="the_hardmax", axis=-1)]   # no C kernel
    graph = helper.make_graph(nodes, "hardmax", [helper.make_tensor_value_info("x", F, [1, 16])],
                              [helper.make_tensor_value_info("values", F, [1, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    with pytest.raises(UnsupportedOp, match=r"node 'the_hardmax' \(Hardmax\)"):
        emit_bundle(model, tmp_path / "direct")
    onnx.save(model, str(tmp_path / "hardmax.onnx"))
    code, _, err = lmc(["build", str(tmp_path / "hardmax.onnx"), "--target", "cortex-m55", "--emit", "c",
                        "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "node 'the_hardmax' (Hardmax)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # not asked for (the target's default): the ONNX bundle is written and says why there is no C
    result = build(tmp_path / "hardmax.onnx", BuildOptions(target="cortex-m55"), tmp_path / "default")
    assert result.cbundle is None and "node 'the_hardmax' (Hardmax)" in result.cbundle_skipped
    assert (tmp_path / "default" / "model.onnx").is_file() and not (tmp_path / "default" / "model.c").exists()
    assert "Not written: node 'the_hardmax' (Hardmax)" in (tmp_path / "default" / "report.md").read_text()


def test_runner_refuses_a_short_input(tmp_path):
    emit_bundle(_chain_model(), tmp_path / "b")
    with HostBuild(tmp_path / "b") as hb:
        hb.inputs[0] = type(hb.inputs[0])(hb.inputs[0].name, hb.inputs[0].dtype, (1, 3, 8, 7))
        with pytest.raises(LmcError, match="status 2"):
            hb.run([np.zeros((1, 3, 8, 7), np.float32)])


# ----------------------------------------------------------------------------------------------- int8 (w8a8)
DS_CNN_FIXTURE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "mcu" / "ds_cnn.onnx"


@pytest.fixture(scope="module")
def ds_cnn_int8(tmp_path_factory):
    work = tmp_path_factory.mktemp("ds8")
    np.savez(work / "calib.npz", input=RNG.standard_normal((16, 1, 1, 49, 10)).astype(np.float32))
    float_result = build(DS_CNN_FIXTURE, BuildOptions(target="cortex-m55", verify=False), work / "f32")
    int8_result = build(DS_CNN_FIXTURE, BuildOptions(target="cortex-m55", quantize="w8a8", calib=str(work / "calib.npz")),
                        work / "int8")
    return work, float_result, int8_result


def test_ds_cnn_int8_is_bit_exact_with_onnxruntime_and_a_quarter_of_the_arena(ds_cnn_int8):
    work, f32, int8 = ds_cnn_int8
    model_c = (work / "int8" / "model.c").read_text()
    assert model_c.count("lmc_qlinear_conv_s8(") == 9 and "lmc_conv2d_f32" not in model_c
    graph = onnx.load(str(work / "int8" / "model.onnx")).graph
    intermediates = {o for n in graph.node for o in n.output} - {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(
        onnx.load(str(work / "int8" / "model.onnx"))).graph.value_info}
    assert all(types.get(name) == TensorProto.INT8 for name in intermediates)      # activations int8 in the arena
    assert int8.plan.arena_bytes * 3 <= f32.plan.arena_bytes
    assert int8.cbundle.weight_bytes * 3 < f32.cbundle.weight_bytes
    report = verify_cbundle(work / "int8", DS_CNN_FIXTURE, samples=4, tolerance=0.05)
    assert report.passed, report.explain()
    c_rows = [o for o in report.outputs if o.name.endswith("[C vs model.onnx]")]
    assert c_rows and all(o.max_abs == 0.0 for o in c_rows)                     # bit for bit
    assert all(o.cosine > 0.999 for o in report.outputs)


def test_verify_fails_on_a_flipped_int8_weight(ds_cnn_int8):
    work, _, _ = ds_cnn_int8
    broken = work / "int8-flipped"
    shutil.copytree(work / "int8", broken)
    weights_c = (broken / "weights.c").read_text()
    m = re.search(r"const int8_t lmc_w_\w+\[\d+\] = \{\n    (-?\d+)", weights_c)
    value = int(m.group(1))
    (broken / "weights.c").write_text(weights_c[:m.start(1)] + str(-value if value else 77) + weights_c[m.end(1):])
    report = verify_cbundle(broken, DS_CNN_FIXTURE, tolerance=0.05)
    assert not report.passed and all("[C vs model.onnx]" in o.name for o in report.failures)


def test_an_output_no_node_computes_is_copied(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    graph = helper.make_graph(nodes, "passthrough", [helper.make_tensor_value_info("x", F, [2, 3])],
                              [helper.make_tensor_value_info("r", F, [2, 3]), helper.make_tensor_value_info("x", F, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    emit_bundle(model, tmp_path / "b")
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    with HostBuild(tmp_path / "b") as hb:
        r, same = hb.run([x])
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(r, np.maximum(x, 0))


def _qdq_conv_model() -> onnx.ModelProto:
    """x → QuantizeLinear → QLinearConv → DequantizeLinear → y: a float output one quantum (0.05) wide."""
    w = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="conv",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dq")]
    inits = [_w("xs", [], value=0.02), _w("xz", [], dtype=np.int8, value=0), _w("w", [4, 3, 3, 3], dtype=np.int8, value=w),
             _w("ws", [4], value=[0.01, 0.02, 0.015, 0.005]), _w("wz", [4], dtype=np.int8, value=[0, 0, 0, 0]),
             _w("ys", [], value=0.05), _w("yz", [], dtype=np.int8, value=-3)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_quantized_outputs_are_held_to_one_quantum(tmp_path):
    emit_bundle(_qdq_conv_model(), tmp_path / "b")
    feeds = [{"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}]
    with HostBuild(tmp_path / "b") as hb:
        (exact,) = compare_c(tmp_path / "b", feeds, hb)
    assert exact.max_abs == 0.0 and exact.allowed > exact.max_rel
    model_c = (tmp_path / "b" / "model.c").read_text()
    for shift, passes in ((1, True), (3, False)):       # the output's zero point moved: every value off by shift quanta
        broken = tmp_path / f"shift{shift}"
        shutil.copytree(tmp_path / "b", broken)
        (broken / "model.c").write_text(re.sub(r"\}, 0, -3\};", f"}}, 0, {-3 + shift}}};", model_c))
        assert (broken / "model.c").read_text() != model_c
        with HostBuild(broken) as hb:
            (err,) = compare_c(broken, feeds, hb)
        assert err.max_abs > 0 and (err.max_rel <= err.allowed) is passes, (shift, err)


def test_small_cnn_int8_with_residual_concat_and_pools_matches_onnxruntime(tmp_path):
    """QLinearAdd (residual + ReLU), int8 Concat with one shared code, int8 MaxPool, QLinearGlobalAveragePool."""
    onnx.save(build_cnn(), str(tmp_path / "cnn.onnx"))
    np.savez(tmp_path / "calib.npz", image=RNG.standard_normal((8, 1, 3, 32, 32)).astype(np.float32))
    result = build(tmp_path / "cnn.onnx", BuildOptions(target="cortex-m7", input_shapes={"image": (1, 3, 32, 32)},
                                                       quantize="w8a8", calib=str(tmp_path / "calib.npz"), verify=False),
                   tmp_path / "out")
    model_c = (tmp_path / "out" / "model.c").read_text()
    for kernel in ("lmc_qlinear_add_s8(", "lmc_maxpool2d_s8(", "lmc_qglobal_avgpool_s8(", "lmc_copy_blocks("):
        assert kernel in model_c, kernel
    assert result.plan.arena_bytes * 3 <= 393216           # the float32 build's arena (32 x 32 x 32 floats x 3)
    report = verify_cbundle(tmp_path / "out", tmp_path / "cnn.onnx", samples=2, tolerance=0.05)
    assert report.passed, report.explain()
    assert all(o.max_abs == 0.0 for o in report.outputs if o.name.endswith("[C vs model.onnx]"))


def test_a_bundle_of_quantization_ops_only_compiles_and_rounds_half_to_even(tmp_path):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "qdq-only", [helper.make_tensor_value_info("x", F, [6])],
                              [helper.make_tensor_value_info("y", F, [6])],
                              [_w("s", [], value=0.5), _w("z", [], dtype=np.int8, value=0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    emit_bundle(model, tmp_path / "b")          # the quant family's header needs the cnn family's: both copied
    x = np.array([0.25, 0.75, -0.25, -1.25, 63.9, -70.0], np.float32)      # ties at x / s = ±0.5, ±1.5, ±2.5
    with HostBuild(tmp_path / "b") as hb:
        (y,) = hb.run([x])
    np.testing.assert_array_equal(y, ort_run_model(model, {"x": x})["y"])
    np.testing.assert_array_equal(y, [0.0, 1.0, -0.0, -1.0, 63.5, -64.0])
