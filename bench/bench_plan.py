"""Arena planning side by side: lmc's planner vs a TFLite-Micro-style greedy planner vs no reuse.

    python bench/bench_plan.py

For each model (llama-code at 1×256 when ../shared is present, and the lmc.models builders), the exact
pipeline runs once; then the same buffers (sizes, lifetimes, 64-byte alignment) are placed by:
- no reuse: every tensor its own bytes (sum of sizes);
- TFLite-Micro greedy: buffers by decreasing size, each at the lowest offset that does not collide
  (first fit, TFLM's GreedyMemoryPlanner);
- lmc: best fit by size plus bounded search (the default plan);
- lmc --in-place: elementwise/view outputs over their dying inputs.
The lower bound (largest live set) is the floor for the first three.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from lmc.compiler.build import BuildOptions, build
from lmc.models import build_cnn, build_gpt2, build_llama

LLAMA_CODE = Path(__file__).resolve().parents[2] / "shared" / "models" / "llama-code.onnx"


def tflm_greedy(tensors, alignment: int = 64) -> int:
    """TFLite-Micro's GreedyMemoryPlanner: largest first, lowest non-colliding offset (first fit)."""
    order = sorted(tensors, key=lambda t: -t["size"])
    placed = []
    arena = 0
    for t in order:
        busy = sorted((p["offset"], p["offset"] + p["size"]) for p in placed
                      if p["first"] <= t["last"] and t["first"] <= p["last"])
        offset = 0
        for lo, hi in busy:
            if offset + t["size"] <= lo:
                break
            offset = max(offset, (hi + alignment - 1) // alignment * alignment)
        placed.append({**t, "offset": offset})
        arena = max(arena, offset + t["size"])
    return arena


def main() -> None:
    import json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = []
        if LLAMA_CODE.is_file():
            models.append(("llama-code 1×256", LLAMA_CODE, {"input_ids": (1, 256)}, ()))
            models.append(("llama-code 1×256, unfused", LLAMA_CODE, {"input_ids": (1, 256)},
                           ("fuse", "fuse-late", "fuse-mask")))
        for name, m, shapes in (("tiny-llama 1×64", build_llama(), {"input_ids": (1, 64)}),
                                ("tiny-gpt2 1×64", build_gpt2(), {"input_ids": (1, 64)}),
                                ("small-cnn 1×3×32×32", build_cnn(), {"image": (1, 3, 32, 32)})):
            path = tmp / (name.split()[0] + ".onnx")
            onnx.save(m, str(path))
            models.append((name, path, shapes, ()))
            models.append((name + ", unfused", path, shapes, ("fuse", "fuse-late", "fuse-mask")))
        for name, path, shapes, off in models:
            plain = build(path, BuildOptions(input_shapes=shapes, verify=False, disabled_passes=off), tmp / "a")
            inplace = build(path, BuildOptions(input_shapes=shapes, verify=False, inplace=True, disabled_passes=off),
                            tmp / "b")
            tensors = json.loads((tmp / "a" / "plan.json").read_text())["tensors"]
            rows.append((name, len(tensors), plain.plan.lower_bound_bytes, sum(t["size"] for t in tensors),
                         tflm_greedy(tensors), plain.plan.arena_bytes, inplace.plan.arena_bytes))
    print("| model | buffers | lower bound | no reuse | TFLM greedy | lmc | lmc --in-place |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, lb, naive, tflm, ours, inpl in rows:
        print(f"| {name} | {n} | {lb / 2**20:.3f} MiB | {naive / lb:.2f}× | {tflm / lb:.3f}× | {ours / lb:.3f}× | "
              f"{inpl / lb:.3f}× |")


if __name__ == "__main__":
    main()
