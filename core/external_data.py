"""Initializers moved to an external-data file: each at an aligned offset, one at a time (no second copy of
all weights). A tensor of at least ``PAGE_ALIGN_MIN_BYTES`` sits at a multiple of the page size as well,
which onnxruntime needs to mmap it rather than read it onto its heap; the tensor keeps only its
``location/offset/length`` entries. Used by the bundle emitter and by calibration sessions."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from pathlib import Path

import onnx
from onnx import numpy_helper

from lmc.core.ir import STUB_LOCATION, proto_graphs
from lmc.core.weights import FileValues, is_file_backed

SMALL_MODEL_BYTES = 64 * 1024
PAGE_BYTES = 4096                  # onnxruntime mmaps external data only at offsets that are page multiples
PAGE_ALIGN_MIN_BYTES = 64 * 1024   # tensors this large are page-aligned (the padding is < 6% of each)


def raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if is_file_backed(tensor):
        return FileValues(tensor).read_bytes()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def externalize(model: onnx.ModelProto, weights_path: Path, alignment: int, threshold: int,
                 tensor_bytes: Callable[[str], bytes] | None = None, keep: Collection[str] = ()) -> bool:
    """Move initializers of ≥ ``threshold`` bytes to ``weights_path`` at aligned offsets. Stub initializers
    (external location ``STUB_LOCATION``) get their bytes from ``tensor_bytes(name)``, one at a time; those
    named in ``keep`` are left as they are."""
    inits = [t for t in all_initializers(model.graph) if t.name not in keep]
    stubbed = any(is_stub(t) or is_file_backed(t) for t in inits)
    total = sum(len(t.raw_data) if t.HasField("raw_data") else 0 for t in inits)
    if total <= SMALL_MODEL_BYTES and not stubbed:
        return False
    offset = 0
    wrote = False
    with open(weights_path, "wb") as f:
        for tensor in inits:
            source = None
            if is_stub(tensor):
                if tensor_bytes is None:
                    raise ValueError(f"initializer '{tensor.name}' is a stub and no data source was given")
                data = tensor_bytes(tensor.name)
            elif is_file_backed(tensor) and (values := FileValues(tensor)).length >= threshold:
                source, data = values, b""                   # copied file to file below
            else:
                data = raw_bytes(tensor)
                if len(data) < threshold:
                    if is_file_backed(tensor):       # the bundle never points at the source model's files
                        del tensor.external_data[:]
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        tensor.raw_data = data
                    continue
            size = source.length if source is not None else len(data)
            align = alignment if size < PAGE_ALIGN_MIN_BYTES else math.lcm(alignment, PAGE_BYTES)
            pad = (-offset) % align
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            if source is not None:
                source.copy_into(f)
            else:
                f.write(data)
            length = size
            del data
            dtype, dims = tensor.data_type, list(tensor.dims)
            name = tensor.name
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", weights_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += length
            wrote = True
    if not wrote:
        weights_path.unlink()
    return wrote


def all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The initializers of ``graph`` and of its subgraphs at any depth (If branches, Loop/Scan bodies)."""
    return [t for g in proto_graphs(graph) for t in g.initializer]


def is_stub(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == STUB_LOCATION for e in tensor.external_data)
