"""Long context: dense vs chunked vs sliding-window attention on a decomposed Llama-style export, S = 512…4096.

For each S the model is built with `--attention dense`, `chunked:128` and `sliding:256,sinks=4`; the table
gives the planned arena, the weights file, onnxruntime latency (one thread, best of 3, all variants of one S
in one process, interleaved) relative to dense, and the output error against dense. Then llama-code's
perplexity (64 windows of 256 tokens of code-val.u16) with sliding windows of 64 and 128, with and
without 4 sinks.

    python bench/bench_long.py [--model models/fixtures/long/llama-long-torchscript.onnx] [--lengths 512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODES = ("dense", "chunked:128", "sliding:256,sinks=4")


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def long_table(model: Path, lengths: list[int], work: Path) -> None:
    from lmc.compiler.build import BuildOptions, build

    print("| S | attention | arena | × dense | weights file | latency × dense | max rel err vs dense | cosine |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for s in lengths:
        results = {}
        for mode in MODES:
            out = work / f"{s}-{mode.replace(':', '-').replace(',', '-')}"
            r = build(model, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, s)}, attention=mode,
                                          verify=False, max_ram=1 << 34), out)
            results[mode] = (r, out)
        sessions = {m: _session(out / "model.onnx") for m, (_, out) in results.items()}
        ids = np.random.default_rng(0).integers(0, 256, (1, s))
        times = {m: [] for m in MODES}
        outputs = {}
        for _ in range(3):
            for m, sess in sessions.items():
                start = time.perf_counter()
                outputs[m] = sess.run(None, {sess.get_inputs()[0].name: ids})[0]
                times[m].append(time.perf_counter() - start)
        dense_arena = results["dense"][0].plan.arena_bytes
        for m in MODES:
            r, out = results[m]
            ref, got = outputs["dense"].astype(np.float64), outputs[m].astype(np.float64)
            err = float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-30))
            cos = float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum()))
            weights = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model."))
            print(f"| {s} | {m} | {r.plan.arena_bytes / 2**20:.2f} MiB | {r.plan.arena_bytes / dense_arena:.3f} | "
                  f"{weights / 1e6:.3f} MB | {min(times[m]) / min(times['dense']):.2f} | {err:.2e} | {cos:.6f} |")


def perplexity_table(work: Path, windows: int) -> None:
    from lmc.compiler.build import BuildOptions, build
    from lmc.compiler.verify import verify

    model = SHARED / "models" / "llama-code.onnx"
    tokens = SHARED / "data" / "code-val.u16"
    if not model.is_file():
        print("(llama-code.onnx not present: perplexity table skipped)")
        return
    print(f"\n| llama-code, 1×256 | perplexity ({windows}×256 of code-val) | Δ |")
    print("|---|---:|---:|")
    base = None
    for mode in ("dense", "sliding:128,sinks=4", "sliding:128", "sliding:64,sinks=4", "sliding:64"):
        out = work / f"ppl-{mode.replace(':', '-').replace(',', '-')}"
        build(model, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 256)}, attention=mode,
                                  verify=False), out)
        p = verify(out, model, tokens=tokens, seq_len=256, windows=windows, tolerance=1.0).perplexity
        base = base or p["original"]
        print(f"| {mode} | {p['bundle']:.3f} | {(p['bundle'] / base - 1) * 100:+.2f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "fixtures" / "long" / "llama-long-torchscript.onnx"))
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        long_table(Path(args.model), [int(x) for x in args.lengths.split(",")], Path(tmp))
        perplexity_table(Path(tmp), args.windows)


if __name__ == "__main__":
    main()
