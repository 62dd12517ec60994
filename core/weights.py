"""Weights left in their external-data files and read on demand.

A model over a few hundred MB keeps its weights in external-data files. Loading them into the protobuf
would keep a full copy resident for the whole build, and every onnxruntime session on the model (folding,
calibration, verification) maps a second one. Instead ``model_io.load_model`` leaves large external tensors
where they are:

- the tensor's ``location`` is rewritten *in memory* to the file's absolute, resolved path (the file on
  disk is never touched); tensors of at most ``INLINE_BYTES`` are read into the protobuf at load;
- ``ir.to_graph`` gives such a constant ``FileValues``: ``load()`` maps the bytes copy-on-write
  (``np.memmap`` mode ``c``: writable, never written back) for the caller alone; nothing is cached on the
  constant, so once the caller drops the array the pages leave the process;
- weights a build creates (a merged projection, a quantized copy) go the same way once the pass that made
  them is done: ``SpillFile`` (used when the model's weights are file-backed);
- a model exported from such a graph still references the file by absolute path. onnxruntime refuses
  absolute and escaping locations, so ``link_external`` puts the files beside a temporary model — a hard
  link where the filesystem allows it (onnxruntime then maps the same pages, zero copy), a streamed copy
  of the referenced ranges where it does not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024          # external tensors this small are read into the model at load
SPILL_MIN_BYTES = 1 << 20         # a build's own weights this large go to its spill file
_PAGE = 4096
_SKELETON_MAX_BYTES = 64 << 20    # a model file this large holds its weights itself
_COPY_CHUNK = 64 << 20

# element types a file's bytes can be mapped as directly (little-endian, one numpy dtype each)
_MAPPABLE = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_file_backed(tensor: onnx.TensorProto) -> bool:
    """True for an external tensor whose location is an absolute path (set by ``model_io.load_model``)."""
    return (tensor.data_location == onnx.TensorProto.EXTERNAL
            and os.path.isabs(_entries(tensor).get("location", "")))


def _span(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    e = _entries(tensor)
    path = Path(e["location"])
    offset = int(e.get("offset") or 0)
    length = int(e["length"]) if e.get("length") else path.stat().st_size - offset
    return path, offset, length


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for e in tensor.external_data:
        if e.key == key:
            e.value = value
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value


def keep_in_file(model: onnx.ModelProto, base_dir: Path) -> int:
    """Prepare a model parsed without its external data (locations already validated to lie inside
    ``base_dir``): the main graph's initializers over ``INLINE_BYTES`` get their file's absolute path as
    location; smaller ones, and tensors in subgraphs or attributes, are read in. Returns how many tensors
    stay in their files."""
    kept = 0
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        path = (base_dir / info.location).resolve()
        offset = info.offset or 0
        length = info.length if info.length is not None else path.stat().st_size - offset
        if length > INLINE_BYTES:
            _set_entry(tensor, "location", str(path))
            _set_entry(tensor, "offset", str(offset))
            _set_entry(tensor, "length", str(length))
            kept += 1
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_file_backed(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return kept


class FileValues(LazyValues):
    """The values of a constant stored in an external-data file (see the module docstring)."""

    def __init__(self, tensor: onnx.TensorProto):
        super().__init__(tensor)
        self.path, self.offset, self.length = _span(tensor)

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise OSError(f"{self.path}: {self.tensor.name} ends past the end of the file (changed since load?)")
        return data

    def copy_into(self, out) -> None:
        """Append the bytes to the open binary file ``out`` (at its position), copied by the kernel
        (``os.copy_file_range``: no pass through this process) where it can, else read and written."""
        out.flush()
        start, left = out.tell(), self.length
        try:
            with open(self.path, "rb") as f:
                while left:
                    done = os.copy_file_range(f.fileno(), out.fileno(), left, self.offset + self.length - left,
                                              start + self.length - left)
                    if done <= 0:
                        raise OSError(f"{self.path}: {self.tensor.name} ends past the end of the file")
                    left -= done
        except (OSError, AttributeError):     # no copy_file_range here (another OS, an older kernel, a pipe)
            out.seek(start)
            out.write(self.read_bytes())
            return
        out.seek(start + self.length)

    def load(self) -> np.ndarray:
        dtype = _MAPPABLE.get(self.tensor.data_type)
        shape = tuple(int(d) for d in self.tensor.dims)
        if dtype is not None and self.length == dtype.itemsize * int(np.prod(shape, dtype=np.int64)) and self.length:
            return np.memmap(self.path, dtype=dtype.newbyteorder("<"), mode="c", offset=self.offset, shape=shape)
        plain = onnx.TensorProto()
        plain.name, plain.data_type = self.tensor.name, self.tensor.data_type
        plain.dims.extend(self.tensor.dims)
        plain.raw_data = self.read_bytes()
        return np.array(onnx.numpy_helper.to_array(plain))

    def take_flat(self, indices: np.ndarray) -> np.ndarray:
        """The elements at ``indices`` of the C-order flattened value, reading only the pages they are on."""
        return np.asarray(self.load()).reshape(-1)[indices]

    def __str__(self):
        return f"FileValues (shape={self.shape}, dtype={self.dtype}, {self.path.name}@{self.offset})"


class ConcatValues(LazyValues):
    """The values of a constant that is other constants joined along ``axis`` (a merged projection), joined
    only when read: ``load()`` concatenates the parts' values for the caller alone (a part that is
    file-backed is mapped for that call only), so merging the projections of a file-backed model copies no
    weight until a pass reads the merged one (quantization does, once) or the bundle is written.
    ``tensor`` is the whole TensorProto, made on access (for exporters)."""

    def __init__(self, name: str, parts: list[LazyValues], axis: int):
        shape = list(parts[0].shape)
        shape[axis] = sum(int(p.shape[axis]) for p in parts)
        self.name, self.parts, self.axis = name, list(parts), axis
        self.shape, self.dtype = tuple(shape), parts[0].dtype
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_numpy_dtype(self.dtype)).itemsize

    @property
    def tensor(self) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(self.load(), self.name)

    def load(self) -> np.ndarray:
        return np.concatenate([p.load() for p in self.parts], axis=self.axis)

    def take_flat(self, indices: np.ndarray) -> np.ndarray:
        """``load().reshape(-1)[indices]`` without joining the parts: each index is unravelled, its
        coordinate on ``axis`` names the part, and the part gives its own elements."""
        coords = list(np.unravel_index(indices, self.shape))
        bounds = np.cumsum([0] + [int(p.shape[self.axis]) for p in self.parts])
        which = np.searchsorted(bounds, coords[self.axis], side="right") - 1
        out = np.empty(len(indices), dtype=_numpy_dtype(self.dtype))
        for i, part in enumerate(self.parts):
            sel = which == i
            if not sel.any():
                continue
            local = [c[sel] for c in coords]
            local[self.axis] = local[self.axis] - bounds[i]
            out[sel] = take_flat(part, np.ravel_multi_index(local, tuple(int(d) for d in part.shape)))
        return out

    def __str__(self):
        return f"ConcatValues (shape={self.shape}, dtype={self.dtype}, {len(self.parts)} parts on axis {self.axis})"


def take_flat(values, indices: np.ndarray) -> np.ndarray:
    """Elements ``indices`` of a constant's C-order flattened values (lazy or an array), reading no more of
    a lazy value than those elements."""
    if hasattr(values, "take_flat"):
        return values.take_flat(indices)
    if isinstance(values, LazyValues):
        return np.asarray(values.load()).reshape(-1)[indices]
    return np.asarray(values).reshape(-1)[indices]


def _numpy_dtype(dtype):
    """A LazyValues ``dtype`` (onnx-graphsurgeon gives numpy dtypes, or onnx enums it cannot map) as numpy's."""
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return dtype


def file_backed(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The model's tensors (subgraphs included) that still reference a file by absolute path."""
    return [t for t in external_data_helper._get_all_tensors(model) if is_file_backed(t)]


def link_external(model: onnx.ModelProto, folder: Path) -> list[tuple[onnx.TensorProto, list[tuple[str, str]]]]:
    """Make the model's file-backed tensors loadable from a model saved in ``folder``. The main graph's
    initializers keep referencing their bytes: each source file is hard-linked into ``folder`` (or, where
    linking fails, the referenced ranges are copied there at page offsets) and locations and offsets are
    rewritten to match. Tensors in subgraphs are read in (onnx's checker, which onnxruntime runs on
    subgraphs, refuses hard-linked data). Returns what ``restore_external`` needs to undo all of it."""
    changed: list[tuple[onnx.TensorProto, list[tuple[str, str]]]] = []
    names: dict[Path, str] = {}
    copies: dict[Path, tuple[str, object, list[int]]] = {}
    top = [t for t in model.graph.initializer if is_file_backed(t)]     # kept: their ids stay theirs
    top_ids = {id(t) for t in top}
    for tensor in file_backed(model):
        changed.append((tensor, [(e.key, e.value) for e in tensor.external_data]))
        if id(tensor) not in top_ids:
            data = FileValues(tensor).read_bytes()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
            continue
        path, offset, length = _span(tensor)
        if path not in names and path not in copies:
            name = f"w{len(names) + len(copies)}.data"
            try:
                os.link(path, folder / name)
                names[path] = name
            except OSError:
                copies[path] = (name, open(folder / name, "wb"), [0])
                log.info("cannot link %s into %s; copying the weights it holds", path, folder)
        if path in names:
            _set_entry(tensor, "location", names[path])
            continue
        name, out, end = copies[path]
        start = -(-end[0] // _PAGE) * _PAGE
        out.seek(start)
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise OSError(f"{path}: {tensor.name} ends past the end of the file")
                out.write(chunk)
                left -= len(chunk)
        end[0] = start + length
        _set_entry(tensor, "location", name)
        _set_entry(tensor, "offset", str(start))
    for _, out, _ in copies.values():
        out.close()
    return changed


def restore_external(changed: list[tuple[onnx.TensorProto, list[tuple[str, str]]]]) -> None:
    """Undo ``link_external`` (and onnx's saving of read-in tensors as external data) on the in-memory model."""
    for tensor, entries in changed:
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL


class SpillFile:
    """An append-only file of weights a build created (merged, transposed, quantized), owned by the build:
    ``ir.spill_constants`` moves in-memory constants of at least ``min_bytes`` into it and gives them
    ``FileValues``, so a pass's new weights leave the process once the pass is done. The file is made in a
    temporary folder on first use; ``close()`` removes both (bundles copy what they need from it).
    ``active``: spill at all — builds turn it on for models whose weights are file-backed (``large_external``);
    a model read into memory whole gains nothing from it."""

    def __init__(self, min_bytes: int = SPILL_MIN_BYTES, active: bool = True):
        self.min_bytes = min_bytes
        self.active = active
        self.path: Path | None = None
        self._file = None
        self._end = 0
        self.bytes = 0

    def add(self, name: str, data_type: int, dims, data: bytes) -> onnx.TensorProto:
        if self._file is None:
            import tempfile

            self.path = Path(tempfile.mkdtemp(prefix="lmc-spill-")).resolve() / "spilled.data"
            self._file = open(self.path, "wb")
        start = -(-self._end // _PAGE) * _PAGE
        self._file.seek(start)
        self._file.write(data)
        self._file.flush()
        self._end = start + len(data)
        self.bytes += len(data)
        tensor = onnx.TensorProto()
        tensor.name, tensor.data_type = name, data_type
        tensor.dims.extend(int(d) for d in dims)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", str(self.path)), ("offset", str(start)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)
            self.path.parent.rmdir()
            self._file = None

    def __enter__(self) -> "SpillFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def release_freed() -> None:
    """Collect garbage cycles and hand the C heap's free pages back to the system (glibc ``malloc_trim``):
    an onnxruntime session's kernels allocate their prepacked and fused weights in many heap blocks, which
    stay in the process after the session is gone — a following session would add its weights on top."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to trim
        pass


MADV_DONTNEED = 4      # Linux madvise(2): drop the range's pages; a clean file page is re-read on next use


def drop_mapped_pages(folder: str | os.PathLike, spans: dict[str, list[tuple[int, int]]]) -> int:
    """Drop from the process the pages it maps of ``spans`` — ``{file name: [(offset, length), …]}`` of
    files in ``folder`` (a bundle's weights, which onnxruntime maps private) — whole pages inside a span
    only. Each range is ``madvise``d ``MADV_DONTNEED``: its pages leave the resident set and, if read again,
    are read back from the file, so values cannot change — unless a page was written since it was mapped
    (``Anonymous`` in smaps: a private copy that differs from the file), and such a mapping is left alone.
    Call it once nothing writes the mappings (after a session is created). Returns the bytes advised (0
    where /proc/self/smaps or madvise is missing)."""
    import ctypes

    root = os.path.realpath(folder)
    mappings, current = [], None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/smaps") as smaps:      # streamed: the whole text is megabytes, a peak of its own
            for line in smaps:
                fields = line.split(maxsplit=5)
                if fields and "-" in fields[0] and not fields[0].endswith(":"):          # a mapping's header
                    current = None
                    path = fields[5].rstrip("\n") if len(fields) == 6 else ""
                    if os.path.dirname(path) == root and os.path.basename(path) in spans:
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        current = [start, end, int(fields[2], 16), os.path.basename(path), True]
                        mappings.append(current)
                elif current is not None and fields[0] == "Anonymous:" and int(fields[1]) > 0:
                    current[4] = False
    except (OSError, AttributeError, ValueError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end, file_offset, name, clean in mappings:
        if not clean:
            continue
        for offset, length in spans[name]:
            lo = max(start, start + offset - file_offset)
            hi = min(end, start + offset + length - file_offset)
            lo, hi = -(-lo // page) * page, hi // page * page                   # whole pages inside
            if hi > lo and madvise(lo, hi - lo, MADV_DONTNEED) == 0:
                dropped += hi - lo
    return dropped


def large_external(path: str | os.PathLike) -> bool:
    """True when the model at ``path`` keeps a tensor over ``INLINE_BYTES`` in an external-data file (such a
    model's weights are file-backed once loaded)."""
    try:
        if os.path.getsize(path) > _SKELETON_MAX_BYTES:
            return False      # its weights are in the protobuf itself: no second parse of it
        model = onnx.load(str(path), load_external_data=False)
    except Exception:         # not a model: load_model says so properly
        return False
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            if info.length is None or info.length > INLINE_BYTES:
                return True
    return False


def copy_file_backed(model: onnx.ModelProto) -> None:
    """Read every file-backed tensor of ``model`` into the protobuf (for a model that must stand alone)."""
    for tensor in file_backed(model):
        data = FileValues(tensor).read_bytes()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data


__all__ = ["ConcatValues", "FileValues", "INLINE_BYTES", "SPILL_MIN_BYTES", "SpillFile", "copy_file_backed", "drop_mapped_pages", "large_external", "release_freed", "file_backed", "is_file_backed", "keep_in_file",
           "link_external", "restore_external"]
