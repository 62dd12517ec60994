"""The greedy head: its bound holds against onnxruntime's own 8-bit kernel, its steps give the full head's
argmax with the kept logits bit for bit, decoding with it gives the same tokens, and the build's check fails
on a head whose screening is broken."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import op_counts
from onnx import TensorProto, helper, numpy_helper

from lmc.compiler.build import BuildOptions, build
from lmc.compiler.drivers import StateDecoder, generation_info, greedy
from lmc.compiler.speculate import decode
from lmc.compiler.verify import GREEDY_HEAD, compare_generation
from lmc.passes.greedy_head import BLOCK, GREEDY_INPUT, candidate_cap, quantize_table

FIXTURES = Path(__file__).resolve().parents[2] / "models" / "fixtures"
TARGET = Path(__file__).resolve().parents[2] / "targets" / "x86_64.toml"
TIED = "gpt2-past-optimum.onnx"     # the head: FusedMatMul(x, Tᵀ) over the embedding's table
CONTEXT = 32
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def _session(nodes, inits, k):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=OPSETS)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k", [64, 384])
def test_bound_holds_against_the_runtime_kernels(k):
    """|L_r − A_r| ≤ β_r with L from onnxruntime's float head and A from its 8-bit MatMulNBits at int8
    activations, over tables and inputs made to strain it: outlier columns, a spike in x, tiny rows."""
    rng = np.random.default_rng(k)
    v = 512
    table = rng.standard_normal((v, k)).astype(np.float32)
    table[:, 3] *= 40                               # an outlier feature
    table[7] *= 1e-3                                # a nearly empty row
    codes, scales, bound = quantize_table(table)
    assert codes.shape == (v, k // BLOCK, BLOCK) and scales.shape == (v, k // BLOCK) and bound.shape == (2, v)
    approx = _session([helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=v,
                                        bits=8, block_size=BLOCK, accuracy_level=4)],
                      [numpy_helper.from_array(codes, "q"), numpy_helper.from_array(scales, "s")], k)
    full = _session([helper.make_node("FusedMatMul", ["x", "t"], ["y"], domain="com.microsoft", transB=1)],
                    [numpy_helper.from_array(table, "t")], k)
    xs = [rng.standard_normal(k) * 3, np.where(rng.random(k) < 0.02, 50.0, 0.01), rng.standard_normal(k) ** 5]
    xs += [rng.standard_normal(k) * 10 ** rng.uniform(-3, 3) for _ in range(100)]
    worst = 0.0
    for x in xs:
        x = x.astype(np.float32)
        a = approx.run(None, {"x": x[None, None]})[0].ravel().astype(np.float64)
        logits = full.run(None, {"x": x[None, None]})[0].ravel().astype(np.float64)
        beta = np.linalg.norm(x.astype(np.float64)) * bound[0] + np.abs(x).max() * bound[1]
        worst = max(worst, float((np.abs(logits - a) / beta).max()))
    assert worst <= 1.0, worst
    assert worst > 0.01           # the bound is not vacuous: the kernel's error reaches a fair part of it


def test_cap_is_whole_groups_of_at_most_an_eighth():
    assert candidate_cap(256) == 64 and candidate_cap(8192) == 1024 and candidate_cap(32000) == 3968


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """x86-64 with the greedy head's threshold lowered to the fixtures' size."""
    path = tmp_path_factory.mktemp("target") / "x86g.toml"
    text = TARGET.read_text()
    assert "greedy_head_min_bytes = " in text
    path.write_text("\n".join("greedy_head_min_bytes = 1" if line.startswith("greedy_head_min_bytes") else line
                              for line in text.splitlines()))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, target) -> dict[str, Path]:
    """A tied head under the lowered threshold."""
    folder = tmp_path_factory.mktemp("greedy")
    out = {}
    for name in (TIED,):
        out[name] = folder / name.split(".")[0]
        build(FIXTURES / name, BuildOptions(target=str(target), context=CONTEXT), out[name])
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_a_head_with_its_own_table_is_left_alone(target, tied):
    """Gathering the rows of a table only the head reads would keep its float copy resident beside the packed
    one: an untied MatMul(x, W) and a FusedMatMul over a table no Gather reads are left alone."""
    from lmc.core import ir
    from lmc.core.pass_manager import PassContext
    from lmc.passes.greedy_head import GreedyHead
    from lmc.targets.target import load_target

    rng = np.random.default_rng(0)
    head = (helper.make_node("FusedMatMul", ["x", "w"], ["logits"], domain="com.microsoft", transB=1) if tied
            else helper.make_node("MatMul", ["x", "w"], ["logits"]))
    w = rng.standard_normal((256, 64) if tied else (64, 256)).astype(np.float32)
    graph = helper.make_graph([head], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 256])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=OPSETS)
    result = GreedyHead("logits", 1).run(ir.to_graph(model), PassContext(target=load_target(str(target))))
    assert not result.modified and ("untied" in result.notes[0] or "not the embedding's" in result.notes[0])


@pytest.mark.parametrize("name", [TIED])
def test_greedy_steps_keep_the_full_heads_argmax_bit_for_bit(bundles, name):
    bundle = bundles[name] / "model.onnx"
    assert generation_info(bundle).greedy == GREEDY_INPUT and op_counts(bundle)["If"] == 2
    decoder = StateDecoder(bundle)
    rng = np.random.default_rng(3)
    kept = []
    for _ in range(6):
        decoder.reset()
        decoder.forward(rng.integers(0, 256, (1, 5)))
        token = 3
        for _ in range(20):
            at = decoder.length
            full = decoder.forward(np.array([[token]]))[0, -1].copy()
            decoder.rewind(at)
            step = decoder.decode_step([token], greedy=True)[0].copy()
            finite = np.isfinite(step)
            assert step.argmax() == full.argmax()
            np.testing.assert_array_equal(step[finite], full[finite])
            kept.append(int(finite.sum()))
            token = int(full.argmax())
    assert max(kept) <= candidate_cap(256) and min(kept) >= 1     # screened, never the whole vocabulary


@pytest.mark.parametrize("name", [TIED])
def test_decoding_with_the_greedy_head_gives_the_same_tokens(bundles, name):
    decoder = StateDecoder(bundles[name] / "model.onnx")
    rng = np.random.default_rng(5)
    for _ in range(4):
        prompt = rng.integers(0, 256, 6).tolist()
        decoder.reset()
        logits = decoder.forward(np.array([prompt]))[0, -1]
        plain = [int(logits.argmax())]
        for _ in range(19):            # the full head, one forward per token
            plain.append(int(decoder.forward(np.array([[plain[-1]]]))[0, -1].argmax()))
        assert greedy(decoder, prompt, 20) == plain
        for speculate in ("off", "lookup"):
            assert decode(decoder, [prompt], 20, speculate=speculate).tokens[0] == plain


def test_the_8bit_tables_mapped_pages_are_released_after_load(bundles):
    """onnxruntime packs the screen's MatMulNBits (in a branch) and keeps its mapped data: lmc drops it."""
    from lmc.core.runtime import packed_and_kept

    model = onnx.load(str(bundles[TIED] / "model.onnx"), load_external_data=False)
    branches = [a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    codes = next(t for g in branches for t in g.initializer if t.name == "lmc_greedy_codes")
    where = {e.key: e.value for e in codes.external_data}
    spans = packed_and_kept(bundles[TIED] / "model.onnx")
    assert (int(where["offset"]), int(where["length"])) in spans[where["location"]]


def test_the_flag_defaults_to_the_full_head(bundles):
    """A run that does not feed the flag (onnxruntime-genai's) gets the full logits."""
    model = onnx.load(str(bundles[TIED] / "model.onnx"), load_external_data=False)
    default = next(t for t in model.graph.initializer if t.name == GREEDY_INPUT)
    assert numpy_helper.to_array(default).item() is False and GREEDY_INPUT in [i.name for i in model.graph.input]
    report = compare_generation(FIXTURES / TIED, bundles[TIED] / "model.onnx", vocab=256, prompt=6, steps=8)
    assert report.passed and {o.name for o in report.outputs} >= {"logits (decode)", GREEDY_HEAD}


@pytest.mark.parametrize("k", [384, 1024, 1056])
def test_the_screened_head_on_two_threads(target, k):
    """Built by the pass on a tied head, run with the switch on and off on two threads: the same argmax and
    the kept logits bit for bit — from K = 512 the products run in K-slices (onnxruntime would split a whole
    one across the threads and sum in other slices); 1056 ends in a short slice."""
    from lmc.compiler.verify import greedy_head_error
    from lmc.core import ir
    from lmc.core.pass_manager import PassContext
    from lmc.passes.greedy_head import GreedyHead
    from lmc.targets.target import load_target

    rng = np.random.default_rng(k)
    table = (rng.standard_normal((2048, k)) / np.sqrt(k)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["embedded"]),
             helper.make_node("FusedMatMul", ["x", "table"], ["logits"], domain="com.microsoft", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 2048]),
                               helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, 1, k])],
                              [numpy_helper.from_array(table, "table")])
    g = ir.to_graph(helper.make_model(graph, opset_imports=OPSETS))
    result = GreedyHead("logits", 1).run(g, PassContext(target=load_target(str(target))))
    assert result.modified, result.notes
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(ir.to_model(g).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    kept = []
    for i in range(40):
        x = (3 * table[i] + rng.standard_normal(k) / np.sqrt(k)).astype(np.float32)[None, None]
        feeds = {"ids": np.zeros((1, 1), np.int64), "x": x}
        full = session.run(["logits"], {**feeds, GREEDY_INPUT: np.array(False)})[0][0]
        screened = session.run(["logits"], {**feeds, GREEDY_INPUT: np.array(True)})[0][0]
        assert screened.argmax() == full.argmax()
        assert greedy_head_error(full, screened).max_rel == 0        # bits, on two threads too
        kept.append(int(np.isfinite(screened).sum()))
    assert max(kept) < 2048              # screened, not the full head


def test_the_check_allows_summation_order_not_a_wrong_token():
    """Kept logits may differ by summation order (products split across threads); the picked token must be
    the argmax, or tie with it within that."""
    from lmc.compiler.verify import GREEDY_HEAD_ALLOWED, greedy_head_error

    full = np.array([[1.0, 5.0, 4.9, -2.0]], np.float32)
    masked = np.array([[-np.inf, 5.0, 4.9, -np.inf]], np.float32)
    assert greedy_head_error(full, masked).max_rel == 0
    assert greedy_head_error(full, masked * (1 + 1e-7)).max_rel <= GREEDY_HEAD_ALLOWED
    wrong = np.array([[-np.inf, -np.inf, 4.9, -np.inf]], np.float32)
    assert greedy_head_error(full, wrong).max_rel > GREEDY_HEAD_ALLOWED         # 4.9 picked, 5.0 the argmax
    tie = np.array([[1.0, 5.0, 5.0 - 1e-6, -2.0]], np.float32)
    swapped = np.array([[-np.inf, 5.0 - 2e-6, 5.0 - 1e-6, -np.inf]], np.float32)
    assert greedy_head_error(tie, swapped).max_rel <= GREEDY_HEAD_ALLOWED       # a tie within rounding


def _tampered(bundle: Path, dst: Path, name: str, change) -> Path:
    """A copy of ``bundle`` whose constant ``name`` (in a branch of the greedy head) is ``change``d."""
    shutil.copytree(bundle, dst)
    model = onnx.load(str(dst / "model.onnx"))
    graphs, found = [model.graph], 0
    while graphs:
        graph = graphs.pop()
        for init in graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init)), name))
                found += 1
        graphs += [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert found == 1
    (dst / "model.weights").unlink()
    onnx.save(model, str(dst / "model.onnx"))
    return dst / "model.onnx"


def test_the_check_fails_on_a_broken_screen(bundles, tmp_path):
    """Negated 8-bit scales screen for the wrong tokens: the build's check must say the greedy head differs."""
    broken = _tampered(bundles[TIED], tmp_path / "broken", "lmc_greedy_scales", lambda s: -s)
    report = compare_generation(FIXTURES / TIED, broken, vocab=256, prompt=6, steps=8)
    assert not report.passed and [o.name for o in report.failures] == [GREEDY_HEAD]
    assert "greedy head" in report.explain()


def test_a_loose_bound_falls_back_to_the_full_head(bundles, tmp_path):
    """Every token a candidate (bound × 10⁶): more than the cap, so the full head runs — still exact."""
    loose = _tampered(bundles[TIED], tmp_path / "loose", "lmc_greedy_bound", lambda b: b * 1e6)
    decoder = StateDecoder(loose)
    decoder.forward(np.array([[1, 2, 3]]))
    full = decoder.forward(np.array([[4]]))[0, -1].copy()
    decoder.rewind(3)
    np.testing.assert_array_equal(decoder.decode_step([4], greedy=True)[0], full)
    assert compare_generation(FIXTURES / TIED, loose, vocab=256, prompt=6, steps=8).passed


def test_threshold_and_disable(tmp_path, target):
    """The x86-64 target leaves a small head alone; --disable-pass greedy-head leaves any head alone."""
    small = build(FIXTURES / TIED, BuildOptions(target="x86-64", context=CONTEXT), tmp_path / "small")
    assert not generation_info(tmp_path / "small" / "model.onnx").greedy
    record = next(r for r in small.records if r.name == "greedy-head")
    assert not record.modified and "threshold" in record.notes[0]
    build(FIXTURES / TIED, BuildOptions(target=str(target), context=CONTEXT, disabled_passes=("greedy-head",)),
          tmp_path / "off")
    assert not generation_info(tmp_path / "off" / "model.onnx").greedy
    assert "If" not in op_counts(tmp_path / "off" / "model.onnx")
