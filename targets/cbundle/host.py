"""Compile a C bundle with the host C compiler and run it through the runner's file protocol.

``find_cc()`` is ``$CC`` or the first of cc/gcc/clang on PATH (None when there is none).
``HostBuild.compile(bundle)`` builds every ``.c`` of the bundle with the contract's flags
(``-std=c99 -O2 -Wall -Wextra -Werror -fdata-sections -ffunction-sections``, ``-lm``) into a temporary
folder; ``run(inputs)`` writes ``lmc_in_<k>.bin`` (raw little-endian bytes of each array, in the graph's
input order) into a fresh folder, runs ``lmc_runner`` there and reads ``lmc_out_<k>.bin`` back as the
graph's output dtypes and shapes (read from the bundle's ``model.onnx``). A compile error or a runner exit
status other than 0 is a ``HostRunError`` carrying the compiler's or runner's message.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from lmc.core.errors import LmcError

log = logging.getLogger(__name__)

CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fdata-sections", "-ffunction-sections")
RUNNER = "lmc_runner"
COMPILE_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300


class HostRunError(LmcError):
    """The C bundle did not compile on the host, or its runner failed."""


def find_cc() -> str | None:
    """The host C compiler: ``$CC`` if set (and found), else cc, gcc or clang on PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass(frozen=True)
class IoSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def bundle_io(bundle: Path) -> tuple[list[IoSpec], list[IoSpec]]:
    """The graph inputs and outputs of a C bundle, as its ``model.onnx`` declares them."""
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)

    def spec(v: onnx.ValueInfoProto) -> IoSpec:
        t = v.type.tensor_type
        return IoSpec(v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
                      tuple(int(d.dim_value) for d in t.shape.dim))
    inits = {i.name for i in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


class HostBuild:
    """A C bundle compiled on the host; ``close()`` (or the context manager) removes the build folder."""

    def __init__(self, bundle: str | Path, cc: str | None = None, extra_flags: Sequence[str] = ()):
        self.bundle = Path(bundle)
        if not (self.bundle / "model.h").is_file():
            raise LmcError(f"{bundle}: not a C bundle (no model.h)")
        self.cc = cc or find_cc()
        if self.cc is None:
            raise LmcError("no host C compiler (cc, gcc or clang on PATH, or $CC) to build the C bundle")
        self.inputs, self.outputs = bundle_io(self.bundle)
        self.work = Path(tempfile.mkdtemp(prefix="lmc-cbundle-"))
        self.exe = self.work / RUNNER
        sources = sorted(str(p) for p in self.bundle.glob("*.c"))
        cmd = [self.cc, *CFLAGS, *extra_flags, "-I", str(self.bundle), *sources, "-o", str(self.exe), "-lm"]
        log.debug("compiling: %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            self.close()
            raise HostRunError(f"{bundle}: compiling the C bundle took over {COMPILE_TIMEOUT_S}s") from exc
        if done.returncode != 0:
            self.close()
            first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
            raise HostRunError(f"{bundle}: the C bundle does not compile with {Path(self.cc).name}: {first}")

    def __enter__(self) -> "HostBuild":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def run(self, inputs: Sequence[np.ndarray] | dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the compiled runner on ``inputs`` (in graph order, or by name); the outputs in graph order."""
        if isinstance(inputs, dict):
            inputs = [inputs[s.name] for s in self.inputs]
        if len(inputs) != len(self.inputs):
            raise LmcError(f"the C bundle takes {len(self.inputs)} inputs, got {len(inputs)}")
        with tempfile.TemporaryDirectory(prefix="run-", dir=self.work) as tmp:
            run_dir = Path(tmp)
            for k, (spec, value) in enumerate(zip(self.inputs, inputs)):
                arr = np.ascontiguousarray(np.asarray(value, dtype=spec.dtype).reshape(spec.shape))
                (run_dir / f"lmc_in_{k}.bin").write_bytes(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
            try:
                done = subprocess.run([str(self.exe)], cwd=run_dir, capture_output=True, text=True,
                                      timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                raise HostRunError(f"{self.bundle}: the C runner took over {RUN_TIMEOUT_S}s") from exc
            if done.returncode != 0:
                raise HostRunError(f"{self.bundle}: the C runner exited with status {done.returncode}"
                                   + (f": {done.stderr.strip()[:200]}" if done.stderr.strip() else ""))
            outs = []
            for k, spec in enumerate(self.outputs):
                raw = (run_dir / f"lmc_out_{k}.bin").read_bytes()
                outs.append(np.frombuffer(raw, dtype=spec.dtype.newbyteorder("<")).astype(spec.dtype).reshape(spec.shape))
            return outs
