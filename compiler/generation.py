"""Generation builds (``lmc build --context N``): a past/present decoder becomes one model that serves prefill
(sequence = prompt ≤ N) and decode (sequence = 1) with its cache as fixed state.

The passes work on static shapes, so the model is compiled twice, with the sequence length bound to two
probe values s₁ ≠ s₂, and the results are compared (*specialise twice, generalise*):
- the two graphs must have the same nodes, names and edges (no decision may depend on the length);
- every constant must be equal in both (dtype, shape and a digest of its values, whatever its size),
  except Reshape targets, where a differing entry k becomes 0 (copy the input's dim k, which differs in the
  same way) or −1 (at most one per target), integer constants affine in S, computed at run time, and
  uniform constants (one value, e.g. the zeros an MoE block scatters into) whose shape is affine in S,
  made at run time by ConstantOfShape, and constants broadcast along their S-sized dims, by Expand (of
  constants small enough to be kept, ``SMALL_CONSTANT``); constants are matched by the node inputs that
  read them, so a folded length merged with an equal model constant at one probe length is no difference;
- anything else that differs (a constant mask of length S, a Range of S) is an error naming the tensor.
The second graph, so generalised, is the bundle; its plan is made per profile by binding the sequence
length again (decode: 1, prefill: N). The state is the cache: ``StaticKVCache`` names the pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes, weights
from lmc.core.errors import LmcError
from lmc.core.metadata import GenerationInfo
from lmc.core.model_io import load_model
from lmc.core.pass_manager import PassRecord
from lmc.passes.cache_masks import dense_probing, judge_masks, mask_keeps, probeable
from lmc.passes.cache_sites import find_cache_pairs, find_roles, find_sites, state_pairs
from lmc.passes.fold_constants import fold_to_fixed_point

log = logging.getLogger(__name__)

PROBE_LENGTHS = (3, 5)
SEQUENCE_DIM = "sequence_length"
SMALL_CONSTANT = 64          # elements: constants up to this size keep their values in a snapshot
KEPT_INTEGER_BYTES = 64 << 10      # in-memory integer constants up to this size keep theirs too …
KEPT_TOTAL_BYTES = 16 << 20        # … while a snapshot keeps at most this much of them
_HASH_SLICE_BYTES = 16 << 20       # a digest reads a constant this much at a time
_INTEGER = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                      onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64})


def _digest(values: np.ndarray) -> bytes:
    """SHA-256 of dtype, shape and values, read ``_HASH_SLICE_BYTES`` at a time: a memmap'd weight is
    hashed in place, never copied whole."""
    values = np.asarray(values)
    h = hashlib.sha256(f"{values.dtype.str}|{values.shape}|".encode())
    if values.dtype.kind == "O":                           # strings
        for item in values.reshape(-1):
            h.update(repr(item).encode() + b"\0")
        return h.digest()
    if values.ndim == 0 or values.size == 0:
        h.update(values.tobytes())
        return h.digest()
    if values.flags.c_contiguous:
        flat = values.reshape(-1)                          # a view
        step = max(1, _HASH_SLICE_BYTES // values.itemsize)
        for i in range(0, flat.size, step):
            h.update(flat[i:i + step].view(np.uint8))
    else:
        step = max(1, _HASH_SLICE_BYTES // max(1, values.nbytes // values.shape[0]))
        for i in range(0, values.shape[0], step):
            h.update(np.ascontiguousarray(values[i:i + step]).reshape(-1).view(np.uint8))
    return h.digest()


@dataclass
class ConstantRecord:
    """One constant as a compile left it: dtype, shape, a digest of its values, and what generalising it
    needs if it differs — its values (``value``: small, or integer within ``KEPT_INTEGER_BYTES``) or, for a
    file-backed constant, where they are (``source``: its external-data tensor, or the file-backed parts a
    merged projection joins on read; the model's data files and the build's spill file do not change during
    a build, so the digest and values are read from it on demand, and two sources naming the same ranges are
    the same without reading either)."""

    dtype: int                                             # TensorProto enum
    shape: tuple[int, ...]
    value: np.ndarray | None = None
    source: weights.FileValues | weights.ConcatValues | None = None
    _digest: bytes | None = None
    fill: np.ndarray | None = None                         # the one value of a uniform in-memory constant

    @classmethod
    def of(cls, const: gs.Constant, keep: bool) -> "ConstantRecord":
        """The record of ``const``; ``keep``: copy its values into the record."""
        shape = tuple(int(d) for d in const.shape)
        source = _file_source(const._values)
        if source is not None:
            return cls(ir.onnx_dtype(const.dtype), shape, source=source)
        values = ir.const_value(const)
        return cls(ir.onnx_dtype(const.dtype), shape, np.array(values) if keep else None, _digest=_digest(values),
                   fill=_fill(values))

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = _digest(self.source.load())
        return self._digest

    def values(self) -> np.ndarray | None:
        """The values: kept, or read back from their file; None when neither."""
        if self.value is not None:
            return self.value
        return self.source.load() if self.source is not None else None

    def same_as(self, other: "ConstantRecord") -> bool:
        if (self.dtype, self.shape) != (other.dtype, other.shape):
            return False
        if self.source is not None and other.source is not None:
            same = _same_source(self.source, other.source)
            if same is not None:
                return same
        return self.digest() == other.digest()


def _file_source(values) -> weights.FileValues | weights.ConcatValues | None:
    """A file-backed constant's values as a record keeps them: its tensor's dims and location (not the model
    around it), or a join of such parts; None for values in memory."""
    if isinstance(values, weights.FileValues):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(values.tensor)
        return weights.FileValues(tensor)
    if isinstance(values, weights.ConcatValues):
        parts = [_file_source(p) for p in values.parts]
        if all(p is not None for p in parts):
            return weights.ConcatValues(values.name, parts, values.axis)
    return None


def _same_source(a, b) -> bool | None:
    """Whether two file sources hold the same values: the same bytes, or joins of the same parts on the same
    axis; None when that takes reading them (a join against one tensor)."""
    if isinstance(a, weights.FileValues) and isinstance(b, weights.FileValues):
        return _same_bytes(a, b)
    if isinstance(a, weights.ConcatValues) and isinstance(b, weights.ConcatValues) and a.axis == b.axis \
            and len(a.parts) == len(b.parts) and [p.shape for p in a.parts] == [p.shape for p in b.parts]:
        same = [_same_source(x, y) for x, y in zip(a.parts, b.parts)]
        return None if None in same else all(same)
    return None


def _fill(values: np.ndarray) -> np.ndarray | None:
    """The value every element of ``values`` has (a 0-d array), or None: read a slice at a time, stopping at
    the first slice that differs (a weight differs in its first few elements)."""
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind not in "biuf":
        return None
    flat, first = values.reshape(-1), values.reshape(-1)[0]
    if not np.all(flat[:4096] == first):                   # most constants (weights) stop here
        return None
    step = max(4096, _HASH_SLICE_BYTES // values.itemsize)
    for i in range(4096, flat.size, step):
        if not np.all(flat[i:i + step] == first):
            return None
    return np.array(first)


def _same_bytes(a: weights.FileValues, b: weights.FileValues) -> bool:
    """Whether two file-backed constants hold the same bytes: the same range of the same file (which does
    not change during a build), or equal ranges read ``_HASH_SLICE_BYTES`` at a time."""
    if (a.path, a.offset, a.length) == (b.path, b.offset, b.length):
        return True
    if a.length != b.length:
        return False
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        left = a.length
        while left:
            n = min(left, _HASH_SLICE_BYTES)
            chunk = fa.read(n)
            if len(chunk) != n or chunk != fb.read(n):
                return False
            left -= n
    return True


@dataclass
class Snapshot:
    """What is compared between the two specialisations."""

    signature: list[tuple]
    constants: dict[str, ConstantRecord]
    shapes: dict[str, tuple | None]


def _signature(graph: gs.Graph) -> list[tuple]:
    return [(n.op, n.name, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in graph.nodes]


def snapshot(graph: gs.Graph) -> Snapshot:
    """The graph's signature, a record of every constant (``ConstantRecord``) and every variable's shape."""
    consts, kept = {}, 0
    for c in ir.constants(graph):
        elements = math.prod(int(d) for d in c.shape)
        nbytes = ir.tensor_nbytes(c) or 0
        keep = elements <= SMALL_CONSTANT or (ir.onnx_dtype(c.dtype) in _INTEGER and nbytes <= KEPT_INTEGER_BYTES
                                              and kept + nbytes <= KEPT_TOTAL_BYTES)
        consts[c.name] = ConstantRecord.of(c, keep)
        if consts[c.name].value is not None and elements > SMALL_CONSTANT:
            kept += nbytes
    tensors = {name: (tuple(t.shape) if t.shape is not None else None) for name, t in graph.tensors().items()
               if isinstance(t, gs.Variable)}
    return Snapshot(_signature(graph), consts, tensors)


def _seq_dims(first: tuple | None, second: tuple | None) -> list[int]:
    if first is None or second is None or len(first) != len(second):
        return []
    return [k for k, (a, b) in enumerate(zip(first, second)) if a != b]


def _reshape_target(value1, value2, readers, first: Snapshot, second: Snapshot) -> np.ndarray | None:
    """A Reshape target for any length: a differing entry k becomes 0 (copy the input's dim k, which
    differs the same way) or −1 (at most one); None when that does not cover it."""
    if not all(ir.is_op(r, "Reshape") and int(r.attrs.get("allowzero", 0)) == 0 for r in readers):
        return None
    target = value2.astype(np.int64).copy()
    for k in np.flatnonzero(value1 != value2):
        copy = all(k in _seq_dims(first.shapes.get(r.inputs[0].name), second.shapes.get(r.inputs[0].name))
                   and second.shapes[r.inputs[0].name][k] == value2[k] for r in readers)
        target[k] = 0 if copy else -1
    return target if np.sum(target == -1) <= 1 else None


def _affine(value1: np.ndarray, value2: np.ndarray, lengths: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) with value = a·S + b elementwise for integer a, b, or None."""
    if value1.dtype.kind not in "iu" or value1.shape != value2.shape:
        return None
    (s1, s2), delta = lengths, value2.astype(np.int64) - value1.astype(np.int64)
    if np.any(delta % (s2 - s1)):
        return None
    a = np.asarray(delta // (s2 - s1), dtype=np.int64)
    return a, np.asarray(value1.astype(np.int64) - a * s1, dtype=np.int64)


def generalise(graph: gs.Graph, first: Snapshot, lengths: tuple[int, int], sequence_of: gs.Tensor) -> int:
    """Turn ``graph`` (compiled at ``lengths[1]``) into the graph for any length, given the snapshot of
    the compile at ``lengths[0]``; ``sequence_of`` is an input whose dim 1 is the sequence length S.
    Constants are compared by dtype, shape and digest (``ConstantRecord.same_as``), whatever their size.
    A differing constant is a Reshape target made of copies (0) and at most one −1, or, if integer and
    affine in S (a·S + b), computed at run time from Shape(sequence_of)[1]; anything else is an error.
    Returns how many constants were generalised."""
    second = snapshot(graph)
    counterparts = _counterparts(first, second)
    if counterparts is None:
        raise LmcError("--context: the compiled graph depends on the sequence length (different rewrites "
                       "at two lengths); lmc cannot emit one model for prefill and decode")
    by_name = {c.name: c for c in ir.constants(graph)}
    names = ir.Namer(graph)
    length: list[gs.Tensor] = []
    changed = 0
    for name, record2 in second.constants.items():
        olds = [first.constants.get(n) for n in sorted(counterparts.get(name, {name}))]
        record1 = olds[0] if all(r is not None and r.same_as(olds[0]) for r in olds) else None
        if record1 is not None and record1.same_as(record2):
            continue
        const = by_name[name]
        readers = list(const.outputs)
        what = readers[0].op if readers else "nothing"
        refused = LmcError(f"--context: constant '{name}' (read by {what}) depends on the sequence length; "
                           f"lmc cannot emit it for variable lengths")
        filled = record1 is not None and _filled_alike(record1, record2)
        slab = _broadcast_alike(record1, const) if record1 is not None and readers and not filled else None
        if record1 is not None and readers and (filled or slab is not None):
            shape = _affine(np.asarray(record1.shape, np.int64), np.asarray(record2.shape, np.int64), lengths)
            if shape is None:
                raise refused
            runtime = _fill_tensor(graph, names, shape, record2, sequence_of, length, name) if slab is None \
                else _expand_tensor(graph, names, shape, slab, sequence_of, length, name)
            for reader in readers:
                for i, t in enumerate(reader.inputs):
                    if t is const:
                        reader.inputs[i] = runtime
            changed += 1
            continue
        if record1 is None or (record1.dtype, record1.shape) != (record2.dtype, record2.shape) or not readers:
            raise refused
        reshape = all(ir.is_op(r, "Reshape") for r in readers)
        if not reshape and record2.dtype not in _INTEGER:
            raise refused                  # neither a Reshape target nor affine: its values are not needed
        value1 = record1.values()
        if value1 is None:
            raise refused
        value2 = np.asarray(ir.const_value(const))
        target = _reshape_target(value1, value2, readers, first, second) if all(
            r.inputs[1] is const for r in readers if ir.is_op(r, "Reshape")) else None
        if target is not None:
            const.values = target
        else:
            coefficients = _affine(value1, value2, lengths)
            if coefficients is None:
                raise refused
            runtime = _affine_tensor(graph, names, coefficients, value2.dtype, sequence_of, length, name)
            for reader in readers:
                for i, t in enumerate(reader.inputs):
                    if t is const:
                        reader.inputs[i] = runtime
        changed += 1
    if length:
        ir.topological_sort(graph)
    return changed


def _counterparts(first: Snapshot, second: Snapshot) -> dict[str, set[str]] | None:
    """For every constant of the second compile, the constants the first compile's nodes read in its
    place (by node and input slot); None when the two graphs differ in anything but constant names — e.g. a
    folded length that equals a model constant at one probe length (an expert index 3 at S = 3) is merged
    with it there and apart from it at the other."""
    a, b = first.signature, second.signature
    if len(a) != len(b):
        return None
    found: dict[str, set[str]] = {}
    for (op1, node1, ins1, outs1), (op2, node2, ins2, outs2) in zip(a, b):
        if (op1, node1, outs1) != (op2, node2, outs2) or len(ins1) != len(ins2):
            return None
        for x, y in zip(ins1, ins2):
            if x != y and (x not in first.constants or y not in second.constants):
                return None
            if y in second.constants:
                found.setdefault(y, set()).add(x)
    return found


def _filled_alike(record1: ConstantRecord, record2: ConstantRecord) -> bool:
    """Both uniform with the same value and dtype, of the same rank (a fill whose shape follows S)."""
    return (record1.fill is not None and record2.fill is not None and record1.dtype == record2.dtype
            and len(record1.shape) == len(record2.shape) and record1.fill.tobytes() == record2.fill.tobytes())


def _symbolic(coefficients) -> list:
    """Dims a·S + b as ``extend_templates`` reads them (ints, ``sequence_length``, ``sequence_length*a+b``)."""
    a, b = coefficients
    return [int(y) if x == 0 else SEQUENCE_DIM if (x, y) == (1, 0) else f"{SEQUENCE_DIM}*{int(x)}+{int(y)}"
            for x, y in zip(a.reshape(-1), b.reshape(-1))]


def _slab(values: np.ndarray | None, dims: list[int]) -> np.ndarray | None:
    """``values`` at index 0 of ``dims`` (kept as size-1 dims) when it is that broadcast along them, else None."""
    if values is None or not dims:
        return None
    slab = values[tuple(slice(0, 1) if d in dims else slice(None) for d in range(values.ndim))]
    return slab if np.array_equal(np.broadcast_to(slab, values.shape), values) else None


def _broadcast_alike(record1: ConstantRecord, const: gs.Constant) -> np.ndarray | None:
    """The slab both compiles' constants broadcast along the dims their shapes differ in (the per-head sink
    logits Expanded to [B, H, S, 1]), or None."""
    second = np.asarray(ir.const_value(const))
    if len(record1.shape) != second.ndim or record1.dtype != ir.onnx_dtype(second.dtype):
        return None
    dims = [d for d, (a, b) in enumerate(zip(record1.shape, second.shape)) if a != b]
    one, two = _slab(record1.values(), dims), _slab(second, dims)
    return two if one is not None and two is not None and np.array_equal(one, two) else None


def _expand_tensor(graph, names, shape, slab: np.ndarray, sequence_of, length: list, base: str) -> gs.Tensor:
    """``Expand(slab, a·S + b)``: a constant broadcast along dims whose size follows S."""
    dims = _affine_tensor(graph, names, shape, np.int64, sequence_of, length, base + "_shape")
    out = gs.Variable(names.fresh(base + "_expanded"), dtype=slab.dtype, shape=_symbolic(shape))
    graph.nodes.append(gs.Node("Expand", name=out.name, outputs=[out],
                               inputs=[gs.Constant(names.fresh(base + "_slab"), np.ascontiguousarray(slab)), dims]))
    return out


def _fill_tensor(graph, names, shape, record: ConstantRecord, sequence_of, length: list, base: str) -> gs.Tensor:
    """``ConstantOfShape(a·S + b)`` of the record's fill value: a uniform constant whose shape follows S."""
    dims = _affine_tensor(graph, names, shape, np.int64, sequence_of, length, base + "_shape")
    out = gs.Variable(names.fresh(base + "_fill"), dtype=record.fill.dtype, shape=_symbolic(shape))
    graph.nodes.append(gs.Node("ConstantOfShape", name=out.name, inputs=[dims], outputs=[out],
                               attrs={"value": onnx.numpy_helper.from_array(record.fill.reshape(1))}))
    return out


def _affine_tensor(graph, names, coefficients, dtype, sequence_of, length: list, base: str) -> gs.Tensor:
    """a·S + b as run-time nodes (S = Shape(sequence_of)[1], made once into ``length``)."""
    a, b = coefficients
    i64 = np.int64
    if not length:
        s = gs.Variable(names.fresh("lmc_sequence_length"), dtype=i64, shape=[1])
        graph.nodes.append(gs.Node("Shape", name=s.name, attrs={"start": 1, "end": 2}, inputs=[sequence_of],
                                   outputs=[s]))
        length.append(s)
    shaped = gs.Variable(names.fresh(base + "_length"), dtype=i64, shape=[1] * a.ndim)
    scaled = gs.Variable(names.fresh(base + "_scaled"), dtype=i64, shape=list(a.shape))
    out = gs.Variable(names.fresh(base + "_runtime"), dtype=i64, shape=list(a.shape))
    graph.nodes += [
        gs.Node("Reshape", name=shaped.name, inputs=[length[0], gs.Constant(names.fresh(base + "_rank"),
                                                                              np.ones(a.ndim, i64))], outputs=[shaped]),
        gs.Node("Mul", name=scaled.name, inputs=[shaped, gs.Constant(names.fresh(base + "_a"), a)], outputs=[scaled]),
        gs.Node("Add", name=out.name, inputs=[scaled, gs.Constant(names.fresh(base + "_b"), b)], outputs=[out])]
    if np.dtype(dtype) == i64:
        return out
    cast = gs.Variable(names.fresh(base + "_cast"), dtype=np.dtype(dtype), shape=list(a.shape))
    graph.nodes.append(gs.Node("Cast", name=cast.name, attrs={"to": ir.onnx_dtype(np.dtype(dtype))},
                               inputs=[out], outputs=[cast]))
    return cast


Template = dict[str, list[tuple[int, int]] | None]    # tensor -> per dim (a, b): size = a·S + b


def shape_templates(graph: gs.Graph, first: Snapshot, lengths: tuple[int, int]) -> Template:
    """Every variable's dims as affine functions of the sequence length S, from its shapes at the two
    probe lengths (shape inference cannot see through contrib ops; the two compiles already did)."""
    (s1, s2), out = lengths, {}
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Variable):
            continue
        a_shape, b_shape = first.shapes.get(name), ir.static_shape(t)
        if a_shape is None or b_shape is None or len(a_shape) != len(b_shape) or \
                not all(isinstance(d, int) for d in a_shape):
            out[name] = None
            continue
        dims = []
        for d1, d2 in zip(a_shape, b_shape):
            slope = (d2 - d1) // (s2 - s1)
            dims.append((slope, d1 - slope * s1))
        out[name] = dims
    return out


def extend_templates(graph: gs.Graph, templates: Template) -> None:
    """Add templates for tensors created after generalisation (e.g. by quantization) from their symbolic
    dims: ints stay, ``sequence_length`` is S, ``sequence_length*a+b`` is a·S + b."""
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Variable) or name in templates or t.shape is None:
            continue
        dims = []
        for d in t.shape:
            if isinstance(d, int) and d >= 0:
                dims.append((0, d))
            elif d == SEQUENCE_DIM:
                dims.append((1, 0))
            elif isinstance(d, str) and d.startswith(SEQUENCE_DIM + "*"):
                a, b = d[len(SEQUENCE_DIM) + 1:].split("+")
                dims.append((int(a), int(b)))
            else:
                dims = None
                break
        templates[name] = dims


def bind_sequence(graph: gs.Graph, length: int | str, templates: Template) -> None:
    """Give every tensor its shape at sequence length ``length``: an int, or a dim name for the emitted
    model (dims that are not exactly S are then left unnamed)."""
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Variable) or name not in templates:
            continue
        dims = templates[name]
        if dims is None:
            t.shape = None
        elif isinstance(length, int):
            t.shape = [a * length + b for a, b in dims]
        else:
            t.shape = [b if a == 0 else length if (a, b) == (1, 0) else f"{length}*{a}+{b}" for a, b in dims]


def _info(graph: gs.Graph, context: int, batch: int) -> GenerationInfo:
    pairs = state_pairs(graph)
    roles = find_roles(graph)
    state = {name for pair in pairs for name in pair}
    logits = [t.name for t in graph.outputs if t.name not in state]
    if len(logits) != 1:
        raise LmcError(f"--context: expected one output besides the cache, found {logits}")
    return GenerationInfo(context, batch, roles.input_ids, roles.position_ids or "position_ids", logits[0],
                          tuple(sorted(pairs)))


def check_generation_model(graph: gs.Graph) -> None:
    """A model ``--context`` can take: cache pairs present."""
    if not find_cache_pairs(graph):
        raise LmcError("--context needs a decoder exported with past key/values (inputs past_key_values.*, "
                       "outputs present.*), e.g. optimum's text-generation-with-past")


PRECHECK_SEQUENCES = (1, 2, 3)      # decode steps and short prefills, at every past length (or ``horizon``'s)


def precheck_masks(model_path, batch: int, context: int) -> dict:
    """Judge every attention mask over the whole horizon before the compiles (which see one sequence
    length each). First on one copy of the model with only the batch bound, for each S in
    ``PRECHECK_SEQUENCES``: every past length 0 … context − S when its masks' cones are light
    (``cache_masks.dense_probing``), else the past lengths ``cache_masks.horizon`` picks. Otherwise on fully
    bound copies, one per probe, where every shape folds so each mask's cone is a few index ops — at the past
    lengths ``cache_masks.horizon`` picks (both sides of every window edge). Returns {key present name:
    MaskPattern}."""
    graph, roles, pairs = _bound_copy(model_path, batch, None, None)
    try:
        sites = find_sites(graph, pairs)
    except LmcError:             # some exports' attentions are recognised only once the lengths fold
        sites = None
    if sites is not None and probeable(graph, pairs, sites):
        return judge_masks(lambda probes: mask_keeps(graph, roles, pairs, sites, probes), context,
                           PRECHECK_SEQUENCES, dense=dense_probing(graph, pairs, sites, context))

    # the batch-bound, folded copy as a skeleton: each probe binds and folds its own graph of it (a third of
    # the original's nodes for an export whose weights fold: transposes, casts), the weights of products and
    # of gathered tables as dtype+dims stubs — a mask's cone reads none of them once the lengths are bound
    skeleton = ir.export_skeleton(graph, stub_if=_product_weight)
    del graph
    with _ProbeRunner(skeleton, batch) as keeps_at:
        return judge_masks(keeps_at, context, PRECHECK_SEQUENCES, dense=False)


POOL_SECONDS = 3.0      # probes estimated to take longer than this (after the first) go to worker processes


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _workers_prepare_apart():
    """While worker processes start, let them prepare from this module instead of the program's
    ``__main__``: multiprocessing re-imports ``__main__`` in every worker (from its file), which would run a
    script's unguarded top-level code again — a second ``lmc.build`` — and fails for a script read from
    stdin. Named by module, the worker runs the empty ``lmc.compiler.worker_main`` instead."""
    import importlib.util
    import sys

    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    had, saved = hasattr(main, "__spec__"), getattr(main, "__spec__", None)
    main.__spec__ = importlib.util.find_spec("lmc.compiler.worker_main")
    try:
        yield
    finally:
        if had:
            main.__spec__ = saved
        else:
            del main.__spec__


class _ProbeRunner:
    """``keeps_at(probes)`` for ``judge_masks`` over bound copies of ``skeleton``, results in probe order.
    The first probe is timed; when the probes of a later call would take longer than ``POOL_SECONDS``, they
    run on worker processes (one per CPU; a 1.1B export's 40 probes take half a second each), else here.
    A context manager: leaving it stops the workers."""

    def __init__(self, skeleton: onnx.ModelProto, batch: int):
        self.skeleton, self.batch = skeleton, batch
        self.seconds: float | None = None
        self._pool = None
        self._failed = False

    def __call__(self, probes):
        import time

        probes = list(probes)
        if self.seconds is None and probes:
            start = time.perf_counter()
            yield from _precheck_one(self.skeleton, self.batch, *probes[0])
            self.seconds = time.perf_counter() - start
            probes = probes[1:]
        if self._pool is None and not self._failed and _workers() > 1 and len(probes) > 1 \
                and len(probes) * self.seconds > POOL_SECONDS:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            log.info("mask probes: %d on %d worker processes", len(probes), _workers())
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])     # workers fork with this module loaded
            self._pool = ProcessPoolExecutor(_workers(), mp_context=context, initializer=_probe_worker_init,
                                             initargs=(self.skeleton.SerializeToString(), self.batch))
        if self._pool is not None:
            from concurrent.futures.process import BrokenProcessPool

            try:
                with _workers_prepare_apart():          # workers start on the first submission
                    results = list(self._pool.map(_probe_worker_run, probes))
            except (BrokenProcessPool, OSError) as e:   # workers that cannot start
                log.info("mask probes: worker processes failed (%s); probing here", e)
                self._pool.shutdown(cancel_futures=True)
                self._pool, self._failed = None, True
            else:
                for keeps in results:
                    yield from keeps
                return
        for past, sequence in probes:
            yield from _precheck_one(self.skeleton, self.batch, past, sequence)

    def __enter__(self) -> _ProbeRunner:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


_worker_model: tuple[onnx.ModelProto, int] | None = None


def _probe_worker_init(skeleton: bytes, batch: int) -> None:
    global _worker_model
    _worker_model = onnx.load_from_string(skeleton), batch


def _probe_worker_run(probe: tuple[int, int]) -> list:
    model, batch = _worker_model
    return list(_precheck_one(model, batch, *probe))


_WEIGHT_READERS = {("MatMul", 1), ("Gemm", 1), ("Gemm", 2), ("Conv", 1), ("Gather", 0)}


def _product_weight(const: gs.Constant) -> bool:
    """Whether every reader of ``const`` takes it as a product's weight or a gathered table."""
    readers = [(node.op, slot) for node in const.outputs for slot, t in enumerate(node.inputs) if t is const]
    return bool(readers) and all(r in _WEIGHT_READERS for r in readers)


def _bound_copy(model_path, batch: int, past: int | None, sequence: int | None):
    """The model (a path, or a loaded ``ModelProto``, which is not changed) with its batch (and, given, its
    past and sequence lengths) bound and folded: (graph, roles, cache pairs)."""
    model = model_path if isinstance(model_path, onnx.ModelProto) else load_model(model_path)
    graph = ir.to_graph(model)
    check_generation_model(graph)
    roles = find_roles(graph)
    pairs = find_cache_pairs(graph)
    pasts = {p.past.name for p in pairs}
    for t in graph.inputs:
        if not t.shape:
            continue
        if t.name in (roles.input_ids, roles.position_ids):
            t.shape = [batch, sequence if sequence is not None else t.shape[1]]
        elif t.name == roles.attention_mask:
            t.shape = [batch, past + sequence if past is not None else t.shape[1]]
        elif t.name in pasts:
            t.shape = [batch, int(t.shape[1]), past if past is not None else t.shape[2], int(t.shape[3])]
    shapes.infer_shapes(graph)
    fold_to_fixed_point(graph)
    return graph, roles, pairs


def _precheck_one(model: onnx.ModelProto, batch: int, past: int, sequence: int):
    graph, roles, pairs = _bound_copy(model, batch, past, sequence)
    keeps = mask_keeps(graph, roles, pairs, find_sites(graph, pairs), [(past, sequence)])
    if keeps is None:
        raise LmcError("--context: the attention masks could not be evaluated")
    yield from keeps


def compile_generation(model_path, context: int, batch: int,
                       run_passes: Callable[[gs.Graph, dict], tuple[gs.Graph, list[PassRecord]]]
                       ) -> tuple[gs.Graph, list[PassRecord], GenerationInfo, Template]:
    """Compile at both probe lengths, generalise, and return (graph with a symbolic sequence dim, the
    records of the second compile, the generation info, the shape templates)."""
    patterns = precheck_masks(model_path, batch, context)
    first: Snapshot | None = None
    for length in PROBE_LENGTHS:
        model = load_model(model_path)
        graph = ir.to_graph(model)
        del model
        check_generation_model(graph)
        roles = find_roles(graph)
        for t in graph.inputs:
            if t.name in (roles.input_ids, roles.position_ids):
                t.shape = [batch, length]
            elif t.shape:                 # cache and attention mask: the batch is bound, their lengths not yet
                t.shape = [batch] + list(t.shape[1:])
        shapes.infer_shapes(graph)
        graph, records = run_passes(graph, patterns)
        if first is None:
            first = snapshot(graph)
            del graph
            weights.release_freed()          # free the first compile's weights before the second is made
    info = _info(graph, context, batch)
    info = dataclasses.replace(info, windows=tuple(sorted({p.window for p in patterns.values() if p.window})))
    templates = shape_templates(graph, first, PROBE_LENGTHS)
    ids = next(t for t in graph.inputs if t.name == info.input_ids)
    generalised = generalise(graph, first, PROBE_LENGTHS, ids)
    log.info("generalised %d reshape targets over the sequence length", generalised)
    extend_templates(graph, templates)       # tensors generalise made (fills) from their symbolic dims
    bind_sequence(graph, SEQUENCE_DIM, templates)
    return graph, records, info, templates


def calibration_feeds(samples: list[dict], info: GenerationInfo, graph: gs.Graph) -> list[dict]:
    """Full feeds for a generation graph from calibration samples holding only token ids ([L] or [1, L]
    each): positions 0…L−1 and an empty (zero) cache, i.e. each sample is a prefill."""
    state = {t.name: t for t in graph.inputs if t.name in {i for i, _ in info.state}}
    feeds = []
    for sample in samples:
        ids = np.asarray(sample[info.input_ids], dtype=np.int64)
        ids = ids.reshape(info.batch, -1) if ids.size % info.batch == 0 else ids
        if ids.ndim != 2 or ids.shape[1] > info.context:
            raise LmcError(f"calibration '{info.input_ids}' samples must be [L] or [{info.batch}, L] with "
                           f"L ≤ --context {info.context}; got {list(np.shape(sample[info.input_ids]))}")
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        feed = {info.input_ids: ids, info.position_ids: positions}
        for name, t in state.items():
            feed[name] = np.zeros([int(d) for d in t.shape], dtype=np.dtype(t.dtype))
        feeds.append(feed)
    return feeds
