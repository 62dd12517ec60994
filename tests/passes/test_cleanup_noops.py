"""cleanup and eliminate-noops: dead code and identity ops go, outputs and their names stay."""

from __future__ import annotations

import numpy as np
from helpers import assert_pass_exact, op_count
from onnx import TensorProto, helper, numpy_helper

from lmc.passes.cleanup import Cleanup
from lmc.passes.eliminate_noops import EliminateNoops


def test_noops_removed_and_output_names_kept():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Dropout", ["a"], ["b"]),
             helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["c", "shape"], ["d"]),
             helper.make_node("Transpose", ["d"], ["e"], perm=[0, 1]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("Identity", ["f"], ["y"]),                  # graph output: its name must stay
             helper.make_node("Exp", ["x"], ["dead"])]                     # reaches no output
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y],
                                                [numpy_helper.from_array(np.array([2, 3], np.int64), "shape")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    graph, records = assert_pass_exact(model, [Cleanup(), EliminateNoops(), Cleanup()], feeds)
    assert [n.op for n in graph.nodes] == ["Relu"]
    assert graph.outputs[0].name == "y" and graph.nodes[0].outputs[0].name == "y"
    assert records[0].stats["nodes_removed"] == 1                         # the dead Exp


def test_input_passed_straight_to_output_keeps_its_identity():
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    graph, _ = assert_pass_exact(model, [EliminateNoops()], {"x": np.arange(4, dtype=np.float32)})
    assert op_count(graph, "Identity") == 1                              # renaming a graph input is not allowed


# --------------------------------------------------------------------------------------------------------
# Near misses: ops that look like no-ops (same shape, same values, zero-ish parameters) but are not. Each
# is checked numerically against onnxruntime on the original graph, and the op must stay.

INT_MAX = np.iinfo(np.int64).max


def _model(nodes, x_shape, y_shape, inits=(), x_type=TensorProto.FLOAT, y_type=TensorProto.FLOAT, outputs=None,
           opset=18):
    """x → nodes → y, then y is read through a Neg into the graph output (named y too), so removing the op
    under test never has to rename the graph input or output."""
    for node in nodes:
        node.output[:] = ["m" if o == "y" else o for o in node.output]
    nodes = list(nodes) + [helper.make_node("Neg", ["m"], ["y"])]
    x = helper.make_tensor_value_info("x", x_type, x_shape)
    outs = outputs or [helper.make_tensor_value_info("y", y_type, y_shape)]
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in inits]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def _feed(shape, dtype=np.float32):
    return {"x": (np.random.default_rng(1).standard_normal(shape) * 10).astype(dtype)}


def _check(model, feeds, passes=None, kept=None, removed=None):
    from helpers import run_ort

    from lmc.core import ir

    graph, records = assert_pass_exact(model, passes or [EliminateNoops(), Cleanup()], feeds)
    ref, got = run_ort(model, feeds), run_ort(ir.to_model(graph), feeds)
    assert [r.dtype for r in ref] == [g.dtype for g in got]
    assert all(np.array_equal(r, g) for r, g in zip(ref, got))
    if kept:
        assert op_count(graph, kept) >= 1, f"{kept} was removed"
    if removed:
        assert op_count(graph, removed) == 0, f"{removed} was kept"
    return graph


def _slice(starts, ends, axes, steps):
    inits = [("starts", np.array(starts, np.int64)), ("ends", np.array(ends, np.int64))]
    names = ["x", "starts", "ends"]
    if axes is not None:
        inits.append(("axes", np.array(axes, np.int64)))
        names.append("axes")
    if steps is not None:
        if axes is None:
            names.append("")
        inits.append(("steps", np.array(steps, np.int64)))
        names.append("steps")
    return [helper.make_node("Slice", names, ["y"])], inits


def test_slice_reversal_is_not_a_noop():
    nodes, inits = _slice([-1], [-INT_MAX], None, [-1])
    _check(_model(nodes, [5], [5], inits), _feed((5,)), kept="Slice")


def test_slice_reversal_along_a_named_axis_is_not_a_noop():
    nodes, inits = _slice([-1], [-INT_MAX], [-1], [-1])
    _check(_model(nodes, [2, 4], [2, 4], inits), _feed((2, 4)), kept="Slice")


def test_slice_with_steps_on_size_one_axes_only_is_a_noop():
    nodes, inits = _slice([0, -1], [INT_MAX, -INT_MAX], [0, 1], [1, -1])
    _check(_model(nodes, [3, 1], [3, 1], inits), _feed((3, 1)), removed="Slice")


def test_full_slice_with_unit_steps_is_a_noop():
    nodes, inits = _slice([0], [INT_MAX], [1], [1])
    _check(_model(nodes, [3, 4], [3, 4], inits), _feed((3, 4)), removed="Slice")


def test_cast_to_a_wider_dtype_keeps_values_but_is_not_a_noop():
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], [4], [4],
                   y_type=TensorProto.DOUBLE)
    _check(model, _feed((4,)), kept="Cast")
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT64)], [4], [4],
                   x_type=TensorProto.INT32, y_type=TensorProto.INT64)
    _check(model, {"x": np.arange(4, dtype=np.int32)}, kept="Cast")


def test_cast_to_float16_is_not_a_noop():
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], [4], [4],
                   y_type=TensorProto.FLOAT16)
    _check(model, {"x": np.array([0.1, 1.0 / 3, 1000.01, -2.5], np.float32)}, kept="Cast")


def test_expand_that_broadcasts_is_not_a_noop():
    model = _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [3, 1], [3, 4],
                   [("shape", np.array([3, 4], np.int64))])
    _check(model, _feed((3, 1)), kept="Expand")
    model = _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [3], [2, 3],
                   [("shape", np.array([2, 1], np.int64))])                  # adds a leading axis
    _check(model, _feed((3,)), kept="Expand")


def test_expand_to_a_broadcast_compatible_smaller_shape_is_a_noop():
    model = _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [3, 4], [3, 4],
                   [("shape", np.array([1, 4], np.int64))])
    _check(model, _feed((3, 4)), removed="Expand")


def test_reshape_squeeze_flatten_that_change_the_shape_are_kept():
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [2, 3], [3, 2],
                   [("shape", np.array([3, 2], np.int64))])
    _check(model, _feed((2, 3)), kept="Reshape")
    model = _model([helper.make_node("Flatten", ["x"], ["y"], axis=1)], [2, 3, 4], [2, 12])
    _check(model, _feed((2, 3, 4)), kept="Flatten")
    model = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [3], [3, 1],
                   [("axes", np.array([1], np.int64))])
    _check(model, _feed((3,)), kept="Unsqueeze")


def test_transpose_that_reorders_with_the_same_shape_is_not_a_noop():
    model = _model([helper.make_node("Transpose", ["x"], ["y"], perm=[2, 1, 0])], [3, 1, 3], [3, 1, 3])
    _check(model, _feed((3, 1, 3)), kept="Transpose")
    model = _model([helper.make_node("Transpose", ["x"], ["y"])], [3, 3], [3, 3])     # default perm: reverse
    _check(model, _feed((3, 3)), kept="Transpose")


def test_transpose_moving_only_size_one_axes_is_a_noop():
    model = _model([helper.make_node("Transpose", ["x"], ["y"], perm=[2, 1, 0])], [1, 3, 1], [1, 3, 1])
    _check(model, _feed((1, 3, 1)), removed="Transpose")


def test_dropout_in_training_mode_is_not_a_noop():
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], seed=7)]
    inits = [("ratio", np.array(0.5, np.float32)), ("training", np.array(True))]
    _check(_model(nodes, [8, 8], [8, 8], inits), {"x": np.ones((8, 8), np.float32)}, kept="Dropout")


def test_dropout_whose_mask_is_a_graph_output_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
               helper.make_tensor_value_info("mask", TensorProto.BOOL, [4])]
    _check(_model(nodes, [4], [4], outputs=outputs), _feed((4,)), kept="Dropout")


def test_dropout_with_constant_false_training_mode_is_a_noop():
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"])]
    inits = [("ratio", np.array(0.5, np.float32)), ("training", np.array(False))]
    _check(_model(nodes, [4], [4], inits), _feed((4,)), removed="Dropout")


def test_pad_that_shifts_with_the_same_shape_is_not_a_noop():
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"])], [5], [5], [("pads", np.array([1, -1], np.int64))])
    _check(model, _feed((5,)), kept="Pad")
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"])], [5], [7], [("pads", np.array([1, 1], np.int64))])
    _check(model, _feed((5,)), kept="Pad")


def test_pad_with_zero_pads_is_a_noop():
    model = _model([helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode="constant")], [2, 3], [2, 3],
                   [("pads", np.zeros(4, np.int64)), ("value", np.array(5.0, np.float32))])
    _check(model, _feed((2, 3)), removed="Pad")


# ---- cleanup: what looks dead but is read


def test_cleanup_keeps_producers_read_only_by_a_nested_subgraph():
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["h", "w"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])])

    inner = helper.make_node("If", ["c"], ["inner_out"], then_branch=branch("t2", "Add"),
                             else_branch=branch("e2", "Mul"))
    outer_then = helper.make_graph([inner], "t1", [], [helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, [4])])
    outer_else = branch("e1", "Sub")
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=outer_then, else_branch=outer_else)]
    model = _model(nodes, [4], [4], [("zero", np.array(0.0, np.float32)), ("w", np.arange(4, dtype=np.float32))],
                   opset=17)
    for x in (np.array([1, 2, 3, 4], np.float32), np.array([-1, -2, -3, 0.5], np.float32)):
        graph = _check(model, {"x": x}, passes=[Cleanup()], kept="Relu")
    assert op_count(graph, "If") == 1


def test_cleanup_keeps_a_node_whose_only_read_output_is_not_the_first():
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "y"], axis=0)]
    model = _model(nodes, [5], [2], [("k", np.array([2], np.int64))], y_type=TensorProto.INT64)
    _check(model, {"x": np.array([3, 1, 4, 1.5, 9], np.float32)}, passes=[Cleanup()], kept="TopK")


# ---- simplify-reshapes: pairs and chains that must stay


def _simplify():
    from lmc.passes.simplify_reshapes import SimplifyReshapes

    return [SimplifyReshapes(), Cleanup(), EliminateNoops(), Cleanup()]


def test_reshape_pair_around_a_non_elementwise_op_stays():
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["a"]),
             helper.make_node("Softmax", ["a"], ["b"], axis=-1),
             helper.make_node("Reshape", ["b", "back"], ["y"])]
    model = _model(nodes, [2, 3], [2, 3], [("flat", np.array([6], np.int64)), ("back", np.array([2, 3], np.int64))])
    graph = _check(model, _feed((2, 3)), passes=_simplify(), kept="Reshape")
    assert op_count(graph, "Reshape") == 2


def test_reshape_pair_to_another_shape_stays():
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Reshape", ["b", "other"], ["y"])]
    model = _model(nodes, [2, 3], [3, 2], [("flat", np.array([6], np.int64)), ("other", np.array([3, 2], np.int64))])
    _check(model, _feed((2, 3)), passes=_simplify(), kept="Reshape")


def test_reshape_pair_around_elementwise_op_is_removed():
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Reshape", ["b", "back"], ["y"])]
    model = _model(nodes, [2, 3], [2, 3], [("flat", np.array([6], np.int64)), ("back", np.array([2, 3], np.int64))])
    _check(model, _feed((2, 3)), passes=_simplify(), removed="Reshape")


def test_reshape_chain_whose_outer_shape_copies_a_dim_is_not_collapsed():
    # 0 in the outer shape copies the *inner* result's dim (6), not x's (2): collapsing would change it
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]),
             helper.make_node("Reshape", ["a", "s2"], ["y"])]
    model = _model(nodes, [2, 3, 4], [6, 2, 2], [("s1", np.array([6, 4], np.int64)),
                                                 ("s2", np.array([0, 2, 2], np.int64))])
    graph = _check(model, _feed((2, 3, 4)), passes=_simplify())
    assert op_count(graph, "Reshape") == 2


def test_reshape_chain_whose_middle_is_read_elsewhere_is_not_collapsed():
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]),
             helper.make_node("Reshape", ["a", "s2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6]),
               helper.make_tensor_value_info("a", TensorProto.FLOAT, [6, 4])]
    model = _model(nodes, [2, 3, 4], None, [("s1", np.array([6, 4], np.int64)), ("s2", np.array([4, 6], np.int64))],
                   outputs=outputs)
    graph = _check(model, _feed((2, 3, 4)), passes=_simplify())
    assert op_count(graph, "Reshape") == 2
