"""Every decoder family lmc has a real-exporter fixture for: built exact, greedy-equal, or refused with a reason.

For each fixture (``models/fixtures/*.onnx``, ``more/``, ``families/``; past/present decoders from optimum's
exporter and from torch.onnx), in one process:
- ``lmc build FIXTURE --context C`` (exact; the build's own check runs over the whole horizon and fails the
  build on a mismatch), its layers' layouts (full or windowed) and the build time;
- greedy generation from 3 random prompts (5 tokens) for max(4 × the widest window, 96) new tokens — capped at
  the context — by the bundle and by the original's own present → past loop: equal or not, and where the first
  token differs;
- with ``--int8``, the same through ``--quantize int8`` (built and generated; its tokens are counted, not
  required equal: int8 is approximate).
A build that exits 0 but generates other tokens is a *silent wrong* — the column that must stay 0.

Encoder–decoder exports (``fixtures/seq2seq``: Whisper- and T5-shaped, optimum's layout) are built at
``--context`` min(C, 32) (Whisper's learned positions) and generate context − 1 tokens from 3 random inputs
against optimum's own loop.

    python bench/bench_families.py [--context 128] [--int8] [--only NAME[,NAME]] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "models" / "fixtures"
PROMPTS, PROMPT_LEN = 3, 5


def fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*.onnx")) + sorted((FIXTURES / "more").glob("*.onnx")) + \
        sorted((FIXTURES / "families").glob("*.onnx"))


def vocab_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = next(o for o in model.graph.output if not o.name.startswith("present"))
    return int(out.type.tensor_type.shape.dim[-1].dim_value or 256)


def run_one(path: Path, context: int, quantize: str | None, work: Path) -> dict:
    from lmc.compiler.build import BuildOptions, QuantizeMode, build
    from lmc.core.errors import LmcError
    from lmc.compiler.drivers import PastDecoder, StateDecoder, generation_info, greedy

    out = work / (path.stem + ("-" + quantize if quantize else ""))
    shutil.rmtree(out, ignore_errors=True)
    row = {"fixture": path.name, "mode": quantize or "exact"}
    start = time.perf_counter()
    try:
        result = build(path, BuildOptions(target="cortex-a55", context=context, quantize=QuantizeMode(quantize or "none")), out)
    except LmcError as exc:
        row.update(status="refused", reason=str(exc).splitlines()[0][:160])
        return row
    row["build_s"] = round(time.perf_counter() - start, 1)
    info = generation_info(out / "model.onnx")
    widest = max(info.windows, default=0)
    new = min(max(4 * widest, 96), context - PROMPT_LEN)
    row.update(windows=list(info.windows), new_tokens=new, check_passed=bool(result.verification.passed),
               max_rel=float(result.verification.max_rel))
    layers = [n for r in result.records for n in r.notes if n.startswith("layers: ")]
    row["layers"] = layers[0][len("layers: "):] if layers else ""
    rng = np.random.default_rng(0)
    vocab = vocab_of(path)
    equal, first_diff = 0, None
    bundle, original = StateDecoder(out / "model.onnx"), PastDecoder(path)
    for _ in range(PROMPTS):
        prompt = rng.integers(0, vocab, PROMPT_LEN).tolist()
        a, b = greedy(bundle, prompt, new), greedy(original, prompt, new)
        if a == b:
            equal += 1
        else:
            at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            first_diff = at if first_diff is None else min(first_diff, at)
    row.update(status="built", greedy_equal=f"{equal}/{PROMPTS}", first_diff=first_diff)
    if quantize is None and equal < PROMPTS:
        row["silent_wrong"] = True
    shutil.rmtree(out, ignore_errors=True)
    return row


SEQ2SEQ = {"whisper-tiny": {}, "t5-small": {"encoder_length": 16}}     # optimum export folders in fixtures/seq2seq


def run_seq2seq(name: str, context: int, work: Path) -> dict:
    """An encoder–decoder export built with --context, its greedy tokens against optimum's own loop (encoder →
    decoder → decoder with past) from 3 random encoder inputs."""
    import lmc
    from lmc.compiler.build import BuildOptions, build
    from lmc.compiler.drivers import greedy
    from lmc.core.errors import LmcError
    from lmc.compiler.seq2seq_export import OriginalLoop, find_export

    folder, out = FIXTURES / "seq2seq" / name, work / name
    row = {"fixture": f"seq2seq/{name}", "mode": "exact"}
    start = time.perf_counter()
    try:
        result = build(folder, BuildOptions(target="cortex-a55", context=context, **SEQ2SEQ[name]), out)
    except LmcError as exc:
        row.update(status="refused", reason=str(exc).splitlines()[0][:160])
        return row
    row.update(build_s=round(time.perf_counter() - start, 1), windows=[], check_passed=bool(result.verification.passed),
               max_rel=float(result.verification.max_rel), layers="self-attention cache in place, cross K/V as state")
    export = find_export(folder)
    rng = np.random.default_rng(0)
    new = context - 1
    equal, first_diff = 0, None
    for _ in range(PROMPTS):
        inputs = ({"input_features": rng.standard_normal((1, 80, 32)).astype(np.float32)} if "whisper" in name
                  else {"input_ids": rng.integers(2, 256, (1, 11))})
        ours = lmc.generate(out, None, new, encoder_inputs=inputs).tokens
        loop = OriginalLoop(export)
        given = dict(inputs)
        if "input_ids" in given:
            given["attention_mask"] = np.ones_like(given["input_ids"])
        loop.encode(given)
        theirs = greedy(loop, [export.decoder_start_token_id], new)
        if ours == theirs:
            equal += 1
        else:
            at = next(i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y)
            first_diff = at if first_diff is None else min(first_diff, at)
    row.update(status="built", new_tokens=new, greedy_equal=f"{equal}/{PROMPTS}", first_diff=first_diff)
    if equal < PROMPTS:
        row["silent_wrong"] = True
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--int8", action="store_true", help="also build and generate --quantize int8")
    ap.add_argument("--only", default="", help="comma-separated fixture names (without .onnx)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    only = {n for n in args.only.split(",") if n}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in fixtures():
            if only and path.stem not in only:
                continue
            for mode in (None, "int8") if args.int8 else (None,):
                row = run_one(path, args.context, mode, Path(tmp))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        for name in SEQ2SEQ:
            if not only or name in only:
                rows.append(run_seq2seq(name, min(args.context, 32), Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n--context {args.context}; greedy over max(4 × widest window, 96) new tokens (capped at the context), "
          f"{PROMPTS} prompts\n")
    print("| fixture | mode | result | windows (layers) | greedy equal | build s |")
    print("|---|---|---|---|---|---:|")
    for r in rows:
        if r["status"] == "refused":
            print(f"| {r['fixture']} | {r['mode']} | refused: {r['reason']} | | | |")
            continue
        result = ("built, check passed" if r["check_passed"] else "built, check FAILED") if r["mode"] == "exact" \
            else f"built (approximate: logits max rel err {r['max_rel']:.2g})"
        diff = "" if r["first_diff"] is None else f" (first differs at {r['first_diff']})"
        print(f"| {r['fixture']} | {r['mode']} | {result} | {r['windows'] or 'none'} ({r['layers']}) | "
              f"{r['greedy_equal']} × {r['new_tokens']}{diff} | {r['build_s']} |")
    exact = [r for r in rows if r["mode"] == "exact"]
    print(f"\nexact: {sum(r['status'] == 'built' for r in exact)} built, "
          f"{sum(r['status'] == 'refused' for r in exact)} refused, "
          f"{sum(bool(r.get('silent_wrong')) for r in exact)} silent wrong")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
