"""Structured pruning on llama-code: perplexity, size, nodes and one-thread latency, one process run.

    python bench/bench_prune.py [--windows 64] [--calib-samples 32] [--runs 20]

For each pruning (MLP fractions 0.1 / 0.2 / 0.3, query heads 1/3 — one of the three query heads of each
key/value group — and MLP 0.2 with heads 1/3) three choices: (a) weight magnitude without compensation
(``choose=magnitude,refit=off``), (b) measured saliency without compensation (``refit=off``), (c) measured
saliency with the least-squares refit (the default); and (c) followed by ``--quantize int4 --calib``.
Perplexity over the first ``windows`` windows of 256 tokens of ../shared/data/code-val.u16; calibration
(saliency, refit, GPTQ) on the first ``calib-samples`` sequences of code-calib.u16. Size: model + external
data on disk. Latency: median of interleaved one-thread runs at 1×256 against lmc's exact bundle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from latency import measure  # noqa: E402
from measures import size_of  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "llama-code.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"
PRUNINGS = ["mlp=0.1", "mlp=0.2", "mlp=0.3", "heads=1/3", "mlp=0.2,heads=1/3"]
CHOICES = [("a", ",choose=magnitude,refit=off"), ("b", ",refit=off"), ("c", "")]


def lmc_build(out: Path, calib: Path, prune: str | None, quantize: str = "none") -> Path:
    from lmc.compiler.build import BuildOptions, build

    build(MODEL, BuildOptions(target="cortex-a55", input_shapes={"input_ids": (1, 256)}, quantize=quantize,
                              calib=str(calib), prune=prune, verify=False), out)
    return out / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from lmc.core.perplexity import load_tokens, perplexity
    from lmc.core.runtime import session

    windows = load_tokens(VAL, 256, args.windows)
    calib_tokens = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.npz"
        np.savez(calib, input_ids=calib_tokens)
        exact = lmc_build(tmp / "exact", calib, None)
        variants = [("exact (lmc, no pruning)", "", None, "none"), ("int4 alone", "", None, "int4")]
        for prune in PRUNINGS:
            variants += [(prune, tag, prune + suffix, "none") for tag, suffix in CHOICES]
            variants.append((prune, "c + int4", prune, "int4"))
        for i, (name, tag, prune, quantize) in enumerate(variants):
            start = time.perf_counter()
            path = exact if i == 0 else lmc_build(tmp / f"v{i}", calib, prune, quantize)
            seconds = time.perf_counter() - start
            ppl = perplexity(session(path), windows).perplexity
            base_s, var_s = measure(exact, path, {"input_ids": (1, 256)}, runs=args.runs)
            nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
            rows.append({"pruning": name, "choice": tag, "ppl": ppl, "size": size_of(path), "nodes": nodes,
                         "latency": var_s / base_s, "seconds": seconds})
            print(f"  {name} {tag}: ppl {ppl:.3f}", file=sys.stderr, flush=True)
    ref = rows[0]["ppl"]
    int4 = rows[1]
    print(f"llama-code, {args.windows} windows × 256 of code-val.u16; calibration {args.calib_samples} × 256 of "
          f"code-calib.u16; latency: one thread, 1×256, vs the exact bundle\n")
    print("| pruning | choice | perplexity | Δ vs exact | bundle MB | nodes | latency vs exact | build s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pruning']} | {r['choice']} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref - 1):+.2f}% | "
              f"{r['size'] / 1e6:.2f} | {r['nodes']} | {r['latency']:.2f} | {r['seconds']:.0f} |")
    print("\n(a) weight magnitude, no compensation; (b) measured saliency, no compensation; (c) measured saliency "
          "with the least-squares refit (the default of --prune).")
    print(f"int4 alone: {int4['size'] / 1e6:.2f} MB, perplexity {100 * (int4['ppl'] / ref - 1):+.2f}% vs exact")
    for prune in PRUNINGS:
        by = {r["choice"]: r for r in rows if r["pruning"] == prune}
        da, dc = by["a"]["ppl"] / ref - 1, by["c"]["ppl"] / ref - 1
        q = by["c + int4"]
        print(f"{prune}: (c) {100 * dc:+.2f}% vs (a) {100 * da:+.2f}% (ratio {dc / da if da > 0 else float('nan'):.2f}); "
              f"c + int4 {q['size'] / int4['size']:.2f}× int4's size at {100 * (q['ppl'] / int4['ppl'] - 1):+.2f}% "
              f"perplexity vs int4 alone")


if __name__ == "__main__":
    main()
