"""onnxruntime latency of a bundle vs its original, single thread, interleaved repeated runs.

    python bench/latency.py ORIGINAL.onnx BUNDLE_DIR [--shape input_ids=1x256] [--runs 30]

Both sessions use ORT_ENABLE_ALL (what a user gets by default), one intra-op thread. Runs alternate
between the two models so machine noise hits both alike; the table gives medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import onnxruntime as ort

from lmc.compiler.verify import random_inputs


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(original: Path, bundle: Path, shapes: dict, runs: int = 30) -> tuple[float, float]:
    """(median seconds of original, median seconds of bundle)."""
    model = bundle / "model.onnx" if bundle.is_dir() else bundle
    feed = random_inputs(model, shapes, samples=1, seed=0)[0]
    a, b = session(original), session(model)
    for s in (a, b):
        for _ in range(3):
            s.run(None, feed)
    ta, tb = [], []
    for _ in range(runs):
        for s, acc in ((a, ta), (b, tb)):
            start = time.perf_counter()
            s.run(None, feed)
            acc.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def parse_shape(text: str) -> dict:
    """``name=DxD[,name=DxD…]`` → {name: dims}."""
    shapes = {}
    for part in text.split(","):
        name, dims = part.split("=")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("bundle")
    parser.add_argument("--shape", default="input_ids=1x256")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    orig, bund = measure(Path(args.original), Path(args.bundle), parse_shape(args.shape), args.runs)
    print(f"| model | original (ms) | bundle (ms) | bundle / original |\n|---|---:|---:|---:|\n"
          f"| {Path(args.original).name} | {orig * 1e3:.2f} | {bund * 1e3:.2f} | {bund / orig:.3f} |")


if __name__ == "__main__":
    main()
