"""A subgraph that reads an outer tensor keeps that tensor alive (and planned) through the node."""

import numpy as np
import onnx
from helpers import assert_close, independent_plan_check, run_ort
from onnx import TensorProto, helper

from lmc.compiler.build import BuildOptions, build


def test_if_branch_reading_outer_tensor(tmp_path):
    then_g = helper.make_graph([helper.make_node("Add", ["h", "h"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Mul", ["h", "h"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("Exp", ["x"], ["big"]),
             helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["r", "big"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "if.onnx"))
    build(tmp_path / "if.onnx", BuildOptions(target="x86-64"), tmp_path / "out")
    plan = independent_plan_check(tmp_path / "out")
    h = next(t for t in plan["tensors"] if t["name"] == "h")
    if_step = next(i for i, n in enumerate(plan["schedule"]) if "If" in n)
    assert h["last"] >= if_step
    for x in (np.array([1, 2, 3, 4], np.float32), np.array([-1, -2, -3, 0.5], np.float32)):
        assert_close(run_ort(model, {"x": x}), run_ort(tmp_path / "out" / "model.onnx", {"x": x}))


# ---------------------------------------------------------------------------------------- helpers
def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _gelu_nodes(x, out):
    """The erf GELU pattern torch exports: x * 0.5 * (1 + erf(x / sqrt 2))."""
    return [helper.make_node("Div", [x, "sqrt2"], [out + "_d"]),
            helper.make_node("Erf", [out + "_d"], [out + "_e"]),
            helper.make_node("Add", [out + "_e", "one"], [out + "_a"]),
            helper.make_node("Mul", [x, out + "_a"], [out + "_m"]),
            helper.make_node("Mul", [out + "_m", "half"], [out])]


_GELU_CONSTS = [helper.make_tensor("sqrt2", TensorProto.FLOAT, [], [2 ** 0.5]),
                helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="m.onnx", opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / name))
    return model


def test_fused_tensor_read_only_inside_branches_is_scheduled_before_the_if(tmp_path):
    """The GELU fusion's output is read only inside the If's branches: the sort must still put it first."""
    then_g = helper.make_graph([helper.make_node("Add", ["g", "g"], ["t_out"])], "then", [], [_vi("t_out", [64])])
    else_g = helper.make_graph([helper.make_node("Mul", ["g", "x"], ["e_out"])], "else", [], [_vi("e_out", [64])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             *_gelu_nodes("x", "g"),
             helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["r"], ["y"])]
    model = _save(tmp_path, nodes, [_vi("x", [64])], [_vi("y", [64])], _GELU_CONSTS)
    result = build(tmp_path / "m.onnx", BuildOptions(target="x86-64"), tmp_path / "out")
    assert "Gelu" in {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    plan = independent_plan_check(tmp_path / "out")
    assert result.verification.passed
    gelu = next(t for t in plan["tensors"] if t["name"] == "g")
    if_step = next(i for i, n in enumerate(plan["schedule"]) if "If" in n)
    assert gelu["first"] < if_step <= gelu["last"]
    for x in (np.linspace(-1, 1, 64, dtype=np.float32), np.linspace(-2, 0.5, 64, dtype=np.float32)):
        assert_close(run_ort(model, {"x": x}), run_ort(tmp_path / "out" / "model.onnx", {"x": x}))


def test_topological_sort_sees_reads_at_any_depth():
    """A tensor read two subgraph levels down orders its producer before the outer node."""
    from lmc.core import ir

    inner_then = helper.make_graph([helper.make_node("Neg", ["h"], ["it"])], "it", [], [_vi("it", [4])])
    inner_else = helper.make_graph([helper.make_node("Abs", ["h"], ["ie"])], "ie", [], [_vi("ie", [4])])
    outer_then = helper.make_graph([helper.make_node("If", ["c"], ["ot"], then_branch=inner_then,
                                                     else_branch=inner_else)], "ot", [], [_vi("ot", [4])])
    outer_else = helper.make_graph([helper.make_node("Identity", ["x"], ["oe"])], "oe", [], [_vi("oe", [4])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("If", ["c"], ["y"], then_branch=outer_then, else_branch=outer_else)]
    graph_proto = helper.make_graph(nodes, "g", [_vi("x", [4]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [4])])
    graph = ir.to_graph(helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)]))
    graph.nodes = graph.nodes[::-1]      # as a rewrite that appends the producer would leave it
    ir.topological_sort(graph)
    assert [n.op for n in graph.nodes] == ["Relu", "If"]
    assert ir.remove_dead_nodes(graph) == 0
    model = ir.to_model(graph)
    x = np.array([1, -2, 3, -4], np.float32)
    assert_close([-np.maximum(x, 0)], run_ort(model, {"x": x, "c": np.array(True)}))


def test_if_body_intermediates_are_planned_as_the_if_nodes_scratch(tmp_path):
    """A branch's own intermediates (a 64 KiB Exp here) are live while the If runs: the plan counts the
    largest live set of the branch bodies as the If step's scratch."""
    then_g = helper.make_graph([helper.make_node("Exp", ["h"], ["big"]),
                                helper.make_node("Sin", ["big"], ["big2"]),
                                helper.make_node("ReduceSum", ["big2"], ["t_out"], keepdims=0)],
                               "then", [], [_vi("t_out", [])])
    else_g = helper.make_graph([helper.make_node("ReduceMax", ["h"], ["e_out"], keepdims=0)],
                               "else", [], [_vi("e_out", [])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["r", "s"], ["y"])]
    model = _save(tmp_path, nodes, [_vi("x", [16384])], [_vi("y", [])], _GELU_CONSTS)
    build(tmp_path / "m.onnx", BuildOptions(target="x86-64"), tmp_path / "out")
    plan = independent_plan_check(tmp_path / "out")
    scratch = {t["name"]: t for t in plan["scratch"]}
    if_name = next(n for n in plan["schedule"] if "If" in n)
    assert if_name in scratch
    assert scratch[if_name]["size"] >= 2 * 65536          # big and big2 are live together at Sin
    assert plan["lower_bound_bytes"] >= 65536 + 2 * 65536  # h is live through the If as well
    x = np.linspace(-1, 1, 16384, dtype=np.float32)
    assert_close(run_ort(model, {"x": x}), run_ort(tmp_path / "out" / "model.onnx", {"x": x}))


def test_loop_body_reading_outer_tensors_is_planned(tmp_path):
    """A Loop body reading an outer (fused) tensor: the producer is scheduled first, the tensor lives
    through the Loop, and the body's intermediates are the Loop's scratch."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "g"], ["prod"]),
         helper.make_node("Tanh", ["prod"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("acc_in", [1024])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [1024])])
    nodes = [*_gelu_nodes("x", "g"),
             helper.make_node("Loop", ["n", "", "x"], ["acc"], body=body),
             helper.make_node("Relu", ["acc"], ["y"])]
    inits = _GELU_CONSTS + [helper.make_tensor("n", TensorProto.INT64, [], [3])]
    model = _save(tmp_path, nodes, [_vi("x", [1024])], [_vi("y", [1024])], inits)
    build(tmp_path / "m.onnx", BuildOptions(target="x86-64"), tmp_path / "out")
    plan = independent_plan_check(tmp_path / "out")
    loop = next(n for n in plan["schedule"] if "Loop" in n)
    step = plan["schedule"].index(loop)
    g = next(t for t in plan["tensors"] if t["name"] == "g")
    assert g["first"] < step <= g["last"]
    scratch = {t["name"]: t for t in plan["scratch"]}
    assert scratch[loop]["size"] >= 4096        # prod (and the carried acc_out) live in the body
    x = np.linspace(-1, 1, 1024, dtype=np.float32)
    assert_close(run_ort(model, {"x": x}), run_ort(tmp_path / "out" / "model.onnx", {"x": x}))


def _vad_model(tmp_path):
    """Silero-VAD-shaped (``lmc.models.build_vad``): a scalar sample-rate input picks the branch."""
    from lmc.models import build_vad

    model = build_vad()
    onnx.save(model, str(tmp_path / "m.onnx"))
    return model


def test_if_chosen_by_a_bound_scalar_input_is_inlined_and_planned(tmp_path):
    from lmc.core import ir, shapes
    from lmc.compiler.backend import plan_memory
    from lmc.core.errors import ShapeError
    from lmc.core.pass_manager import PassContext, PassManager
    from lmc.compiler.pipeline import default_pipeline
    from lmc.targets.target import load_target
    import pytest

    model = _vad_model(tmp_path)
    target = load_target("x86-64")
    x = np.linspace(-1, 1, 512, dtype=np.float32).reshape(1, 512)
    for rate, rows in ((16000, 4), (8000, 8)):
        graph = ir.to_graph(model)
        shapes.bind_input_values(graph, {"sr": np.array(rate)})
        assert [t.name for t in graph.inputs] == ["x"]
        shapes.infer_shapes(graph)
        options = BuildOptions(target="x86-64")
        graph, records = PassManager(default_pipeline(options, target, ["x"]), PassContext(target=target, options=options)).run(graph)
        assert "If" not in {n.op for n in graph.nodes}
        assert ir.static_shape(graph.outputs[0]) == (rows,)
        plan = plan_memory(graph, target)
        assert plan.arena_bytes > 0
        out = run_ort(ir.to_model(graph), {"x": x})
        assert_close(run_ort(model, {"x": x, "sr": np.array(rate)}), out)

    # unbound, the If's output has no static shape: a user error naming it
    unbound = ir.to_graph(model)
    shapes.infer_shapes(unbound)
    with pytest.raises(ShapeError):
        shapes.require_static_shapes(unbound)
    # bad bindings are user errors
    for values in ({"nope": np.array(1)}, {"x": np.zeros((2, 2), np.float32)}):
        with pytest.raises(ShapeError):
            shapes.bind_input_values(ir.to_graph(model), values)


def test_constant_if_inlining_renames_clashing_names_and_keeps_outer_reads():
    """The chosen branch's names may clash with names inside another node's subgraph (legal in ONNX for
    sibling scopes): inlining renames them; reads of outer tensors stay wired."""
    from lmc.core import ir
    from lmc.passes.fold_constants import FoldConstants
    from lmc.core.pass_manager import PassContext

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["h", "k"], ["tmp"]),
                                  helper.make_node("Neg", ["tmp"], [name])], name, [], [_vi(name, [4])])

    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("If", ["yes"], ["a"], then_branch=branch("a_t", "Add"), else_branch=branch("a_e", "Sub")),
             helper.make_node("If", ["c"], ["b"], then_branch=branch("b_t", "Mul"), else_branch=branch("b_e", "Div")),
             helper.make_node("Add", ["a", "b"], ["y"])]
    inits = [helper.make_tensor("yes", TensorProto.BOOL, [], [True]), helper.make_tensor("k", TensorProto.FLOAT, [4], [1, 2, 3, 4])]
    graph_proto = helper.make_graph(nodes, "g", [_vi("x", [4]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [4])], inits)
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    graph = ir.to_graph(model)
    result = FoldConstants().run(graph, PassContext())
    assert result.modified and result.stats["if_inlined"] == 1
    ir.topological_sort(graph)
    assert [n.op for n in graph.nodes].count("If") == 1
    out = ir.to_model(graph)
    onnx.checker.check_model(out)
    x = np.array([1, -2, 3, -4], np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        # (onnxruntime's own If inlining trips over the clash: the reference runs unoptimized)
        assert_close(run_ort(model, feeds, optimize=False), run_ort(out, feeds))


def test_cse_and_dedup_see_inside_bodies():
    """Duplicate nodes inside a branch merge; a duplicate weight read only inside a branch is stored once;
    a duplicate outer node read only by a branch is merged and the branch reads the kept one."""
    from lmc.core import ir
    from lmc.core.pass_manager import PassContext
    from lmc.passes.cse import EliminateCommonSubexpressions
    from lmc.passes.dedup_weights import DedupWeights

    w = np.arange(256, dtype=np.float32)
    then_g = helper.make_graph([helper.make_node("Mul", ["h2", "w_b"], ["p1"]),
                                helper.make_node("Mul", ["h2", "w_b"], ["p2"]),
                                helper.make_node("Add", ["p1", "p2"], ["t_out"])], "then", [], [_vi("t_out", [256])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h2"], ["e_out"])], "else", [], [_vi("e_out", [256])])
    nodes = [helper.make_node("Relu", ["x"], ["h1"]),
             helper.make_node("Relu", ["x"], ["h2"]),
             helper.make_node("Mul", ["h1", "w_a"], ["m"]),
             helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["r", "m"], ["y"])]
    inits = [onnx.numpy_helper.from_array(w, "w_a"), onnx.numpy_helper.from_array(w.copy(), "w_b")]
    model = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", [256]), _vi("c", [], TensorProto.BOOL)],
                                                [_vi("y", [256])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = ir.to_graph(model)
    assert ir.weight_bytes(graph) == 2 * w.nbytes
    assert DedupWeights().run(graph, PassContext()).stats["duplicates_merged"] == 1
    assert ir.weight_bytes(graph) == w.nbytes
    assert EliminateCommonSubexpressions().run(graph, PassContext()).stats["nodes_merged"] == 2
    ir.topological_sort(graph)
    assert [n.op for n in graph.nodes].count("Relu") == 1
    assert [n.op for n in graph.nodes[2].attrs["then_branch"].nodes].count("Mul") == 1
    out = ir.to_model(graph)
    x = np.linspace(-1, 1, 256, dtype=np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        assert_close(run_ort(model, feeds), run_ort(out, feeds))


def test_weights_inside_if_branches_are_emitted_and_run(tmp_path, capsys):
    """silero-vad-shaped (opset 18): each If branch holds its weights as initializers over the external-data
    threshold, under the same names in both; the bundle must load, verify and run both branches exactly."""
    import pytest

    from lmc.compiler.cli import main
    from lmc.models import build_vad_stateful

    model = build_vad_stateful()
    onnx.save(model, str(tmp_path / "vad.onnx"))
    out = tmp_path / "out"
    args = ["build", str(tmp_path / "vad.onnx"), "--input-shape", "input=1x512", "--input-shape",
            "state=2x1x128", "-o", str(out)]
    for argv in (args, ["verify", str(out), "--against", str(tmp_path / "vad.onnx")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, capsys.readouterr().err
    bundle = onnx.load(str(out / "model.onnx"), load_external_data=False)
    branch_weights = [t for n in bundle.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                      for t in a.g.initializer if np.prod(t.dims) * 4 > 1024]      # basis and decoder, twice
    assert len(branch_weights) == 4 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in branch_weights)
    rng = np.random.default_rng(1)
    feeds = {"input": rng.standard_normal((1, 512)).astype(np.float32),
             "state": rng.standard_normal((2, 1, 128)).astype(np.float32)}
    for rate in (16000, 8000):
        feeds["sr"] = np.array(rate, np.int64)
        assert_close(run_ort(model, feeds), run_ort(out / "model.onnx", feeds))
