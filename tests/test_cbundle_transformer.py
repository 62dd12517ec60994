"""The C bundle's transformer kernels (family "transformer") against onnxruntime, their run-time checks failing
on bad data, and the 260K-parameter Llama fixture as a one-shot C bundle and as C greedy generation.

One "zoo" graph (opset 24) holds one output per op case, so its kernels compile once. Everything compiles
with the host C compiler (skipped without one); the board run needs arm-none-eabi-gcc and qemu-system-arm.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lmc

from lmc.compiler.backend import plan_memory
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.drivers import PastDecoder, greedy
from lmc.compiler.cli import main
from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.metadata import GenerationInfo
from lmc.targets.cbundle import board as boards
from lmc.targets.cbundle.emit import emit_c
from lmc.targets.cbundle.generation import GenerationRunError, HostGenerator, generate_board, generate_host, step_io
from lmc.targets.cbundle.host import HostBuild, HostRunError, find_cc
from lmc.targets.target import load_target

pytestmark = pytest.mark.skipif(find_cc() is None, reason="no host C compiler (cc, gcc or clang) on PATH")

FIXTURE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "mcu" / "llama260k-past-optimum.onnx"
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 5, 4, 8, 256
F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
RNG = np.random.default_rng(11)
OPSET = 24


def _c(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def emit_bundle(model: onnx.ModelProto, folder: Path, target: str = "cortex-m7"):
    """Plan ``model`` as it is (no passes) and write its C bundle beside its model.onnx."""
    graph = ir.to_graph(model)
    shapes.infer_shapes(graph)
    plan = plan_memory(graph, load_target(target))
    folder.mkdir(parents=True)
    onnx.save(ir.to_model(graph), str(folder / "model.onnx"))
    return emit_c(graph, plan, load_target(target), folder)


# ----------------------------------------------------------------------------------------------- the zoo
ZOO_INPUTS = {
    "ids": ([2, 5], I64), "x": ([2, 3, 5, 8], F), "q": ([1, 4, 3, 8], F), "k": ([1, 2, 6, 8], F),
    "v": ([1, 2, 6, 4], F), "mask": ([1, 1, 3, 6], B), "fmask": ([3, 6], F), "nonpad": ([1], I64),
    "cache": ([1, 2, 6, 8], F), "upd": ([1, 2, 2, 8], F), "widx": ([1], I64), "pos": ([1, 4], I64),
    "am": ([1, 6], I64),
}


def _zoo() -> tuple[onnx.ModelProto, list[str]]:
    nodes, outs = [], []
    inits = [_c("table", RNG.standard_normal((16, 8))), _c("table_t", RNG.standard_normal((8, 16))),
             _c("idx_neg", [-1, 0], np.int64), _c("i0", 0, np.int64), _c("i1", 1, np.int64),
             _c("one1", [1], np.int64), _c("zero_f", 0.0), _c("half", 0.5), _c("three", 3, np.int64),
             _c("sl_starts", [1, -6], np.int64), _c("sl_ends", [4, 100], np.int64), _c("sl_axes", [2, 3], np.int64),
             _c("rev_s", [-1], np.int64), _c("rev_e", [-100], np.int64), _c("rev_a", [3], np.int64),
             _c("rev_st", [-2], np.int64), _c("big", [1 << 40], np.int64), _c("col", RNG.standard_normal((3, 1))),
             _c("shape_e", [2, 3, 4], np.int64), _c("split_35", [3, 5], np.int64), _c("last", [-1], np.int64),
             _c("ax12", [1, 2], np.int64), _c("ax3", [3], np.int64), _c("slots", np.arange(6), np.int64),
             _c("ax2", [2], np.int64), _c("three_v", [3, 3, 9, 3], np.int64),
             _c("nd_idx", [[0, 1, 5], [0, 0, -6]], np.int64), _c("upd_rows", RNG.standard_normal((2, 8))),
             _c("ln_scale", RNG.standard_normal(8)), _c("ln_bias", RNG.standard_normal(8)),
             _c("ln2_scale", RNG.standard_normal((5, 8))), _c("w", RNG.standard_normal((8, 6))),
             _c("w3", RNG.standard_normal((3, 8, 6))), _c("reps", [2, 1, 3, 1], np.int64),
             _c("ge_idx", RNG.integers(-5, 5, (2, 3, 4, 8)), np.int64), _c("k3", [3], np.int64),
             _c("gnd_idx", [[[1, 2], [0, 0]], [[-1, 1], [1, -3]]], np.int64), _c("ax2_scalar", 2, np.int64),
             _c("nd_idx_dup", [[0, 1, 5], [0, 1, 5], [0, 0, 2]], np.int64),
             _c("upd_rows2", RNG.standard_normal((3, 8))), _c("depth12", 12, np.int64),
             _c("onoff", [0.5, -1.0]),
             _c("ties", [[1.0, 2.0, 2.0, 0.5, 2.0], [3.0, 3.0, 1.0, 1.0, 0.0]])]

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out] if isinstance(out, str) else out, name=f"{op}_{len(nodes)}",
                                      **attrs))
        return out

    def case(name, op, ins, **attrs):
        outs.append(name)
        return node(op, ins, name, **attrs)

    case("gather_rows", "Gather", ["table", "ids"])
    case("gather_cols", "Gather", ["table_t", "ids"], axis=1)
    case("gather_negative", "Gather", ["x", "idx_neg"], axis=2)
    case("gather_scalar", "Gather", ["pos", "i0"], axis=1)
    case("slice_const", "Slice", ["x", "sl_starts", "sl_ends", "sl_axes"])
    case("slice_reversed", "Slice", ["x", "rev_s", "rev_e", "rev_a", "rev_st"])
    length = node("Shape", ["pos"], "pos_len", start=1, end=2)
    case("slice_runtime", "Slice", ["am", node("Neg", [length], "neg_len"), "big", "one1"])
    case("expand", "Expand", ["col", "shape_e"])
    outs.extend(["split_a", "split_b"])
    node("Split", ["x", "split_35"], ["split_a", "split_b"], axis=-1)
    positive = node("Greater", ["x", "zero_f"], "positive")
    case("where", "Where", [positive, "x", "half"])
    case("isnan", "IsNaN", [node("Sqrt", ["x"], "sqrt_x")])
    small = node("Less", ["x", "half"], "small")
    case("and", "And", [positive, small])
    case("or", "Or", [positive, small])
    case("xor", "Xor", [positive, small])
    case("not", "Not", [positive])
    case("less_equal_i64", "LessOrEqual", ["slots", node("Unsqueeze", ["pos", "ax2"], "pos_col")])
    case("equal_i64", "Equal", ["ids", "three"])
    case("cast_i64_f32", "Cast", ["ids"], to=F)
    case("cast_f32_i64", "Cast", ["x"], to=I64)
    case("cast_bool_f32", "Cast", [positive], to=F)
    case("cast_i64_bool", "Cast", ["am"], to=B)
    case("sin", "Sin", ["x"])
    case("cos", "Cos", ["x"])
    case("reduce_mean", "ReduceMean", ["x", "last"])
    case("reduce_sum", "ReduceSum", ["x", "ax12"], keepdims=0)
    case("reduce_max", "ReduceMax", ["x", "ax3"])
    case("reduce_sum_i64", "ReduceSum", ["am", "one1"])
    count = node("Gather", [node("Shape", ["ids"], "ids_shape"), "i1"], "ids_len")
    case("range", "Range", ["i0", count, "i1"])
    case("add_i64", "Add", ["pos", node("Sub", ["reduce_sum_i64_2", "i1"], "past")])
    node("ReduceSum", ["am", "one1"], "reduce_sum_i64_2")
    case("neg_i64", "Neg", ["pos"])
    case("mul_i64", "Mul", ["pos", "pos"])
    case("matmul_broadcast", "MatMul", ["x", "w3"])
    case("attention_bool", "Attention", ["q", "k", "v", "mask", "", "", "nonpad"], scale=0.3)
    case("attention_float", "Attention", ["q", "k", "v", "fmask"])
    case("attention_causal", "Attention", ["q", "k", "v"], is_causal=1)
    case("layer_norm", "LayerNormalization", ["x", "ln_scale", "ln_bias"], epsilon=1e-5)
    case("layer_norm_2d", "LayerNormalization", ["x", "ln2_scale"], axis=2)
    case("gather_elements", "GatherElements", ["x", "ge_idx"], axis=2)
    case("gather_nd", "GatherND", ["x", "gnd_idx"])
    case("onehot", "OneHot", ["ids", "depth12", "onoff"], axis=1)
    case("scatter_nd_add", "ScatterND", ["cache", "nd_idx_dup", "upd_rows2"], reduction="add")
    case("scatter_elements", "ScatterElements", ["x", "ge_idx", "gather_elements"], axis=2)
    outs.extend(["topk_values", "topk_indices"])
    node("TopK", ["x", "k3"], ["topk_values", "topk_indices"], axis=-1)
    outs.extend(["bottomk_values", "bottomk_indices"])
    node("TopK", ["ties", "k3"], ["bottomk_values", "bottomk_indices"], axis=1, largest=0)
    case("argmax", "ArgMax", ["x"], axis=3, keepdims=0)
    case("argmax_last", "ArgMax", ["ties"], axis=1, select_last_index=1)
    case("cumsum", "CumSum", ["x", "ax2_scalar"])
    case("cumsum_rev_excl_i64", "CumSum", ["am", "i1"], exclusive=1, reverse=1)
    case("tile", "Tile", ["v", "reps"])
    case("fill_f32", "ConstantOfShape", ["shape_e"], value=numpy_helper.from_array(np.array([-2.5], np.float32)))
    case("fill_i64", "ConstantOfShape", ["shape_e"], value=numpy_helper.from_array(np.array([7], np.int64)))
    case("mod_i64", "Mod", [node("Sub", ["pos", "three_v"], "pos_shifted"), "three"])
    case("mod_f32", "Mod", ["x", "half"], fmod=1)
    case("scatter_nd", "ScatterND", ["cache", "nd_idx", "upd_rows"])
    case("scatter_linear", "TensorScatter", ["cache", "upd", "widx"], axis=2)
    case("scatter_circular", "TensorScatter", ["cache", "upd", "nonpad"], axis=2, mode="circular")
    inputs = [helper.make_tensor_value_info(n, t, s) for n, (s, t) in ZOO_INPUTS.items()]
    outputs = [helper.make_tensor_value_info(o, 0, None) for o in outs]
    graph = helper.make_graph(_toposort(nodes), "zoo", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model = onnx.shape_inference.infer_shapes(model)
    known = {"slice_runtime": (I64, [1, 4]), "range": (I64, [5])}      # shapes that depend on values
    inferred = {v.name: v for v in model.graph.value_info}
    for o in model.graph.output:
        if o.name in known:
            o.type.CopyFrom(helper.make_tensor_type_proto(*known[o.name]))
        elif o.name in inferred:
            o.type.CopyFrom(inferred[o.name].type)
    return model, outs


def _toposort(nodes):
    ready, done, order = set(ZOO_INPUTS) | {""}, set(), []
    produced = {o for n in nodes for o in n.output}
    pending = list(nodes)
    while pending:
        for n in list(pending):
            if all(i in ready or i not in produced for i in n.input):
                order.append(n)
                ready.update(n.output)
                pending.remove(n)
    return order


def _zoo_feeds() -> dict[str, np.ndarray]:
    feeds = {}
    for name, (shape, t) in ZOO_INPUTS.items():
        if t == F:
            feeds[name] = RNG.standard_normal(shape).astype(np.float32)
        elif t == B:
            feeds[name] = RNG.random(shape) < 0.7
        else:
            feeds[name] = RNG.integers(0, 16, shape).astype(np.int64)
    feeds["x"] *= 4.0                                  # casts to int64 see values beyond ±1
    feeds["mask"][..., 0] = True                       # every row sees a key
    feeds["nonpad"] = np.array([5], np.int64)
    feeds["widx"] = np.array([3], np.int64)
    feeds["pos"] = np.array([[2, 3, 4, 5]], np.int64)
    feeds["am"] = np.array([[0, 1, 1, 1, 1, 1]], np.int64)
    return feeds


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    model, outs = _zoo()
    folder = tmp_path_factory.mktemp("zoo") / "bundle"
    emit_bundle(model, folder)
    feeds = _zoo_feeds()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    with HostBuild(folder) as host:
        got = dict(zip([o.name for o in sess.get_outputs()], host.run(feeds)))
    return reference, got


CASES = _zoo()[1]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_onnxruntime(zoo, case):
    reference, got = zoo
    r, c = reference[case], got[case]
    assert r.shape == c.shape and r.dtype == c.dtype, (r.shape, c.shape, r.dtype, c.dtype)
    if r.dtype.kind == "f":
        scale = float(np.abs(r).max()) or 1.0
        assert float(np.abs(r - c).max()) / scale <= 1e-5, case
    else:
        np.testing.assert_array_equal(r, c)


# ----------------------------------------------------------------------------------------------- run-time checks
def test_gather_refuses_ids_outside_the_table(tmp_path):
    table = _c("table", RNG.standard_normal((16, 4)))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="g"),
             helper.make_node("Identity", ["rows"], ["y"], name="i")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", I64, [3])],
                              [helper.make_tensor_value_info("y", F, [3, 4])], [table])
    emit_bundle(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "b")
    with HostBuild(tmp_path / "b") as host:
        got = host.run([np.array([15, -16, 0], np.int64)])[0]          # -16 is row 0
        np.testing.assert_array_equal(got, numpy_helper.to_array(table)[[15, 0, 0]])
        for bad in ([16, 0, 0], [0, -17, 0]):
            with pytest.raises(HostRunError, match="status 3"):
                host.run([np.array(bad, np.int64)])


def test_tensor_scatter_refuses_a_write_past_the_cache(tmp_path):
    nodes = [helper.make_node("TensorScatter", ["cache", "upd", "at"], ["written"], name="s", axis=2),
             helper.make_node("Identity", ["written"], ["y"], name="i")]
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("cache", F, [1, 2, 6, 4]),
                                            helper.make_tensor_value_info("upd", F, [1, 2, 2, 4]),
                                            helper.make_tensor_value_info("at", I64, [1])],
                              [helper.make_tensor_value_info("y", F, [1, 2, 6, 4])])
    emit_bundle(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "b")
    cache, upd = np.zeros((1, 2, 6, 4), np.float32), np.ones((1, 2, 2, 4), np.float32)
    with HostBuild(tmp_path / "b") as host:
        assert host.run([cache, upd, np.array([4], np.int64)])[0][0, :, 4:].min() == 1.0
        with pytest.raises(HostRunError, match="status 3"):
            host.run([cache, upd, np.array([5], np.int64)])


def test_range_refuses_a_count_other_than_the_planned_one(tmp_path):
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="r"),
             helper.make_node("Identity", ["r"], ["y"], name="i")]
    scalar = [helper.make_tensor_value_info(n, I64, []) for n in ("start", "limit", "delta")]
    graph = helper.make_graph(nodes, "r", scalar, [helper.make_tensor_value_info("y", I64, [5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    graph = ir.to_graph(model)
    graph.nodes[0].outputs[0].shape, graph.nodes[0].outputs[0].dtype = [5], np.int64   # the planned count
    folder = tmp_path / "b"
    folder.mkdir()
    plan = plan_memory(graph, load_target("cortex-m7"))
    onnx.save(ir.to_model(graph), str(folder / "model.onnx"))
    emit_c(graph, plan, load_target("cortex-m7"), folder)
    one = np.array(1, np.int64)
    with HostBuild(folder) as host:
        np.testing.assert_array_equal(host.run([np.array(2, np.int64), np.array(7, np.int64), one])[0],
                                      np.arange(2, 7))
        with pytest.raises(HostRunError, match="status 3"):
            host.run([np.array(2, np.int64), np.array(8, np.int64), one])


# ----------------------------------------------------------------------------------------------- the 260K Llama
def _oneshot_shapes(seq: int) -> dict:
    found = {"input_ids": (1, seq), "attention_mask": (1, seq), "position_ids": (1, seq)}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            found[f"past_key_values.{i}.{kind}"] = (1, KV_HEADS, 0, HEAD_DIM)
    return found


def test_llama260k_oneshot_c_logits_match_onnxruntime(tmp_path):
    out = tmp_path / "one"
    result = build(FIXTURE, BuildOptions(target="cortex-m7", input_shapes=_oneshot_shapes(16)), out)
    assert result.cbundle is not None and "transformer" in result.cbundle.families
    header = (out / "model.h").read_text()
    assert f"#define LMC_ARENA_BYTES {result.plan.arena_bytes}u" in header
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 16)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64),
             "position_ids": np.arange(16, dtype=np.int64)[None]}
    feeds.update({n: np.zeros(s, np.float32) for n, s in _oneshot_shapes(16).items() if n.startswith("past")})
    reference = ort.InferenceSession(str(FIXTURE), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    with HostBuild(out) as host:
        logits = host.run(feeds)[0]
    assert float(np.abs(logits - reference).max()) / float(np.abs(reference).max()) <= 1e-5


def greedy_onnxruntime(prompt: list[int], count: int) -> list[int]:
    """The original export driven the plain way: prefill, then one token at a time, present fed back."""
    return greedy(PastDecoder(FIXTURE), prompt, count)


CONTEXT = 32
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def generation_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "bundle"
    result = build(FIXTURE, BuildOptions(target="cortex-m7", context=CONTEXT), out)
    with HostGenerator(out) as generator:
        yield out, result, generator


def test_llama260k_c_greedy_tokens_equal_onnxruntime(generation_bundle):
    out, result, generator = generation_bundle
    decode = next(p for p in result.plan.profiles if p.name == "decode")
    assert f"#define LMC_ARENA_BYTES {decode.arena_bytes}u" in (out / "model.h").read_text()
    expected = greedy_onnxruntime(PROMPT, 20)
    assert len(set(expected)) > 5                         # a continuation that exercises the cache
    assert generator.generate(PROMPT, 20) == expected
    assert generator.generate([7], 1) == greedy_onnxruntime([7], 1)
    assert generator.generate(PROMPT, 0) == []


def test_w8a8_generation_in_c_gives_the_bundles_greedy_tokens(tmp_path):
    """--quantize w8a8 --context on a microcontroller target: the static int8 pass (convolutions only) steps
    aside for a decoder left with a dynamic sequence, the QDQ w8a8 pass quantizes it, and the C decode step
    generates the tokens onnxruntime generates on the same bundle — int8 weights: a third of the float flash."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, VOCAB, (8, 16)).astype(np.int64))
    out = tmp_path / "w8a8"
    result = build(FIXTURE, BuildOptions(target="cortex-m7", context=CONTEXT, quantize="w8a8", calib=str(calib)), out)
    assert result.cbundle is not None and "quantize-w8a8" in {r.name for r in result.records}
    theirs = lmc.generate(out, PROMPT, 16).tokens
    with HostGenerator(out) as generator:
        assert generator.generate(PROMPT, 16) == theirs
    assert result.cbundle.weight_bytes < FIXTURE.stat().st_size / 2


def test_a_cache_that_does_not_persist_changes_the_tokens(generation_bundle, tmp_path):
    """The comparison above fails when the state is lost between lmc_run calls."""
    out, _, _ = generation_bundle
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    runner = (broken / "runner.c").read_text()
    runner = runner.replace("rc = lmc_run(inputs, outputs);",
                            "memset(lmc_state_0, 0, sizeof lmc_state_0);\n        rc = lmc_run(inputs, outputs);")
    (broken / "runner.c").write_text(runner)
    assert generate_host(broken, PROMPT, 20) != greedy_onnxruntime(PROMPT, 20)


def test_generation_runner_refuses_bad_prompts(generation_bundle):
    _, _, generator = generation_bundle
    assert len(generator.generate(list(range(CONTEXT - 1)), 2)) == 2      # 32 positions: the whole context
    with pytest.raises(GenerationRunError, match="context"):
        generator.generate(list(range(CONTEXT)), 2)                       # 33 positions > 32
    with pytest.raises(GenerationRunError, match="vocabulary"):
        generator.generate([VOCAB], 1)
    with pytest.raises(LmcError, match="empty"):
        generator.generate([], 1)


def _lmc(args, capsys) -> tuple[int, str, str]:
    """The command line as a user runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_lmc_generate_on_c(generation_bundle, tmp_path, capsys):
    out, _, _ = generation_bundle
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("1 2 3")
    expected = greedy_onnxruntime(PROMPT, 6)
    args = ["generate", str(out), "--prompt-tokens", str(prompt), "--max-new-tokens", "6", "--on", "c"]
    stop = expected[4]                      # the tokens up to the first stop token, that one included
    code, stdout, _ = _lmc(args + ["--json", "--stop-token", str(stop)], capsys)
    assert code == 0 and json.loads(stdout)["tokens"] == expected[:expected.index(stop) + 1]
    code, _, err = _lmc(args + ["--temperature", "0.5"], capsys)
    assert code == 2 and "--temperature" in err
    (tmp_path / "plain").mkdir()
    code, _, err = _lmc(["generate", str(tmp_path / "plain"), "--prompt-tokens", str(prompt), "--on", "c"], capsys)
    assert code == 2 and "not a C generation bundle" in err


def test_lmc_verify_checks_a_generation_c_bundles_onnx_and_sends_the_board_to_generate(generation_bundle, capsys):
    out, _, _ = generation_bundle
    code, stdout, _ = _lmc(["verify", str(out), "--against", str(FIXTURE)], capsys)
    assert code == 0 and "PASS" in stdout
    code, _, err = _lmc(["verify", str(out), "--against", str(FIXTURE), "--on", "cortex-m7"], capsys)
    assert code == 2 and "--on cortex-m7" in err and "lmc generate" in err


def test_a_sliding_window_model_generates_in_c_as_under_onnxruntime(tmp_path):
    """Mistral-style sliding window 8: the cache is a ring (ScatterND writes, Mod positions); 30 tokens wrap it."""
    model = FIXTURE.parents[1] / "families" / "mistral-sw-past-optimum.onnx"
    out = tmp_path / "sw"
    build(model, BuildOptions(target="cortex-m7", context=48, prefill_chunk=1), out)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"ScatterND", "Mod"} <= ops
    expected = lmc.generate(out, PROMPT, 30, speculate="off").tokens      # the bundle under onnxruntime
    assert generate_host(out, PROMPT, 30) == expected


def test_step_io_refuses_what_the_runner_cannot_drive():
    info = GenerationInfo(32, 2, "input_ids", "", "logits", (("past", "present"),), attention_mask="attention_mask")
    with pytest.raises(LmcError, match="batch 1"):
        step_io(None, info)


@pytest.mark.skipif(shutil.which(boards.GCC) is None or shutil.which(boards.QEMU) is None,
                    reason="no arm-none-eabi-gcc / qemu-system-arm (scripts/setup-mcu.sh)")
def test_llama260k_generates_on_the_emulated_cortex_m7(generation_bundle):
    out, result, _ = generation_bundle
    run = generate_board(out, "cortex-m7", PROMPT, 8)
    assert run.tokens == greedy_onnxruntime(PROMPT, 8)
    decode = next(p for p in result.plan.profiles if p.name == "decode")
    assert run.arena_bytes == decode.arena_bytes
    assert run.ram_bytes <= 512 * 1024 and run.flash_bytes <= 2 * 1024 * 1024
    assert run.lmc_run_calls == len(PROMPT) + 8 - 1
