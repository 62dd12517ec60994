"""Specialise twice, generalise: constants larger than the by-value threshold are compared by their values
too (a digest), and a differing one is generalised or refused like a small one."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from lmc.core import weights
from lmc.compiler import generation
from lmc.core.errors import LmcError
from lmc.compiler.generation import SMALL_CONSTANT, generalise, snapshot

N = SMALL_CONSTANT + 36          # elements: above the by-value threshold


def _graph(s: int, name: str, value: np.ndarray) -> gs.Graph:
    """x [1, S, N] + constant ``name`` [N] -> y."""
    x = gs.Variable("x", value.dtype, [1, s, N])
    y = gs.Variable("y", value.dtype, [1, s, N])
    node = gs.Node("Add", "add", inputs=[x, gs.Constant(name, value)], outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=18)


def _run(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    graph.inputs[0].shape = [1, "S", N]
    graph.outputs[0].shape = None
    model = gs.export_onnx(graph)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_large_float_constant_whose_values_depend_on_the_length_is_refused_naming_it():
    g = _graph(5, "bias", np.full(N, 5, np.float32))
    with pytest.raises(LmcError, match="'bias'.*sequence length"):
        generalise(g, snapshot(_graph(3, "bias", np.full(N, 3, np.float32))), (3, 5), g.inputs[0])


def test_large_constant_equal_in_both_compiles_is_left_alone():
    values = np.linspace(0, 1, N, dtype=np.float32)
    g = _graph(5, "bias", values.copy())
    assert generalise(g, snapshot(_graph(3, "bias", values.copy())), (3, 5), g.inputs[0]) == 0
    assert np.array_equal(g.nodes[0].inputs[1].values, values)


def test_large_affine_integer_constant_is_computed_at_run_time():
    g = _graph(5, "offsets", np.arange(N, dtype=np.int64) + 2 * 5)
    assert generalise(g, snapshot(_graph(3, "offsets", np.arange(N, dtype=np.int64) + 2 * 3)), (3, 5),
                      g.inputs[0]) == 1
    x = np.zeros((1, 7, N), np.int64)
    assert np.array_equal(_run(g, x)[0, 0], np.arange(N) + 2 * 7)


def _file_backed(spill: weights.SpillFile, name: str, value: np.ndarray) -> gs.Constant:
    tensor = spill.add(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape, value.tobytes())
    const = gs.Constant(name, value)
    const._values = weights.FileValues(tensor)
    return const


def _graph_with(s: int, const: gs.Constant) -> gs.Graph:
    dtype = const.dtype
    x = gs.Variable("x", dtype, [1, s, N])
    y = gs.Variable("y", dtype, [1, s, N])
    return gs.Graph(nodes=[gs.Node("Add", "add", inputs=[x, const], outputs=[y])], inputs=[x], outputs=[y],
                    opset=18)


def test_file_backed_constants_are_read_back_from_their_file(monkeypatch):
    with weights.SpillFile() as spill:
        # a differing file-backed integer constant: its first values are read back to generalise it
        first = _graph_with(3, _file_backed(spill, "offsets", np.arange(N, dtype=np.int64) + 3))
        record = snapshot(first)
        del first
        g = _graph_with(5, _file_backed(spill, "offsets", np.arange(N, dtype=np.int64) + 5))
        assert generalise(g, record, (3, 5), g.inputs[0]) == 1
        assert np.array_equal(_run(g, np.zeros((1, 4, N), np.int64))[0, 0], np.arange(N) + 4)
        # a differing file-backed float constant is refused
        first = _graph_with(3, _file_backed(spill, "w", np.full(N, 3, np.float32)))
        g = _graph_with(5, _file_backed(spill, "w", np.full(N, 5, np.float32)))
        with pytest.raises(LmcError, match="'w'"):
            generalise(g, snapshot(first), (3, 5), g.inputs[0])
        # the same bytes of the same file in both compiles: equal without hashing them
        shared = _file_backed(spill, "w", np.ones(N, np.float32))
        first = snapshot(_graph_with(3, shared))
        monkeypatch.setattr(generation, "_digest", lambda values: pytest.fail("hashed a weight read in place"))
        g = _graph_with(5, gs.Constant("w", np.zeros(1, np.float32)))
        g.nodes[0].inputs[1] = shared
        assert generalise(g, first, (3, 5), g.inputs[0]) == 0
        # equal bytes in two places (a weight each compile made again): compared, not hashed
        g = _graph_with(5, _file_backed(spill, "w", np.ones(N, np.float32)))
        assert generalise(g, first, (3, 5), g.inputs[0]) == 0
        g = _graph_with(5, _file_backed(spill, "w", np.full(N, 2, np.float32)))
        with pytest.raises(LmcError, match="'w'"):
            generalise(g, first, (3, 5), g.inputs[0])


def test_joined_file_backed_constants_are_compared_by_their_parts(monkeypatch):
    """A merged projection joined on read (ConcatValues of file-backed parts) is recorded by its parts:
    the same parts in both compiles are equal without joining or hashing them; a part that differs is caught."""
    half = N // 2

    def joined(spill, a, b):
        const = gs.Constant("w", np.zeros(N, np.float32))
        const._values = weights.ConcatValues("w", [_file_backed(spill, "w0", a)._values,
                                                   _file_backed(spill, "w1", b)._values], axis=0)
        return const

    with weights.SpillFile() as spill:
        ones, twos = np.ones(half, np.float32), np.full(N - half, 2, np.float32)
        shared = joined(spill, ones, twos)
        first = snapshot(_graph_with(3, shared))
        loads = []
        real_load = weights.ConcatValues.load
        monkeypatch.setattr(weights.ConcatValues, "load", lambda self: loads.append(1) or real_load(self))
        monkeypatch.setattr(generation, "_digest", lambda values: pytest.fail("hashed a joined weight"))
        for again in (shared, joined(spill, ones, twos)):           # the same parts; equal bytes elsewhere
            g = _graph_with(5, again)
            assert generalise(g, first, (3, 5), g.inputs[0]) == 0
        assert loads == []
        g = _graph_with(5, joined(spill, ones, twos + 1))
        with pytest.raises(LmcError, match="'w'"):
            generalise(g, first, (3, 5), g.inputs[0])
