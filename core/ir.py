"""IR helpers over onnx-graphsurgeon.

The passes edit a ``gs.Graph``. This module holds the small, exact helpers they share:

- conversion ``ModelProto <-> gs.Graph`` (``to_graph`` / ``to_model``), with unique node names;
- ``export_skeleton``: the graph as a ModelProto whose large constants are dtype+dims stubs (no weight
  copied; graphs over the 2 GB protobuf limit export), with ``constant_bytes`` to stream their data;
- graph surgery: topological sort, dead-node removal, tensor replacement, fresh names;
- predicates (``is_op`` checks domain as well as op type), constant access, byte sizes;
- weights left in external-data files (``weights.FileValues``): ``const_value`` maps them for the caller
  only, ``constant_bytes`` reads them, ``spill_constants`` moves a pass's new large weights to a file.

Subgraphs (If branches, Loop/Scan bodies) share tensor objects with the outer graph: a body that reads an
outer tensor ``h`` holds the very ``gs.Variable`` the outer node wrote, and ``h.outputs`` lists the body's
reading node. For every helper here a read inside a subgraph, at any depth, is a *use by the node holding
the subgraph*: ``outer_reads(node)`` lists them, and the sort, dead-code removal and ``replace_tensor``
honour them. ``to_graph`` gives every subgraph output its own producer inside the subgraph (an Identity
where a body returned an outer tensor or a constant directly), so rewiring a tensor's readers is enough.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from lmc.core.weights import ConcatValues, FileValues, is_file_backed


log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"
# Constants at or below this size are exported with their values for shape inference's data propagation.
_SKELETON_INLINE_BYTES = 4096


# ----------------------------------------------------------------------------------------------- dtypes
def onnx_dtype(dtype) -> int:
    """The TensorProto enum of a gs dtype (numpy dtype or an onnx enum already)."""
    if isinstance(dtype, int):
        return dtype
    if dtype is None:
        return onnx.TensorProto.UNDEFINED
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return onnx.TensorProto.UNDEFINED


def itemsize_bits(elem_type: int) -> int:
    """Storage bits of one element of an onnx elem type (4 for int4/uint4)."""
    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 4
    if elem_type == onnx.TensorProto.STRING or elem_type == onnx.TensorProto.UNDEFINED:
        return 0
    return 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its non-empty inputs, then the names its subgraphs (If/Loop/Scan bodies,
    nested ones included) read from enclosing scopes."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names.extend(sorted(_outer_reads(sub)))
    return names


def proto_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its subgraphs at any depth (If branches, Loop/Scan bodies), each before the ones it holds,
    in node order."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found += proto_graphs(sub)
    return found


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads and defines neither by its inputs, initializers nor nodes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(node_reads(node))
        defined.update(node.output)
    return read - defined


_SUB_BYTE_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
                  onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}


def proto_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a TensorProto's values from its dims and type, wherever they are stored: ceil(n · bits / 8)
    for sub-byte types, the strings' lengths for strings, n · itemsize otherwise."""
    n = int(np.prod(list(tensor.dims), dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in _SUB_BYTE_BITS:
        return (n * _SUB_BYTE_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape when every dim is a known non-negative int, else None."""
    shape = tensor.shape
    if shape is None:
        return None
    try:
        dims = tuple(int(d) for d in shape if d >= 0)   # str/None dims raise TypeError
    except TypeError:
        return None
    return dims if len(dims) == len(shape) else None


UPPER_SHAPE = "lmc_upper_shape"   # a data-dependent tensor's largest shape (its dims are symbolic)


def set_upper_shape(tensor: gs.Tensor, shape: Sequence[int]) -> gs.Tensor:
    """Record the largest shape a tensor of data-dependent size (e.g. NonZero's) can take: what its bytes
    are planned as while its dims stay symbolic in the model."""
    setattr(tensor, UPPER_SHAPE, tuple(int(d) for d in shape))
    return tensor


def tensor_nbytes(tensor: gs.Tensor) -> int | None:
    """Bytes of a tensor with static shape (or a recorded ``set_upper_shape``) and known dtype:
    ceil(prod(shape) * bits / 8); else None."""
    shape = static_shape(tensor)
    if shape is None:
        shape = getattr(tensor, UPPER_SHAPE, None)
    bits = itemsize_bits(onnx_dtype(tensor.dtype))
    if shape is None or bits == 0:
        return None
    return (math.prod(shape) * bits + 7) // 8


# ---------------------------------------------------------------------------------------- predicates
def is_op(node: gs.Node, op: str | Sequence[str], domain: str | Sequence[str] = DEFAULT_DOMAINS) -> bool:
    """True when node's op type is ``op`` (or one of them) *and* its domain is ``domain``."""
    ops = (op,) if isinstance(op, str) else tuple(op)
    domains = (domain,) if isinstance(domain, str) else tuple(domain)
    return node.op in ops and (node.domain or "") in domains


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The numpy value of a constant tensor, or None for a variable. Lazy (file-backed) values are decoded
    for this call only and *not* cached on the constant, so reading a large weight never leaves a second
    resident copy beside the loaded model."""
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        if isinstance(values, LazyValues):
            return values.load()
        return np.asarray(values)
    return None


def scalar_value(tensor: gs.Tensor) -> float | None:
    """The value of a constant holding exactly one element, else None."""
    value = const_value(tensor)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def has_subgraph(node: gs.Node) -> bool:
    return bool(subgraphs(node))


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs a node holds as attributes (If branches, a Loop/Scan body; lists of graphs too)."""
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, gs.Graph)]
    return found


def _defined_in(graph: gs.Graph) -> set[int]:
    """ids of the tensors a graph defines itself: its inputs and its nodes' outputs."""
    defined = {id(t) for t in graph.inputs}
    for n in graph.nodes:
        defined.update(id(t) for t in n.outputs)
    return defined


def _reads_from_outside(graph: gs.Graph, out: dict[int, gs.Tensor]) -> None:
    """Tensors read (as node inputs or listed as outputs) anywhere in ``graph`` and its nested subgraphs
    that ``graph`` does not define, into ``out`` (by id, in first-read order)."""
    defined = _defined_in(graph)
    for n in graph.nodes:
        for t in n.inputs:
            if t.name and id(t) not in defined:
                out.setdefault(id(t), t)
        for sub in subgraphs(n):
            inner: dict[int, gs.Tensor] = {}
            _reads_from_outside(sub, inner)
            for key, t in inner.items():
                if key not in defined:
                    out.setdefault(key, t)
    for t in graph.outputs:
        if t.name and id(t) not in defined:
            out.setdefault(id(t), t)


def outer_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors the node's subgraphs read from enclosing scopes (at any depth), constants included: a use
    of each by ``node``. Empty for a node without subgraphs."""
    out: dict[int, gs.Tensor] = {}
    for sub in subgraphs(node):
        _reads_from_outside(sub, out)
    return list(out.values())


def all_reads(node: gs.Node) -> list[gs.Tensor]:
    """The node's inputs followed by its subgraphs' outer reads: everything it needs before it runs."""
    return list(node.inputs) + outer_reads(node) if has_subgraph(node) else list(node.inputs)


def nested_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """Every subgraph held by a node of ``graph``, at any depth (outer before inner)."""
    found: list[gs.Graph] = []
    stack = [sub for n in reversed(graph.nodes) for sub in reversed(subgraphs(n))]
    while stack:
        sub = stack.pop()
        found.append(sub)
        stack += [s for n in reversed(sub.nodes) for s in reversed(subgraphs(n))]
    return found


def all_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name used in ``graph`` and its subgraphs, at any depth."""
    names: set[str] = set()
    for g in [graph, *nested_graphs(graph)]:
        names.update(t.name for t in g.inputs)
        names.update(t.name for t in g.outputs)
        for n in g.nodes:
            names.add(n.name)
            names.update(t.name for t in n.inputs)
            names.update(t.name for t in n.outputs)
    names.discard("")
    return names


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def sole_reader(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The single node reading ``t`` (None when several read it, none does, or it is a graph output)."""
    if len(t.outputs) != 1 or t.name in graph_outputs(graph):
        return None
    return t.outputs[0]


def graph_outputs(graph: gs.Graph) -> set[str]:
    return {t.name for t in graph.outputs}


def weight_bytes(graph: gs.Graph) -> int:
    """Bytes of all distinct constants referenced by the graph's nodes (subgraphs included)."""
    return sum(tensor_nbytes(c) or 0 for c in constants(graph))


def bytes_by_dtype(graph: gs.Graph) -> dict[str, int]:
    """Weight bytes per ONNX dtype name (e.g. {"float": …, "int4": …})."""
    out: dict[str, int] = {}
    for const in constants(graph):
        name = onnx.helper.tensor_dtype_to_string(onnx_dtype(const.dtype)).replace("TensorProto.", "").lower()
        out[name] = out.get(name, 0) + (tensor_nbytes(const) or 0)
    return dict(sorted(out.items()))


def constants(graph: gs.Graph, nested: bool = True) -> list[gs.Constant]:
    """Distinct constants used by nodes, in first-use order; with ``nested`` (the default) also those read
    inside subgraphs (a node's outer reads right after its inputs, then the subgraphs' own constants)."""
    seen: dict[int, gs.Constant] = {}
    for node in graph.nodes:
        for t in (all_reads(node) if nested else node.inputs):
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen[id(t)] = t
        if nested:
            for sub in subgraphs(node):
                for c in constants(sub):
                    seen.setdefault(id(c), c)
                for t in sub.outputs:
                    if isinstance(t, gs.Constant):
                        seen.setdefault(id(t), t)
    return list(seen.values())


# ---------------------------------------------------------------------------------------- conversion
def ensure_unique_names(graph: gs.Graph) -> None:
    """Give every node a non-empty name that no other node has (op type + index when missing)."""
    used: set[str] = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        base, k = name, 1
        while name in used:
            name = f"{base}__{k}"
            k += 1
        node.name = name
        used.add(name)


# Attribute of an imported gs.Graph: the initializers the model also listed as graph inputs (the layout of
# IR version < 4), by name, with their position among the inputs and their declared value info.
INITIALIZER_INPUTS = "lmc_initializer_inputs"
INPUT_ORDER = "lmc_input_order"     # every graph input's name -> its position in the model
INPUT_DEFAULTS = "lmc_input_defaults"   # graph input name -> the value a run that does not feed it sees
# IR version 4 is the first where an initializer need not be a graph input.
_MIN_IR_VERSION = 4


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into gs with unique node names.

    Initializers the model also lists as graph inputs (IR version < 4 required it; old model zoos keep it)
    are weights: they are constants of the graph, not inputs, and the graph is raised to IR version 4 so
    that its export is valid without them among the inputs. They are remembered (``initializer_inputs``):
    ``shapes.bind_input_shapes`` turns one back into a run-time input when the user binds it by name."""
    init_names = {t.name for t in model.graph.initializer}
    listed = {vi.name: (i, vi) for i, vi in enumerate(model.graph.input) if vi.name in init_names}
    graph = gs.import_onnx(model)
    if listed:
        graph.inputs = [t for t in graph.inputs if t.name not in listed]     # gs already leaves them out
        if graph.ir_version is not None and graph.ir_version < _MIN_IR_VERSION:
            graph.ir_version = _MIN_IR_VERSION
    own_subgraph_outputs(graph)
    unique_constant_names(graph)
    for const in constants(graph):
        values = const._values
        if isinstance(values, LazyValues) and not isinstance(values, FileValues) and is_file_backed(values.tensor):
            const._values = FileValues(values.tensor)
    setattr(graph, INITIALIZER_INPUTS, listed)
    setattr(graph, INPUT_ORDER, {vi.name: i for i, vi in enumerate(model.graph.input)})
    ensure_unique_names(graph)
    return graph


def own_subgraph_outputs(graph: gs.Graph) -> int:
    """Give every subgraph output (at any depth) a producer inside that subgraph: where a body lists an
    outer tensor, one of its own inputs, or a constant as an output, an Identity inside the body writes a
    fresh tensor instead. Then rewiring an outer tensor's readers (``replace_tensor``) never has to look
    at body output lists. Returns how many Identity nodes were added."""
    added = 0
    subs = nested_graphs(graph)
    if not subs:
        return 0
    names = Namer(graph)
    for sub in subs:
        produced = {id(t) for n in sub.nodes for t in n.outputs}
        for i, t in enumerate(sub.outputs):
            if id(t) in produced:
                continue
            out = gs.Variable(names.fresh(f"{t.name}_out"), dtype=t.dtype, shape=t.shape)
            sub.nodes.append(gs.Node("Identity", names.fresh(f"{t.name}_identity"), inputs=[t], outputs=[out]))
            produced.add(id(out))
            sub.outputs[i] = out
            added += 1
    return added


def unique_constant_names(graph: gs.Graph) -> int:
    """Rename every constant whose name another, distinct constant already has (sibling If branches may
    each hold their own initializer of one name; exported stubs and bundle weights are matched by name).
    Returns how many were renamed."""
    first: dict[str, int] = {}
    clashes = [c for c in constants(graph) if first.setdefault(c.name, id(c)) != id(c)]
    if clashes:
        names = Namer(graph)
        for const in clashes:
            const.name = names.fresh(const.name)
    return len(clashes)


def initializer_inputs(graph: gs.Graph) -> dict[str, tuple[int, onnx.ValueInfoProto]]:
    """The initializers the imported model also listed as graph inputs (see ``to_graph``)."""
    return getattr(graph, INITIALIZER_INPUTS, None) or {}


def set_input_default(graph: gs.Graph, name: str, value: np.ndarray) -> None:
    """Give the graph input ``name`` a default: exported as an initializer of that name beside the input
    (IR version ≥ 4), so a run that does not feed it sees ``value``."""
    defaults = vars(graph).get(INPUT_DEFAULTS) or {}
    defaults[name] = np.asarray(value)
    setattr(graph, INPUT_DEFAULTS, defaults)


def _finish_export(graph: gs.Graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """The opsets ``graph`` needs, the inputs' defaults as initializers, and no body initializer that
    repeats one of the main graph's weights (gs writes an outer constant a body reads among the body's
    initializers too: a runtime would load it twice). Small ones stay: shape inference reads a body's
    shape constants only from the body itself."""
    del model.opset_import[:]
    model.opset_import.extend(opset_imports(graph))
    for name, value in (vars(graph).get(INPUT_DEFAULTS) or {}).items():
        if any(vi.name == name for vi in model.graph.input):
            model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    _drop_outer_initializers(model.graph, {t.name for t in model.graph.initializer
                                           if proto_nbytes(t) > _SKELETON_INLINE_BYTES})
    return model


def _drop_outer_initializers(graph: onnx.GraphProto, outer: set[str]) -> None:
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                own = [t for t in sub.initializer if t.name not in outer]
                if len(own) != len(sub.initializer):
                    del sub.initializer[:]
                    sub.initializer.extend(own)
                _drop_outer_initializers(sub, outer | {t.name for t in own})


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export the graph (caller ensures topological order)."""
    return _finish_export(graph, gs.export_onnx(graph, do_type_check=False))


def opset_imports(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    """The graph's opset imports, plus version 1 of any node domain not imported yet."""
    imports = {(d.domain or ""): d.version for d in (graph.import_domains or [])
               if (d.domain or "") not in DEFAULT_DOMAINS}
    imports[""] = int(graph.opset)
    for node in graph.nodes:
        domain = node.domain or ""
        if domain not in imports and domain != "ai.onnx":
            imports[domain] = 1
    return [onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items())]


class Namer:
    """Fresh tensor/node names for one rewrite: snapshots the graph's names once (O(graph)), then each
    ``fresh(base)`` is O(1) and never repeats a name it handed out."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        if any(has_subgraph(n) for n in graph.nodes):
            self.used |= all_names(graph)     # names in subgraphs must not be shadowed either

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def new_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used in the graph yet (one-off; use ``Namer`` in loops)."""
    return Namer(graph).fresh(base)


def topological_sort(graph: gs.Graph) -> None:
    """Restore a valid topological order in place — Kahn's algorithm, stable: among nodes that are ready,
    the one earliest in the current order goes first, so an already sorted graph keeps its order.
    A node depends on the producers of its inputs *and* of every outer tensor its subgraphs read (at any
    depth); subgraph bodies are sorted the same way. Raises ValueError on a cycle."""
    import heapq

    nodes = list(graph.nodes)
    position = {id(n): i for i, n in enumerate(nodes)}
    pending = {}
    readers: dict[int, list[gs.Node]] = {}
    for n in nodes:
        deps = {id(t.inputs[0]) for t in all_reads(n) if len(t.inputs) == 1 and id(t.inputs[0]) in position}
        deps.discard(id(n))
        pending[id(n)] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(n)
    ready = [position[id(n)] for n in nodes if pending[id(n)] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        order.append(n)
        for r in readers.get(id(n), ()):
            pending[id(r)] -= 1
            if pending[id(r)] == 0:
                heapq.heappush(ready, position[id(r)])
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    graph.nodes = order
    for n in order:
        for sub in subgraphs(n):
            topological_sort(sub)


def remove_dead_nodes(graph: gs.Graph) -> int:
    """Drop nodes none of whose outputs reaches a graph output (reverse reachability); returns how many,
    subgraphs included. A tensor read inside a subgraph (at any depth) is a use by the node holding it, so
    its producer lives when that node does; inside each live body, nodes that reach no body output go too."""
    nodes = list(graph.nodes)
    mine = {id(n) for n in nodes}      # a body's outer reads have producers outside it: not walked here
    live: set[int] = set()
    stack = [t.inputs[0] for t in graph.outputs if len(t.inputs) == 1]
    while stack:
        n = stack.pop()
        if id(n) in live or id(n) not in mine:
            continue
        live.add(id(n))
        for t in all_reads(n):
            if len(t.inputs) == 1 and id(t.inputs[0]) not in live:
                stack.append(t.inputs[0])
    dead = [n for n in nodes if id(n) not in live]
    for n in dead:
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes = [n for n in nodes if id(n) in live]
    removed = len(dead)
    for n in graph.nodes:
        for sub in subgraphs(n):
            removed += remove_dead_nodes(sub)
    return removed


def constant_bytes(const: gs.Constant) -> bytes:
    """The raw little-endian bytes of a constant as ONNX stores them (packed for 4-bit types)."""
    values = const._values
    if isinstance(values, FileValues):
        return values.read_bytes()
    if isinstance(values, ConcatValues):
        return np.ascontiguousarray(values.load()).tobytes()
    if isinstance(values, LazyValues):
        tensor = values.tensor
        if tensor.HasField("raw_data"):
            return tensor.raw_data
        return onnx.numpy_helper.to_array(tensor).tobytes()
    return np.ascontiguousarray(values).tobytes()


def spill_constants(graph: gs.Graph, spill) -> int:
    """Move every in-memory constant of at least ``spill.min_bytes`` (subgraphs included) into ``spill``
    (a ``weights.SpillFile``) when it is active; the constant reads it back on demand. Returns the bytes
    moved."""
    moved = 0
    if not spill.active:
        return 0
    for const in constants(graph):
        if isinstance(const._values, (FileValues, ConcatValues)):     # joined from file-backed parts on read
            continue
        nbytes = tensor_nbytes(const) or 0
        if nbytes < spill.min_bytes:
            continue
        values = const._values
        data_type = values.tensor.data_type if isinstance(values, LazyValues) else onnx_dtype(const.dtype)
        if itemsize_bits(data_type) == 0:
            continue
        tensor = spill.add(const.name, data_type, const.shape, constant_bytes(const))
        const._values = FileValues(tensor)
        moved += nbytes
    return moved


# ------------------------------------------------------------------------------------------ export
STUB_LOCATION = "__lmc_stub__"


def export_skeleton(graph: gs.Graph, inline_bytes: int = _SKELETON_INLINE_BYTES,
                    stub_if: Callable[[gs.Constant], bool] | None = None) -> onnx.ModelProto:
    """Export the graph with every constant larger than ``inline_bytes`` (and, given ``stub_if``, for which
    it holds) replaced by a dtype+dims stub (external-data location ``STUB_LOCATION``): no such weight is
    copied. ``constant_bytes`` gives the data."""
    stubs: dict[str, onnx.TensorProto] = {}
    originals: list[tuple[gs.Constant, object]] = []
    for const in constants(graph):
        nbytes = tensor_nbytes(const) or 0
        if nbytes <= inline_bytes or (stub_if is not None and not stub_if(const)):
            continue
        stub = onnx.TensorProto()
        stub.name = const.name
        stub.data_type = onnx_dtype(const.dtype)
        stub.dims.extend(const.shape)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", STUB_LOCATION
        stubs[const.name] = stub
    # Export with tiny placeholders, then swap the stubs in: gs would otherwise serialize the weights.
    for const in constants(graph):
        if const.name in stubs:
            originals.append((const, const._values))
            const._values = np.zeros((0,), dtype=np.uint8)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for const, values in originals:
            const._values = values
    _swap_stubs(model.graph, stubs)
    return _finish_export(graph, model)


def _swap_stubs(graph: onnx.GraphProto, stubs: dict[str, onnx.TensorProto]) -> None:
    """Put the stubs in place of the placeholder initializers of ``graph`` and of its subgraphs (gs writes
    an outer constant a body reads among that body's initializers as well)."""
    for g in proto_graphs(graph):
        for init in g.initializer:
            if init.name in stubs:
                init.CopyFrom(stubs[init.name])


# ----------------------------------------------------------------------------------------- rewriting
def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every consumer of ``old`` read ``new`` instead. When ``old`` is a graph output, ``new`` takes
    its place and its name (so the model's interface is unchanged). Returns False (and changes nothing)
    when that would rename a graph input, a constant, or another graph output."""
    out_names = graph_outputs(graph)
    if old.name in out_names:
        if isinstance(new, gs.Constant) or any(t is new for t in graph.inputs) or new.name in out_names:
            return False
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    if old.name in out_names:
        idx = [i for i, t in enumerate(graph.outputs) if t is old][0]
        name = old.name
        old.name = name + "__replaced"
        new.name = name
        if new.dtype is None:
            new.dtype = old.dtype
        if new.shape is None:
            new.shape = old.shape
        graph.outputs[idx] = new
    return True


def bypass(graph: gs.Graph, node: gs.Node, input_index: int = 0, output_index: int = 0) -> bool:
    """Remove a node whose output ``output_index`` equals its input ``input_index``; True on success."""
    src, dst = node.inputs[input_index], node.outputs[output_index]
    if not replace_tensor(graph, dst, src):
        return False
    node.outputs.clear()
    node.inputs.clear()
    return True



# -------------------------------------------------------------------------------------------- cones
def cone(tensors: Sequence[gs.Tensor], graph: gs.Graph | None = None,
         stop: frozenset[str] = frozenset()) -> tuple[list[gs.Node], set[str]]:
    """The nodes computing ``tensors`` (in ``graph``'s order when given) and the names of the graph
    inputs they read (constants are not leaves); tensors named in ``stop`` are leaves too."""
    nodes, leaves, seen, stack = [], set(), set(), list(tensors)
    while stack:
        x = stack.pop()
        node = producer(x) if x.name not in stop else None
        if node is None:
            if isinstance(x, gs.Variable) and x.name:
                leaves.add(x.name)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack += list(node.inputs) + outer_reads(node)
    if graph is not None:
        order = {id(n): i for i, n in enumerate(graph.nodes)}
        nodes.sort(key=lambda n: order.get(id(n), -1))
    return nodes, leaves


def cone_model(graph: gs.Graph, outputs: Sequence[gs.Tensor], inputs: Sequence[gs.Tensor] | None = None,
               free_dims: bool = False, cut: Sequence[gs.Tensor] = ()) -> onnx.ModelProto:
    """A model computing ``outputs`` from ``inputs`` (default: all graph inputs) with only the nodes they
    depend on; ``cut`` tensors become inputs too (what computes them is left out). With ``free_dims``
    every input dim is symbolic (probes choose their own shapes) and no intermediate shape is recorded."""
    nodes, leaves = cone(outputs, graph, frozenset(t.name for t in cut))
    cut = [t for t in cut if t.name in leaves]
    sub = gs.Graph(nodes=nodes, inputs=list(graph.inputs if inputs is None else inputs) + cut, outputs=list(outputs),
                   opset=graph.opset, import_domains=graph.import_domains)
    model = gs.export_onnx(sub, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(opset_imports(graph))
    if free_dims:
        del model.graph.value_info[:]
        for vi in model.graph.input:
            for k, dim in enumerate(vi.type.tensor_type.shape.dim):
                dim.Clear()
                dim.dim_param = f"d{k}"
    del model.graph.output[:]
    for t in outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t.name))
    return model
