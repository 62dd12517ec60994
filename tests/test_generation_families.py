"""Generation bundles (``lmc build --context 64``) of the decoder families in ``models/fixtures/families``
(written by ``models/exporters/export_family_fixtures.py``): sliding-window and mixed sliding/full layers, GPT-Neo's
local/global attention, mixture of experts, ALiBi, attention sinks, GPT-J/CodeGen/XGLM. Every fixture lmc
builds must generate, greedily, the same tokens as the original's own present→past loop over three prompts
and 32 new tokens (past every window), with logits close at every step; the ones it does not yet build are
strict xfails carrying lmc's one-line error, so a fix shows up as an XPASS."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from helpers import cache_layers, op_counts

from lmc.compiler.build import BuildOptions, build
from lmc.core.errors import LmcError
from lmc.compiler.drivers import PastDecoder, StateDecoder, generation_info, greedy

FAMILIES = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "families"
CONTEXT = 64
NEW_TOKENS = 32
PROMPTS = (5, 9, 13)        # prompt lengths; + 32 new tokens stays below the context

# fixture -> how many of its attentions lmc fuses into GroupQueryAttention/Attention-24 (the others stay
# decomposed over the in-place cache: a feature the fused kernels lack)
BUILDS = {
    "starcoder2-sw-past-dynamo.onnx": 2,
    "mistral-sw-past-optimum.onnx": 2,
    "qwen2-sw-past-optimum.onnx": 2,
    "gemma3-past-optimum.onnx": 3,
    "exaone4-past-dynamo.onnx": 4,
    "mixtral-past-dynamo.onnx": 2,
    "qwen2-moe-past-dynamo.onnx": 2,
    "qwen3-moe-past-optimum.onnx": 2,
    "gptj-past-optimum.onnx": 2,          # present.key = Cast(Concat(past, k)), a float→float Cast
    "codegen-past-optimum.onnx": 2,       # Softmax(Div(Add(MatMul, mask), 4)): scaled after the mask
    "gpt-neo-past-optimum.onnx": 2,       # Where(causal table, scores, min) + padding mask, unscaled
    "xglm-past-dynamo.onnx": 2,           # heads folded into the batch: 3-D MatMuls, Reshape [B*H, T, D]
    "mpt-past-optimum.onnx": 2,           # ALiBi: Attention-24 with the bias table as a float mask
    "gpt-oss-past-optimum.onnx": 0,       # sinks: both attentions decomposed over the in-place state
}
# fixture -> (lmc build's one-line error, the exception build raises)
GAPS = {
}
WINDOWED = {"starcoder2-sw-past-dynamo.onnx", "mistral-sw-past-optimum.onnx", "qwen2-sw-past-optimum.onnx",
            "gemma3-past-optimum.onnx", "exaone4-past-dynamo.onnx", "gpt-oss-past-optimum.onnx",
            "gpt-neo-past-optimum.onnx"}
ALL = [*BUILDS, *GAPS]
PARAMS = [*BUILDS] + [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=why, raises=exc))
                      for name, (why, exc) in GAPS.items()]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Builds on first use (inside the test, so a refused build is the test's failure, not a setup error);
    the build's own horizon check is skipped — the test below compares with the original itself."""
    root = tmp_path_factory.mktemp("families")

    @cache
    def get(name: str) -> Path:
        out = root / name.split(".")[0]
        build(FAMILIES / name, BuildOptions(target="cortex-a55", context=CONTEXT, verify=False), out)
        return out / "model.onnx"

    return get


def test_every_fixture_is_listed_and_small():
    on_disk = sorted(p.name for p in FAMILIES.glob("*.onnx"))
    assert on_disk == sorted(ALL)
    readme = (FAMILIES / "README.md").read_text()
    for name in on_disk:
        assert f"`{name}`" in readme and (FAMILIES / name).stat().st_size < 1 << 20


def _teacher_forced(ours: StateDecoder, theirs: PastDecoder, prompt: np.ndarray) -> tuple[list, list, float]:
    """Both decoders fed the original's greedy tokens: (our argmaxes, theirs, largest logit difference
    relative to the logits' scale)."""
    ours.reset()
    theirs.reset()
    a, b = ours.forward(prompt[None]), theirs.forward(prompt[None])
    mine, original, rel = [], [], 0.0
    for _ in range(NEW_TOKENS):
        rel = max(rel, float(np.abs(a[0] - b[0]).max() / max(1.0, np.abs(b[0]).max())))
        mine.append(int(np.argmax(a[0, -1])))
        original.append(int(np.argmax(b[0, -1])))
        token = np.array([[original[-1]]], dtype=np.int64)
        a, b = ours.forward(token), theirs.forward(token)
    return mine, original, rel


@pytest.mark.parametrize("name", PARAMS)
def test_greedy_tokens_equal_the_original_loop(bundle, name):
    model = bundle(name)
    layers = cache_layers(FAMILIES / name)
    info = generation_info(model)
    assert len(info.state) == 2 * layers and info.context == CONTEXT
    ops = op_counts(model)
    assert ops["GroupQueryAttention"] + ops["Attention"] == BUILDS[name], ops
    assert "NonZero" not in ops, ops         # MoE routing has one row per token: a static plan
    ours, theirs = StateDecoder(model), PastDecoder(FAMILIES / name)
    rng = np.random.default_rng(7)
    for length in PROMPTS:
        prompt = rng.integers(0, 256, length)
        mine, original, rel = _teacher_forced(ours, theirs, prompt)
        assert mine == original, (length, mine, original)
        assert rel < 1e-4, (length, rel)
    prompt = rng.integers(0, 256, PROMPTS[0])
    assert greedy(ours, prompt, NEW_TOKENS) == greedy(theirs, prompt, NEW_TOKENS)


def test_generalise_makes_sequence_sized_fills_at_run_time_and_matches_constants_by_reader():
    """A uniform constant whose shape follows S (the zeros an MoE block scatters into) becomes
    ConstantOfShape of the run-time shape; a constant merged at one probe length with an equal folded
    length (expert index 3 = S at S = 3) is matched by the node input reading it, not by its name."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from lmc.compiler.generation import generalise, snapshot

    def graph(s):
        x = gs.Variable("x", np.float32, [1, s, 8])
        y = gs.Variable("y", np.float32, [1, s, 8])
        g = gs.Variable("g", np.float32, [1, s])
        three = gs.Constant("three", np.array(3, np.int64))
        length = three if s == 3 else gs.Constant("length", np.array(s, np.int64))   # merged at S = 3
        n = gs.Variable("n", np.int64, [])
        nodes = [gs.Node("Add", "a", inputs=[x, gs.Constant("zeros", np.zeros((1, s, 8), np.float32))], outputs=[y]),
                 gs.Node("Gather", "g", inputs=[x, three], outputs=[g], attrs={"axis": 2}),
                 gs.Node("Identity", "n", inputs=[length], outputs=[n])]
        return gs.Graph(nodes=nodes, inputs=[x], outputs=[y, g, n], opset=18)

    g = graph(5)
    assert generalise(g, snapshot(graph(3)), (3, 5), g.inputs[0]) == 2   # the fill, and the length (affine)
    assert any(n.op == "ConstantOfShape" for n in g.nodes)
    g.inputs[0].shape = [1, "S", 8]
    for t in g.outputs:
        t.shape = None
    x = np.random.rand(1, 7, 8).astype(np.float32)
    y, got, n = ort.InferenceSession(gs.export_onnx(g).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(["y", "g", "n"], {"x": x})
    assert np.array_equal(y, x) and np.array_equal(got, x[:, :, 3]) and int(n) == 7


def test_generalise_expands_constants_broadcast_along_the_sequence():
    """Per-head values Expanded to [1, H, S, 1] (gpt-oss's sink logits once folded) become Expand of the
    [1, H, 1, 1] slab to the run-time shape; values that vary along S are still refused."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from lmc.compiler.generation import generalise, snapshot

    heads = np.array([0.5, -1.0, 2.0, 0.25], np.float32).reshape(1, 4, 1, 1)

    def graph(s, along=False):
        x = gs.Variable("x", np.int64, [1, s])
        y = gs.Variable("y", np.float32, [1, 4, s, 1])
        value = np.broadcast_to(heads, (1, 4, s, 1)) + (np.arange(s, dtype=np.float32)[:, None] if along else 0)
        nodes = [gs.Node("Identity", "i", inputs=[gs.Constant("column", np.ascontiguousarray(value))], outputs=[y])]
        return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=18)

    g = graph(5)
    assert generalise(g, snapshot(graph(3)), (3, 5), g.inputs[0]) == 1
    assert any(n.op == "Expand" for n in g.nodes)
    g.inputs[0].shape, g.outputs[0].shape = [1, "S"], None
    y = ort.InferenceSession(gs.export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": np.zeros((1, 7), np.int64)})[0]
    assert np.array_equal(y, np.broadcast_to(heads, (1, 4, 7, 1)))
    g = graph(5, along=True)
    with pytest.raises(LmcError, match="column"):
        generalise(g, snapshot(graph(3, along=True)), (3, 5), g.inputs[0])
