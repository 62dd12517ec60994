"""Weights stay in their external-data files: read on demand, never copied into the bundle by reference,
never written to, and onnxruntime sessions on the graph map them (or get a copy where linking fails)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.core import ir, shapes, weights
from lmc.compiler.build import BuildOptions, build
from lmc.core.model_io import load_model
from lmc.core.runtime import session
from lmc.compiler.verify import bundle_model_path


def _mlp(folder, d: int = 256, layers: int = 3, seed: int = 0):
    """x[1,d] → (MatMul by a d×d weight → Relu) × layers, plus a small bias, weights in one external file."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) * 0.05).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        h = f"r{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "bias"))
    nodes.append(helper.make_node("Add", [h, "bias"], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "mlp.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="mlp.data",
              size_threshold=0)
    return path


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_large_tensors_stay_in_their_file(tmp_path):
    path = _mlp(tmp_path)
    model = load_model(path)
    by_name = {t.name: t for t in model.graph.initializer}
    for i in range(3):
        t = by_name[f"w{i}"]
        assert weights.is_file_backed(t) and not t.HasField("raw_data")
    assert not weights.is_file_backed(by_name["bias"]) and by_name["bias"].HasField("raw_data")   # 1 KiB: read in


def test_values_are_read_per_access_and_not_cached(tmp_path):
    path = _mlp(tmp_path)
    reference = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in onnx.load(str(path)).graph.initializer}
    before = _digest(tmp_path)
    graph = ir.to_graph(load_model(path))
    const = next(c for c in ir.constants(graph) if c.name == "w1")
    assert isinstance(const._values, weights.FileValues)
    value = ir.const_value(const)
    np.testing.assert_array_equal(value, reference["w1"])
    value[...] = 0                      # copy-on-write: the caller's array only
    del value
    assert isinstance(const._values, weights.FileValues)
    np.testing.assert_array_equal(ir.const_value(const), reference["w1"])
    assert ir.constant_bytes(const) == reference["w1"].tobytes()
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("link", [True, False])
def test_session_on_a_file_backed_graph(tmp_path, monkeypatch, link):
    path = _mlp(tmp_path)
    if not link:                        # e.g. another filesystem: the referenced ranges are copied instead
        def refuse(*_args, **_kwargs):
            raise OSError("cross-device link")
        monkeypatch.setattr(weights.os, "link", refuse)
    graph = ir.to_graph(load_model(path))
    model = ir.to_model(graph)
    locations = [e.value for t in weights.file_backed(model) for e in t.external_data if e.key == "location"]
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    got = session(model).run(None, {"x": x})[0]
    want = session(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the in-memory model still references the source file afterwards
    assert [e.value for t in weights.file_backed(model) for e in t.external_data if e.key == "location"] == locations


def test_bundle_never_references_the_source_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = _mlp(src)
    before = _digest(src)
    result = build(path, BuildOptions(target="x86-64"), tmp_path / "out")
    assert result.verification is not None and result.verification.passed
    bundle = onnx.load(str(bundle_model_path(tmp_path / "out")), load_external_data=False)
    for t in bundle.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                assert not os.path.isabs(e.value) and "/" not in e.value
    assert _digest(src) == before
    # the bundle stands alone: it runs with the source folder gone
    for p in src.iterdir():
        p.unlink()
    src.rmdir()
    x = np.ones((1, 256), np.float32)
    assert session(bundle_model_path(tmp_path / "out")).run(None, {"x": x})[0].shape == (1, 256)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_loading_keeps_weights_out_of_memory(tmp_path):
    path = _mlp(tmp_path, d=2048, layers=6)           # 96 MiB of weights
    start = _rss()
    graph = ir.to_graph(load_model(path))
    for const in ir.constants(graph):                 # a pass reading every weight once
        ir.const_value(const).sum()
    assert ir.weight_bytes(graph) > 96 * 2**20
    assert _rss() - start < 24 * 2**20


def _parallel(folder, d: int = 512):
    """y = x·A + x·B with A, B of d×d (1 MiB each at d = 512): merge-parallel-matmuls makes one 2 MiB weight."""
    rng = np.random.default_rng(2)
    a, b = ((rng.standard_normal((d, d)) * 0.05).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "A"], ["ya"]), helper.make_node("MatMul", ["x", "B"], ["yb"]),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    graph = helper.make_graph(nodes, "par", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])],
                              [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    path = folder / "par.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="par.data", size_threshold=0)
    return path, a, b


def test_merged_file_backed_weights_are_joined_on_read(tmp_path):
    """merge-parallel-matmuls over weights left in their file copies nothing: the merged weight is joined
    when read (and written whole into a bundle)."""
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.passes.merge_matmuls import MergeParallelMatMuls

    path, a, b = _parallel(tmp_path)
    graph = ir.to_graph(load_model(path))
    shapes.infer_shapes(graph)
    with weights.SpillFile() as spill:
        graph, _ = PassManager([MergeParallelMatMuls()], PassContext(spill=spill)).run(graph)
        merged = [c for c in ir.constants(graph) if c.name.endswith("_merged")]
        assert len(merged) == 1 and isinstance(merged[0]._values, weights.ConcatValues) and spill.bytes == 0
        assert merged[0].shape == (512, 1024) and ir.tensor_nbytes(merged[0]) == 2 * a.nbytes
        np.testing.assert_array_equal(ir.const_value(merged[0]), np.concatenate([a, b], axis=1))
        assert ir.constant_bytes(merged[0]) == np.concatenate([a, b], axis=1).tobytes()
        model = ir.to_model(graph)                       # exporters get the whole tensor
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(out[merged[0].name], np.concatenate([a, b], axis=1))


def test_take_flat_reads_merged_values_without_joining_them(tmp_path, monkeypatch):
    """``take_flat`` gives the elements of the joined, flattened value on either axis, nested joins too,
    and never calls ``load`` on the join itself (dedup's probe reads 64 elements, not a merged projection)."""
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.passes.merge_matmuls import MergeParallelMatMuls

    path, a, b = _parallel(tmp_path)
    graph = ir.to_graph(load_model(path))
    shapes.infer_shapes(graph)
    graph, _ = PassManager([MergeParallelMatMuls()], PassContext()).run(graph)
    merged = next(c for c in ir.constants(graph) if c.name.endswith("_merged"))._values
    parts = merged.parts
    whole = np.concatenate([a, b], axis=1)
    monkeypatch.setattr(weights.ConcatValues, "load", lambda self: (_ for _ in ()).throw(AssertionError("loaded")))
    for axis, join, ref in ((1, merged, whole),
                            (0, weights.ConcatValues("r", parts, 0), np.concatenate([a, b], axis=0)),
                            (1, weights.ConcatValues("n", [merged, parts[0]], 1), np.concatenate([whole, a], 1))):
        flat = ref.reshape(-1)
        idx = np.array([0, 1, ref.shape[1] - 1, ref.shape[1], flat.size // 2 + 3, flat.size - 1], dtype=np.int64)
        np.testing.assert_array_equal(weights.take_flat(join, idx), flat[idx])
    np.testing.assert_array_equal(weights.take_flat(whole, np.array([5])), whole.reshape(-1)[[5]])


def test_streamed_calibration_links_weights_instead_of_writing_them(tmp_path, monkeypatch):
    """A streamed calibration session (a graph holding merged weights) links the model's weights file and
    joins a merged weight by a Concat of its file-backed parts: no weights file is written, and the
    statistics and Grams are those of the whole model."""
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.passes.merge_matmuls import MergeParallelMatMuls
    from lmc.passes.quantize import calibration

    path, a, b = _parallel(tmp_path)
    graph = ir.to_graph(load_model(path))
    shapes.infer_shapes(graph)
    graph, _ = PassManager([MergeParallelMatMuls()], PassContext()).run(graph)
    merged = next(c for c in ir.constants(graph) if c.name.endswith("_merged"))
    assert isinstance(merged._values, weights.ConcatValues)
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((1, 512)).astype(np.float32)} for _ in range(3)]
    out = graph.outputs[0].name
    monkeypatch.setattr(calibration, "STREAM_BYTES", 0)
    wrote, mkdtemp = [], tempfile.mkdtemp
    real = calibration.externalize
    monkeypatch.setattr(calibration, "externalize", lambda *a, **k: wrote.append(real(*a, **k)) or wrote[-1])
    folders = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: folders.append(mkdtemp(*a, **k)) or folders[-1])
    links = os.stat(path.with_suffix(".data")).st_nlink
    seen = []
    real_session = calibration.session
    monkeypatch.setattr(calibration, "session", lambda p, **k: seen.append(onnx.load(str(p), load_external_data=False))
                        or real_session(p, **k))
    with calibration.Calibrator(graph, [out], feeds) as calibrator:
        assert wrote == [False] and folders and not os.path.exists(folders[0])   # linked, read, removed
        # the merged weight's MatMul reads its parts where they are (no Concat of weights to fold at load)
        inits = {t.name for t in seen[0].graph.initializer}
        ops = [(n.op_type, [i in inits for i in n.input]) for n in seen[0].graph.node]
        assert ("MatMul", [False, True]) in ops and sum(op == "MatMul" for op, _ in ops) == 2
        assert not any(op == "Concat" and any(flags) for op, flags in ops)
        assert os.stat(path.with_suffix(".data")).st_nlink == links
        stats = calibrator.run(gram=True)[out]
    y = np.concatenate([f["x"] @ a + f["x"] @ b for f in feeds])
    np.testing.assert_allclose(stats.gram, y.T @ y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.absmax, np.abs(y).max(axis=0), rtol=1e-5)
    # with a Gram, E[x²] is its diagonal over the rows: the statistics without one agree
    np.testing.assert_allclose(stats.second_moment, (y.astype(np.float64) ** 2).mean(axis=0), rtol=1e-5)
    with calibration.Calibrator(graph, [out], feeds) as calibrator:
        plain = calibrator.run()[out]
    np.testing.assert_allclose(stats.second_moment, plain.second_moment, rtol=1e-5)
    np.testing.assert_array_equal(stats.absmax, plain.absmax)


def test_a_merged_weight_read_otherwise_is_joined_for_calibration(tmp_path):
    """A merged weight read by anything besides MatMul's right operand stays one tensor in the calibration
    model: a Concat of its file-backed parts, and its MatMul is left whole."""
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.passes.merge_matmuls import MergeParallelMatMuls
    from lmc.passes.quantize import calibration

    path, a, b = _parallel(tmp_path)
    graph = ir.to_graph(load_model(path))
    shapes.infer_shapes(graph)
    graph, _ = PassManager([MergeParallelMatMuls()], PassContext()).run(graph)
    merged = next(c for c in ir.constants(graph) if c.name.endswith("_merged"))
    model = ir.export_skeleton(graph)
    model.graph.node.append(helper.make_node("ReduceSum", [merged.name], ["total"], keepdims=0))
    linked = calibration._point_at_files(model, {c.name: c for c in ir.constants(graph)})
    assert linked == {f"{merged.name}/part0", f"{merged.name}/part1"}
    joins = [n for n in model.graph.node if n.op_type == "Concat"]
    assert [list(n.input) for n in joins] == [sorted(linked)] and joins[0].output[0] == merged.name
    assert [list(n.input)[1] for n in model.graph.node if n.op_type == "MatMul"] == [merged.name]


def test_weights_a_pass_creates_are_spilled(tmp_path):
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.passes.quantize.weight_only import QuantizeConfig, QuantizeWeights, WeightBits

    path, a, b = _parallel(tmp_path)
    graph = ir.to_graph(load_model(path))
    shapes.infer_shapes(graph)
    with weights.SpillFile(min_bytes=1 << 17) as spill:
        graph, _ = PassManager([QuantizeWeights(QuantizeConfig(bits=WeightBits.INT8))],
                               PassContext(spill=spill)).run(graph)
        made = [c for c in ir.constants(graph) if (ir.tensor_nbytes(c) or 0) >= 1 << 17]
        assert len(made) == 2 and all(isinstance(c._values, weights.FileValues) for c in made)
        assert all(c._values.path == spill.path for c in made) and spill.bytes == a.nbytes // 4 + b.nbytes // 4
        folder = spill.path.parent
    assert not folder.exists()


def test_models_in_memory_are_not_spilled(tmp_path):
    from lmc.models import build_llama

    model = build_llama()
    onnx.save(model, str(tmp_path / "m.onnx"))
    path, _, _ = _parallel(tmp_path)
    assert not weights.large_external(tmp_path / "m.onnx") and weights.large_external(path)
    graph = ir.to_graph(model)
    spill = weights.SpillFile(min_bytes=1, active=False)
    assert ir.spill_constants(graph, spill) == 0 and spill.path is None


def test_quantized_build_spills_its_new_weights(tmp_path, monkeypatch):
    from lmc.compiler.build import QuantizeMode

    path, a, b = _parallel(tmp_path, d=1024)          # int8 copies of 1 MiB each
    added = []
    original_add = weights.SpillFile.add

    def counting_add(self, name, *args):
        added.append(name)
        return original_add(self, name, *args)

    monkeypatch.setattr(weights.SpillFile, "add", counting_add)
    result = build(path, BuildOptions(target="x86-64", quantize=QuantizeMode.INT8), tmp_path / "out")
    assert len(added) >= 2
    x = np.random.default_rng(3).standard_normal((1, 1024)).astype(np.float32)
    want = x @ a + x @ b
    got = session(bundle_model_path(result.out_dir)).run(None, {"x": x})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 0.05
    assert not list(tmp_path.glob("out/*.data"))


_PEAK_CHILD = """
import sys
from lmc.compiler.build import BuildOptions, build
from lmc.core.runtime import session

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

session(sys.argv[3]).run(None, {"x": __import__("numpy").ones((1, 2048), "float32")})   # onnxruntime warmed up
base = status("VmRSS")
build(sys.argv[1], BuildOptions(target="x86-64"), sys.argv[2])
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_build_peak_is_about_one_copy_of_the_weights(tmp_path):
    """A verified exact build of a 256 MiB file-backed model: its peak above the idle process stays under
    1.15× the weights (the original and the bundle are each mapped once, one after the other; with the
    weights read into the loaded model it is 1.2×, and 2× on a 1.1B-parameter export)."""
    import subprocess
    import sys

    (tmp_path / "small").mkdir()
    path, small = _mlp(tmp_path, d=2048, layers=16), _mlp(tmp_path / "small", d=2048, layers=1)
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path), str(tmp_path / "out"), str(small)],
                         capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 1.15 * 16 * 2048 * 2048 * 4, peak


def test_subgraph_tensors_are_read_in(tmp_path):
    """Only the main graph's initializers stay in their files; a branch's own large initializer is read in
    (bundles write top-level initializers to their weights file)."""
    big = np.arange(64 * 1024, dtype=np.float32)                         # 256 KiB
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [big.size])
    then = helper.make_graph([helper.make_node("Identity", ["t"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [big.size])],
                             [numpy_helper.from_array(big, "t")])
    other = helper.make_graph([helper.make_node("Neg", ["w"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [big.size])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [out],
                              [numpy_helper.from_array(big + 1, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "if.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="if.data", size_threshold=0)
    loaded = load_model(tmp_path / "if.onnx")
    assert [t.name for t in weights.file_backed(loaded)] == ["w"]
    for c in (True, False):
        got = session(ir.to_model(ir.to_graph(loaded))).run(None, {"c": np.array(c)})[0]
        np.testing.assert_array_equal(got, big if c else -(big + 1))


def test_calibrated_quantization_of_a_file_backed_model(tmp_path, monkeypatch):
    """GPTQ's calibration session links the model's files instead of streaming a copy of its weights."""
    from lmc.compiler.build import QuantizeMode
    from lmc.passes.quantize import calibration

    path, a, b = _parallel(tmp_path, d=512)
    monkeypatch.setattr(calibration, "STREAM_BYTES", 1)        # would stream any graph holding its weights
    folders = []
    close = calibration.Calibrator.close

    def recording_close(self):
        folders.append(self._folder)
        close(self)

    monkeypatch.setattr(calibration.Calibrator, "close", recording_close)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 1, 512)).astype(np.float32))
    result = build(path, BuildOptions(target="x86-64", quantize=QuantizeMode.INT4, calib=str(tmp_path / "calib.npz")),
                   tmp_path / "out")
    assert folders and folders == [None] * len(folders)      # no streamed copy was written
    x = rng.standard_normal((1, 512)).astype(np.float32)
    want = x @ a + x @ b
    got = session(bundle_model_path(result.out_dir)).run(None, {"x": x})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 0.2


def _mapped_rss(path) -> int:
    """Resident bytes of the process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_dropped_weight_pages_leave_the_process_and_read_back_the_same(tmp_path):
    from lmc.core.weights import drop_mapped_pages

    values = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)     # 16 MiB
    values.tofile(tmp_path / "model.weights")
    mapped = np.memmap(tmp_path / "model.weights", dtype=np.float32, mode="r")
    assert float(mapped.sum()) == pytest.approx(float(values.sum()), rel=1e-4)     # every page read
    path = (tmp_path / "model.weights").resolve()
    assert _mapped_rss(path) > 15 << 20
    everything = {"model.weights": [(0, values.nbytes)]}
    assert drop_mapped_pages(tmp_path / "elsewhere", everything) == 0              # not this folder's:
    assert drop_mapped_pages(tmp_path, {"other.weights": [(0, values.nbytes)]}) == 0   # not this file: kept
    assert _mapped_rss(path) > 15 << 20
    half = values.nbytes // 2
    assert drop_mapped_pages(tmp_path, {"model.weights": [(100, half)]}) < half    # whole pages inside only
    assert 7 << 20 < _mapped_rss(path) < 9 << 20
    assert drop_mapped_pages(tmp_path, everything) >= values.nbytes
    assert _mapped_rss(path) < 1 << 20
    np.testing.assert_array_equal(np.asarray(mapped), values)                      # read back, unchanged


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_a_writable_mapping_keeps_its_pages(tmp_path):
    """A private writable mapping may hold changed pages: dropping them would bring the file's values back."""
    from lmc.core.weights import drop_mapped_pages

    np.zeros(1 << 20, np.float32).tofile(tmp_path / "model.weights")
    mapped = np.memmap(tmp_path / "model.weights", dtype=np.float32, mode="c")      # copy-on-write
    mapped[:] = 7.0
    assert drop_mapped_pages(tmp_path, {"model.weights": [(0, 4 << 20)]}) == 0
    assert float(mapped.min()) == 7.0


def test_calibration_session_runs_only_what_its_tensors_need(tmp_path):
    """The calibration session is cut to the cone of the tensors it collects: a product whose output nobody
    asked for is not in it (onnxruntime would run it every sample), and the statistics are unchanged."""
    from lmc.passes.quantize import calibration

    rng = np.random.default_rng(6)
    w, head = (rng.standard_normal((64, n)).astype(np.float32) for n in (64, 512))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "HEAD"], ["logits"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 512])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(head, "HEAD")]),
        opset_imports=[helper.make_opsetid("", 17)])
    graph = ir.to_graph(model)
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(2)]
    with calibration.Calibrator(graph, ["r"], feeds) as calibrator:
        assert [o.name for o in calibrator._sess.get_outputs()] == ["r"]
        stats = calibrator.run()["r"]
    r = np.maximum(np.concatenate([f["x"] for f in feeds]) @ w, 0)
    np.testing.assert_allclose(stats.absmax, np.abs(r).max(axis=0), rtol=1e-6)
    trimmed = onnx.ModelProto()
    trimmed.CopyFrom(model)
    trimmed.graph.output.append(helper.make_empty_tensor_value_info("r"))
    calibration._keep_only(trimmed, ["r"])
    assert [n.op_type for n in trimmed.graph.node] == ["MatMul", "Relu"]
    assert [t.name for t in trimmed.graph.initializer] == ["W"]


def test_calibration_asking_for_nothing_computed_keeps_the_graph():
    """Asked for no tensor (a session for the model's own outputs) or for graph inputs alone, the calibration
    session is not cut to nothing (onnxruntime refuses a graph without outputs); the statistics are the
    feeds'."""
    from lmc.passes.quantize import calibration

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [numpy_helper.from_array(np.ones(3, np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": np.array([[1, -2, 3], [-4, 5, -6]], np.float32)}]
    with calibration.Calibrator(ir.to_graph(model), [], feeds) as calibrator:
        assert [o.name for o in calibrator._sess.get_outputs()] == ["y"]
    with calibration.Calibrator(ir.to_graph(model), ["x"], feeds) as calibrator:
        stats = calibrator.run()["x"]
    np.testing.assert_array_equal(stats.absmax, [4, 5, 6])


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_file_backed_values_copy_into_another_file_at_its_position(tmp_path, monkeypatch, kernel_copy):
    """FileValues.copy_into appends exactly its range, by the kernel or (no copy_file_range) read and
    written; a range past the file's end is an error, not a short copy."""
    data = np.arange(5000, dtype=np.float32)
    (tmp_path / "src.bin").write_bytes(b"x" * 100 + data.tobytes() + b"y" * 7)
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[5000], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", str(tmp_path / "src.bin")), ("offset", "100"), ("length", str(data.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range")
    with open(tmp_path / "out.bin", "wb") as out:
        out.write(b"head")
        weights.FileValues(tensor).copy_into(out)
        out.write(b"tail")
    assert (tmp_path / "out.bin").read_bytes() == b"head" + data.tobytes() + b"tail"
    tensor.external_data[2].value = str(data.nbytes + 8)
    with open(tmp_path / "bad.bin", "wb") as out, pytest.raises(OSError, match="past the end"):
        weights.FileValues(tensor).copy_into(out)
