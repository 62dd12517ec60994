"""The runtime cost model (``lmc.targets.runtime_model``) and the session configuration bundles carry
(``lmc.compiler.runtime``): what each item counts, the x86-64 model as measured on onnxruntime 1.32, and
small bundles' predictions against their measured model-attributable peak."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.compiler import runtime
from lmc.compiler.runtime import CPU_ARENA, TRIM_HEAP, USE_ENV_ALLOCATORS, after_load, apply_session_options, open_bundle
from lmc.models import build_llama
from lmc.targets.runtime_model import RuntimeModel
from lmc.targets.target import load_target

NBITS = "com.microsoft.MatMulNBits"
INTEGER_GEMM = "com.microsoft.MatMulIntegerToFloat"


def test_a_prepacked_weight_is_replaced_by_its_packed_copy():
    model = RuntimeModel(prepack_ops=frozenset({"MatMul", NBITS}), prepack_factor={NBITS: 1.5})
    assert model.weight_resident(100, ["MatMul"]) == (0, 100)
    assert model.weight_resident(100, [NBITS]) == (0, 150)
    assert model.weight_resident(100, ["Gather", NBITS]) == (100, 150)      # a tied table: both resident
    assert model.weight_resident(100, ["Gather"]) == (100, 0)
    keeps = dataclasses.replace(model, prepack_keeps_original=frozenset({"MatMul"}))
    assert keeps.weight_resident(100, ["MatMul"]) == (100, 100)


def test_the_empty_session_is_reported_beside_the_peak_not_in_it():
    model = RuntimeModel(session_bytes=10_000_000, first_run_bytes=1000, node_bytes=10)
    prediction = model.predict([], arena=0, inputs=0, outputs=0, state=0, nodes=5)
    assert prediction.peak_bytes == 1050
    assert "session" not in prediction.items
    assert prediction.to_dict()["session_bytes"] == 10_000_000


def test_items_outputs_once_workspaces_once_per_kind_arena_scaled():
    model = RuntimeModel(prepack_ops=frozenset({NBITS}), kernel_workspaces={NBITS: 7, "Conv": 1000},
                         arena_factor=0.5, output_copies=1)
    items = model.predict([(10, [NBITS]), (10, [NBITS])], arena=100, inputs=3, outputs=40, state=5).items
    assert items["kernel_workspaces"] == 7               # two readers, one kind; Conv is not in the graph
    assert items["arena"] == 50 and items["outputs"] == 40 and items["inputs"] == 3 and items["state"] == 5


def test_kernel_temporaries_follow_the_share_of_packed_weights_the_kind_reads():
    model = RuntimeModel(prepack_ops=frozenset({NBITS, INTEGER_GEMM}), kernel_temporaries={NBITS: 0.5},
                         arena_factor=0.0)
    every_gemm = model.predict([(10, [NBITS]), (10, [NBITS])], arena=1000, inputs=0, outputs=0, state=0)
    assert every_gemm.items["kernel_temporaries"] == 500
    head_only = model.predict([(10, [NBITS])] + [(10, [INTEGER_GEMM])] * 3, arena=1000, inputs=0, outputs=0,
                              state=0)
    assert head_only.items["kernel_temporaries"] == 125      # w8a8: only the tied head is MatMulNBits


def test_x86_runtime_model_is_the_measured_one():
    runtime = load_target("x86-64").runtime
    # w8a8's integer GEMMs repack their int8 weights at load and the runtime releases the originals
    assert INTEGER_GEMM in runtime.prepack_ops and not runtime.prepack_keeps_original
    assert runtime.output_copies == 1         # the caller's result wraps the runtime's output buffer
    assert 0 < runtime.arena_factor < 1 and runtime.prepack_factor[NBITS] > 1
    options = runtime.session_options
    assert options["enable_mem_pattern"] is False and options[TRIM_HEAP] is True
    assert options[CPU_ARENA]["initial_chunk_size_bytes"] >= 16 << 20
    for name in ("cortex-a55", "cortex-a76"):     # the same onnxruntime version, the same model
        assert load_target(name).runtime == runtime


def test_session_options_apply_the_process_arena_and_config_entries():
    opts = apply_session_options(ort.SessionOptions(), {
        "enable_mem_pattern": False, TRIM_HEAP: True,
        CPU_ARENA: {"arena_extend_strategy": 0, "initial_chunk_size_bytes": 16 << 20},
        "config_entries": {"session.disable_prepacking": "1"}})
    assert opts.enable_mem_pattern is False
    assert opts.get_session_config_entry(USE_ENV_ALLOCATORS) == "1"
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"


def test_the_heap_is_trimmed_after_the_load_when_the_bundle_asks(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.weights, "release_freed", lambda: calls.append(1))
    after_load({"enable_mem_pattern": False})
    assert calls == []
    after_load({TRIM_HEAP: True})
    assert calls == [1]


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("runtime-model")
    onnx.save(build_llama(), str(work / "tiny-llama.onnx"))
    np.savez(work / "calib.npz", input_ids=np.random.default_rng(0).integers(0, 256, (8, 1, 64)).astype(np.int64))
    out = {}
    for mode in (QuantizeMode.NONE, QuantizeMode.INT4, QuantizeMode.W8A8):
        out[mode.value] = work / mode.value
        build(work / "tiny-llama.onnx", BuildOptions(
            target="x86-64", input_shapes={"input_ids": (1, 64)}, quantize=mode, verify=False,
            calib=str(work / "calib.npz") if mode is QuantizeMode.W8A8 else None), out[mode.value])
    return out


def test_bundles_carry_the_session_options_their_prediction_assumes(tiny_bundles):
    bundle = tiny_bundles["int4"]
    options = json.loads((bundle / "session_options.json").read_text())
    runtime = json.loads((bundle / "plan.json").read_text())["runtime"]
    assert options == runtime["session_options"] == load_target("x86-64").runtime.session_options
    assert runtime["predicted_peak_bytes"] == sum(runtime["items"].values())
    assert runtime["session_bytes"] > 0 and "session" not in runtime["items"]


def test_w8a8_integer_gemm_weights_are_predicted_as_packed_copies(tiny_bundles):
    plan = json.loads((tiny_bundles["w8a8"] / "plan.json").read_text())
    items = plan["runtime"]["items"]
    # the int8 GEMM weights are most of the weights: resident as packed copies, not a second time as originals
    assert items["weights"] < plan["weights_bytes"]["mmap"] / 2 < items["prepacked_weights"]
    assert items["kernel_workspaces"] >= load_target("x86-64").runtime.kernel_workspaces[INTEGER_GEMM]


def test_open_bundle_runs_a_bundle_as_onnxruntime_does(tiny_bundles):
    model = tiny_bundles["int4"] / "model.onnx"
    ids = np.random.default_rng(1).integers(0, 256, (1, 64)).astype(np.int64)
    ours = open_bundle(model, threads=1).run(None, {"input_ids": ids})[0]
    theirs = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from lmc.compiler.runtime import open_bundle
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
    model, options = sys.argv[1], json.loads(sys.argv[2])
    base = status("VmRSS:")
    sess = open_bundle(model, threads=1, settings=options)
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                              np.int64 if "int64" in i.type else np.float32) for i in sess.get_inputs()}
    for _ in range(2):
        sess.run(None, feeds)
    print(status("VmHWM:") - base)
""")


def _peak(model: Path, options: dict) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(model), json.dumps(options)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS from /proc")
@pytest.mark.parametrize("mode", ["none", "int4", "w8a8"])
def test_prediction_matches_the_measured_model_attributable_peak(tiny_bundles, tmp_path, mode):
    """Peak RSS of loading the bundle and running it twice, minus an empty session's under the same
    options (bench/bench_memory.py does the same for every model and mode)."""
    from onnx import TensorProto, helper

    bundle = tiny_bundles[mode]
    options = json.loads((bundle / "session_options.json").read_text())
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "empty.onnx"))
    measured = _peak(bundle / "model.onnx", options) - _peak(tmp_path / "empty.onnx", options)
    predicted = json.loads((bundle / "plan.json").read_text())["runtime"]["predicted_peak_bytes"]
    assert 0.85 < measured / predicted < 1.15, (measured, predicted)
