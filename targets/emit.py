"""Write a bundle atomically: ``model.onnx`` (+ ``model.weights``), ``plan.json``, ``report.md``.

Weights: when the initializers total more than ``SMALL_MODEL_BYTES``, every initializer of at least
``external_data_threshold`` bytes is streamed to ``model.weights`` at an offset that is a multiple of the
target's alignment (so it can be mmap'd and read in place), and the tensor keeps only its
``location/offset/length`` entries. Tensors are written one at a time: no second copy of all weights.

Atomicity: everything is written into a hidden temporary folder beside ``out_dir`` and renamed into place;
an existing bundle at ``out_dir`` is replaced only after the new one is complete. A folder that exists and
is not an lmc bundle (no ``plan.json``) and is not empty is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Callable

import onnx
from onnx import numpy_helper

from lmc.compiler.ir import STUB_LOCATION

from lmc.compiler.errors import LmcError

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.weights"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.md"
SMALL_MODEL_BYTES = 64 * 1024


@dataclass(frozen=True)
class BundleFiles:
    out_dir: Path
    model: Path
    weights: Path | None
    plan: Path
    report: Path


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _externalize(model: onnx.ModelProto, weights_path: Path, alignment: int, threshold: int,
                 tensor_bytes: Callable[[str], bytes] | None = None) -> bool:
    """Move initializers of ≥ ``threshold`` bytes to ``weights_path`` at aligned offsets. Stub initializers
    (external location ``STUB_LOCATION``) get their bytes from ``tensor_bytes(name)``, one at a time."""
    inits = list(model.graph.initializer)
    stubbed = any(_is_stub(t) for t in inits)
    total = sum(len(t.raw_data) if t.HasField("raw_data") else 0 for t in inits)
    if total <= SMALL_MODEL_BYTES and not stubbed:
        return False
    offset = 0
    wrote = False
    with open(weights_path, "wb") as f:
        for tensor in inits:
            if _is_stub(tensor):
                if tensor_bytes is None:
                    raise ValueError(f"initializer '{tensor.name}' is a stub and no data source was given")
                data = tensor_bytes(tensor.name)
            else:
                data = _raw_bytes(tensor)
                if len(data) < threshold:
                    continue
            pad = (-offset) % alignment
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(data)
            dtype, dims = tensor.data_type, list(tensor.dims)
            name = tensor.name
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
            wrote = True
    if not wrote:
        weights_path.unlink()
    return wrote


def _is_stub(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == STUB_LOCATION for e in tensor.external_data)


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise LmcError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / PLAN_FILE).exists():
            raise LmcError(f"{out_dir}: exists, is not empty and holds no lmc bundle; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def stage_model(model: onnx.ModelProto, out_dir: str | Path, alignment: int,
                external_data_threshold: int, tensor_bytes: Callable[[str], bytes] | None = None) -> Path:
    """Write ``model.onnx`` (+ weights) into a fresh temporary folder beside ``out_dir``; return it.
    ``model`` is consumed: its large tensors are moved to the weights file."""
    out_dir = Path(out_dir)
    try:
        _prepare_out_dir(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.lmc-tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise LmcError(f"{out_dir}: cannot write the bundle there ({exc.strerror or exc})") from exc
    try:
        _externalize(model, tmp / WEIGHTS_FILE, alignment, external_data_threshold, tensor_bytes)
        with open(tmp / MODEL_FILE, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    except OSError as exc:
        discard(tmp)
        raise LmcError(f"{out_dir}: writing the bundle failed ({exc.strerror or exc})") from exc
    except BaseException:
        discard(tmp)
        raise
    return tmp


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def commit_bundle(staged: Path, out_dir: str | Path, files: dict[str, str]) -> BundleFiles:
    """Add the text ``files`` to a staged bundle and rename it into place (replacing an old bundle)."""
    out_dir = Path(out_dir)
    try:
        for name, text in files.items():
            (staged / name).write_text(text)
        os.chmod(staged, 0o755)
        _prepare_out_dir(out_dir)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.lmc-old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(staged, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, out_dir)
    except BaseException:
        discard(staged)
        raise
    weights = out_dir / WEIGHTS_FILE
    return BundleFiles(out_dir, out_dir / MODEL_FILE, weights if weights.exists() else None,
                       out_dir / PLAN_FILE, out_dir / REPORT_FILE)
