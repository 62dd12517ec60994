"""Calibration statistics of intermediate tensors, collected with onnxruntime.

For each requested tensor x (last axis = features) over all calibration samples:
``second_moment[k]`` = E[x_k²] (mean over every position of every sample), ``absmax[k]`` = max |x_k|.
Samples come from an ``.npz`` holding one array per model input, shaped [N, *input_shape] (sample i is
arr[i]). The graph is exported with the requested tensors as extra outputs; weights are not copied twice:
a graph holding over ``STREAM_BYTES`` of weights in memory is written to a temporary folder with its weights
streamed one tensor at a time into a page-aligned external-data file (which onnxruntime maps rather than
copies), never serialised into one protobuf (which fails past 2 GB); weights still in the model's own
files are linked into the session, not copied (``runtime.session``), and a merged projection's MatMul
reads its parts there, one MatMul per part (no joined copy for onnxruntime to fold at load). ``Calibrator``
keeps that session and passes over the samples again for any subset of the tensors (statistics too large to
collect all at once: GPTQ's Gram matrices, group by group); ``collect`` is one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.external_data import PAGE_BYTES, externalize, is_stub
from lmc.core.runtime import session
from lmc.core.weights import ConcatValues, FileValues, link_external
from lmc.passes.quantize.gram import GramProducts, GramSum

log = logging.getLogger(__name__)
CALIB_MODEL, CALIB_WEIGHTS = "calib.onnx", "calib.weights"   # a streamed calibration session's files

STREAM_BYTES = 1 << 30
INLINE_BYTES = 4096               # ir.export_skeleton keeps constants this small in the model


def _in_memory_bytes(graph: gs.Graph) -> int:
    """Weight bytes the graph holds in memory: file-backed weights (``weights.FileValues``) are linked into a
    session, not copied, so only the rest decides whether to stream."""
    return sum(ir.tensor_nbytes(c) or 0 for c in ir.constants(graph) if not isinstance(c._values, FileValues))


@dataclass
class ChannelStats:
    second_moment: np.ndarray         # E[x_k²]
    absmax: np.ndarray                # max |x_k|
    gram: np.ndarray | None = None    # Σ x xᵀ over every position (for GPTQ, GRAM_DTYPE), when collected
    rows: np.ndarray | None = None    # a deterministic sample of rows of x [R, features], when requested


def _describe(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def conform_sample(name: str, value, shape: Sequence[int] | None, dtype=None, source: str = "") -> np.ndarray:
    """One calibration sample for input ``name`` shaped (and typed) as the model's input: ``value`` already
    has the input's shape, or lacks only a leading batch dim of 1 (added). Raises ``LmcError`` naming the
    input, the expected and the given shape/dtype."""
    where = f"{source}: " if source else ""
    arr = np.asarray(value)
    if dtype is not None:
        want = np.dtype(dtype)
        if arr.dtype != want:
            same_kind = (arr.dtype.kind in "iu" and want.kind in "iu") or (arr.dtype.kind == "f" and want.kind == "f") \
                or (arr.dtype.kind == "b" and want.kind == "b")
            if not same_kind:
                raise LmcError(f"{where}calibration array '{name}' has dtype {arr.dtype}, but the model input is "
                               f"{want}")
            arr = arr.astype(want)
    if shape is None:
        return arr
    expected = [int(d) for d in shape]
    got = list(arr.shape)
    if got == expected:
        return arr
    if expected and expected[0] == 1 and got == expected[1:]:
        return arr[None]
    raise LmcError(f"{where}calibration array '{name}': a sample is {_describe(got)}, but the model input is "
                   f"{_describe(expected)}; give [N, {', '.join(str(d) for d in expected)}] (sample i is arr[i])"
                   + (f" or [N, {', '.join(str(d) for d in expected[1:])}]" if expected and expected[0] == 1 else ""))


def load_calibration(path: str | Path, input_names: Sequence[str], max_samples: int | None = None,
                     shapes: Mapping[str, Sequence[int]] | None = None,
                     dtypes: Mapping[str, object] | None = None) -> list[dict]:
    """Feeds from a calibration ``.npz``: one dict per sample.

    Each array is ``[N, *input_shape]`` (sample i is ``arr[i]``, batch dim included) or, when the input's
    batch dim is 1, ``[N, *input_shape[1:]]`` (the batch dim is added). With ``shapes`` (and ``dtypes``) of
    the model's bound inputs every array is checked and a mismatch is an ``LmcError`` naming the input, the
    expected and the given shape; inputs without a known shape get ``arr[i]`` as is (e.g. generation
    bundles' token ids, [L] or [1, L] per sample)."""
    shapes = shapes or {}
    dtypes = dtypes or {}
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise LmcError(f"{path}: cannot read calibration data ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from exc
    except Exception as exc:  # zipfile.BadZipFile and friends: a corrupt .npz is the user's
        raise LmcError(f"{path}: cannot read calibration data ({type(exc).__name__})") from exc
    if not isinstance(data, dict) or not data:
        raise LmcError(f"{path}: holds no arrays")
    missing = [n for n in input_names if n not in data]
    if missing:
        raise LmcError(f"{path}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(data)})")
    for name in input_names:
        arr = data[name]
        if arr.ndim == 0 or len(arr) == 0:
            raise LmcError(f"{path}: calibration array '{name}' is {_describe(arr.shape)}; expected [N, …] with "
                           "N ≥ 1 samples")
        if arr.dtype.kind not in "biuf":
            raise LmcError(f"{path}: calibration array '{name}' has dtype {arr.dtype}; expected numbers")
    counts = {name: len(data[name]) for name in input_names}
    n = min(counts.values())
    if len(set(counts.values())) > 1:
        log.warning("%s: arrays hold different sample counts (%s); using %d", path,
                    ", ".join(f"{k} {v}" for k, v in counts.items()), n)
    if max_samples:
        n = min(n, max_samples)
    return [{name: conform_sample(name, data[name][i], shapes.get(name), dtypes.get(name), str(path))
             for name in input_names} for i in range(n)]


def _ort_dtype(type_str: str):
    """``tensor(float)`` → float32 (None when numpy has no such type, e.g. bfloat16)."""
    name = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else type_str
    name = {"float": "float32", "double": "float64", "bool": "bool"}.get(name, name)
    try:
        return np.dtype(name)
    except TypeError:
        return None


def conform_feeds(feeds: Sequence[dict], inputs) -> None:
    """Check (in place) ``feeds`` against onnxruntime session ``inputs`` (``sess.get_inputs()``): every
    input has a value of its shape and dtype (a missing leading batch dim of 1 is added)."""
    for feed in feeds:
        for inp in inputs:
            if inp.name not in feed:
                raise LmcError(f"calibration data has no array for model input '{inp.name}'")
            shape = inp.shape if all(isinstance(d, int) for d in inp.shape) else None
            feed[inp.name] = conform_sample(inp.name, feed[inp.name], shape, _ort_dtype(inp.type))


class Calibrator:
    """An onnxruntime session over ``graph`` as it is when created, with ``tensors`` as extra outputs, that
    passes over ``feeds`` as often as asked, each time for any subset of those tensors (``run``): statistics
    that do not all fit in memory at once (GPTQ's Gram matrices) are collected in groups, each group one
    pass, from the same session — so every pass sees exactly the same values, whatever the graph becomes
    meanwhile. A context manager: ``close`` frees the session and its temporary folder."""

    def __init__(self, graph: gs.Graph, tensors: Sequence[str], feeds: Sequence[dict], low_memory: bool = False):
        import shutil
        import tempfile

        self.tensors = list(tensors)
        self.feeds = feeds
        self.passes = 0
        self._folder = None
        stream = _in_memory_bytes(graph) > STREAM_BYTES
        model = ir.export_skeleton(graph) if stream else ir.to_model(graph)
        present = {o.name for o in model.graph.output}
        for name in self.tensors:
            if name not in present:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        _keep_only(model, self.tensors)
        if stream:
            folder = Path(tempfile.mkdtemp(prefix="lmc-calib-"))
            try:
                by_name = {c.name: c for c in ir.constants(graph)}
                # weights still in their files are linked, not copied (a merged one a Concat of its parts);
                # the other stubs go to the file; the skeleton's inline tensors stay inline (onnxruntime's
                # shape inference cannot read a Reshape's shape from external data)
                linked = _point_at_files(model, by_name)
                externalize(model, folder / CALIB_WEIGHTS, PAGE_BYTES, INLINE_BYTES + 1,
                            lambda name: ir.constant_bytes(by_name[name]), keep=linked)
                link_external(model, folder)
                with open(folder / CALIB_MODEL, "wb") as f:
                    f.write(model.SerializeToString())
                del model, by_name
                self._sess = session(folder / CALIB_MODEL, low_memory=low_memory)
            finally:
                # onnxruntime has read (or mapped) the files: the folder goes now, so no link to the
                # model's weights outlives this call even if the process is killed later
                shutil.rmtree(folder, ignore_errors=True)
        else:
            self._sess = session(model, low_memory=low_memory)
            del model
        conform_feeds(self.feeds, self._sess.get_inputs())
        self._inputs = {i.name for i in self._sess.get_inputs()}

    def run(self, tensors: Sequence[str] | None = None, gram: bool | Collection[str] = False, keep_rows: int = 0,
            progress: Callable[[int, int], None] | None = None) -> dict[str, ChannelStats]:
        """One pass over the feeds: statistics of ``tensors`` (default: all), with XᵀX for ``gram`` (True:
        every tensor; or the names to collect it for)."""
        tensors = self.tensors if tensors is None else list(tensors)
        unknown = [t for t in tensors if t not in self.tensors]
        if unknown:
            raise ValueError(f"not an output of this calibration session: {', '.join(unknown)}")
        grams = set(tensors) if gram is True else set(gram or ())
        self.passes += 1
        return _collect(self._sess, self._inputs, tensors, self.feeds, progress, grams, keep_rows)

    def close(self) -> None:
        import shutil

        self._sess = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> Calibrator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _keep_only(model: onnx.ModelProto, tensors: Sequence[str]) -> None:
    """Reduce the model to what computing ``tensors`` needs: those its outputs, the nodes they depend on and
    those nodes' initializers (onnxruntime runs every node of a graph, whatever the outputs asked for — a
    language model's logits over every calibration position would be computed and dropped). Graph inputs stay
    (the feeds are the same). A node holding subgraphs keeps every name they read."""
    graph = model.graph
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    needed, todo, keep = set(tensors), list(tensors), set()
    while todo:                                      # whatever the nodes' order
        i = producer.get(todo.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        node = graph.node[i]
        for name in ir.node_reads(node):
            if name not in needed:
                needed.add(name)
                todo.append(name)
    if not keep or len(keep) == len(graph.node):    # nothing computed asked: the graph as it is
        return
    kept = [node for i, node in enumerate(graph.node) if i in keep]
    wanted = set(tensors)
    outputs = [o for o in graph.output if o.name in wanted]
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _point_at_files(model: onnx.ModelProto, by_name: dict[str, gs.Constant]) -> set[str]:
    """Make the stubs whose values are bytes of a file (``FileValues``) file-backed initializers of those
    bytes. A stub merged from such parts (``ConcatValues``) becomes file-backed initializers of its parts:
    where it is only ever the right operand of MatMul and its parts join along the last axis, each
    MatMul(x, [W₁ … W_P]) becomes Concat(MatMul(x, W₁) … MatMul(x, W_P)) on the last axis — the same
    columns, with the parts read from the file where they are; otherwise a Concat node joins the parts
    (onnxruntime folds it once, at load, into a copy). Returns the names of the file-backed initializers."""
    linked: set[str] = set()
    joins, split = [], {}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in ir.node_reads(node):
            readers.setdefault(name, []).append(node)
    for tensor in list(model.graph.initializer):
        value = by_name[tensor.name]._values if is_stub(tensor) and tensor.name in by_name else None
        if isinstance(value, FileValues):
            tensor.CopyFrom(value.tensor)
            linked.add(tensor.name)
        elif isinstance(value, ConcatValues) and all(isinstance(p, FileValues) for p in value.parts):
            parts = []
            for i, part in enumerate(value.parts):
                init = model.graph.initializer.add()
                init.CopyFrom(part.tensor)
                init.name = f"{tensor.name}/part{i}"
                parts.append(init.name)
            linked.update(parts)
            uses = readers.get(tensor.name, [])
            if value.axis % len(value.shape) == len(value.shape) - 1 and uses and tensor.name not in outputs and all(
                    n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2
                    and n.input[1] == tensor.name != n.input[0] for n in uses):
                split[tensor.name] = parts
            else:
                joins.append(onnx.helper.make_node("Concat", parts, [tensor.name], axis=value.axis,
                                                   name=f"{tensor.name}/join"))
            model.graph.initializer.remove(tensor)
    nodes = joins
    for node in model.graph.node:
        parts = split.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if parts is None:
            nodes.append(node)
            continue
        outs = [f"{node.output[0]}/part{i}" for i in range(len(parts))]
        nodes += [onnx.helper.make_node("MatMul", [node.input[0], part], [out], name=f"{node.name}/part{i}")
                  for i, (part, out) in enumerate(zip(parts, outs))]
        nodes.append(onnx.helper.make_node("Concat", outs, [node.output[0]], axis=-1, name=f"{node.name}/join"))
    if joins or split:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return linked


def collect(graph: gs.Graph, tensors: Sequence[str], feeds: Sequence[dict],
            progress: Callable[[int, int], None] | None = None, gram: bool = False,
            keep_rows: int = 0) -> dict[str, ChannelStats]:
    """Second moments and absmax per last-axis feature of ``tensors`` over ``feeds`` (and XᵀX with
    ``gram``; up to ``keep_rows`` rows of x, spread evenly over the samples, with ``keep_rows``)."""
    with Calibrator(graph, tensors, feeds) as calibrator:
        return calibrator.run(gram=gram, keep_rows=keep_rows, progress=progress)


class _BoundOutputs:
    """``sess.run(tensors, feed)`` with the outputs written into the same arrays on every run whose inputs
    have the shapes of the previous one (onnxruntime's I/O binding): a pass over many samples then maps no
    fresh pages for its outputs. The arrays returned are overwritten by the next run."""

    def __init__(self, sess, tensors: Sequence[str]):
        self.sess, self.tensors = sess, list(tensors)
        self.key = None
        self.outputs: list[np.ndarray] = []
        self.binding = None

    def run(self, feed: dict) -> list[np.ndarray]:
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        key = tuple((k, v.shape, v.dtype.str) for k, v in sorted(feed.items()))
        if key != self.key:
            values = self.sess.run(self.tensors, feed)
            self.key, self.outputs = key, [np.empty_like(v) for v in values]
            self.binding = self.sess.io_binding()
            for name, out in zip(self.tensors, self.outputs):
                if name not in feed:                         # a graph input asked for is its feed
                    self.binding.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            return values
        if any(n not in feed for n in self.tensors):
            for name, value in feed.items():
                self.binding.bind_cpu_input(name, value)
            self.sess.run_with_iobinding(self.binding)
        return [feed[n] if n in feed else out for n, out in zip(self.tensors, self.outputs)]


def _collect(sess, inputs, tensors, feeds, progress, grams, keep_rows) -> dict[str, ChannelStats]:
    sums: dict[str, np.ndarray] = {}
    maxes: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    gram_sums: dict[str, GramSum] = {}
    products = GramProducts()
    kept: dict[str, list[np.ndarray]] = {}
    per_sample = -(-keep_rows // max(1, len(feeds))) if keep_rows else 0
    runner = _BoundOutputs(sess, tensors)

    for i, feed in enumerate(feeds):
        values = runner.run({k: v for k, v in feed.items() if k in inputs})
        for name, v in zip(tensors, values):
            x = v.reshape(-1, v.shape[-1])
            counts[name] = counts.get(name, 0) + x.shape[0]
            if name in grams:
                # Σ x² is the Gram's diagonal, formed at the end; |x| is exact in the tensor's own type
                maxes[name] = np.maximum(maxes.get(name, 0), np.abs(x).max(axis=0).astype(np.float64))
                if name not in gram_sums:
                    gram_sums[name] = GramSum(len(x), x.shape[1], products)
                gram_sums[name].add(x)
            else:
                flat = np.asarray(x, dtype=np.float64)
                sums[name] = sums.get(name, 0) + (flat ** 2).sum(axis=0)
                maxes[name] = np.maximum(maxes.get(name, 0), np.abs(flat).max(axis=0))
                del flat
            if per_sample:
                step = max(1, x.shape[0] // per_sample)
                kept.setdefault(name, []).append(x[::step][:per_sample].astype(np.float32))
        del values
        if progress:
            progress(i + 1, len(feeds))
    formed = {}
    for name, gram in gram_sums.items():
        formed[name] = gram.result()
        sums[name] = np.diagonal(formed[name]).astype(np.float64)
    return {n: ChannelStats(sums[n] / counts[n], maxes[n], formed.get(n),
                            np.concatenate(kept[n]) if n in kept else None) for n in tensors}
