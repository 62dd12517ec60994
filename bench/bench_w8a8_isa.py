"""w8a8 and the target's integer GEMM (llama-code 1×256): what each target's bundle computes on an x86-64 host.

onnxruntime on x86-64 without VNNI shifts int8 activations to uint8 and adds u8 × s8 pairs in int16
(VPMADDUBSW), saturating; with ``session.qdqisint8allowed = 1`` it keeps them int8 and runs an exact s8 × s8
kernel (Arm's path by default). lmc reads this from the target's ISA features (``Int8Products``): x86-64 w8a8
bundles take 7-bit GEMM weights (no pair sum can saturate), cortex-a55 bundles keep 8 bits and carry the
config entry. Per bundle: perplexity on ``--windows`` windows of code-val (default config, as the bundle's
session options say, and forced s8 × s8), and the two kernels' logits against each other.

    python bench/bench_w8a8_isa.py [--windows 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.core.perplexity import load_tokens, perplexity
from lmc.core.runtime import bundle_session_options, session

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "llama-code.onnx"
KEPT = {"session.qdqisint8allowed": "1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "_work" / "w8a8-isa"))
    args = ap.parse_args()
    out = Path(args.out)
    calib = out / "calib.npz"
    if not calib.is_file():
        out.mkdir(parents=True, exist_ok=True)
        np.savez(calib, input_ids=load_tokens(SHARED / "data" / "code-calib.u16", 256, 32).astype(np.int64))
    tokens = load_tokens(SHARED / "data" / "code-val.u16", 256, args.windows)
    rows = [("exact (x86-64)", None, "none")] + [(f"w8a8 for {t}", t, "w8a8") for t in ("x86-64", "cortex-a55")]
    base = None
    print(f"| bundle | weights of the integer GEMMs | perplexity, bundle's config | Δ vs exact | perplexity, s8 × s8 forced "
          f"| u8 × s8 vs s8 × s8 logits: max rel | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, target, mode in rows:
        path = out / f"{target or 'x86-64'}-{mode}"
        if not (path / "model.onnx").is_file():
            build(MODEL, BuildOptions(target=target or "x86-64", input_shapes={"input_ids": (1, 256)},
                                      quantize=QuantizeMode(mode), calib=None if mode == "none" else str(calib),
                                      verify=False), path)
        model = path / "model.onnx"
        own = bundle_session_options(model).get("config_entries", {})
        ppl = perplexity(session(model, threads=1, config_entries=own), tokens).perplexity
        base = base or ppl
        if mode == "none":
            print(f"| {label} | — | {ppl:.3f} | — | — | — | — |")
            continue
        forced = perplexity(session(model, threads=1, config_entries={**own, **KEPT}), tokens).perplexity
        feed = {"input_ids": tokens[:1].astype(np.int64)}
        a = session(model, threads=1).run(None, feed)[0]
        b = session(model, threads=1, config_entries=KEPT).run(None, feed)[0]
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
        bits = "7 bits (x86-64: AVX2, no VNNI)" if target == "x86-64" else "8 bits (dotprod: exact)"
        print(f"| {label} | {bits} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {forced:.3f} | {rel:.2e} | "
              f"{top1:.1%} |")


if __name__ == "__main__":
    main()
