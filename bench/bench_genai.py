"""onnxruntime-genai driving lmc's generation bundles, next to lmc's own driver (`lmc generate`'s StateDecoder).

For each bundle (exact, and int4 calibrated on code-calib.u16), each driver in a fresh process with one
onnxruntime thread: 8 prompts × 200 greedy tokens (prompts: 32 tokens at offsets 1000·i of code-val.u16, as
bench_generate.py), the decode rate (199 decode steps per prompt after its prefill, timed together), its CPU
time per decode step (the process's, all threads: steadier than the rate on a shared host) and the process's
peak RSS (VmHWM, and above the process after its imports). genai runs its own greedy search
(``do_sample=False``) through the bundle's ``genai_config.json``, its end-of-sequence token set to one that
lmc's 8 × 200 tokens do not hold, so both decode every token; the table says whether the tokens are equal.

    python bench/bench_genai.py [--model PAST.onnx] [--context 512] [--calib-samples 32] [--repeats 2]
                                [--out bench/_work/genai] [--rebuild]
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
TOKENIZER = SHARED / "data" / "code-tokenizer.json"
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 32, 200


def prompts() -> list[list[int]]:
    tokens = np.fromfile(str(VAL), dtype="<u2").astype(np.int64)
    return [[int(t) for t in tokens[1000 * i: 1000 * i + PROMPT_LEN]] for i in range(PROMPTS)]


def lmc_worker(bundle: Path) -> dict:
    """lmc's driver (what `lmc generate` runs): one StateDecoder, each prompt prefilled, then greedy steps."""
    from lmc.compiler.drivers import StateDecoder, continue_greedy

    base = status("VmRSS:")
    decoder = StateDecoder(bundle / "model.onnx", threads=1)
    seconds, cpu, out = 0.0, 0.0, []
    for prompt in prompts():
        decoder.reset()
        logits = decoder.forward(np.array([prompt], dtype=np.int64))
        start, cpu_start = time.perf_counter(), time.process_time()
        out.append(continue_greedy(decoder, logits, NEW_TOKENS))
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
    return {"tokens": out, "decode_seconds": seconds, "decode_cpu_seconds": cpu, "base_rss": base,
            "peak_rss": status("VmHWM:")}


def genai_worker(bundle: Path, eos: int, new_tokens: int = NEW_TOKENS) -> dict:
    """onnxruntime-genai on a folder with a genai_config.json (an lmc bundle, or genai's builder's output): one
    Model, a Generator per prompt, greedy search of ``new_tokens`` tokens."""
    import onnxruntime_genai as og

    base = status("VmRSS:")
    config = og.Config(str(bundle))
    config.overlay(json.dumps({"model": {"eos_token_id": eos, "decoder": {"session_options": {
        "intra_op_num_threads": 1, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    seconds, cpu, out = 0.0, 0.0, []
    for prompt in prompts():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=PROMPT_LEN + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))     # the prefill runs here
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):           # the first picks from the prefill's logits: new − 1 decode runs
            generator.generate_next_token()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        out.append([int(t) for t in generator.get_sequence(0)][PROMPT_LEN:])
        del generator
    return {"tokens": out, "decode_seconds": seconds, "decode_cpu_seconds": cpu, "base_rss": base,
            "peak_rss": status("VmHWM:")}


def run_worker(kind: str, bundle: Path, eos: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", kind, str(bundle), "--eos", str(eos)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best(kind: str, bundle: Path, repeats: int, eos: int = 0) -> dict:
    """The fastest of ``repeats`` fresh-process runs (the host is shared: load slows a run, never speeds it)."""
    runs = [run_worker(kind, bundle, eos) for _ in range(repeats)]
    return min(runs, key=lambda r: r["decode_seconds"])


def files_bytes(bundle: Path) -> int:
    return sum((bundle / n).stat().st_size for n in ("model.onnx", "model.weights") if (bundle / n).exists())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--eos", type=int, default=0)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "_work" / "genai"))
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    if args.worker:
        kind, bundle = args.worker[0], Path(args.worker[1])
        result = lmc_worker(bundle) if kind == "lmc" else genai_worker(bundle, args.eos)
        print(json.dumps(result))
        return
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib.npz"
    ids = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    np.savez(calib, input_ids=ids)
    rows = []
    for variant in ("exact", "int4"):
        bundle = out / variant
        if args.rebuild or not (bundle / "genai_config.json").exists():
            quantized = variant != "exact"
            start = time.perf_counter()
            build(args.model, BuildOptions(context=args.context, tokenizer=str(TOKENIZER),
                                           quantize=QuantizeMode.INT4 if quantized else QuantizeMode.NONE,
                                           calib=str(calib) if quantized else None), bundle)
            print(f"built {variant} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        ours = best("lmc", bundle, args.repeats)
        seen = {t for row in ours["tokens"] for t in row}
        vocab = json.loads((bundle / "genai_config.json").read_text())["model"]["vocab_size"]
        eos = next(t for t in range(vocab - 1, -1, -1) if t not in seen)
        theirs = best("genai", bundle, args.repeats, eos)
        rows.append((variant, bundle, ours, theirs))
        print(f"measured {variant}", file=sys.stderr)
    steps = PROMPTS * (NEW_TOKENS - 1)
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    print("| bundle | files | greedy tokens: genai = lmc generate | driver | decode tok/s | CPU ms per decode step | "
          "peak RSS | peak RSS above imports |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for variant, bundle, ours, theirs in rows:
        same = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"]))
        equal = sum(x == y for a, b in zip(ours["tokens"], theirs["tokens"]) for x, y in zip(a, b))
        for name, r in (("lmc generate (StateDecoder)", ours), ("onnxruntime-genai", theirs)):
            print(f"| {variant} | {mb(files_bytes(bundle))} | {same}/{PROMPTS} prompts ({equal}/{PROMPTS * NEW_TOKENS} "
                  f"tokens) | {name} | {steps / r['decode_seconds']:.0f} | {1e3 * r['decode_cpu_seconds'] / steps:.2f} | "
                  f"{mb(r['peak_rss'])} | "
                  f"{mb(r['peak_rss'] - r['base_rss'])} |")


if __name__ == "__main__":
    main()
