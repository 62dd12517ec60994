"""Folding, dedup and sharing side by side: lmc vs onnxsim vs onnxslim on one model, one process run.

    python bench/bench_simplify.py [MODEL] [--shape input_ids=1x256]

For each tool, in-process: wall time (load + simplify + save; lmc's includes its onnxruntime verification), nodes, bytes on disk, planned arena (lmc's planner on
the tool's output, shapes bound, no further rewrites), relative error of the outputs vs the original
under onnxruntime. Then each command-line tool as users run it (defaults). Times are ratios to lmc's. Needs the bench extra (pip install -e .[bench]).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from lmc.core import ir
from lmc.core import shapes as shape_ops
from lmc.compiler.backend import plan_memory
from lmc.compiler.build import BuildOptions, build
from lmc.core.pass_manager import FixedPoint, PassContext, PassManager
from lmc.compiler.verify import compare_models, random_inputs
from lmc.passes.cleanup import Cleanup
from lmc.passes.fold_constants import FoldConstants
from lmc.targets.target import load_target

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "llama-code.onnx"
REPEATS = 3
FUSION = ("upgrade-opset", "fuse", "fuse-late")
OPTIONAL = ("simplify-repeat", "fold-matmul-scale", "dedup-weights", "share-transposed") + FUSION


def disk_bytes(path: Path) -> int:
    folder = path.parent if path.name == "model.onnx" else None
    if folder is not None:
        return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".weights"))
    return path.stat().st_size


def arena_of(path: Path, shapes: dict) -> int:
    target = load_target("cortex-a55")
    graph = ir.to_graph(onnx.load(str(path)))
    shape_ops.bind_input_shapes(graph, shapes)
    shape_ops.infer_shapes(graph)
    graph, _ = PassManager([FixedPoint("fold", [FoldConstants(), Cleanup()])], PassContext(target=target)).run(graph)
    return plan_memory(graph, target).arena_bytes


def run_lmc(model: Path, out: Path, shapes: dict, disabled=(), verify: bool = True) -> Path:
    build(model, BuildOptions(target="cortex-a55", input_shapes=shapes, disabled_passes=disabled, verify=verify), out)
    return out / "model.onnx"


def run_onnxsim(model: Path, out: Path, shapes: dict) -> Path:
    import onnxsim

    simplified, ok = onnxsim.simplify(str(model), overwrite_input_shapes={k: list(v) for k, v in shapes.items()})
    path = out / "onnxsim.onnx"
    onnx.save(simplified, str(path))
    return path


def run_onnxslim(model: Path, out: Path, shapes: dict) -> Path:
    import onnxslim

    shape_args = [f"{k}:{','.join(str(d) for d in v)}" for k, v in shapes.items()]
    slimmed = onnxslim.slim(str(model), input_shapes=shape_args)
    path = out / "onnxslim.onnx"
    onnx.save(slimmed, str(path))
    return path


def cli_seconds(argv: list[str]) -> float | None:
    """Wall time of one command as a user runs it (process start, imports, work, output)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start if proc.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--shape", default="input_ids=1x256")
    args = parser.parse_args()
    name, dims = args.shape.split("=")
    shapes = {name: tuple(int(d) for d in dims.split("x"))}
    model = Path(args.model)
    original = onnx.load(str(model), load_external_data=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        feeds = random_inputs(model, shapes, samples=1, seed=0)
        tools = [
            ("lmc", lambda: run_lmc(model, tmp / "lmc", shapes)),
            ("lmc, no verification (like onnxsim)", lambda: run_lmc(model, tmp / "lmc-nv", shapes, verify=False)),
            ("lmc without fusion (fold, simplify, dedup, share)", lambda: run_lmc(model, tmp / "lmc-nf", shapes, FUSION)),
            ("lmc fold+cleanup only", lambda: run_lmc(model, tmp / "lmc-fold", shapes, OPTIONAL)),
            ("onnxsim", lambda: run_onnxsim(model, tmp, shapes)),
            ("onnxslim", lambda: run_onnxslim(model, tmp, shapes)),
        ]
        for tool, fn in tools:
            try:
                seconds = float("inf")
                for _ in range(REPEATS):   # best of REPEATS: the first run of each pays one-off warm-ups
                    start = time.perf_counter()
                    path = fn()
                    seconds = min(seconds, time.perf_counter() - start)
            except Exception as exc:  # an anchor missing or failing is a row, not a crash
                rows.append((tool, None, None, None, None, f"failed: {type(exc).__name__}: {exc}"[:80]))
                continue
            out_model = onnx.load(str(path), load_external_data=False)
            err = compare_models(model, path, feeds).max_rel
            rows.append((tool, seconds, len(out_model.graph.node), disk_bytes(path), arena_of(path, shapes),
                         f"{err:.2e}"))
        shape_arg = ",".join(str(d) for d in shapes[name])
        commands = [
            ("lmc build", [sys.executable, "-m", "lmc.compiler.cli", "build", str(model), "-o", str(tmp / "cli-lmc"),
                           "--input-shape", args.shape]),
            ("lmc build --no-verify", [sys.executable, "-m", "lmc.compiler.cli", "build", str(model), "-o",
                                       str(tmp / "cli-lmc2"), "--input-shape", args.shape, "--no-verify"]),
            ("onnxsim (CLI defaults)", [shutil.which("onnxsim") or "onnxsim", str(model), str(tmp / "cli-sim.onnx"),
                                        "--overwrite-input-shape", f"{name}:{shape_arg}"]),
            ("onnxslim (CLI defaults)", [shutil.which("onnxslim") or "onnxslim", str(model), str(tmp / "cli-slim.onnx"),
                                         "--input-shapes", f"{name}:{shape_arg}"]),
        ]
        cli_rows = []
        for label, argv in commands:
            runs = [cli_seconds(argv) for _ in range(REPEATS)]
            ok = [r for r in runs if r is not None]
            cli_rows.append((label, min(ok) if ok else None))
    base = rows[0][1]
    print(f"model: {model.name} ({len(original.graph.node)} nodes, {model.stat().st_size / 1e6:.1f} MB), "
          f"shape {args.shape}\n")
    print("| tool | time (× lmc) | nodes | bytes on disk | planned arena | max rel err |")
    print("|---|---:|---:|---:|---:|---:|")
    for tool, seconds, nodes, size, arena, err in rows:
        if seconds is None:
            print(f"| {tool} | — | — | — | — | {err} |")
            continue
        print(f"| {tool} | {seconds / base:.2f} | {nodes} | {size / 1e6:.2f} MB | {arena / 2**20:.2f} MiB | {err} |")
    cli_base = cli_rows[0][1]
    print("\nCommand-line wall time (best of %d, process start to exit):\n" % REPEATS)
    print("| command | time (× lmc build) |")
    print("|---|---:|")
    for label, seconds in cli_rows:
        print(f"| {label} | {'failed' if seconds is None else f'{seconds / cli_base:.2f}'} |")


if __name__ == "__main__":
    main()
