"""lmc diff between two bundles (plan delta, tensors, weights by dtype, ops) and between two models."""

from __future__ import annotations

import json

import onnx
import pytest

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.compiler.cli import main
from lmc.compiler.inspection import PLAN_KEYS, diff_bundles
from lmc.models import build_llama

SHAPES = {"input_ids": (1, 32)}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    onnx.save(build_llama(), str(d / "tiny-llama.onnx"))
    exact = build(d / "tiny-llama.onnx", BuildOptions(target="cortex-a55", input_shapes=SHAPES), d / "exact")
    int4 = build(d / "tiny-llama.onnx", BuildOptions(target="cortex-a55", input_shapes=SHAPES,
                                                     quantize=QuantizeMode.INT4), d / "int4")
    return d, exact, int4


def _run(capsys, *args) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().out


def test_bundle_diff_json_has_plan_delta_and_weights_by_dtype(bundles, capsys):
    d, exact, int4 = bundles
    code, out = _run(capsys, "diff", str(d / "int4"), str(d / "exact"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "bundles"
    assert set(PLAN_KEYS) <= set(data["plan"])
    arena = data["plan"]["arena_bytes"]
    assert arena == {"a": int4.plan.arena_bytes, "b": exact.plan.arena_bytes,
                     "delta": exact.plan.arena_bytes - int4.plan.arena_bytes}
    assert data["plan"]["peak_ram_bytes"]["a"] == int4.plan.peak_ram_bytes
    assert data["plan"]["predicted_runtime_peak_bytes"]["b"] == exact.plan.runtime["predicted_peak_bytes"]
    assert data["plan"]["state_bytes"] == {"a": 0, "b": 0, "delta": 0}
    weights = data["weights_by_dtype"]
    four_bit = [k for k in weights if k in ("int4", "uint4")]
    assert four_bit and all(weights[k]["a"]["bytes"] > 0 and weights[k]["b"]["bytes"] == 0 for k in four_bit)
    assert weights["float"]["b"]["bytes"] > weights["float"]["a"]["bytes"]
    # the bytes by dtype read from the bundle agree with what the build counted
    assert {k: v["b"]["bytes"] for k, v in weights.items() if v["b"]["bytes"]} == exact.weights_by_dtype
    assert {k: v["a"]["bytes"] for k, v in weights.items() if v["a"]["bytes"]} == int4.weights_by_dtype
    assert data["ops"]                     # quantized MatMuls are different ops
    assert len(data["tensors_changed"]) <= 10


def test_bundle_diff_text(bundles, capsys):
    d, exact, int4 = bundles
    code, out = _run(capsys, "diff", str(d / "int4"), str(d / "exact"))
    assert code == 0
    for needle in ("arena_bytes", "lower_bound_bytes", "peak_ram_bytes", "predicted_runtime_peak_bytes",
                   "state_bytes", "weights by dtype:", "int4 ", "float", "nodes by op", "quantize=int4"):
        assert needle in out, needle


def test_bundle_diff_ranks_changed_tensors(bundles, tmp_path):
    """A bundle whose plan was edited: the tensors whose size and lifetime changed come first, by name."""
    import shutil

    d, exact, _ = bundles
    other = tmp_path / "other"
    shutil.copytree(d / "exact", other)
    plan = json.loads((other / "plan.json").read_text())
    plan["tensors"][0]["size"] *= 4
    plan["tensors"][1]["last"] = plan["tensors"][1]["first"]
    (other / "plan.json").write_text(json.dumps(plan))
    diff = diff_bundles(d / "exact", other)
    names = [t["name"] for t in diff.tensors_changed]
    assert names[:1] == [plan["tensors"][0]["name"]] and plan["tensors"][1]["name"] in names
    assert diff.plan["arena_bytes"] == (exact.plan.arena_bytes, exact.plan.arena_bytes)
    assert not diff.ops and diff.tensors_only_a == diff.tensors_only_b == 0


def test_model_diff_still_works_and_mixed_is_refused(bundles, capsys):
    d, _, _ = bundles
    code, out = _run(capsys, "diff", str(d / "tiny-llama.onnx"), str(d / "exact" / "model.onnx"),
                     "--input-shape", "input_ids=1x32", "--json")
    assert code == 0
    data = json.loads(out)
    assert "initializers_only_a" in data and data["a"]["nodes"] > data["b"]["nodes"]
    code, _ = _run(capsys, "diff", str(d / "tiny-llama.onnx"), str(d / "exact"))
    assert code == 2
