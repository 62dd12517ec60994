"""Speculative decoding: greedy tokens/s with and without drafts, how many drafts are kept, whether the
tokens stay plain greedy's, and what a k-token forward costs against a 1-token one.

Bundles of the reference model (``lmc build --context 512``, exact and ``--quantize int4 --calib`` with
code-calib windows as bench_generate.py makes them), one onnxruntime thread. 8 prompts (32 tokens at offsets
1000·i of the code validation stream, as bench_generate.py takes them) × 256 new tokens, every variant run
prompt by prompt in turn in one process (a busy moment of the machine weighs on all alike):
- plain greedy (``--speculate off``), prompt lookup with K = 2, 4, 8 drafts, and for the exact bundle the
  int4 bundle as a draft bundle (``--draft``);
- decode tokens/s = (new tokens − 1) / decode seconds after the prefill (as ``lmc generate --json``);
- acceptance = drafts kept / drafts verified; forwards = the bundle's forwards after the prefill;
- identical: prompts whose 256 tokens equal plain greedy's (and tokens equal at the same index).
Forward cost: after a 128-token prefill, one k-token forward (then rewound) timed 60 times, median,
k = 1, 2, 4, 8.

    python bench/bench_speculate.py [--model PAST.onnx] [--context 512] [--out bench/_work/spec]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "llama-code-past.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 32, 256
KS = (2, 4, 8)


def build_bundles(args) -> dict[str, Path]:
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib.npz"
    ids = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    np.savez(calib, input_ids=ids)
    bundles = {}
    for variant in ("exact", "int4"):
        bundle = out / variant
        if not (bundle / "model.onnx").is_file() or args.rebuild:
            if bundle.exists():
                import shutil
                shutil.rmtree(bundle)
            start = time.perf_counter()
            quantize = QuantizeMode.NONE if variant == "exact" else QuantizeMode.INT4
            build(args.model, BuildOptions(context=args.context, quantize=quantize,
                                           calib=str(calib) if variant != "exact" else None), bundle)
            print(f"built {variant} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        bundles[variant] = bundle
    return bundles


def forward_cost(decoder, prompt: np.ndarray, repeats: int) -> dict[int, float]:
    """Median seconds of one k-token forward at position len(prompt) (rewound after each), the k taken in
    turn within each repeat so a busy moment of the machine weighs on all alike."""
    decoder.reset()
    decoder.forward(prompt[None, :])
    at = decoder.length
    times: dict[int, list[float]] = {k: [] for k in (1,) + KS}
    for _ in range(repeats):
        for k in times:
            ids = np.asarray(prompt[:k], dtype=np.int64)[None, :]
            start = time.perf_counter()
            decoder.forward(ids)
            times[k].append(time.perf_counter() - start)
            decoder.rewind(at)
    return {k: float(np.median(t)) for k, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "_work" / "spec"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--prompts", type=int, default=PROMPTS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    bundles = build_bundles(args)

    from lmc.compiler.drivers import StateDecoder
    from lmc.compiler.speculate import decode

    tokens = np.fromfile(str(VAL), dtype="<u2").astype(np.int64)
    decoders = {v: StateDecoder(b / "model.onnx", threads=1) for v, b in bundles.items()}
    draft = StateDecoder(bundles["int4"] / "model.onnx", threads=1)
    variants = []            # (label, bundle variant, speculate, draft decoder)
    for v in decoders:
        variants.append((f"{v}, plain greedy", v, "off", None))
        variants += [(f"{v}, lookup:{k}", v, f"lookup:{k}", None) for k in KS]
    variants.append(("exact, draft int4 bundle:4", "exact", "draft:4", draft))
    stats = {label: {"seconds": 0.0, "new": 0, "drafted": 0, "accepted": 0, "forwards": 0, "same": 0, "tokens": []}
             for label, *_ in variants}
    for i in range(args.prompts):
        prompt = [int(t) for t in tokens[1000 * i: 1000 * i + PROMPT_LEN]]
        plain = {}
        for label, v, spec, dr in variants:
            run = decode(decoders[v], [prompt], args.new_tokens, speculate=spec, draft=dr)
            s = stats[label]
            s["seconds"] += run.decode_seconds
            s["new"] += len(run.tokens[0]) - 1
            s["drafted"] += run.drafted
            s["accepted"] += run.accepted
            s["forwards"] += run.forwards
            if spec == "off":
                plain[v] = run.tokens[0]
            s["same"] += run.tokens[0] == plain[v]
            s["agree"] = s.get("agree", 0) + sum(a == b for a, b in zip(run.tokens[0], plain[v]))
        print(f"prompt {i + 1}/{args.prompts}", file=sys.stderr)

    print(f"Decode over {args.prompts} prompts × {args.new_tokens} tokens (context {args.context}, 1 thread):\n")
    print("| bundle, drafts | decode tok/s | vs plain | acceptance (kept/drafted) | forwards | tokens = plain greedy |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, v, spec, _ in variants:
        s = stats[label]
        rate = s["new"] / s["seconds"]
        base = stats[f"{v}, plain greedy"]
        base_rate = base["new"] / base["seconds"]
        acc = f"{s['accepted'] / s['drafted'] * 100:.1f}% ({s['accepted']}/{s['drafted']})" if s["drafted"] else "—"
        total = args.prompts * args.new_tokens
        print(f"| {label} | {rate:.1f} | {rate / base_rate:.2f}× | {acc} | {s['forwards']} | "
              f"{s['same']}/{args.prompts} prompts ({s['agree']}/{total} tokens) |")

    print(f"\nOne forward of k tokens at position {4 * PROMPT_LEN} (median of {args.repeats}), "
          f"relative to a 1-token forward:\n")
    print("| bundle | 1 token | " + " | ".join(f"k = {k}" for k in KS) + " |")
    print("|---|---:|" + "---:|" * len(KS))
    prompt = tokens[: 4 * PROMPT_LEN]
    for v, decoder in decoders.items():
        cost = forward_cost(decoder, prompt, args.repeats)
        print(f"| {v} | {cost[1] * 1e3:.2f} ms | " + " | ".join(f"{cost[k] / cost[1]:.2f}× ({cost[k] * 1e3:.2f} ms)"
                                                               for k in KS) + " |")


if __name__ == "__main__":
    main()
