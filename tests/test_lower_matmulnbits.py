"""DequantizeLinear → MatMul written as MatMulNBits: onnxruntime's numbers on the pair, bit for bit."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lmc.core import ir
from lmc.core.runtime import session
from lmc.compiler.lower_matmulnbits import accuracy_level, lower_decoded_matmuls, lowerable
from lmc.passes.quantize.scales import pack_int4, pack_uint4_flat

K, N, BLOCK = 96, 40, 32
RNG = np.random.default_rng(0)


def _tensor(name, dtype, values):
    if dtype in (TensorProto.UINT4, TensorProto.INT4):
        data = pack_uint4_flat(values) if dtype == TensorProto.UINT4 else pack_int4(values)
        return helper.make_tensor(name, dtype, list(values.shape), data, raw=True)
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    return helper.make_tensor(name, dtype, list(values.shape), np.asarray(values, np_type).tobytes(), raw=True)


def pair_model(dtype, zero_point: bool, k=K, block=BLOCK, second_reader=False) -> onnx.ModelProto:
    """A [3, k] → DequantizeLinear(W [k, N], blocks along k) → MatMul → Y; optionally a second MatMul."""
    lo, hi = {TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7),
              TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}[dtype]
    nb = -(-k // block)
    inits = [_tensor("w", dtype, RNG.integers(lo, hi + 1, size=(k, N))),
             helper.make_tensor("s", TensorProto.FLOAT, [nb, N], RNG.uniform(0.01, 0.1, (nb, N)).astype(np.float32))]
    if zero_point:
        inits.append(_tensor("z", dtype, RNG.integers(lo, hi + 1, size=(nb, N))))
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"] + ["z"] * zero_point, ["wf"], axis=0, block_size=block),
             helper.make_node("MatMul", ["a", "wf"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])]
    if second_reader:
        nodes.append(helper.make_node("MatMul", ["a2", "wf"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [3, N]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, k]) for n in ["a", "a2"][:1 + second_reader]]
    graph = helper.make_graph(nodes, "pair", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model, feeds, level):
    entries = {"session.qdq_matmulnbits_accuracy_level": str(level)}
    return session(model, threads=1, config_entries=entries).run(None, feeds)


@pytest.mark.parametrize("dtype,zero_point", [(TensorProto.UINT4, True), (TensorProto.UINT4, False),
                                              (TensorProto.INT4, False), (TensorProto.INT4, True),
                                              (TensorProto.UINT8, True), (TensorProto.INT8, False)])
@pytest.mark.parametrize("level", [0, 4])
def test_lowered_pair_computes_what_onnxruntime_fuses(dtype, zero_point, level):
    model = pair_model(dtype, zero_point)
    feeds = {"a": RNG.standard_normal((3, K)).astype(np.float32)}
    expected = run(model, feeds, level)
    graph = ir.to_graph(model)
    assert lower_decoded_matmuls(graph, level) == 1
    lowered = ir.to_model(graph)
    assert [n.op_type for n in lowered.graph.node] == ["MatMulNBits"]
    got = run(lowered, feeds, level)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_a_wrong_layout_would_be_seen():
    """The comparison above is sharp: the same weights with two blocks' scales swapped do not pass it."""
    model = pair_model(TensorProto.UINT4, True)
    feeds = {"a": RNG.standard_normal((3, K)).astype(np.float32)}
    expected = run(model, feeds, 4)
    graph = ir.to_graph(model)
    lower_decoded_matmuls(graph, 4)
    node = graph.nodes[0]
    scales = node.inputs[2]
    broken = np.asarray(scales.values).reshape(N, -1)[:, ::-1].reshape(-1).copy()
    scales.values = broken
    got = run(ir.to_model(graph), feeds, 4)
    assert not np.array_equal(got[0], expected[0])


@pytest.mark.parametrize("k,block,shared", [(K + 16, BLOCK, False), (K, 8, False), (K, BLOCK, True)])
def test_pairs_onnxruntime_would_not_fuse_stay_pairs(k, block, shared):
    """Blocks the kernel cannot take, and a weight two MatMuls read (onnxruntime computes it in float:
    MatMulNBits at level 4 would quantize the activations and change the numbers)."""
    graph = ir.to_graph(pair_model(TensorProto.UINT4, True, k=k, block=block, second_reader=shared))
    assert not lowerable(graph.nodes[0])
    assert lower_decoded_matmuls(graph, 4) == 0
    assert [n.op for n in graph.nodes] == ["DequantizeLinear", "MatMul"] + ["MatMul"] * shared


def test_accuracy_level_is_onnxruntimes_unless_the_bundle_sets_one():
    assert accuracy_level({}) == 4
    assert accuracy_level({"config_entries": {"session.qdq_matmulnbits_accuracy_level": "0"}}) == 0
