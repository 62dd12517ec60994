"""Generation bundles (``lmc build --context N``) from a wider set of real exporter outputs
(``models/fixtures/more``, written by ``models/exporters/export_more_fixtures.py``): every architecture lmc compiles must
be exact against the original's own present→past loop, with each attention fused; the ones it does not yet
compile are listed as strict xfails carrying lmc's one-line error, so a fix shows up as an XPASS."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from helpers import cache_layers, op_counts

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.core.errors import LmcError
from lmc.compiler.drivers import PastDecoder, StateDecoder, generation_info, greedy
from lmc.compiler.verify import compare_generation

MORE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "more"
CONTEXT = 32

# fixture -> the fused attention lmc emits for it (GroupQueryAttention carries rotary and the cache write;
# otherwise Attention-24 + TensorScatter-24, with RotaryEmbedding when the model has rotary positions)
EXACT = {
    "mistral-past-optimum.onnx": "GroupQueryAttention",
    "phi3-past-optimum.onnx": "Attention",
    "phi-past-optimum.onnx": "Attention",
    "gpt-neox-past-optimum.onnx": "Attention",
    "stablelm-past-optimum.onnx": "Attention",
    "opt-past-optimum.onnx": "GroupQueryAttention",
    "falcon-past-optimum.onnx": "Attention",
    "llama-hd12-past-optimum.onnx": "Attention",
    "llama-mha-untied-past-optimum.onnx": "GroupQueryAttention",
    "qwen3-past-optimum.onnx": "Attention",
    "gemma-past-optimum.onnx": "GroupQueryAttention",         # positions from Range(cache length, +S)
    "gemma2-past-optimum.onnx": "GroupQueryAttention",
    "llama-hf-past-dynamo.onnx": "GroupQueryAttention",
}
# fixture -> (lmc build's one-line error, the exception build raises)
GAPS = {
    "bloom-past-optimum.onnx": ("lmc: error: --context: no attention recognised for cache output 'present.0.key'",
                                LmcError),
}
ALL = [*EXACT, *GAPS]
PARAMS = [*EXACT] + [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=why, raises=exc))
                     for name, (why, exc) in GAPS.items()]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Builds on first use (inside the test, so a refused build is the test's failure, not a setup error)."""
    root = tmp_path_factory.mktemp("more")

    @cache
    def get(name: str) -> Path:
        out = root / name.split(".")[0]
        build(MORE / name, BuildOptions(target="cortex-a55", context=CONTEXT), out)
        return out / "model.onnx"

    return get


def test_every_fixture_is_listed_and_small():
    on_disk = sorted(p.name for p in MORE.glob("*.onnx"))
    assert on_disk == sorted(ALL)
    readme = (MORE / "README.md").read_text()
    for name in on_disk:
        assert f"`{name}`" in readme and (MORE / name).stat().st_size < 1 << 20


@pytest.mark.parametrize("name", PARAMS)
def test_bundle_is_exact_and_attention_fused(bundle, name):
    model = bundle(name)
    ops = op_counts(model)
    layers = cache_layers(MORE / name)
    assert ops["GroupQueryAttention"] + ops["Attention"] == layers, ops
    assert ops[EXACT.get(name, "GroupQueryAttention")] == layers, ops
    if ops["Attention"]:
        assert ops["TensorScatter"] == 2 * layers, ops          # the in-place cache write of k and v
    assert not {"Softmax", "Expand"} & set(ops), ops
    info = generation_info(model)
    assert len(info.state) == 2 * layers and info.context == CONTEXT
    report = compare_generation(MORE / name, model, vocab=256, prompt=6, steps=12)
    assert report.passed and report.max_rel < 1e-5, report


@pytest.mark.parametrize("name", PARAMS)
def test_greedy_tokens_equal_the_original_loop(bundle, name):
    prompt = np.random.default_rng(1).integers(0, 256, 7)
    ours = greedy(StateDecoder(bundle(name)), prompt, 20)
    theirs = greedy(PastDecoder(MORE / name), prompt, 20)
    assert ours == theirs


# int8 weights are family-independent: one of each fused-attention form (bench/bench_families.py --int8 runs
# every family)
INT8_FAMILIES = ["mistral-past-optimum.onnx", "phi3-past-optimum.onnx", "gpt-neox-past-optimum.onnx"]


@pytest.mark.parametrize("name", INT8_FAMILIES)
def test_int8_generation_bundle_runs(tmp_path, name):
    out = tmp_path / "gen8"
    result = build(MORE / name, BuildOptions(context=CONTEXT, quantize=QuantizeMode.INT8), out)
    assert result.weight_bytes_after < result.weight_bytes_before / 2
    tokens = greedy(StateDecoder(out / "model.onnx"), [3, 1, 4, 1, 5], 8)
    assert len(tokens) == 8 and all(0 <= t < 256 for t in tokens)
