"""lmc's generation bundles against onnxruntime-genai running its own model builder's output, from the same weights.

For each size — llama-code (always) and the TinyLlama-1.1B-shaped export (``--large``, bench/make_tinyllama.py) —
bench/peer_checkpoint.py rebuilds the transformers checkpoint from the optimum past/present export (its logits
checked against the export's), then, cached in ``--out`` (``--rebuild`` redoes them):
- genai: ``python -m onnxruntime_genai.models.builder -i CHECKPOINT -o OUT -p fp32|int4 -e cpu`` (int4 with the
  builder's cpu defaults; the table of bundles lists what it chose: MatMulNBits block size and accuracy level,
  whether the embedding and the lm-head are 4-bit). genai 0.18's builder imports two Qwen3.5 classes that
  transformers 4.57 lacks; they are stubbed before it runs (a Llama never touches them);
- lmc: ``lmc build PAST --context 512 --target x86-64`` (exact) and ``--quantize int4 --calib calib.npz``
  (llama-code: 32 code-calib windows, as bench_genai.py) or ``--quantize int4`` (the 1.1B, no calibration data).

Measurements, each in a fresh process with one onnxruntime thread, lmc and genai processes interleaved
(per round and mode: lmc plain, genai, lmc lookup; ``--repeats`` rounds; best and range reported):
8 prompts (32 tokens at offsets 1000·i of code-val.u16; the 1.1B's vocabulary of 32000 holds the same ids) ×
256 new greedy tokens (``--large-tokens``, 64 by default, for the 1.1B). Decode tok/s = (new − 1) per prompt
over the decode time after its prefill (as bench_genai.py and ``lmc generate --json``), CPU ms per new token
(the process's, steadier on a shared host), peak RSS (VmHWM) and the peak above the process after its imports.
lmc runs plain greedy (``speculate="off"``) and prompt lookup (``lookup``, lmc's K; on an int4 bundle lmc's
default is off, so it is asked for): its tokens are compared with plain greedy's. genai runs its greedy search
with the end-of-sequence id set to one lmc's tokens never hold (as bench_genai.py) and ``max_length`` = prompt +
new tokens, so both decode every token; lmc's exact tokens are compared with genai fp32's.
Forward cost (bench_speculate.forward_cost, lmc's int4 bundle): after a 128-token prefill one k-token forward,
k = 1, 2, 4, 8, median over ``--forward-repeats``, relative to k = 1.

    python bench/bench_peer.py [--repeats 3] [--large] [--large-tokens 64] [--modes exact,int4] [--out bench/_work/peer] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_genai import PROMPT_LEN, PROMPTS, genai_worker, prompts  # noqa: E402  (the same prompts, genai's loop)
from measures import status  # noqa: E402

SHARED = HERE.parents[1] / "shared"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"
NEW_TOKENS, CONTEXT = 256, 512
KS = (2, 4, 8)
MODES = ("exact", "int4")
GENAI_PRECISION = {"exact": "fp32", "int4": "int4"}


@dataclass(frozen=True)
class Size:
    name: str
    model: Path
    tokenizer: Path | None
    calib: bool
    new_tokens: int


def sizes(args) -> list[Size]:
    out = [Size("llama-code", SHARED / "models" / "llama-code-past.onnx", SHARED / "data" / "code-tokenizer.json",
                True, args.new_tokens)]
    if args.large:
        out.append(Size("tinyllama-1.1B", Path(args.large_model), None, False, args.large_tokens))
    return out


# ---------------------------------------------------------------------------------------------- workers
def lmc_worker(bundle: Path, speculate: str, new_tokens: int) -> dict:
    """lmc's driver (what ``lmc generate`` runs): one StateDecoder, each prompt prefilled, then decoded."""
    from lmc.compiler.drivers import StateDecoder
    from lmc.compiler.speculate import decode

    base = status("VmRSS:")
    decoder = StateDecoder(bundle / "model.onnx", threads=1)
    seconds, cpu, out, ran, drafted, accepted = 0.0, 0.0, [], "", 0, 0
    for prompt in prompts():
        cpu_start = time.process_time()
        run = decode(decoder, [prompt], new_tokens, speculate=speculate)
        cpu += time.process_time() - cpu_start       # includes the prefill: subtracted below by its share
        seconds += run.decode_seconds
        cpu -= run.prefill_seconds                    # one thread: the prefill's wall time is its CPU time
        out.append(run.tokens[0])
        ran, drafted, accepted = run.speculation, drafted + run.drafted, accepted + run.accepted
    return {"tokens": out, "decode_seconds": seconds, "decode_cpu_seconds": cpu, "base_rss": base,
            "peak_rss": status("VmHWM:"), "speculation": ran, "drafted": drafted, "accepted": accepted}


def cost_worker(bundle: Path, repeats: int) -> dict:
    """bench_speculate's k-token forward cost at position 128 on one StateDecoder (one thread)."""
    from bench_speculate import forward_cost
    from lmc.compiler.drivers import StateDecoder

    decoder = StateDecoder(bundle / "model.onnx", threads=1)
    tokens = np.fromfile(str(VAL), dtype="<u2").astype(np.int64)
    return {str(k): v for k, v in forward_cost(decoder, tokens[: 4 * PROMPT_LEN], repeats).items()}


def run_builder(argv: list[str]) -> None:
    """onnxruntime-genai's model builder under transformers 4.x: stub the two Qwen3.5 classes its base module
    imports by name (added in transformers 5; a Llama build never touches them), then run it as ``-m`` does."""
    import transformers

    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {}))
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def run_worker(*argv: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"worker {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- builds
def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def build_all(size: Size, out: Path, rebuild: bool, modes: tuple[str, ...] = MODES) -> dict:
    """The checkpoint, genai's fp32/int4 folders and lmc's exact/int4 bundles of ``size`` (cached)."""
    from peer_checkpoint import rebuild as rebuild_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    built: dict = {"build_seconds": {}}
    checkpoint = out / "checkpoint"
    if rebuild or not (checkpoint / "model.safetensors").is_file():
        start = time.perf_counter()
        done = rebuild_checkpoint(size.model, checkpoint, tokenizer=size.tokenizer)
        print(f"{size.name}: checkpoint in {time.perf_counter() - start:.0f}s, logits vs the export "
              f"max abs diff {done.max_abs_diff:.2e}", file=sys.stderr)
        built["checkpoint_diff"] = done.max_abs_diff
    for mode in modes:
        folder = out / f"genai-{GENAI_PRECISION[mode]}"
        if rebuild or not (folder / "genai_config.json").is_file():
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, __file__, "--builder", "-i", str(checkpoint), "-o", str(tmp),
                   "-p", GENAI_PRECISION[mode], "-e", "cpu", "-c", str(out / "builder-cache")]
            built["build_seconds"][f"genai {GENAI_PRECISION[mode]}"] = timed(cmd, out / f"{folder.name}.log")
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            shutil.rmtree(out / "builder-cache", ignore_errors=True)
        bundle = out / f"lmc-{mode}"
        if rebuild or not (bundle / "model.onnx").is_file():
            cmd = [shutil.which("lmc") or "lmc", "build", str(size.model), "--context", str(CONTEXT),
                   "--target", "x86-64", "-o", str(bundle)]
            if mode == "int4":
                cmd += ["--quantize", "int4"]
                if size.calib:
                    calib = out / "calib.npz"
                    ids = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[:32].astype(np.int64)
                    np.savez(calib, input_ids=ids)
                    cmd += ["--calib", str(calib)]
            built["build_seconds"][f"lmc {mode}"] = timed(cmd, out / f"lmc-{mode}.log")
        print(f"{size.name}: {mode} built", file=sys.stderr)
    return built


def folder_bytes(folder: Path) -> int:
    names = ("model.onnx", "model.weights", "model.onnx.data", "model.onnx_data")
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists())


def quantized_ops(folder: Path) -> str:
    """What the weights are: MatMulNBits (block sizes, accuracy levels), blocked DequantizeLinear + MatMul, and
    the op that reads the embedding and the one that computes the lm-head."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    nodes = model.graph.node
    nbits = [attrs(n) for n in nodes if n.op_type == "MatMulNBits"]
    dq = [attrs(n) for n in nodes if n.op_type == "DequantizeLinear" and "block_size" in attrs(n)]
    parts = []
    if nbits:
        parts.append(f"{len(nbits)} MatMulNBits (block {sorted({a.get('block_size') for a in nbits})}, "
                     f"accuracy_level {sorted({a.get('accuracy_level', 0) for a in nbits})})")
    if dq:
        parts.append(f"{len(dq)} blocked DequantizeLinear (block {sorted({a['block_size'] for a in dq})})")
    embed = sorted({n.op_type for n in nodes if "embed" in n.name and "Gather" in n.op_type})
    head = sorted({n.op_type for n in nodes if "lm_head" in n.name and "MatMul" in n.op_type})
    if any(n.op_type == "If" and n.name.startswith("lmc_greedy") for n in nodes):
        head = ["greedy head (8-bit screen, float rows) beside the full head"]
    parts.append(f"embedding {'/'.join(embed) or '?'}, lm-head {'/'.join(head) or '?'}")
    return "; ".join(parts) if nbits or dq else "float; " + parts[-1]


# ---------------------------------------------------------------------------------------------- main
def spread(runs: list[dict], steps: int) -> tuple[float, float, float]:
    rates = [steps / r["decode_seconds"] for r in runs]
    return max(rates), min(rates), max(rates)


def paired(runs: list[dict], peer: list[dict]) -> float:
    """The median over rounds of lmc's decode rate / genai's in the same round (runs made back to back: a load
    that comes and goes between rounds moves both)."""
    return float(np.median([p["decode_seconds"] / r["decode_seconds"] for r, p in zip(runs, peer)]))


def measure(size: Size, out: Path, repeats: int, forward_repeats: int, modes: tuple[str, ...] = MODES) -> dict:
    n = size.new_tokens
    runs: dict[str, list[dict]] = {}
    eos: dict[str, int] = {}
    for r in range(repeats):
        for mode in modes:
            bundle, folder = out / f"lmc-{mode}", out / f"genai-{GENAI_PRECISION[mode]}"
            plain = run_worker("lmc", str(bundle), "off", str(n))
            runs.setdefault(f"{mode}/plain", []).append(plain)
            if mode not in eos:
                seen = {t for row in plain["tokens"] for t in row}
                vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
                eos[mode] = next(t for t in range(vocab - 1, -1, -1) if t not in seen)
            runs.setdefault(f"{mode}/genai", []).append(run_worker("genai", str(folder), str(eos[mode]), str(n)))
            runs.setdefault(f"{mode}/lookup", []).append(run_worker("lmc", str(bundle), "lookup", str(n)))
            print(f"{size.name}: round {r + 1}/{repeats} {mode} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    cost = run_worker("cost", str(out / "lmc-int4"), str(forward_repeats)) if forward_repeats and "int4" in modes else None
    return {"runs": runs, "cost": cost}


def _modes(measured: dict) -> list[str]:
    return [m for m in MODES if f"{m}/plain" in measured["runs"]]


def report(results: list[tuple[Size, Path, dict, dict]]) -> None:
    print("Bundles:\n")
    print("| model | bundle | files | weights | build s (this run) |")
    print("|---|---|---:|---|---:|")
    for size, out, built, measured in results:
        for mode in _modes(measured):
            for name, folder in ((f"lmc {mode}", out / f"lmc-{mode}"),
                                 (f"genai {GENAI_PRECISION[mode]}", out / f"genai-{GENAI_PRECISION[mode]}")):
                secs = built["build_seconds"].get(name)
                print(f"| {size.name} | {name} | {folder_bytes(folder) / 1e6:.1f} MB | {quantized_ops(folder)} | "
                      f"{f'{secs:.0f}' if secs else 'cached'} |")
    print("\nDecode, one thread (best of the rounds, range in brackets; ratios: lmc's best / genai's best of the "
          "same mode, and the median over rounds of lmc's rate / genai's in the same round; peak: the largest over "
          "the rounds):\n")
    print("| model | mode | driver | decode tok/s (range) | vs genai | per round | CPU ms/token | peak RSS | vs genai "
          "| peak above imports | vs genai | tokens |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, _, _, measured in results:
        runs = measured["runs"]
        steps = PROMPTS * (size.new_tokens - 1)
        total = PROMPTS * size.new_tokens
        for mode in _modes(measured):
            genai = runs[f"{mode}/genai"]
            g_best = spread(genai, steps)[0]
            g_above = max(r["peak_rss"] - r["base_rss"] for r in genai)
            g_peak = max(r["peak_rss"] for r in genai)
            plain_tokens = runs[f"{mode}/plain"][0]["tokens"]
            for driver in ("plain", "lookup", "genai"):
                rs = runs[f"{mode}/{driver}"]
                best, lo, hi = spread(rs, steps)
                cpu = min(r["decode_cpu_seconds"] for r in rs) / steps * 1e3
                peak = max(r["peak_rss"] for r in rs)
                above = max(r["peak_rss"] - r["base_rss"] for r in rs)
                tokens = rs[0]["tokens"]
                if driver == "plain":
                    g_tokens = genai[0]["tokens"]
                    same = sum(a == b for a, b in zip(tokens, g_tokens))
                    eq = sum(x == y for a, b in zip(tokens, g_tokens) for x, y in zip(a, b))
                    label = "lmc plain greedy"
                    note = f"= genai {GENAI_PRECISION[mode]}: {same}/{PROMPTS} prompts ({eq}/{total})"
                elif driver == "lookup":
                    same = sum(a == b for a, b in zip(tokens, plain_tokens))
                    eq = sum(x == y for a, b in zip(tokens, plain_tokens) for x, y in zip(a, b))
                    steady = all(r["tokens"] == tokens for r in rs)
                    acc = sum(r["accepted"] for r in rs) / max(1, sum(r["drafted"] for r in rs))
                    label = f"lmc {rs[0]['speculation']}"
                    note = (f"= lmc plain: {same}/{PROMPTS} prompts ({eq}/{total}); {acc:.0%} drafts kept"
                            + ("" if steady else "; runs differ"))
                else:
                    label = f"genai ({GENAI_PRECISION[mode]} builder)"
                    short = sum(len(t) < size.new_tokens for t in tokens)
                    note = f"{short} prompts ended early" if short else f"all {total} tokens decoded"
                ratio = f"{best / g_best:.2f}×" if driver != "genai" else "—"
                per_round = f"{paired(rs, genai):.2f}×" if driver != "genai" else "—"
                pratio = f"{peak / g_peak:.2f}×" if driver != "genai" else "—"
                aratio = f"{above / g_above:.2f}×" if driver != "genai" else "—"
                print(f"| {size.name} | {mode} | {label} | {best:.1f} ({lo:.1f}–{hi:.1f}) | {ratio} | {per_round} | {cpu:.2f} | "
                      f"{peak / 2**20:.1f} MiB | {pratio} | {above / 2**20:.1f} MiB | {aratio} | {note} |")
    for size, _, _, measured in results:
        runs = measured["runs"]
        base = {d: min(r["base_rss"] for m in _modes(measured) for r in runs[f"{m}/{d}"]) / 2**20
                for d in ("plain", "genai")}
        print(f"\n{size.name}: the process after its imports (the base of 'above imports'): lmc {base['plain']:.1f} MiB "
              f"(numpy, onnx, onnxruntime's Python module), genai {base['genai']:.1f} MiB (onnxruntime_genai, whose "
              f"onnxruntime library loads with the model, so above its imports).")
    for size, _, _, measured in results:
        cost = measured["cost"]
        if cost is None:
            continue
        one = cost["1"]
        print(f"\n{size.name}, lmc int4 bundle: one forward of k tokens at position {4 * PROMPT_LEN} "
              f"(median), against a 1-token forward:\n")
        print("| 1 token | " + " | ".join(f"k = {k}" for k in KS) + " |")
        print("|---:|" + "---:|" * len(KS))
        print(f"| {one * 1e3:.1f} ms | " + " | ".join(f"{cost[str(k)] / one:.2f}× ({cost[str(k)] * 1e3:.1f} ms)"
                                                   for k in KS) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--builder":
        return run_builder(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "lmc":
            result = lmc_worker(Path(rest[0]), rest[1], int(rest[2]))
        elif kind == "genai":
            result = genai_worker(Path(rest[0]), int(rest[1]), int(rest[2]))
        else:
            result = cost_worker(Path(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--large", action="store_true", help="also the TinyLlama-1.1B-shaped export (takes long)")
    ap.add_argument("--only-large", action="store_true", help="the 1.1B only")
    ap.add_argument("--large-model", default=str(HERE / "_work" / "tinyllama" / "model.onnx"))
    ap.add_argument("--large-tokens", type=int, default=64)
    ap.add_argument("--forward-repeats", type=int, default=30, help="k-token forward timings (0: skip)")
    ap.add_argument("--out", default=str(HERE / "_work" / "peer"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--report-only", action="store_true", help="print the tables of the last run (results.json)")
    args = ap.parse_args()
    args.large = args.large or args.only_large
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not modes:
        ap.error(f"--modes: one or more of {', '.join(MODES)}")
    results = []
    for size in sizes(args):
        if args.only_large and size.name == "llama-code":
            continue
        out = Path(args.out) / size.name
        saved = out / "results.json"
        if args.report_only:
            data = json.loads(saved.read_text())
            built, measured = data["built"], data["measured"]
        else:
            built = build_all(size, out, args.rebuild, modes)
            measured = measure(size, out, args.repeats, args.forward_repeats, modes)
            saved.write_text(json.dumps({"built": built, "measured": measured}))
        results.append((size, out, built, measured))
    report(results)


if __name__ == "__main__":
    main()
