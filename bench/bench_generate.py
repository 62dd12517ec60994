"""Generation: lmc's generation bundles against the original past/present export driven the plain way.

For each variant, in a fresh process with one onnxruntime thread:
- peak RSS above the process after its imports during one 480-token generation (32-token prompt, then
  448 greedy steps), and its growth from the first decode step to the last;
- decode tokens/s over 8 prompts × 200 greedy tokens (prompts: 32 tokens at offsets 1000·i of the
  validation stream), and whether the greedy tokens equal the original loop's;
- streaming perplexity (token by token) on the first 32 windows of 256 validation tokens.
The naive loop feeds each ``present`` back as ``past`` and grows ``attention_mask`` by one per step.

    python bench/bench_generate.py [--model PAST.onnx] [--context 512] [--calib-samples 32] [--out bench/_work/gen]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "llama-code-past.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"
PROMPTS, PROMPT_LEN, NEW_TOKENS, TRACE_TOKENS, WINDOWS = 8, 32, 200, 480, 32


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(kind: str, path: str, windows: int) -> dict:
    """Runs in its own process: RSS trace, throughput, greedy tokens, streaming perplexity."""
    from lmc.compiler.generate import PastDecoder, StateDecoder
    from lmc.compiler.perplexity import load_tokens, streaming_perplexity

    tokens = np.fromfile(str(VAL), dtype="<u2").astype(np.int64)
    base = _rss()
    decoder = PastDecoder(path, threads=1) if kind == "naive" else StateDecoder(Path(path) / "model.onnx", threads=1)
    loaded = _rss()
    trace = []
    decoder.reset()
    logits = decoder.forward(tokens[None, :PROMPT_LEN])
    for _ in range(TRACE_TOKENS - PROMPT_LEN):
        logits = decoder.forward(np.array([[int(np.argmax(logits[0, -1]))]]))
        trace.append(_rss())
    peak = _hwm()
    out_tokens, decode_s, steps = [], 0.0, 0
    for i in range(PROMPTS):
        decoder.reset()
        logits = decoder.forward(tokens[None, 1000 * i: 1000 * i + PROMPT_LEN])
        gen = [int(np.argmax(logits[0, -1]))]
        start = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            logits = decoder.forward(np.array([[gen[-1]]]))
            gen.append(int(np.argmax(logits[0, -1])))
        decode_s += time.perf_counter() - start
        steps += NEW_TOKENS - 1
        out_tokens.append(gen)
    ppl = None
    if windows:
        win = load_tokens(VAL, 256, windows)
        ppl = streaming_perplexity(decoder, win, chunk=256 if kind == "naive" else 1).perplexity
    return {"base_rss": base, "loaded_rss": loaded, "peak_above_imports": peak - base,
            "first_step_rss": trace[0], "last_step_rss": trace[-1], "growth": trace[-1] - trace[0],
            "tokens_per_s": steps / decode_s, "tokens": out_tokens, "perplexity": ppl}


def run_worker(kind: str, path: Path, windows: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--windows", str(windows)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def files_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.name in ("model.onnx", "model.weights"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=WINDOWS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "_work" / "gen"))
    ap.add_argument("--variants", default="exact,int8,int4")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.windows)))
        return
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib.npz"
    ids = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    np.savez(calib, input_ids=ids)
    rows = [("optimum export, naive present→past loop", "naive", Path(args.model), None)]
    for variant in args.variants.split(","):
        mode = QuantizeMode.NONE if variant == "exact" else QuantizeMode(variant)
        bundle = out / variant
        if bundle.exists():
            import shutil
            shutil.rmtree(bundle)
        start = time.perf_counter()
        result = build(args.model, BuildOptions(context=args.context, quantize=mode,
                                                calib=str(calib) if mode is not QuantizeMode.NONE else None), bundle)
        print(f"built {variant} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        rows.append((f"lmc {variant}", "bundle", bundle, result.plan))
    results = []
    for label, kind, path, plan in rows:
        r = run_worker(kind, path, args.windows)
        results.append((label, path, plan, r))
        print(f"measured {label}", file=sys.stderr)
    ref = results[0][3]
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    print(f"| | files | ppl (streaming, {args.windows}×256) | greedy = fp32 | peak RSS above imports, "
          f"{TRACE_TOKENS} tokens | growth | predicted (plan) | decode tok/s vs naive loop |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for label, path, plan, r in results:
        same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "—"
        if r is not ref and r["perplexity"]:
            ppl += f" ({(r['perplexity'] / ref['perplexity'] - 1) * 100:+.1f}%)"
        predicted = "—"
        if plan is not None:
            pred = json.loads((path / "plan.json").read_text()).get("runtime", {}).get("predicted_peak_bytes")
            if pred:
                predicted = f"{mb(pred)} ({(r['peak_above_imports'] / pred - 1) * 100:+.0f}%)"
        print(f"| {label} | {mb(files_bytes(path))} | {ppl} | {same}/{PROMPTS} | {mb(r['peak_above_imports'])} | "
              f"{mb(r['growth'])} | {predicted} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}× "
              f"({r['tokens_per_s']:.0f}/s) |")


if __name__ == "__main__":
    main()
