"""DS-CNN keyword spotting as a C bundle, float32 and full int8: outputs against onnxruntime, the arena the
plan gives, MACs, flash, and (with scripts/setup-mcu.sh's toolchain) what the board's linker and qemu say.

    python bench/bench_mcu.py [--out bench/_work/mcu] [--samples 8] [--no-board]

For each target (cortex-m55, cortex-m7) and mode (float32; int8 = ``--quantize w8a8`` with a calibration
of 16 seeded random feature maps) the committed fixture ``models/fixtures/mcu/ds_cnn.onnx`` is built with
``lmc build`` (a C bundle: the targets keep weights in flash), compiled with the host cc and run on
``--samples`` seeded random inputs. Columns:
- C vs ORT: the C outputs against onnxruntime on the bundle's model.onnx (node by node) — max relative
  error, and "exact" when every output is bit for bit the same;
- vs float: the bundle's outputs (C) against the original float model: cosine and top-1 agreement;
- arena: plan.json's arena_bytes (= LMC_ARENA_BYTES in model.h, checked); MACs per inference (the emitter's
  count); weights: the bytes of weights.c's arrays (flash);
- board (lmc.targets.cbundle.board: arm-none-eabi-gcc, qemu-system-arm on mps3-an547 / mps2-an500):
  flash and RAM as the linker placed them, the map's .bss.lmc_arena, instructions of one lmc_run under
  ``-icount`` (not cycles), and whether the board's outputs equal the host C's; "—" without the toolchain.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lmc.compiler.build import BuildOptions, build
from lmc.core.errors import LmcError
from lmc.targets.cbundle.host import HostBuild

REPO = Path(__file__).resolve().parents[1]
DS_CNN = REPO / "models" / "fixtures" / "mcu" / "ds_cnn.onnx"
TARGETS = ("cortex-m55", "cortex-m7")
MODES = ("float32", "int8")


@dataclass
class Row:
    target: str
    mode: str
    max_rel: float
    exact: bool
    cosine: float
    top1: float
    arena: int
    macs: int
    weight_bytes: int
    board_flash: int | None = None
    board_ram: int | None = None
    board_arena: int | None = None
    instructions: int | None = None
    board_equal: bool | None = None


def _session(path: Path, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _board(bundle: Path, target: str, inputs: list[np.ndarray], host_outputs: list[np.ndarray]):
    """(flash, RAM, arena, instructions, outputs equal to the host C's) on the target's board, or None."""
    try:
        from lmc.targets.cbundle.board import BoardImage, board_for     # optional: the board toolchain
    except ImportError:
        return None
    try:
        with BoardImage(bundle, board_for(target)) as image:
            runs = [image.run([x]) for x in inputs[:2]]
    except LmcError as exc:
        print(f"  (board skipped for {bundle.name}: {str(exc).splitlines()[0]})")
        return None
    equal = all(run.exit_code == 0 and np.array_equal(run.outputs[0], host) for run, host in zip(runs, host_outputs))
    first = runs[0]
    return first.flash_bytes, first.ram_bytes, first.arena_bytes, first.instructions, equal


def measure(out: Path, samples: int, board: bool) -> list[Row]:
    rng = np.random.default_rng(0)
    calib = out / "calib.npz"
    np.savez(calib, input=rng.standard_normal((16, 1, 1, 49, 10)).astype(np.float32))
    inputs = [np.random.default_rng(100 + i).standard_normal((1, 1, 49, 10)).astype(np.float32)
              for i in range(samples)]
    original = _session(DS_CNN, optimize=True)
    reference = [original.run(None, {"input": x})[0] for x in inputs]
    rows = []
    for target in TARGETS:
        for mode in MODES:
            bundle = out / f"{target}-{mode}"
            options = BuildOptions(target=target, quantize="w8a8" if mode == "int8" else "none",
                                   calib=str(calib) if mode == "int8" else None, verify=False)
            result = build(DS_CNN, options, bundle)
            header = (bundle / "model.h").read_text()
            assert f"#define LMC_ARENA_BYTES {result.plan.arena_bytes}u" in header
            compiled = _session(bundle / "model.onnx", optimize=False)
            with HostBuild(bundle) as host:
                got = [host.run([x])[0] for x in inputs]
            expect = [compiled.run(None, {"input": x})[0] for x in inputs]
            max_rel = max(float(np.abs(g - e).max() / np.abs(e).max()) for g, e in zip(got, expect))
            exact = all(np.array_equal(g, e) for g, e in zip(got, expect))
            flat_g, flat_r = np.concatenate([g.ravel() for g in got]), np.concatenate([r.ravel() for r in reference])
            cosine = float(flat_g @ flat_r / np.linalg.norm(flat_g) / np.linalg.norm(flat_r))
            top1 = float(np.mean([g.argmax() == r.argmax() for g, r in zip(got, reference)]))
            row = Row(target, mode, max_rel, exact, cosine, top1, result.plan.arena_bytes, result.cbundle.macs,
                      result.cbundle.weight_bytes)
            if board:
                figures = _board(bundle, target, inputs, got)
                if figures is not None:
                    row.board_flash, row.board_ram, row.board_arena, row.instructions, row.board_equal = figures
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(rows: list[Row]) -> str:
    head = ("| target | mode | C vs ORT (max rel) | vs float: cosine / top-1 | arena (plan) | MACs | weights (flash) "
            "| board flash | board RAM | board arena | instructions / inference | board = host C |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.target} | {r.mode} | {'exact' if r.exact else f'{r.max_rel:.1e}'} | {r.cosine:.6f} / {r.top1:.0%} "
            f"| {r.arena:,} | {r.macs:,} | {r.weight_bytes:,} | {_fmt(r.board_flash)} | {_fmt(r.board_ram)} "
            f"| {_fmt(r.board_arena)} | {_fmt(r.instructions)} | {_fmt(r.board_equal)} |")
    by = {(r.target, r.mode): r for r in rows}
    ratios = []
    for t in TARGETS:
        f, q = by[(t, "float32")], by[(t, "int8")]
        line = f"{t}: int8 / float32 arena {q.arena / f.arena:.2f}, weights {q.weight_bytes / f.weight_bytes:.2f}"
        if f.instructions and q.instructions:
            line += f", instructions {q.instructions / f.instructions:.2f}"
        if f.board_flash and q.board_flash:
            line += f", board flash {q.board_flash / f.board_flash:.2f}, board RAM {q.board_ram / f.board_ram:.2f}"
        ratios.append(line)
    return "\n".join(lines + [""] + ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "_work" / "mcu"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--no-board", action="store_true", help="Skip the emulated boards.")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(table(measure(out, args.samples, not args.no_board)))


if __name__ == "__main__":
    main()
