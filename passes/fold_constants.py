"""Constant folding: compute at compile time every node whose inputs are all constant.

Exact. One run does:
1. ``Shape``/``Size`` of a tensor whose shape is static become constants (with ``start``/``end``);
   this is what turns export shape chains (Shape → Gather → Unsqueeze → Concat → Reshape, Range, Trilu
   masks) constant once input shapes are bound.
2. The *foldable closure*: nodes (in topological order) whose inputs are constants, empty optionals, or
   outputs of foldable nodes; ``Constant`` nodes are foldable (they become initializers). Nondeterministic
   ops (``is_nondeterministic``), ops with subgraphs and nodes producing a graph output are not, nor are
   ``QuantizeLinear``/``DequantizeLinear`` and ops outside the ONNX domain: a model that arrives
   quantized (int8 weight → DequantizeLinear → MatMul) keeps its int8 weights and its DequantizeLinear
   (folding would turn them into float weights four times the size, and onnxruntime fuses the pair).
3. All foldable nodes are evaluated in one onnxruntime session (optimizations off). If that fails, they
   are evaluated node by node: a node that fails stays in the graph, its reason is logged and listed in
   the pass notes, and its dependants stay too — never silently.
4. Size policy: a node whose folded output is larger than ``target.memory.fold_max_bytes`` *and* larger
   than the sum of its inputs is a blow-up (ConstantOfShape/Tile/Expand/Range of a big shape): it stays
   a run-time op, so the weights file (mmap'd or flash) does not grow by a tensor the device can compute
   in a scratch buffer. Each refused tensor is named in the notes.
5. Outputs of folded nodes read by the remaining graph become ``gs.Constant`` tensors.
A ``Where`` whose condition is a constant that is all true (or all false) becomes its X (or Y) input when
that input already has the output's shape. An ``If`` whose condition is a constant becomes the nodes of the
branch it picks, in its place: the branch's own tensors and nodes get fresh names (a sibling scope may use
the same ones), its reads of outer tensors stay wired to them, and the If's outputs keep their names.
Nodes whose outputs are read only inside subgraphs fold like any other (the readers get the constant).

The PassManager repeats this with shape inference in between until nothing changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.runtime import session
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

log = logging.getLogger(__name__)

NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear")     # kept as ops: they carry a model's quantization
DEFAULT_FOLD_MAX_BYTES = 4 << 20


def is_nondeterministic(node: gs.Node) -> bool:
    """True for ops whose outputs may differ between runs on the same inputs: the random ops (in any
    domain) and a Dropout whose ``training_mode`` input is given and not a constant false."""
    if node.op in NONDETERMINISTIC_OPS:
        return True
    if ir.is_op(node, "Dropout") and len(node.inputs) > 2 and node.inputs[2].name:
        training = ir.const_value(node.inputs[2])
        return training is None or bool(np.any(training))
    return False


def _keeps_its_op(node: gs.Node) -> bool:
    """Never folded: nondeterministic ops, quantize/dequantize, and ops outside the ONNX domain."""
    return (is_nondeterministic(node) or (node.domain or "") not in ir.DEFAULT_DOMAINS
            or ir.is_op(node, QUANTIZATION_OPS))


@dataclass
class FoldStats:
    shapes: int = 0
    folded: int = 0
    failed: dict[str, str] = field(default_factory=dict)      # node name -> reason
    refused: dict[str, int] = field(default_factory=dict)     # tensor name -> bytes
    where: int = 0
    ifs: int = 0


def _fold_shapes(graph: gs.Graph, stats: FoldStats, names: ir.Namer) -> None:
    outputs = ir.graph_outputs(graph)
    for node in graph.nodes:
        if not node.outputs or not node.inputs:
            continue
        if ir.is_op(node, "Shape"):
            known = _known_dims(node)
            if known is None or None in known:     # unknown dims selected: fold the readers that skip them
                stats.shapes += _fold_known_dims(graph, node, names, outputs)
                continue
            value = np.array(known, dtype=np.int64)
        elif ir.is_op(node, "Size"):
            shape = ir.static_shape(node.inputs[0])
            if shape is None:
                continue
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            continue
        out = node.outputs[0]
        if out.name in outputs:
            continue
        const = gs.Constant(names.fresh(out.name + "_value"), value)
        if ir.replace_tensor(graph, out, const):
            node.outputs.clear()
            stats.shapes += 1


def _known_dims(node: gs.Node) -> list[int | None] | None:
    """The dims a Shape node outputs (with its start/end), None for the unknown ones."""
    dims = node.inputs[0].shape
    if dims is None:
        return None
    rank = len(dims)
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    return [d if isinstance(d, int) and d >= 0 else None for d in dims[max(0, start):min(rank, end)]]


def _fold_known_dims(graph: gs.Graph, node: gs.Node, names: ir.Namer, outputs: set[str]) -> int:
    """Readers of a partly known Shape that select only known dims — Gather with a constant index, Slice
    with constant bounds and step 1 — become constants (as onnxslim does); returns how many."""
    dims = _known_dims(node)
    if dims is None:
        return 0
    folded = 0
    for reader in list(node.outputs[0].outputs):
        out = reader.outputs[0] if reader.outputs else None
        if out is None or out.name in outputs or reader.inputs[0] is not node.outputs[0]:
            continue
        picked = None
        if ir.is_op(reader, "Gather") and int(reader.attrs.get("axis", 0)) == 0:
            idx = ir.const_value(reader.inputs[1])
            if idx is not None and np.all((idx >= -len(dims)) & (idx < len(dims))):
                picked = np.asarray([dims[int(i)] for i in idx.reshape(-1)], dtype=object).reshape(idx.shape)
        elif ir.is_op(reader, "Slice") and len(reader.inputs) >= 3:
            params = [ir.const_value(t) for t in reader.inputs[1:]]
            if all(p is not None and p.size == 1 for p in params):
                axes_ok = len(params) < 3 or int(params[2].reshape(-1)[0]) in (0, -1)
                step_ok = len(params) < 4 or int(params[3].reshape(-1)[0]) == 1
                if axes_ok and step_ok:
                    start, end = (int(p.reshape(-1)[0]) for p in params[:2])
                    picked = np.asarray(dims[slice(max(-len(dims), min(start, len(dims))),
                                                   max(-len(dims) - 1, min(end, len(dims))))], dtype=object)
        if picked is None or any(d is None for d in picked.reshape(-1)):
            continue
        const = gs.Constant(names.fresh(out.name + "_value"), picked.astype(np.int64))
        if ir.replace_tensor(graph, out, const):
            reader.inputs.clear()
            reader.outputs.clear()
            folded += 1
    return folded


def _is_input_constant(t: gs.Tensor, folded_outputs: set[str]) -> bool:
    if isinstance(t, gs.Constant):
        return True
    if isinstance(t, gs.Variable) and not t.name:   # empty optional input
        return True
    return t.name in folded_outputs


def _foldable_closure(graph: gs.Graph, excluded: set[str]) -> list[gs.Node]:
    outputs = ir.graph_outputs(graph)
    folded_outputs: set[str] = set()
    nodes = []
    for node in graph.nodes:
        if (node.name in excluded or _keeps_its_op(node) or ir.has_subgraph(node)
                or not node.outputs or any(o.name in outputs for o in node.outputs)):
            continue
        if all(_is_input_constant(t, folded_outputs) for t in node.inputs):
            nodes.append(node)
            folded_outputs.update(o.name for o in node.outputs)
    return nodes


def _evaluate(graph: gs.Graph, nodes: list[gs.Node], wanted: list[str]) -> dict[str, np.ndarray]:
    """Evaluate ``nodes`` (topologically ordered) in one onnxruntime session; return ``wanted`` values."""
    produced = {o.name for n in nodes for o in n.outputs}
    inits: dict[str, onnx.TensorProto] = {}
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in inits:
                inits[t.name] = onnx.numpy_helper.from_array(ir.const_value(t), t.name)
    protos = []
    for n in nodes:
        proto = onnx.helper.make_node(n.op, [t.name for t in n.inputs], [o.name for o in n.outputs],
                                      name=n.name, domain=n.domain or "")
        for key, value in n.attrs.items():
            if isinstance(value, gs.Constant):
                value = onnx.numpy_helper.from_array(ir.const_value(value))
            proto.attribute.append(onnx.helper.make_attribute(key, value))
        protos.append(proto)
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in wanted if name in produced]
    g = onnx.helper.make_graph(protos, "fold", [], outputs, list(inits.values()))
    model = onnx.helper.make_model(g, opset_imports=ir.opset_imports(graph))
    model.ir_version = min(model.ir_version, 10)
    sess = session(model, optimize=False, log_level=4)
    names = [o.name for o in outputs]
    return dict(zip(names, sess.run(names, {})))


def _nbytes(value: np.ndarray) -> int:
    return int(value.nbytes)


class FoldConstants:
    name = "fold-constants"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = False  # folding makes new shapes inferable: re-infer after it

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._refused: set[str] = set()
        self._failed: dict[str, str] = {}

    def _limit(self, ctx: PassContext) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        if ctx.target is not None:
            return ctx.target.memory.fold_max_bytes
        return DEFAULT_FOLD_MAX_BYTES

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = FoldStats()
        names = ir.Namer(graph)
        _fold_shapes(graph, stats, names)
        stats.where = _fold_constant_where(graph)
        stats.ifs = _inline_constant_ifs(graph, names)
        excluded = set(self._refused) | set(self._failed)
        nodes = _foldable_closure(graph, excluded)
        limit = self._limit(ctx)
        # a node whose inferred output is already over the limit is refused before it is evaluated (an
        # Expand/Tile/ConstantOfShape to a huge shape would otherwise allocate it in onnxruntime)
        too_big = {}
        for node in nodes:
            in_bytes = sum(ir.tensor_nbytes(t) or 0 for t in node.inputs if t.name)
            for o in node.outputs:
                size = ir.tensor_nbytes(o) if o.name else None
                if size is not None and size > limit and size > in_bytes:
                    too_big[o.name] = size
                    self._refused.add(node.name)
        if too_big:
            stats.refused.update(too_big)
            nodes = _foldable_closure(graph, set(self._refused) | set(self._failed))
        values: dict[str, np.ndarray] = {}
        if nodes:
            values = self._evaluate_all(graph, nodes, stats)
        for node in nodes:
            if node.name in stats.failed or not all(o.name in values for o in node.outputs):
                continue
            in_bytes = sum(ir.tensor_nbytes(t) or 0 for t in node.inputs if t.name)
            for o in node.outputs:
                size = _nbytes(values[o.name])
                if size > limit and size > in_bytes:
                    stats.refused[o.name] = size
                    self._refused.add(node.name)
        if stats.refused or stats.failed:
            nodes = _foldable_closure(graph, set(self._refused) | set(self._failed))
        folded = self._replace(graph, nodes, values, names)
        stats.folded = folded
        notes = [f"not folded: node '{n}' failed to evaluate: {r}" for n, r in stats.failed.items()]
        notes += [f"not folded: '{t}' would be a {b}-byte constant (> {limit}-byte growth limit)"
                  for t, b in stats.refused.items()]
        modified = bool(stats.shapes or stats.folded or stats.where or stats.ifs)
        return PassResult(graph, modified=modified, stats={
            "shape_ops_folded": stats.shapes, "nodes_folded": stats.folded, "where_simplified": stats.where,
            "if_inlined": stats.ifs,
            "eval_failures": len(stats.failed), "refused_blowups": len(stats.refused)}, notes=notes)

    def _evaluate_all(self, graph: gs.Graph, nodes: list[gs.Node], stats: FoldStats) -> dict[str, np.ndarray]:
        wanted = [o.name for n in nodes for o in n.outputs if o.name]
        try:
            return _evaluate(graph, nodes, wanted)
        except Exception as exc:  # evaluation errors come from onnxruntime with many types
            log.info("batch folding failed (%s); evaluating node by node", str(exc).splitlines()[0])
        values: dict[str, np.ndarray] = {}
        for node in nodes:
            inputs_ok = all(isinstance(t, gs.Constant) or not t.name or t.name in values for t in node.inputs)
            if not inputs_ok:
                continue
            # Feed already-computed inputs as constants of a one-node evaluation.
            swapped = []
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Variable) and t.name in values:
                    swapped.append((i, t))
                    node.inputs[i] = gs.Constant(t.name, values[t.name])
            try:
                values.update(_evaluate(graph, [node], [o.name for o in node.outputs if o.name]))
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0][:200]
                log.warning("constant folding: node '%s' (%s) failed to evaluate: %s", node.name, node.op, reason)
                stats.failed[node.name] = reason
                self._failed[node.name] = reason
            finally:
                for i, t in swapped:
                    node.inputs[i] = t
        return values

    def _replace(self, graph: gs.Graph, nodes: list[gs.Node], values: dict[str, np.ndarray], names: ir.Namer) -> int:
        folded_names = {n.name for n in nodes}
        count = 0
        for node in nodes:
            if not all(o.name in values for o in node.outputs if o.name):
                continue
            for o in node.outputs:
                if not o.name:
                    continue
                readers_outside = [c for c in o.outputs if c.name not in folded_names]
                if readers_outside:
                    value = values[o.name]
                    const = gs.Constant(names.fresh(o.name + "_folded"), np.array(value, order="C"))
                    ir.replace_tensor(graph, o, const)
            node.outputs.clear()
            node.inputs.clear()
            count += 1
        return count


def _fold_constant_where(graph: gs.Graph) -> int:
    count = 0
    for node in graph.nodes:
        if not ir.is_op(node, "Where") or len(node.inputs) != 3 or not node.outputs:
            continue
        cond = ir.const_value(node.inputs[0])
        if cond is None or cond.size == 0:
            continue
        pick = 1 if bool(cond.all()) else 2 if not bool(cond.any()) else 0
        if pick == 0:
            continue
        chosen, out = node.inputs[pick], node.outputs[0]
        shape = ir.static_shape(out)
        if shape is None or ir.static_shape(chosen) != shape or ir.onnx_dtype(chosen.dtype) != ir.onnx_dtype(out.dtype):
            continue
        if ir.replace_tensor(graph, out, chosen):
            node.outputs.clear()
            node.inputs.clear()
            count += 1
    return count


def _inline_constant_ifs(graph: gs.Graph, names: ir.Namer) -> int:
    """Replace every top-level ``If`` whose condition is a one-element constant by the nodes of the branch
    it selects; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if not ir.is_op(node, "If") or not node.inputs or not node.outputs:
            continue
        cond = ir.const_value(node.inputs[0])
        if cond is None or cond.size != 1:
            continue
        branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs) or branch.inputs:
            continue
        _inline_branch(graph, node, branch, names)
        count += 1
    return count


def _inline_branch(graph: gs.Graph, node: gs.Node, branch: gs.Graph, names: ir.Namer) -> None:
    # A name the branch defines may also name another tensor in a sibling scope (legal there, a clash once
    # the branch is part of the outer graph): those tensors — and every inlined node — get fresh names.
    owners: dict[str, set[int]] = {}
    for g in (graph, *ir.nested_graphs(graph)):
        for t in [*g.inputs, *g.outputs, *(t for n in g.nodes for t in [*n.inputs, *n.outputs])]:
            if t.name:
                owners.setdefault(t.name, set()).add(id(t))
    local_vars = {id(t): t for n in branch.nodes for t in n.outputs if t.name}
    branch_consts = {id(t): t for n in branch.nodes for t in n.inputs if isinstance(t, gs.Constant)}
    for t in [*local_vars.values(), *branch_consts.values()]:
        if len(owners.get(t.name, ())) > 1:
            t.name = names.fresh(t.name)
    node_names = {n.name for n in graph.nodes if n is not node}
    for n in branch.nodes:
        if not n.name or n.name in node_names:
            n.name = names.fresh(n.name or n.op)
        node_names.add(n.name)
    if_outputs = list(node.outputs)
    cond = node.inputs[0]
    node.outputs.clear()
    node.inputs.clear()
    extra: list[gs.Node] = []
    moved: dict[int, gs.Tensor] = {}       # id(branch output) -> the If output its producer now writes
    for b_out, i_out in zip(list(branch.outputs), if_outputs):
        if i_out.dtype is None:
            i_out.dtype = b_out.dtype
        if ir.static_shape(i_out) is None and ir.static_shape(b_out) is not None:
            i_out.shape = list(b_out.shape)
        producer = ir.producer(b_out)
        if id(b_out) in local_vars and id(b_out) not in moved and producer is not None:
            for reader in list(b_out.outputs):     # other branch nodes reading it read the If output now
                for k, t in enumerate(reader.inputs):
                    if t is b_out:
                        reader.inputs[k] = i_out
            producer.outputs[producer.outputs.index(b_out)] = i_out
            moved[id(b_out)] = i_out
        else:    # an outer tensor, a constant, or a tensor already written to another If output
            src = moved.get(id(b_out), b_out)
            extra.append(gs.Node("Identity", names.fresh(f"{i_out.name}_identity"), inputs=[src], outputs=[i_out]))
    nodes = list(graph.nodes)
    at = next(i for i, n in enumerate(nodes) if n is node)
    graph.nodes = nodes[:at] + list(branch.nodes) + extra + nodes[at + 1:]
    log.debug("inlined the %s branch of If '%s' (condition '%s')", branch.name, node.name, cond.name)


def fold_to_fixed_point(graph: gs.Graph, rounds: int = 4) -> None:
    """Fold ``graph``'s constants until nothing more folds (at most ``rounds`` rounds), dropping dead nodes and
    re-inferring shapes after each: Constant nodes and shape chains over bound dims become constants, which
    the matchers read. For analyses on a copy of a model, outside a build's pipeline."""
    for _ in range(rounds):
        if not FoldConstants().run(graph, PassContext()).modified:
            break
        ir.remove_dead_nodes(graph)
        shapes.infer_shapes(graph)
