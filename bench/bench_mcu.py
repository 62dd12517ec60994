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


def _step_kinds(model_path: Path) -> dict[str, tuple[str, int]]:
    """Node name -> (kind, MACs) of the convolutions and matrix products of a bundle's model.onnx: kind is
    "conv KxK" / "depthwise KxK" (group = channels) / "pointwise 1x1" / "gemm"; other nodes are absent."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    kinds = {}
    for node in model.graph.node:
        out = int(np.prod(shapes.get(node.output[0], [0])))
        if node.op_type in ("Conv", "FusedConv", "QLinearConv"):
            w = dims.get(node.input[3 if node.op_type == "QLinearConv" else 1], [])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            k = "x".join(str(d) for d in w[2:])
            kind = ("pointwise 1x1" if k == "1x1" and group == 1 else f"depthwise {k}" if group > 1 and w[1] == 1
                    else f"conv {k}")
            kinds[node.name] = (kind, out * int(np.prod(w[1:])))
        elif node.op_type in ("Gemm", "QGemm", "MatMul"):
            w = dims.get(node.input[3 if node.op_type == "QGemm" else 1], [])
            n = shapes.get(node.output[0], [1])[-1] or 1
            kinds[node.name] = ("gemm", out * int(np.prod(w)) // n if w else 0)     # out × K
    return kinds


def board_steps_table(out: Path, inputs: list[np.ndarray]) -> str:
    """Where one inference's instructions go on the board: each bundle built by ``measure`` run once with its
    steps counted exactly (``lmc.targets.cbundle.board.profile_bundle``), grouped by kind of step, with the
    MACs they do; and the image's RAM against the target's ``ram_bytes`` and the stack the run used."""
    from lmc.targets.cbundle.board import OUTSIDE_STEPS, profile_bundle      # optional: the board toolchain
    from lmc.targets.target import load_target

    head = ("| target | mode | RAM (of the target's) | stack used | step kind | steps | instructions | share | MACs "
            "| instructions / MAC |")
    lines = [head, "|" + "---|" * 10]
    for target in TARGETS:
        for mode in MODES:
            bundle = out / f"{target}-{mode}"
            try:
                run = profile_bundle(bundle, target, inputs[:1])
            except LmcError as exc:
                return f"(board steps skipped: {str(exc).splitlines()[0]})"
            kinds = _step_kinds(bundle / "model.onnx")
            groups: dict[str, list[int]] = {}
            for label, n in run.steps:
                name = label.split("'")[1] if "'" in label else ""
                kind, macs = kinds.get(name, ("other", 0)) if label != OUTSIDE_STEPS else ("other", 0)
                g = groups.setdefault(kind, [0, 0, 0])
                g[0], g[1], g[2] = g[0] + (label != OUTSIDE_STEPS), g[1] + n, g[2] + macs
            total = sum(g[1] for g in groups.values()) or 1
            ram = load_target(target).memory.ram_bytes
            first = True
            for kind, (count, n, macs) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
                lead = (f"| {target} | {mode} | {run.ram_bytes:,} ({run.ram_bytes / ram:.1%}) | {run.stack_used:,} "
                        if first else "| | | | ")
                per_mac = f"{n / macs:.1f}" if macs else "—"
                lines.append(f"{lead}| {kind} | {count} | {n:,} | {n / total:.0%} | {macs:,} | {per_mac} |")
                first = False
    return "\n".join(lines)


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
    if not args.no_board:
        inputs = [np.random.default_rng(100).standard_normal((1, 1, 49, 10)).astype(np.float32)]
        print()
        print(board_steps_table(out, inputs))


if __name__ == "__main__":
    main()
