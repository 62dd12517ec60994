"""Generation bundles (``lmc build --context N``) from real exporters' past/present decoders: exact against the
original's own present→past loop, cache in place, one model for prefill and decode, and the near misses
the cache rewrite must refuse."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import cache_layers, op_counts

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.compiler.cli import main
from lmc.core.errors import LmcError
from lmc.compiler.drivers import PastDecoder, StateDecoder, generation_info, greedy
from lmc.compiler.verify import compare_generation, verify

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"
EXPORTS = ["llama-past-optimum.onnx", "qwen2-past-optimum.onnx", "gpt2-past-optimum.onnx",
           "llama-past-torchscript.onnx", "llama-past-dynamo.onnx"]
CONTEXT = 32


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in EXPORTS:
        d = tmp_path_factory.mktemp(name.split(".")[0]) / "gen"
        build(FIXTURES / name, BuildOptions(target="cortex-a55", context=CONTEXT), d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", EXPORTS)
def test_bundle_is_exact_and_fully_fused(bundles, name):
    bundle = bundles[name] / "model.onnx"
    ops = op_counts(bundle)
    layers = cache_layers(FIXTURES / name)
    assert ops["GroupQueryAttention"] == layers, ops          # attention + rotary + cache write in one kernel
    assert not {"Softmax", "Concat", "Expand", "Transpose"} & set(ops), ops
    info = generation_info(bundle)
    assert len(info.state) == 2 * layers and info.context == CONTEXT
    report = compare_generation(FIXTURES / name, bundle, vocab=256, prompt=6, steps=12)
    assert report.passed and report.max_rel < 1e-5, report


@pytest.mark.parametrize("name", EXPORTS)
def test_greedy_tokens_equal_the_original_loop(bundles, name):
    prompt = np.random.default_rng(1).integers(0, 256, 7)
    ours = greedy(StateDecoder(bundles[name] / "model.onnx"), prompt, 20)
    theirs = greedy(PastDecoder(FIXTURES / name), prompt, 20)
    assert ours == theirs


def test_plan_has_state_and_both_profiles(bundles):
    plan = json.loads((bundles[EXPORTS[0]] / "plan.json").read_text())
    state = plan["state"]
    # 2 layers × (k, v) × [1, 2 kv heads, 32 slots, 16] float32
    assert state["bytes"] == 4 * 2 * CONTEXT * 16 * 4 and len(state["buffers"]) == 4
    profiles = {p["name"]: p for p in plan["profiles"]}
    assert profiles["decode"]["sequence"] == 1 and profiles["prefill"]["sequence"] == CONTEXT
    assert profiles["decode"]["arena_bytes"] < profiles["prefill"]["arena_bytes"]
    assert plan["peak_ram_bytes"] == max(p["peak_ram_bytes"] for p in plan["profiles"])
    assert plan["peak_ram_bytes"] >= state["bytes"] + plan["arena_bytes"]


def test_cache_is_updated_in_place_and_bounded(bundles):
    decoder = StateDecoder(bundles[EXPORTS[0]] / "model.onnx")
    buffers = {name: value for name, value in decoder.state.items()}
    decoder.forward(np.arange(5)[None])
    decoder.forward(np.array([[7]]))
    for name, value in decoder.state.items():
        assert value is buffers[name]                     # the same OrtValue the session wrote into
        rows = value.numpy()[0, :, :, 0]
        assert np.all(rows[:, :6] != 0) and np.all(rows[:, 6:] == 0)
    with pytest.raises(LmcError, match="context"):
        decoder.forward(np.zeros((1, CONTEXT), np.int64))


def test_without_group_query_attention_the_standard_ops_serve(tmp_path):
    """A target whose runtime lacks the contrib kernel gets TensorScatter + Attention-24, also exact."""
    spec = tomllib.loads((Path(__file__).resolve().parents[1] / "targets" / "cortex_a55.toml").read_text())
    text = (Path(__file__).resolve().parents[1] / "targets" / "cortex_a55.toml").read_text()
    text = text.replace('"com.microsoft.GroupQueryAttention", ', "").replace(spec["name"], "no-gqa", 1)
    target = tmp_path / "no-gqa.toml"
    target.write_text(text)
    out = tmp_path / "gen"
    build(FIXTURES / EXPORTS[0], BuildOptions(target=str(target), context=CONTEXT), out)
    ops = op_counts(out / "model.onnx")
    assert ops["TensorScatter"] == 4 and ops["Attention"] == 2 and "GroupQueryAttention" not in ops
    prompt = [3, 1, 4, 1, 5]
    assert greedy(StateDecoder(out / "model.onnx"), prompt, 10) == greedy(PastDecoder(FIXTURES / EXPORTS[0]), prompt, 10)


def _edit(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model.graph)
    onnx.save(model, str(dst))
    return dst


def test_non_causal_mask_is_refused(tmp_path):
    """Near miss: the mask lets each query see its own key only from the next position (Less, not ≤)."""
    def edit(graph):
        node = next(n for n in graph.node if n.op_type == "LessOrEqual")
        node.op_type = "Less"
    model = _edit(FIXTURES / "llama-past-optimum.onnx", tmp_path / "m.onnx", edit)
    with pytest.raises(LmcError, match="neither causal nor a sliding window"):
        build(model, BuildOptions(context=CONTEXT), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unscaled_by_a_tensor_is_refused(tmp_path):
    """Near miss: the keys are scaled by a per-head tensor, not a scalar."""
    def edit(graph):
        node = next(n for n in graph.node if n.name == "/model/layers.1/self_attn/Mul_9")   # kᵀ · √scale
        scale = onnx.numpy_helper.from_array(np.linspace(0.4, 0.6, 4).astype(np.float32).reshape(1, 4, 1, 1),
                                             "per_head_scale")
        graph.initializer.append(scale)
        node.input[1] = "per_head_scale"
    model = _edit(FIXTURES / "llama-past-optimum.onnx", tmp_path / "m.onnx", edit)
    with pytest.raises(LmcError, match="scalar scale"):
        build(model, BuildOptions(context=CONTEXT), tmp_path / "out")


def test_rotary_that_is_not_rotate_half_stays_unfused_and_exact(tmp_path):
    """Near miss for the position-table rotary rule: the cos/sin angles differ between the halves."""
    def edit(graph):
        concat = next(n for n in graph.node if n.op_type == "Concat" and "rotary_emb" in n.name
                      and len(n.input) == 2 and n.input[0] == n.input[1])
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.5, np.float32), "half_stretch"))
        graph.node.insert(list(graph.node).index(concat), onnx.helper.make_node(
            "Mul", [concat.input[1], "half_stretch"], ["stretched"], name="stretch"))
        concat.input[1] = "stretched"
    model = _edit(FIXTURES / "llama-past-optimum.onnx", tmp_path / "m.onnx", edit)
    result = build(model, BuildOptions(context=CONTEXT), tmp_path / "out")
    notes = [n for r in result.records for n in r.notes]
    assert any("rotary-positions" in n and "rotate-half" in n for n in notes), notes
    assert "RotaryEmbedding" not in op_counts(tmp_path / "out" / "model.onnx")
    assert result.verification.passed


def test_one_shot_model_is_refused_with_one_line(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", str(model_dir / "tiny-llama.onnx"), "--context", "16", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "past key/values" in err and len(err.strip().splitlines()) == 1


def test_generalise_turns_sequence_dims_into_copies_or_runtime_values_and_refuses_the_rest():
    import onnx_graphsurgeon as gs

    from lmc.compiler.generation import generalise, snapshot

    def graph(s, extra=None):
        x = gs.Variable("x", np.float32, [1, s, 8])
        y = gs.Variable("y", np.float32, [1, s, 2, 4])
        nodes = [gs.Node("Reshape", "r", inputs=[x, gs.Constant("shape", np.array([1, s, 2, 4]))], outputs=[y])]
        outputs = [y]
        if extra == "expand":        # an Expand to [1, S, 8]: affine in S, computed at run time
            z = gs.Variable("z", np.float32, [1, s, 8])
            nodes.append(gs.Node("Expand", "e", inputs=[x, gs.Constant("eshape", np.array([1, s, 8]))], outputs=[z]))
            outputs.append(z)
        if extra == "range":         # positions 0…S−1 stored as a constant: its shape depends on S
            z = gs.Variable("z", np.int64, [s])
            nodes.append(gs.Node("Identity", "i", inputs=[gs.Constant("positions", np.arange(s))], outputs=[z]))
            outputs.append(z)
        return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=18)

    g = graph(5)
    assert generalise(g, snapshot(graph(3)), (3, 5), g.inputs[0]) == 1
    assert list(g.nodes[0].inputs[1].values) == [1, 0, 2, 4]
    g = graph(5, "expand")
    assert generalise(g, snapshot(graph(3, "expand")), (3, 5), g.inputs[0]) == 2
    import onnxruntime as ort
    g.inputs[0].shape = [1, "S", 8]
    for t in g.outputs:
        t.shape = None
    model = gs.export_onnx(g)
    x = np.random.rand(1, 7, 8).astype(np.float32)
    z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["z"], {"x": x})[0]
    assert z.shape == (1, 7, 8)                           # the Expand target follows the run-time length
    g = graph(5, "range")
    with pytest.raises(LmcError, match="positions"):
        generalise(g, snapshot(graph(3, "range")), (3, 5), g.inputs[0])


def test_cli_generate_and_verify(bundles, tmp_path, capsys):
    bundle = bundles[EXPORTS[0]]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("5 9 2 11\n7")
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(bundle), "--prompt-tokens", str(prompt), "--max-new-tokens", "6", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and len(out["tokens"]) == 6 and out["tokens_per_s"] > 0 and out["peak_rss_bytes"] > 0
    assert out["tokens"] == greedy(PastDecoder(FIXTURES / EXPORTS[0]), [5, 9, 2, 11, 7], 6)
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(bundle), "--prompt-tokens", str(prompt), "--max-new-tokens", str(CONTEXT)])
    assert exc.value.code == 2 and "context" in capsys.readouterr().err
    report = verify(bundle, FIXTURES / EXPORTS[0])
    assert report.passed and {o.name for o in report.outputs} == {"logits (prefill)", "logits (decode)"}


def test_int4_generation_bundle_with_calibration(tmp_path):
    ids = np.random.default_rng(0).integers(0, 256, (4, 16))
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    out = tmp_path / "gen4"
    result = build(FIXTURES / EXPORTS[0], BuildOptions(context=CONTEXT, quantize=QuantizeMode.INT4, block_size=16,
                                                       calib=str(tmp_path / "calib.npz")), out)
    assert result.weight_bytes_after < result.weight_bytes_before / 3
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    ops = Counter(n.op_type for n in model.graph.node)
    # every projection and the tied head: MatMulNBits, as written (no pair left for onnxruntime to fuse)
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 9 and not ops["DequantizeLinear"]
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in floats]
    tokens = greedy(StateDecoder(out / "model.onnx"), [1, 2, 3], 8)
    assert len(tokens) == 8 and result.verification.outputs[0].cosine > 0.9


def _windowed_reference(model: Path, tokens: np.ndarray, prompt: int, window: int, sinks: int) -> list[np.ndarray]:
    """The original export driven step by step, each decode step's attention_mask hiding the keys outside
    the window (j ≥ sinks and q − j ≥ window): the sliding-window semantics, computed by the original."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past")}
    logits = []
    for start, stop in [(0, prompt)] + [(i, i + 1) for i in range(prompt, len(tokens))]:
        mask = np.ones((1, stop), np.int64)
        if stop - start == 1:
            j = np.arange(stop)
            mask[0] = (j < sinks) | (start - j < window)
        values = sess.run(outs, {"input_ids": tokens[None, start:stop], "attention_mask": mask,
                                 "position_ids": np.arange(start, stop)[None], **past})
        past = {n.replace("present", "past_key_values"): v for n, v in zip(outs[1:], values[1:])}
        logits.append(values[0])
    return logits


def test_sliding_ring_buffer_equals_windowed_attention_at_bounded_memory(tmp_path):
    """--attention sliding:W,sinks=S: a ring of S + W + chunk − 1 slots; 72 decode steps (the ring wraps
    several times) equal the original with the window applied through its attention_mask."""
    window, sinks, chunk = 16, 4, 8
    out = tmp_path / "slide"
    result = build(FIXTURES / EXPORTS[0], BuildOptions(context=256, attention=f"sliding:{window},sinks={sinks}",
                                                       prefill_chunk=chunk), out)
    assert result.plan.state[0].size == 2 * (sinks + window + chunk - 1) * 16 * 4   # [1, 2, slots, 16] float32
    assert "ScatterND" in op_counts(out / "model.onnx") and "TensorScatter" not in op_counts(out / "model.onnx")
    tokens = np.random.default_rng(0).integers(0, 256, 80)
    decoder = StateDecoder(out / "model.onnx")
    ours = [decoder.forward(tokens[None, :chunk])] + [decoder.forward(tokens[None, i:i + 1]) for i in range(chunk, 80)]
    reference = _windowed_reference(FIXTURES / EXPORTS[0], tokens, chunk, window, sinks)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, reference)) < 1e-5
    # a long prompt runs in chunks; each chunk sees what token-by-token decoding would
    decoder.reset()
    chunked = decoder.forward(tokens[None, :60])
    decoder.reset()
    stepped = np.concatenate([decoder.forward(tokens[None, i:i + 1]) for i in range(60)], axis=1)
    assert np.abs(chunked - stepped).max() < 1e-5


def test_int8_kv_cache_quarter_state_small_error(bundles, tmp_path):
    out = tmp_path / "kv8"
    result = build(FIXTURES / EXPORTS[0], BuildOptions(context=CONTEXT, kv_cache="int8"), out)
    float_plan = json.loads((bundles[EXPORTS[0]] / "plan.json").read_text())
    assert result.plan.state_bytes < float_plan["state"]["bytes"] / 2          # int8 rows + one scale per row
    info = generation_info(out / "model.onnx")
    assert len(info.state) == 8 and any(name.endswith("_scale") for name, _ in info.state)
    report = compare_generation(FIXTURES / EXPORTS[0], out / "model.onnx", vocab=256, prompt=6, steps=12)
    assert all(o.cosine > 0.9999 for o in report.outputs) and not result.verification.passed is None
    assert "kv-cache int8" in BuildOptions(context=CONTEXT, kv_cache="int8").approximations


def test_tiled_heads_are_not_repeat_kv(tmp_path):
    """Near miss (optimum form): Unsqueeze at axis 1 before Expand/Reshape tiles the kv heads (query head h
    reads kv head h mod kv), which GQA's h // r grouping does not compute."""
    def edit(graph):
        unsqueeze = next(n for n in graph.node if n.op_type == "Unsqueeze" and n.input[0] == "present.1.key")
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "axis_one"))
        unsqueeze.input[1] = "axis_one"
    model = _edit(FIXTURES / "llama-past-optimum.onnx", tmp_path / "m.onnx", edit)
    greedy(PastDecoder(model), [1, 2, 3], 2)                      # the edited original still runs
    with pytest.raises(LmcError, match="repeat_kv"):
        build(model, BuildOptions(context=CONTEXT), tmp_path / "out")


def test_dynamo_key_transpose_must_swap_the_last_axes(tmp_path):
    """Near miss (dynamo form): Reshape → Transpose → Reshape around kᵀ with a permutation that is not the
    swap of the last two axes (same sizes, other values) is refused."""
    def edit(graph):
        node = next(n for n in graph.node if n.name == "node_Transpose_456")
        node.attribute[0].ints[:] = [1, 0, 2]
    model = _edit(FIXTURES / "llama-past-dynamo.onnx", tmp_path / "m.onnx", edit)
    greedy(PastDecoder(model), [1, 2, 3], 2)
    with pytest.raises(LmcError, match="no attention recognised"):
        build(model, BuildOptions(context=CONTEXT), tmp_path / "out")


def test_batch_of_two_rows(bundles, tmp_path):
    out = tmp_path / "b2"
    result = build(FIXTURES / EXPORTS[0], BuildOptions(context=CONTEXT, batch=2), out)
    single = json.loads((bundles[EXPORTS[0]] / "plan.json").read_text())
    assert result.plan.state_bytes == 2 * single["state"]["bytes"]
    report = compare_generation(FIXTURES / EXPORTS[0], out / "model.onnx", vocab=256, prompt=5, steps=6)
    assert report.passed and report.max_rel < 1e-5


@pytest.mark.parametrize("name", EXPORTS)
def test_decode_step_gives_the_logits_forward_gives(bundles, name):
    """``decode_step`` (buffers bound once, the batch-1 mask wrapped once per length) against ``forward``,
    bit for bit, through a prefill between decode steps, a rewind (which it leaves to ``forward``) and
    decode steps again; the decoder's position bookkeeping agrees as well."""
    bundle = bundles[name] / "model.onnx"
    plain, fast = StateDecoder(bundle), StateDecoder(bundle)
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 256, (1, 5))
    np.testing.assert_array_equal(plain.forward(prompt), fast.forward(prompt))
    for phase in range(3):
        for _ in range(4):
            token = int(rng.integers(0, 256))
            want = plain.forward(np.array([[token]]))[:, -1]
            got = fast.decode_step([token])
            np.testing.assert_array_equal(got, want)
        chunk = rng.integers(0, 256, (1, 3))
        np.testing.assert_array_equal(plain.forward(chunk), fast.forward(chunk))
        if phase == 1:
            plain.rewind(plain.length - 2)
            fast.rewind(fast.length - 2)
        assert plain.length == fast.length and np.array_equal(plain.positions(), fast.positions())
        assert np.array_equal(plain.written(), fast.written())
