"""Write a bundle atomically: ``model.onnx`` (+ ``model.weights``), ``plan.json``, ``report.md``.

Weights: when the initializers total more than ``SMALL_MODEL_BYTES``, every initializer of at least
``external_data_threshold`` bytes is streamed to ``model.weights`` at an offset that is a multiple of the
target's alignment (so it can be read in place) — and a tensor of at least ``PAGE_ALIGN_MIN_BYTES`` at a
multiple of the page size as well, which onnxruntime needs to mmap it rather than read it onto its heap —
and the tensor keeps only its ``location/offset/length`` entries. Tensors are written one at a time: no
second copy of all weights.

Atomicity: everything is written into a hidden temporary folder beside ``out_dir`` and renamed into place;
an existing bundle at ``out_dir`` is replaced only after the new one is complete.

Ownership: every bundle holds a marker file, ``.lmc-bundle``, listing the files lmc wrote into it. An existing
``out_dir`` is replaced only when it is such a bundle — it holds the marker and every entry in it is a regular
file the marker lists — and then only the listed files are deleted. Any other non-empty folder (a
``plan.json`` alone proves nothing: it may be the user's) is refused with an ``LmcError`` naming it; an
empty folder is fine.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Callable

import onnx

from lmc.core.external_data import SMALL_MODEL_BYTES, externalize  # noqa: F401  (SMALL_MODEL_BYTES: build reads it here)

from lmc.core.errors import LmcError

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.weights"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.md"
MARKER_FILE = ".lmc-bundle"
MARKER_HEADER = "# lmc bundle: files written by lmc (an lmc build replaces this folder only while it holds just these)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleFiles:
    out_dir: Path
    model: Path
    weights: Path | None
    plan: Path
    report: Path



def bundle_files(folder: Path) -> list[str] | None:
    """The files lmc wrote into ``folder`` (its marker included) when ``folder`` is a bundle lmc wrote and
    nothing else was added to it since; None otherwise."""
    marker = folder / MARKER_FILE
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0] != MARKER_HEADER:
        return None
    listed = {line for line in lines[1:] if line} | {MARKER_FILE}
    if any("/" in name or os.sep in name or name in (".", "..") for name in listed):
        return None
    for entry in os.scandir(folder):
        if entry.name not in listed or entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            return None
    return sorted(listed)


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise LmcError(f"{out_dir}: exists and is not a folder; refusing to replace it")
        if any(out_dir.iterdir()) and bundle_files(out_dir) is None:
            entries = sorted(os.listdir(out_dir))
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            why = ("it holds files lmc did not write" if (out_dir / MARKER_FILE).is_file()
                   else f"it has no {MARKER_FILE} marker")
            raise LmcError(f"{out_dir}: exists, is not empty ({shown}) and is not a bundle lmc wrote ({why}); "
                           "refusing to overwrite it — pass an empty or new folder to -o")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def _write_marker(staged: Path) -> None:
    names = sorted(name for name in os.listdir(staged) if name != MARKER_FILE)
    (staged / MARKER_FILE).write_text("\n".join([MARKER_HEADER, *names, MARKER_FILE]) + "\n", encoding="utf-8")


def _remove_old_bundle(old: Path) -> None:
    """Delete the files an old bundle's marker lists, then the folder; anything else found there by now
    is left in place (with the folder) rather than deleted."""
    listed = bundle_files(old)
    if listed is None:
        log.warning("%s: the replaced bundle changed while it was being replaced; left in place", old)
        return
    for name in listed:
        try:
            (old / name).unlink()
        except FileNotFoundError:
            pass
    try:
        old.rmdir()
    except OSError:
        log.warning("%s: the replaced bundle holds files lmc did not write; left in place", old)


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
        externalize(model, tmp / WEIGHTS_FILE, alignment, external_data_threshold, tensor_bytes)
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
        _write_marker(staged)
        os.chmod(staged, 0o755)
        _prepare_out_dir(out_dir)
        if out_dir.exists():
            if not any(out_dir.iterdir()):
                os.rmdir(out_dir)              # an empty folder: nothing to keep
                os.rename(staged, out_dir)
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.lmc-old-", dir=out_dir.parent))
                old.rmdir()
                os.rename(out_dir, old)
                os.rename(staged, out_dir)
                _remove_old_bundle(old)
        else:
            os.rename(staged, out_dir)
    except BaseException:
        discard(staged)
        raise
    weights = out_dir / WEIGHTS_FILE
    return BundleFiles(out_dir, out_dir / MODEL_FILE, weights if weights.exists() else None,
                       out_dir / PLAN_FILE, out_dir / REPORT_FILE)
