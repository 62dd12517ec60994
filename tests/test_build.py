"""End-to-end builds: bundles equal the original under onnxruntime, plans are sound and tight, the arena
executor reproduces the outputs, and a wrong plan is caught."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import assert_close, independent_plan_check, run_ort, token_feed

from lmc.compiler.arena_executor import ArenaExecutor
from lmc.compiler.build import BuildOptions, build
from lmc.targets.plan import MemoryPlan, PlannedTensor

CASES = {
    "tiny-llama": ({"input_ids": (1, 32)}, lambda: token_feed(1, 32)),
    "tiny-gpt2": ({"input_ids": (2, 16)}, lambda: token_feed(2, 16)),
    "small-cnn": ({"image": (2, 3, 32, 32)},
                  lambda: {"image": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}),
}


@pytest.fixture(scope="module")
def bundles(model_dir, tmp_path_factory):
    out = {}
    for name, (shapes, _) in CASES.items():
        d = tmp_path_factory.mktemp(name) / "out"
        out[name] = (build(model_dir / f"{name}.onnx", BuildOptions(target="x86-64", input_shapes=shapes), d), d)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bundle_matches_original(name, bundles, model_dir):
    result, out = bundles[name]
    feed = CASES[name][1]()
    assert_close(run_ort(model_dir / f"{name}.onnx", feed), run_ort(out / "model.onnx", feed), rel=1e-4)
    assert result.verification is not None and result.verification.passed
    assert (out / "report.md").read_text().startswith("# lmc build report")


@pytest.mark.parametrize("name", list(CASES))
def test_plan_is_sound_and_tight(name, bundles):
    _, out = bundles[name]
    plan = independent_plan_check(out)
    assert plan["arena_bytes"] <= 1.01 * plan["lower_bound_bytes"]
    for key in ("schema", "target", "alignment", "weights_bytes", "io_bytes", "peak_ram_bytes"):
        assert key in plan


@pytest.mark.parametrize("name", list(CASES))
def test_arena_executor_reproduces_outputs(name, bundles, model_dir):
    _, out = bundles[name]
    feed = CASES[name][1]()
    got = ArenaExecutor(out).run(feed)
    assert_close(run_ort(model_dir / f"{name}.onnx", feed), list(got.values()), rel=1e-4)


def test_overlapping_plan_is_caught(bundles, model_dir):
    """Force two simultaneously-live tensors onto the same bytes: the arena executor must go wrong."""
    _, out = bundles["tiny-llama"]
    plan = MemoryPlan.from_dict(json.loads((out / "plan.json").read_text()))
    tensors = list(plan.tensors)
    # a large tensor, and another written while it still waits for a later reader, made to share offset 0
    big, other = next((a, b) for a in sorted(tensors, key=lambda t: -t.size) for b in tensors
                      if a.first < b.first < a.last)
    bad = [PlannedTensor(t.name, t.size, 0, t.first, t.last) if t in (big, other) else t for t in tensors]
    bad_plan = MemoryPlan(**{**plan.__dict__, "tensors": tuple(bad)})
    feed = CASES["tiny-llama"][1]()
    reference = run_ort(model_dir / "tiny-llama.onnx", feed)
    got = list(ArenaExecutor(out, plan=bad_plan).run(feed).values())
    with pytest.raises(AssertionError):
        assert_close(reference, got, rel=1e-4)


def test_build_is_deterministic_and_input_untouched(model_dir, tmp_path):
    src = model_dir / "tiny-gpt2.onnx"
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    opts = BuildOptions(input_shapes={"input_ids": (1, 16)})
    build(src, opts, tmp_path / "a")
    build(src, opts, tmp_path / "b")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    for f in ("model.onnx", "model.weights", "plan.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_weights_file_is_aligned(bundles):
    import onnx

    _, out = bundles["tiny-gpt2"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets, "weights should be external"
    assert all(o % 64 == 0 for o in offsets)


def test_llama_code_exact_bundle(llama_code, tmp_path):
    out = tmp_path / "out"
    result = build(llama_code, BuildOptions(target="cortex-a55", input_shapes={"input_ids": (1, 256)}), out)
    assert result.verification.max_rel <= 1e-4
    plan = independent_plan_check(out)
    assert plan["arena_bytes"] <= 1.01 * plan["lower_bound_bytes"]
    tokens = np.random.default_rng(1).integers(0, 8192, (1, 256)).astype(np.int64)
    got = ArenaExecutor(out).run({"input_ids": tokens})
    assert_close(run_ort(llama_code, {"input_ids": tokens}), list(got.values()), rel=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_in_place_plan_is_sound_smaller_and_executes(name, bundles, model_dir, tmp_path):
    shapes, make_feed = CASES[name]
    out = tmp_path / "inplace"
    result = build(model_dir / f"{name}.onnx", BuildOptions(target="x86-64", input_shapes=shapes, inplace=True), out)
    plan = independent_plan_check(out)
    assert plan["inplace"], "elementwise outputs should reuse their inputs' bytes"
    assert result.plan.arena_bytes <= bundles[name][0].plan.arena_bytes
    feed = make_feed()
    got = ArenaExecutor(out).run(feed)
    assert_close(run_ort(model_dir / f"{name}.onnx", feed), list(got.values()), rel=1e-4)


def test_ort_mobile_files(model_dir, tmp_path):
    out = tmp_path / "out"
    build(model_dir / "tiny-llama.onnx", BuildOptions(input_shapes={"input_ids": (1, 16)}, ort_format=True), out)
    feed = token_feed(1, 16)
    assert_close(run_ort(model_dir / "tiny-llama.onnx", feed), run_ort(out / "model.ort", feed), rel=1e-4)
    config = (out / "required_operators.config").read_text()
    assert "ai.onnx;23;" in config and "Attention" in config and str(tmp_path) not in config


def test_generation_options_need_context_and_a_default_build_stays_exact(model_dir, tmp_path, monkeypatch):
    from lmc.compiler import verify
    from lmc.core.errors import LmcError

    model = model_dir / "tiny-llama.onnx"
    for given in ({"kv_cache": "int8"}, {"batch": 2}, {"prefill_chunk": 16}, {"kv_cache": "float"}):
        with pytest.raises(LmcError, match="--context"):
            build(model, BuildOptions(input_shapes={"input_ids": (1, 8)}, **given), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert BuildOptions().approximations == [] and BuildOptions(context=32).approximations == []
    assert (BuildOptions(context=32).batch, BuildOptions(context=32).prefill_chunk) == (1, 64)
    assert BuildOptions(context=32, kv_cache="int8").approximations == ["kv-cache int8"]
    # a build with the defaults is exact: a mismatch against the original fails it
    monkeypatch.setattr(verify.VerifyReport, "passed", property(lambda self: False))
    with pytest.raises(verify.VerificationFailed):
        build(model, BuildOptions(input_shapes={"input_ids": (1, 8)}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
