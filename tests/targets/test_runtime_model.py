"""The runtime cost model (``lmc.targets.runtime_model``) and the session configuration bundles carry
(``lmc.core.runtime``): what each item counts, the x86-64 model as measured on onnxruntime 1.32, and
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
from lmc.core import runtime
from lmc.core.runtime import CPU_ARENA, RELEASE_MAPPED, TRIM_HEAP, USE_ENV_ALLOCATORS, after_load, apply_session_options, open_bundle
from lmc.models import build_llama
from lmc.targets.runtime_model import (DECODED_MATMUL, Choice, DecodedMatMul, RuntimeModel,
                                       merge_session_options)
from lmc.targets.target import load_target

NBITS = "com.microsoft.MatMulNBits"
NBITS_FLOAT = "com.microsoft.MatMulNBits@0"          # accuracy level 0: float activations
INTEGER_GEMM = "com.microsoft.MatMulIntegerToFloat"
LEVEL = "session.qdq_matmulnbits_accuracy_level"
FIXTURES = Path(__file__).resolve().parents[2] / "models" / "fixtures"


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
    a55, a76 = (load_target(name).runtime for name in ("cortex-a55", "cortex-a76"))
    assert a55 == a76                   # the same ISA and onnxruntime version, the same model
    assert a55.choices == ()            # accuracy level 0's latency was measured on x86-64 only
    # measured on the aarch64 wheel (bench/bench_memory_aarch64.py): the empty session, MatMulNBits' code
    # pages (fewer) and packed size; the rest is x86-64's, which the aarch64 measurements agree with
    on_aarch64 = ("session_bytes", "prepack_factor", "kernel_workspaces")
    # x86-64 alone drops the mapped weight pages after load: its MatMulNBits keeps scales it packed; on
    # aarch64 the kernel reads them at every run
    assert options[RELEASE_MAPPED] is True and RELEASE_MAPPED not in a55.session_options
    x86_options = {k: v for k, v in options.items() if k != RELEASE_MAPPED}
    assert dataclasses.replace(a55, choices=(), **{f: getattr(runtime, f) for f in on_aarch64}) == \
        dataclasses.replace(runtime, choices=(), session_options=x86_options)
    assert a55.kernel_workspaces[NBITS] < runtime.kernel_workspaces[NBITS] and a55.prepack_factor[NBITS] > 1
    assert {k for k in a55.kernel_workspaces} == {k for k in runtime.kernel_workspaces}
    assert runtime.prepack_factor[NBITS_FLOAT] < 1 < runtime.prepack_factor[NBITS]
    assert runtime.kernel_temporaries[NBITS_FLOAT] < runtime.kernel_temporaries[NBITS]


def test_a_variant_kind_takes_its_own_entries_else_its_familys():
    model = RuntimeModel(prepack_ops=frozenset({NBITS}), prepack_factor={NBITS: 1.2, NBITS_FLOAT: 0.8},
                         kernel_workspaces={NBITS: 100, NBITS_FLOAT: 7}, kernel_temporaries={NBITS: 0.5},
                         dequantize_matmul=NBITS_FLOAT, arena_factor=0.0)
    assert model.weight_resident(100, [DECODED_MATMUL]) == (0, 80)      # a prepacking op through its family
    assert model.weight_resident(100, [NBITS]) == (0, 120)
    items = model.predict([(100, [DECODED_MATMUL])], arena=1000, inputs=0, outputs=0, state=0).items
    assert items["kernel_workspaces"] == 107                             # its family's and its own
    assert items["kernel_temporaries"] == 500                            # none of its own: its family's


def test_session_options_merge_config_entries_key_by_key():
    base = {"enable_mem_pattern": False, "config_entries": {"a": "1"}, "cpu_arena": {"x": 1}}
    assert merge_session_options(base, {"config_entries": {"b": "2"}}) == {
        "enable_mem_pattern": False, "config_entries": {"a": "1", "b": "2"}, "cpu_arena": {"x": 1}}
    assert base["config_entries"] == {"a": "1"}


def test_x86_chooses_float_matmulnbits_only_for_4_bit_weights_on_many_rows():
    runtime = load_target("x86-64").runtime
    rows = runtime.choices[0].min_rows
    assert rows == 128 and runtime.choices[0].weight_bits == {4}

    def chosen(*matmuls: tuple[int, int]) -> RuntimeModel:
        return runtime.choose([DecodedMatMul(bits, n) for bits, n in matmuls])

    one_shot = chosen(*[(4, 256)] * 42)           # int4 llama-code at 1×256
    assert one_shot.choice and one_shot.dequantize_matmul == NBITS_FLOAT and not one_shot.choices
    assert one_shot.session_options["config_entries"] == {LEVEL: "0"}
    assert {k: v for k, v in one_shot.session_options.items() if k != "config_entries"} == runtime.session_options
    assert chosen((4, rows)).choice                # 2×64 rows count as 128
    for case in ([(8, 256)] * 42,                  # 8-bit weights: slower at every row count
                 [(4, 1)] * 24,                    # a generation bundle: decode multiplies one row
                 [(4, rows - 1)],
                 [(4, 256), (8, 256)],             # every decoded weight must be 4-bit
                 []):                              # nothing decoded (exact, w8a8): nothing to choose
        model = chosen(*case)
        assert model.choice is None and model.session_options == runtime.session_options, case
        assert model.dequantize_matmul == NBITS


def test_the_prediction_follows_the_choice():
    runtime = load_target("x86-64").runtime
    weights = [(100_000, [DECODED_MATMUL])] * 10 + [(50_000, ["Gather", NBITS])]   # + a tied head
    level4 = runtime.choose([DecodedMatMul(4, 1)] * 10).predict(weights, arena=1_000_000, inputs=0, outputs=0,
                                                                  state=0).to_dict()
    level0 = runtime.choose([DecodedMatMul(4, 256)] * 10).predict(weights, arena=1_000_000, inputs=0, outputs=0,
                                                                   state=0).to_dict()
    assert level4["choice"] is None and level0["choice"] == runtime.choices[0].name
    assert level0["session_options"]["config_entries"][LEVEL] == "0" and LEVEL not in str(level4["session_options"])
    a, b = level4["items"], level0["items"]
    head = int(50_000 * runtime.prepack_factor[NBITS])            # the explicit head keeps its level
    assert a["prepacked_weights"] == 10 * int(100_000 * runtime.prepack_factor[NBITS]) + head
    assert b["prepacked_weights"] == 10 * int(100_000 * runtime.prepack_factor[NBITS_FLOAT]) + head
    assert b["kernel_workspaces"] == a["kernel_workspaces"] + runtime.kernel_workspaces[NBITS_FLOAT]
    share = 1 / 11      # the head's share of the packed weights still quantizes its activation per call
    assert b["kernel_temporaries"] == int(1_000_000 * (runtime.kernel_temporaries[NBITS] * share
                                                       + runtime.kernel_temporaries[NBITS_FLOAT] * (1 - share)))
    assert b["kernel_temporaries"] < a["kernel_temporaries"]
    assert level0["predicted_peak_bytes"] < level4["predicted_peak_bytes"]


def test_the_first_choice_that_applies_is_taken():
    model = RuntimeModel(session_options={"enable_mem_pattern": False}, dequantize_matmul=NBITS, choices=(
        Choice.from_table({"name": "many rows", "weight_bits": [4], "min_rows": 64,
                           "session_options": {"config_entries": {LEVEL: "0"}}, "dequantize_matmul": NBITS_FLOAT}),
        Choice.from_table({"name": "any 4-bit", "weight_bits": [4, 2],
                           "session_options": {"config_entries": {"x": "1"}}})))
    many = model.choose([DecodedMatMul(4, 64)])
    assert many.choice == "many rows" and many.dequantize_matmul == NBITS_FLOAT
    assert many.session_options == {"enable_mem_pattern": False, "config_entries": {LEVEL: "0"}}
    few = model.choose([DecodedMatMul(4, 1), DecodedMatMul(2, 8)])
    assert few.choice == "any 4-bit" and few.dequantize_matmul == NBITS      # names no kind: the model's own
    assert few.session_options["config_entries"] == {"x": "1"}
    assert model.choose([DecodedMatMul(8, 64)]).choice is None


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


def test_packed_pages_are_released_while_the_session_loads(monkeypatch, tiny_bundles):
    """``loading``: with release_mapped_after_load the packed-and-kept spans of a bundle of WATCH_MIN_BYTES or
    more are released every RELEASE_EVERY seconds while the session is created, once more after, and never
    again; a smaller bundle's once after; without the setting, never. The session computes what one created
    without releasing does."""
    import time

    model = tiny_bundles["int4"] / "model.onnx"
    spans = runtime.packed_and_kept(model)
    assert spans                                  # level-4 MatMulNBits scales in model.weights
    calls = []
    real = runtime.weights.drop_mapped_pages
    monkeypatch.setattr(runtime.weights, "drop_mapped_pages", lambda folder, s: calls.append(s) or real(folder, s))
    with runtime.loading({RELEASE_MAPPED: True}, model):          # a tiny bundle: after the load only
        time.sleep(5 * runtime.RELEASE_EVERY)
        assert calls == []
    assert calls == [spans]
    calls.clear()
    monkeypatch.setattr(runtime, "WATCH_MIN_BYTES", 0)
    with runtime.loading({RELEASE_MAPPED: True}, model):
        released = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        time.sleep(8 * runtime.RELEASE_EVERY)     # a load that takes longer than a few releases
        during = len(calls)
    assert during >= 2 and all(s == spans for s in calls)
    assert len(calls) == during + 1               # after_load's; the thread has stopped
    time.sleep(3 * runtime.RELEASE_EVERY)
    assert len(calls) == during + 1
    calls.clear()
    with runtime.loading({}, model):
        plain = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        time.sleep(3 * runtime.RELEASE_EVERY)
    assert calls == []
    feed = {"input_ids": np.random.default_rng(1).integers(0, 256, (1, 64)).astype(np.int64)}
    np.testing.assert_array_equal(released.run(None, feed)[0], plain.run(None, feed)[0])


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory) -> dict[str, Path]:
    """tiny-llama bundles at 1×64 (none, int4, w8a8), and at 2×64 — 128 rows per MatMul — int4 and int8."""
    work = tmp_path_factory.mktemp("runtime-model")
    onnx.save(build_llama(), str(work / "tiny-llama.onnx"))
    np.savez(work / "calib.npz", input_ids=np.random.default_rng(0).integers(0, 256, (8, 1, 64)).astype(np.int64))
    out = {}
    for name, mode, batch in (("none", QuantizeMode.NONE, 1), ("int4", QuantizeMode.INT4, 1),
                              ("w8a8", QuantizeMode.W8A8, 1), ("int4-2x64", QuantizeMode.INT4, 2),
                              ("int8-2x64", QuantizeMode.INT8, 2)):
        out[name] = work / name
        build(work / "tiny-llama.onnx", BuildOptions(
            target="x86-64", input_shapes={"input_ids": (batch, 64)}, quantize=mode, verify=False,
            calib=str(work / "calib.npz") if mode is QuantizeMode.W8A8 else None), out[name])
    return out


def _options_and_runtime(bundle: Path) -> tuple[dict, dict]:
    return (json.loads((bundle / "session_options.json").read_text()),
            json.loads((bundle / "plan.json").read_text())["runtime"])


def test_each_bundle_carries_the_session_options_chosen_for_what_it_holds(tiny_bundles, tmp_path):
    target = load_target("x86-64").runtime
    options, runtime = _options_and_runtime(tiny_bundles["int4-2x64"])       # 4-bit weights, 128 rows
    assert options == runtime["session_options"] and runtime["choice"] == target.choices[0].name
    assert options["config_entries"] == {LEVEL: "0"} and options["enable_mem_pattern"] is False
    for name in ("int8-2x64", "int4", "w8a8", "none"):        # 8-bit weights, 64 rows, integer GEMMs, none
        options, runtime = _options_and_runtime(tiny_bundles[name])
        assert options == runtime["session_options"] == target.session_options and runtime["choice"] is None, name
    # a generation bundle: decode multiplies one row, whatever the prefill chunk
    out = tmp_path / "gen4"
    build(FIXTURES / "llama-past-optimum.onnx", BuildOptions(context=32, quantize=QuantizeMode.INT4, block_size=16,
                                                             prefill_chunk=32, verify=False, target="x86-64"), out)
    options, runtime = _options_and_runtime(out)
    plan = json.loads((out / "plan.json").read_text())
    assert options == runtime["session_options"] == target.session_options and runtime["choice"] is None
    assert {p["name"] for p in plan["profiles"]} == {"decode", "prefill"}


def test_the_plan_predicts_the_chosen_configuration(tiny_bundles):
    """The level-0 bundle's prediction is the runtime model's under its choice: the decoded weights as
    accuracy level 0 packs them, fewer per-call temporaries than the same graph at level 4."""
    from lmc.core import ir
    from lmc.compiler.backend import decoded_matmuls, plan_memory, runtime_for, written_decoded_matmul
    from lmc.core.model_io import load_model

    target = load_target("x86-64")
    graph = ir.to_graph(load_model(tiny_bundles["int4-2x64"] / "model.onnx"))
    assert {(m.bits, m.rows) for m in decoded_matmuls(graph)} == {(4, 128)}
    chosen = plan_memory(graph, target).runtime
    same_at_level4 = ir.to_graph(load_model(tiny_bundles["int4-2x64"] / "model.onnx"))
    for node in same_at_level4.nodes:
        if written_decoded_matmul(node):          # the bundle writes its MatMulNBits at the chosen level
            node.attrs["accuracy_level"] = 4
    level4 = plan_memory(same_at_level4, target, runtime=dataclasses.replace(target.runtime, choices=())).runtime
    assert runtime_for(graph, target).choice == chosen["choice"] == target.runtime.choices[0].name
    assert chosen == json.loads((tiny_bundles["int4-2x64"] / "plan.json").read_text())["runtime"]
    assert level4["choice"] is None and LEVEL not in str(level4["session_options"])
    assert chosen["items"]["prepacked_weights"] < level4["items"]["prepacked_weights"]
    assert chosen["items"]["kernel_temporaries"] < level4["items"]["kernel_temporaries"]


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
    from lmc.core.runtime import open_bundle
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
@pytest.mark.parametrize("mode", ["none", "int4", "w8a8", "int4-2x64"])
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


def test_packed_and_kept_names_the_level4_scales_and_zero_points_only(tmp_path):
    """The spans x86-64 bundles drop after load are MatMulNBits' scales and zero points at accuracy level 4
    (packed into its weight, kept by the runtime); the packed weights themselves and anything a level-0
    kernel reads at run time are not among them. Generation with them dropped gives the same tokens."""
    from lmc.compiler.drivers import StateDecoder, greedy

    out = tmp_path / "gen"
    build(FIXTURES / "llama-past-optimum.onnx", BuildOptions(context=32, quantize=QuantizeMode.INT4, block_size=16,
                                                             verify=False, target="x86-64"), out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    level4 = [n for n in nbits if any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute)]
    assert level4
    expected = sorted(offsets[name] for n in level4 for name in n.input[2:4] if name in offsets)
    spans = runtime.packed_and_kept(out / "model.onnx")
    assert sorted(off for off, _ in spans["model.weights"]) == expected
    assert not {offsets.get(n.input[1]) for n in nbits} & set(expected)
    options = json.loads((out / "session_options.json").read_text())
    assert options[RELEASE_MAPPED] is True
    assert greedy(StateDecoder(out / "model.onnx", threads=1), [1, 2, 3], 12) == \
        greedy(StateDecoder(out / "model.onnx", threads=1, session_options={RELEASE_MAPPED: False}), [1, 2, 3], 12)
