"""cse: repeated computations from the same inputs are computed once."""

import numpy as np
from helpers import assert_pass_exact, op_count
from onnx import TensorProto, helper

from lmc.passes.cleanup import Cleanup
from lmc.passes.cse import EliminateCommonSubexpressions


def test_duplicate_chains_merge_and_outputs_stay():
    nodes = [helper.make_node("Relu", ["x"], ["a1"]), helper.make_node("Relu", ["x"], ["a2"]),
             helper.make_node("Exp", ["a1"], ["b1"]), helper.make_node("Exp", ["a2"], ["b2"]),
             helper.make_node("Add", ["b1", "b2"], ["y"]),
             helper.make_node("Softmax", ["x"], ["s1"], axis=0), helper.make_node("Softmax", ["x"], ["s2"], axis=1),
             helper.make_node("Add", ["s1", "s2"], ["z"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("y", "z")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 17)])
    graph, records = assert_pass_exact(model, [EliminateCommonSubexpressions(), Cleanup()],
                                       {"x": np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)})
    assert op_count(graph, "Relu") == 1 and op_count(graph, "Exp") == 1
    assert op_count(graph, "Softmax") == 2            # different attributes: not the same computation


def _twins(make_node, opsets=(("", 17),), inputs=(), inits=()):
    """x [4, 4] -> two nodes made by ``make_node(output)`` (same op, attributes and inputs) -> Add -> y."""
    nodes = [make_node("a1"), make_node("a2"), helper.make_node("Add", ["a1", "a2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph(nodes, "g", [x, *inputs], [y], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _after_cse(model):
    from helpers import apply_passes

    graph, _ = apply_passes(model, [EliminateCommonSubexpressions(), Cleanup()])
    return graph


def test_random_ops_stay_separate():
    model = _twins(lambda out: helper.make_node("RandomUniformLike", ["x"], [out]))
    assert op_count(_after_cse(model), "RandomUniformLike") == 2


def test_dropout_in_training_mode_stays_separate_and_at_inference_merges():
    inits = [helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("training", TensorProto.BOOL, [], [True])]
    model = _twins(lambda out: helper.make_node("Dropout", ["x", "ratio", "training"], [out]), inits=inits)
    assert op_count(_after_cse(model), "Dropout") == 2
    training = helper.make_tensor_value_info("training", TensorProto.BOOL, [])    # a run-time flag: may be true
    model = _twins(lambda out: helper.make_node("Dropout", ["x", "ratio", "training"], [out]), inputs=[training],
                   inits=inits[:1])
    assert op_count(_after_cse(model), "Dropout") == 2
    model = _twins(lambda out: helper.make_node("Dropout", ["x", "ratio"], [out]), inits=inits[:1])
    assert op_count(_after_cse(model), "Dropout") == 1


def test_custom_domain_ops_merge_only_when_known_deterministic():
    model = _twins(lambda out: helper.make_node("Noise", ["x"], [out], domain="com.example"),
                   opsets=(("", 17), ("com.example", 1)))
    assert op_count(_after_cse(model), "Noise") == 2
    model = _twins(lambda out: helper.make_node("FusedMatMul", ["x", "x"], [out], domain="com.microsoft", alpha=0.5),
                   opsets=(("", 17), ("com.microsoft", 1)))
    graph, _ = assert_pass_exact(model, [EliminateCommonSubexpressions(), Cleanup()],
                                 {"x": np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)})
    assert op_count(graph, "FusedMatMul") == 1
