"""Generation: lmc's generation bundles against the original past/present export driven the plain way.

For each variant, in a fresh process with one onnxruntime thread:
- peak RSS above the process after its imports during one 480-token generation (32-token prompt, then
  448 greedy steps), and its growth from the first decode step to the last;
- decode tokens/s over 8 prompts × 200 greedy tokens (prompts: 32 tokens at offsets 1000·i of the
  validation stream), measured for all variants in one process, interleaved prompt by prompt, and
  whether the greedy tokens equal the original loop's;
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

sys.path.insert(0, str(Path(__file__).parent))
from measures import status  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "llama-code-past.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"
PROMPTS, PROMPT_LEN, NEW_TOKENS, TRACE_TOKENS, WINDOWS = 8, 32, 200, 480, 32


def worker(kind: str, path: str, windows: int, trace_tokens: int = TRACE_TOKENS) -> dict:
    """Runs in its own process: RSS trace, throughput, greedy tokens, streaming perplexity."""
    from lmc.compiler.drivers import PastDecoder, StateDecoder
    from lmc.core.perplexity import load_tokens, streaming_perplexity

    tokens = np.fromfile(str(VAL), dtype="<u2").astype(np.int64)
    base = status("VmRSS:")
    decoder = PastDecoder(path, threads=1) if kind == "naive" else StateDecoder(Path(path) / "model.onnx", threads=1)
    loaded = status("VmRSS:")
    trace = []
    decoder.reset()
    logits = decoder.forward(tokens[None, :PROMPT_LEN])
    heap = []
    for _ in range(trace_tokens - PROMPT_LEN):
        logits = decoder.forward(np.array([[int(np.argmax(logits[0, -1]))]]))
        trace.append(status("VmRSS:"))
        heap.append(status("RssAnon:"))
    peak = status("VmHWM:")
    ppl = None
    if windows:
        win = load_tokens(VAL, 256, windows)
        ppl = streaming_perplexity(decoder, win, chunk=256 if kind == "naive" else 1).perplexity
    return {"base_rss": base, "loaded_rss": loaded, "peak_above_imports": peak - base, "trace_tokens": trace_tokens,
            "rss_max_over_trace": max(trace) - base,
            "first_step_rss": trace[0], "last_step_rss": trace[-1], "growth": trace[-1] - trace[0],
            "heap_growth": heap[-1] - heap[0],
            "perplexity": ppl}


def throughput(rows) -> dict[str, tuple[float, list[list[int]]]]:
    """Decode tokens/s of every variant in this one process, interleaved prompt by prompt (so a busy
    moment of the machine weighs on all alike), and their greedy tokens."""
    from lmc.compiler.drivers import PastDecoder, StateDecoder

    tokens = np.fromfile(str(VAL), dtype="<u2").astype(np.int64)
    decoders = {label: (PastDecoder(path, threads=1) if kind == "naive" else
                        StateDecoder(Path(path) / "model.onnx", threads=1)) for label, kind, path, *_ in rows}
    seconds = {label: 0.0 for label in decoders}
    generated = {label: [] for label in decoders}
    for i in range(PROMPTS):
        for label, decoder in decoders.items():
            decoder.reset()
            logits = decoder.forward(tokens[None, 1000 * i: 1000 * i + PROMPT_LEN])
            gen = [int(np.argmax(logits[0, -1]))]
            start = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                logits = decoder.forward(np.array([[gen[-1]]]))
                gen.append(int(np.argmax(logits[0, -1])))
            seconds[label] += time.perf_counter() - start
            generated[label].append(gen)
    return {label: (PROMPTS * (NEW_TOKENS - 1) / seconds[label], generated[label]) for label in decoders}


def run_worker(kind: str, path: Path, windows: int, trace_tokens: int = TRACE_TOKENS) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--windows", str(windows),
           "--trace-tokens", str(trace_tokens)]
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
    ap.add_argument("--sliding", default="128,4", help="W,S for a sliding-window bundle row ('' to skip)")
    ap.add_argument("--sliding-tokens", type=int, default=2000)
    ap.add_argument("--trace-tokens", type=int, default=TRACE_TOKENS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.windows, args.trace_tokens)))
        return
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib.npz"
    ids = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    np.savez(calib, input_ids=ids)
    rows = [("optimum export, naive present→past loop", "naive", Path(args.model), None, TRACE_TOKENS)]
    builds = [(v, dict(context=args.context, quantize=QuantizeMode.NONE if v == "exact" else QuantizeMode(v)))
              for v in args.variants.split(",") if v]
    if args.sliding:
        w, sinks = (int(x) for x in args.sliding.split(","))
        builds.append((f"sliding:{w},sinks={sinks}", dict(context=args.sliding_tokens + 48, quantize=QuantizeMode.NONE,
                                                          attention=f"sliding:{w},sinks={sinks}", prefill_chunk=1)))
    for variant, kwargs in builds:
        bundle = out / variant.replace(":", "-").replace(",", "-")
        if bundle.exists():
            import shutil
            shutil.rmtree(bundle)
        start = time.perf_counter()
        quantized = kwargs["quantize"] is not QuantizeMode.NONE
        result = build(args.model, BuildOptions(calib=str(calib) if quantized else None, **kwargs), bundle)
        print(f"built {variant} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        trace = args.sliding_tokens if variant.startswith("sliding") else TRACE_TOKENS
        rows.append((f"lmc {variant}", "bundle", bundle, result.plan, trace))
    results = []
    speed = throughput(rows)
    for label, kind, path, plan, trace in rows:
        r = run_worker(kind, path, args.windows, trace)
        r["tokens_per_s"], r["tokens"] = speed[label]
        results.append((label, path, plan, r))
        print(f"measured {label}", file=sys.stderr)
    ref = results[0][3]
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    print(f"| | files | ppl (streaming, {args.windows}×256) | greedy = fp32 | peak RSS above imports, "
          f"{TRACE_TOKENS} tokens | growth (heap; mapped weights) | predicted (plan) | decode tok/s vs naive loop |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for label, path, plan, r in results:
        label = label if r["trace_tokens"] == TRACE_TOKENS else f"{label} ({r['trace_tokens']} tokens)"
        same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "—"
        if r is not ref and r["perplexity"]:
            ppl += f" ({(r['perplexity'] / ref['perplexity'] - 1) * 100:+.1f}%)"
        predicted = "—"
        if plan is not None:
            runtime = json.loads((path / "plan.json").read_text()).get("runtime", {})
            # the plan predicts above an empty session; this table measures above the imports
            pred = runtime.get("predicted_peak_bytes", 0) + runtime.get("session_bytes", 0)
            if pred:
                predicted = f"{mb(pred)} ({(r['peak_above_imports'] / pred - 1) * 100:+.0f}%)"
        print(f"| {label} | {mb(files_bytes(path))} | {ppl} | {same}/{PROMPTS} | {mb(r['peak_above_imports'])} | "
              f"{mb(r['heap_growth'])}; {mb(r['growth'] - r['heap_growth'])} | {predicted} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}× "
              f"({r['tokens_per_s']:.0f}/s) |")


if __name__ == "__main__":
    main()
