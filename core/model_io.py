"""Loading ONNX models safely.

``load_model(path)`` reads a model with or without external data and never writes to it:

- the protobuf is parsed without external data first; a parse failure, a name or text field that is not
  valid UTF-8, an input without an element type or a graph the onnx checker rejects is a
  ``ModelLoadError`` naming the file;
- every external-data ``location`` must be a relative path that resolves *inside* the model's folder
  (absolute paths, ``..`` escapes and symlinks leading out are refused), name an existing file, and
  ``offset + length`` must lie within it;
- external data stays in its files (``weights.keep_in_file``): large tensors are read on demand, so models
  over 2 GB load without a resident copy of their weights; ``lazy=False`` reads everything in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from onnx import external_data_helper

from lmc.core import weights
from lmc.core.errors import ModelLoadError

log = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31 - 1


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors of ``model`` (subgraphs included) whose data lies in external files."""
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def check_external_locations(model: onnx.ModelProto, base_dir: Path, source: str) -> None:
    """Refuse external-data references that escape ``base_dir`` or point past the end of their file."""
    root = base_dir.resolve()
    for tensor in external_tensors(model):
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location or ""
        if not location:
            raise ModelLoadError(f"{source}: tensor '{tensor.name}' uses external data with no location")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location.split("/")[0]:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' external data location '{location}' is absolute; "
                "only paths inside the model's folder are allowed")
        resolved = (root / location).resolve()
        if not resolved.is_relative_to(root):
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' external data location '{location}' escapes the model's folder")
        if not resolved.is_file():
            raise ModelLoadError(f"{source}: tensor '{tensor.name}' external data file '{location}' not found")
        size = resolved.stat().st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' external data [{offset}, {offset + length}) lies beyond "
                f"the end of '{location}' ({size} bytes)")


UNSUPPORTED_OPS = frozenset({
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength",
    "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
})


def check_tensor_graph(model: onnx.ModelProto, source: str) -> None:
    """lmc plans tensors: graph inputs/outputs must be tensors, and no node may build sequences or
    optionals (their sizes are not static)."""
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            which = v.type.WhichOneof("value")
            if which not in (None, "tensor_type"):
                raise ModelLoadError(f"{source}: {kind} '{v.name}' is a {which.replace('_type', '')}; lmc compiles "
                                     "graphs whose inputs and outputs are tensors")
    for node in model.graph.node:
        if node.op_type in UNSUPPORTED_OPS and node.domain in ("", "ai.onnx"):
            raise ModelLoadError(f"{source}: node '{node.name or node.op_type}' ({node.op_type}) builds a "
                                 "sequence/optional value; lmc plans tensor graphs only")


_DTYPES = set(onnx.TensorProto.DataType.values())


def _check_tensor_proto(t: onnx.TensorProto, what: str, source: str) -> None:
    if t.data_type not in _DTYPES or t.data_type == onnx.TensorProto.UNDEFINED:
        raise ModelLoadError(f"{source}: {what} has an unknown data type {t.data_type}")
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"{source}: {what} has a negative dim {list(t.dims)}")
    if t.raw_data and t.data_type != onnx.TensorProto.STRING:
        bits = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            bits = 4
        count = 1
        for d in t.dims:
            count *= d
        if len(t.raw_data) != (count * bits + 7) // 8:
            raise ModelLoadError(f"{source}: {what} holds {len(t.raw_data)} bytes, but its shape {list(t.dims)} "
                                 f"needs {(count * bits + 7) // 8}")


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)       # newer protobuf; older ones have only ``label``
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def _first_bad_string(message, path: str) -> str | None:
    """The path of the first string field of ``message`` (recursively) that is not valid UTF-8, or None.
    (A proto2 ``string`` is not checked by the parser; the Python runtime hands invalid ones out as bytes.)"""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            repeated = _repeated(field)
            for i, v in enumerate(value if repeated else [value]):
                if not isinstance(v, str):
                    return f"{path}.{field.name}" + (f"[{i}]" if repeated else "")
        elif field.type == field.TYPE_MESSAGE:
            repeated = _repeated(field)
            for i, item in enumerate(value if repeated else [value]):
                where = f"{path}.{field.name}" + (f"[{i}]" if repeated else "")
                found = _first_bad_string(item, where)
                if found:
                    return found
    return None


def check_text(model: onnx.ModelProto, source: str) -> None:
    """Every name and text field is valid UTF-8 (a flipped byte in a name otherwise fails deep in lmc)."""
    bad = _first_bad_string(model, "model")
    if bad:
        raise ModelLoadError(f"{source}: {bad} is not valid UTF-8 text (file corrupt?)")


def check_tensor_data(model: onnx.ModelProto, source: str) -> None:
    """Declared element types are known; initializers' and Constant values' bytes match their shapes; no
    list attribute is empty (its type cannot be told)."""
    g = model.graph
    for kind, values in (("input", g.input), ("output", g.output), ("value", g.value_info)):
        for v in values:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in _DTYPES:
                raise ModelLoadError(f"{source}: {kind} '{v.name}' has an unknown element type "
                                     f"{v.type.tensor_type.elem_type}")
    for v in g.input:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            raise ModelLoadError(f"{source}: input '{v.name}' has no element type (0, UNDEFINED); a model's "
                                 "inputs must declare theirs")
    for t in g.initializer:
        _check_tensor_proto(t, f"initializer '{t.name}'", source)
    for node in g.node:
        for a in node.attribute:
            where = f"attribute '{a.name}' of node '{node.name or node.op_type}' ({node.op_type})"
            if a.type == onnx.AttributeProto.TENSOR:
                _check_tensor_proto(a.t, where, source)
            elif a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS) \
                    and not (a.ints or a.floats or a.strings):
                raise ModelLoadError(f"{source}: {where} is an empty list")


def load_model(path: str | os.PathLike, lazy: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX model; see the module docstring for the checks."""
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise ModelLoadError(f"{source}: no such file")
    if not p.is_file():
        raise ModelLoadError(f"{source}: not a file")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelLoadError(f"{source}: cannot read ({exc.strerror})") from exc
    if not data:
        raise ModelLoadError(f"{source}: empty file")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise ModelLoadError(f"{source}: not a valid ONNX model (protobuf parse failed: {exc})") from exc
    del data
    if not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{source}: not a valid ONNX model (no graph or no opset import)")
    if not model.graph.output:
        raise ModelLoadError(f"{source}: the graph has no outputs (file truncated or corrupt?)")
    check_text(model, source)
    check_tensor_graph(model, source)
    check_tensor_data(model, source)
    check_external_locations(model, p.parent, source)
    external = external_tensors(model)
    if external and lazy:
        weights.keep_in_file(model, p.parent)
    elif external:
        external_data_helper.load_external_data_for_model(model, str(p.parent))
    try:
        # From the path: the C++ checker reads the file itself (faster than serializing the parsed model
        # back, and fine past 2 GB); external locations were validated above.
        onnx.checker.check_model(str(p))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source}: invalid ONNX model ({first})") from exc
    log.info("loaded %s: %d nodes, %d initializers", source, len(model.graph.node), len(model.graph.initializer))
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save a model in one file; models over the protobuf limit need the bundle emitter instead."""
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ModelLoadError(f"{path}: model exceeds 2 GB; save it with external data (lmc build does)")
    onnx.save_model(model, str(path))
