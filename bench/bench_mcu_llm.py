"""A 260K-parameter Llama (llama2.c's stories260K shape, random weights) as a C bundle on a microcontroller:
one-shot logits and greedy generation, against onnxruntime, on the host and on the emulated board.

    python bench/bench_mcu_llm.py [--out bench/_work/mcu-llm] [--tokens 32] [--contexts 64,256] [--no-board]
    python bench/bench_mcu_llm.py --families      # every decoder fixture as C greedy generation (host)

Models: the committed fixture ``models/fixtures/mcu/llama260k-past-optimum.onnx`` (vocabulary 256) and the
exact stories260K shape (vocabulary 512), which ``models/exporters/export_mcu_llama.py --vocab 512`` writes
into ``bench/_work/mcu-llm-models`` (run once, with the export extra; the row is skipped without it). Target cortex-m7
(512 KiB RAM, 2 MiB flash; board mps2-an500 under qemu-system-arm).

Rows:
- one-shot (``--input-shape input_ids=1x16``, empty past): the C logits against onnxruntime on the original,
  max relative error over 4 random inputs on the host (cc), and on the board for the first;
- generation (``--context N --prefill-chunk 1``: the C runs one token per step, prompts included, so the
  plan's profiles are both the decode step's and the build's RAM check is the C's): the C greedy runner
  (decode step + static KV cache) generates ``--tokens``
  tokens after the prompt 1 2 3; "tokens equal" compares them with the original export driven under
  onnxruntime (prefill, then present fed back as past), on the host and on the board;
- int8 (``--quantize w8a8``, calibrated on 8 random 16-token prompts): built if the C kernels cover it,
  else the reason; its C is judged against onnxruntime on the bundle's own model.onnx (graph
  optimizations off: the integer and QDQ operators' semantics), and the
  quantization's error against the float original is given beside it (max relative, top-1 agreement); and
  the w8a8 generation bundles (``--context N --quantize w8a8``, calibrated on 8 random 16-token prompts),
  whose C greedy tokens are compared with onnxruntime driving the same bundle;
- arena: plan.json's (the decode profile for generation) and the linker map's ``.bss.lmc_arena``; RAM and
  flash: the linker's region usage (RAM = .data + .bss — arena, I/O and the KV state — + heap + stack
  reserved); instructions per lmc_run under ``-icount`` (not cycles).

``--families``: every decoder fixture under models/fixtures (the exporters' Llama/Qwen2/GPT-2 layouts, ``more/``
and ``families/``) built for cortex-m7 with ``--context 32 --prefill-chunk 1``; the C greedy runner's 20 tokens
after 1 2 3 against the same bundle's model.onnx under onnxruntime (which the build checks against the
original), or the reason no C was written (an op without a C kernel) or the build was refused.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import lmc
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.drivers import PastDecoder, greedy
from lmc.core.errors import LmcError
from lmc.targets.cbundle import board as boards
from lmc.targets.cbundle.generation import HostGenerator, generate_board
from lmc.targets.cbundle.host import HostBuild

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "models" / "fixtures" / "mcu" / "llama260k-past-optimum.onnx"
STORIES = REPO / "bench" / "_work" / "mcu-llm-models" / "llama260k-v512-past-optimum.onnx"
TARGET = "cortex-m7"
RAM, FLASH = 512 * 1024, 2 * 1024 * 1024
LAYERS, KV_HEADS, HEAD_DIM = 5, 4, 8
PROMPT = [1, 2, 3]
SEQ = 16
INPUTS = 4                 # one-shot: random 16-token inputs compared on the host (the board runs the first)


@dataclass
class Row:
    model: str
    mode: str
    check: str            # logits max rel / tokens equal, host
    board_check: str
    arena_plan: int
    arena_map: int | None
    ram: int | None
    flash: int | None
    instructions: int | None   # per lmc_run


def _fmt(v) -> str:
    return "—" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def _oneshot_shapes() -> dict:
    shapes = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ), "position_ids": (1, SEQ)}
    shapes.update({f"past_key_values.{i}.{k}": (1, KV_HEADS, 0, HEAD_DIM) for i in range(LAYERS)
                   for k in ("key", "value")})
    return shapes


def _oneshot_feeds(seed: int, vocab: int) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.random.default_rng(seed).integers(0, vocab, (1, SEQ)).astype(np.int64),
             "attention_mask": np.ones((1, SEQ), np.int64), "position_ids": np.arange(SEQ, dtype=np.int64)[None]}
    feeds.update({k: np.zeros(v, np.float32) for k, v in _oneshot_shapes().items() if k.startswith("past")})
    return feeds


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) / float(np.abs(b).max())


def greedy_onnxruntime(model: Path, prompt: list[int], count: int) -> list[int]:
    """The original export driven the plain way under onnxruntime (prefill, then present fed back as past)."""
    return greedy(PastDecoder(model), prompt, count)


def oneshot(model: Path, name: str, out: Path, on_board: bool, quantize: str = "none",
            calib: Path | None = None) -> Row:
    bundle = out / f"{name}-oneshot-{quantize}"
    shutil.rmtree(bundle, ignore_errors=True)
    mode = "one-shot 1x16 " + ("float32" if quantize == "none" else quantize)
    try:
        result = build(model, BuildOptions(target=TARGET, input_shapes=_oneshot_shapes(), quantize=quantize,
                                           calib=str(calib) if calib else None), bundle)
        if result.cbundle is None:
            raise LmcError("no C bundle written")
    except LmcError as exc:
        return Row(name, mode, f"not built: {str(exc).splitlines()[0][:90]}", "—", 0, None, None, None, None)
    vocab = int(ort.InferenceSession(str(model)).get_outputs()[0].shape[-1] or 256)
    original_session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    # float: against the original; quantized: against onnxruntime on the bundle's own model.onnx with graph
    # optimizations off (the integer and QDQ operators' semantics, not x86 onnxruntime's fused int8 kernels, which saturate
    # u8 x s8 products), the quantization's error against the original beside it
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference_session = original_session if quantize == "none" else ort.InferenceSession(
        str(bundle / "model.onnx"), plain, providers=["CPUExecutionProvider"])
    samples = [_oneshot_feeds(seed, vocab) for seed in range(INPUTS)]
    rels, top1, float_rels, float_top1 = [], [], [], []
    with HostBuild(bundle) as host:
        for feeds in samples:
            logits = host.run(feeds)[0]
            reference = reference_session.run(["logits"], feeds)[0]
            original = original_session.run(["logits"], feeds)[0]
            rels.append(_rel(logits, reference))
            top1.append(float(np.mean(logits[0].argmax(-1) == reference[0].argmax(-1))))
            float_rels.append(_rel(logits, original))
            float_top1.append(float(np.mean(logits[0].argmax(-1) == original[0].argmax(-1))))
    if quantize == "none":
        check = f"logits max rel {max(rels):.1e}"
    else:
        within = sum(r <= 1e-5 for r in rels)
        check = (f"vs model.onnx: within 1e-5 on {within}/{len(rels)} inputs, worst {max(rels):.1e}, top-1 "
                 f"{np.mean(top1):.2f}; vs float: max rel {max(float_rels):.2f}, top-1 {np.mean(float_top1):.2f}")
    feeds, reference = samples[0], reference_session.run(["logits"], samples[0])[0]
    row = Row(name, mode, check, "—", result.plan.arena_bytes, None, None, None, None)
    if on_board:
        run = boards.run_bundle(bundle, TARGET, feeds)
        row.board_check = f"logits max rel {_rel(run.outputs[0], reference):.1e}"
        row.arena_map, row.ram, row.flash, row.instructions = run.arena_bytes, run.ram_bytes, run.flash_bytes, \
            run.instructions
    return row


def generation(model: Path, name: str, out: Path, context: int, count: int, on_board: bool,
               quantize: str = "none", calib: Path | None = None) -> Row:
    """Greedy tokens of the bundle's C decode step against the original's under onnxruntime (float32), or
    against onnxruntime on the same quantized bundle (w8a8: the quantized model the C implements)."""
    bundle = out / f"{name}-gen{context}-{quantize}"
    shutil.rmtree(bundle, ignore_errors=True)
    result = build(model, BuildOptions(target=TARGET, context=context, prefill_chunk=1, quantize=quantize,
                                       calib=None if calib is None else str(calib)), bundle)
    decode = next(p for p in result.plan.profiles if p.name == "decode")
    expected = (greedy_onnxruntime(model, PROMPT, count) if quantize == "none"
                else lmc.generate(bundle, PROMPT, count, speculate="off").tokens)
    with HostGenerator(bundle) as generator:
        got = generator.generate(PROMPT, count)
    mode = f"generation --context {context}, {count} tokens" + ("" if quantize == "none" else f" {quantize}")
    row = Row(name, mode, f"tokens equal: {got == expected}", "—", decode.arena_bytes, None, None, None, None)
    if on_board:
        run = generate_board(bundle, TARGET, PROMPT, count)
        row.board_check = f"tokens equal: {run.tokens == expected}"
        row.arena_map, row.ram, row.flash = run.arena_bytes, run.ram_bytes, run.flash_bytes
        row.instructions = round(run.instructions / run.lmc_run_calls) if run.instructions else None
    return row


def _calibration(path: Path, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, vocab, (8, 1, SEQ)).astype(np.int64),
              "attention_mask": np.ones((8, 1, SEQ), np.int64),
              "position_ids": np.tile(np.arange(SEQ, dtype=np.int64), (8, 1, 1))}
    arrays.update({k: np.zeros((8, *v), np.float32) for k, v in _oneshot_shapes().items() if k.startswith("past")})
    np.savez(path, **arrays)
    return path


def families(out: Path, count: int = 20) -> None:
    paths = sorted((REPO / "models" / "fixtures").glob("*.onnx")) + \
        sorted((REPO / "models" / "fixtures" / "more").glob("*.onnx")) + \
        sorted((REPO / "models" / "fixtures" / "families").glob("*.onnx"))
    print("| fixture | C greedy tokens (20) | decode arena | C ops of the decode step |")
    print("|---|---|---|---|")
    for path in paths:
        if path.parent.name == "mcu":
            continue
        bundle = out / f"family-{path.stem}"
        shutil.rmtree(bundle, ignore_errors=True)
        try:
            result = build(path, BuildOptions(target=TARGET, context=32, prefill_chunk=1, verify=False), bundle)
        except LmcError as exc:
            print(f"| {path.stem} | refused by lmc: {str(exc).splitlines()[0][:100]} | — | — |")
            continue
        if result.cbundle is None:
            why = result.cbundle_skipped.split(": the C bundle has no kernel")[0].split(" (model.onnx")[0]
            print(f"| {path.stem} | no C: {why[:100]} | — | — |")
            continue
        decode = next(p for p in result.plan.profiles if p.name == "decode")
        expected = lmc.generate(bundle, PROMPT, count, speculate="off").tokens
        with HostGenerator(bundle) as generator:
            got = generator.generate(PROMPT, count)
        ops = len({n.op_type for n in onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node})
        print(f"| {path.stem} | {'equal' if got == expected else 'DIFFER'} | {decode.arena_bytes:,} | {ops} op types |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "_work" / "mcu-llm"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--contexts", default="64,256")
    ap.add_argument("--no-board", action="store_true")
    ap.add_argument("--rows", choices=("all", "float", "int8"), default="all")
    ap.add_argument("--families", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.families:
        families(out)
        return
    on_board = not args.no_board and shutil.which(boards.GCC) is not None and shutil.which(boards.QEMU) is not None
    if not STORIES.is_file():
        done = subprocess.run([sys.executable, str(REPO / "models" / "exporters" / "export_mcu_llama.py"),
                               "--vocab", "512", str(STORIES.parent)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"(stories260K vocabulary 512 not exported: {done.stderr.strip().splitlines()[-1:]})")
    models = [(FIXTURE, "llama260k v256")] + ([(STORIES, "stories260K v512")] if STORIES.is_file() else [])
    rows = []
    for path, name in models if args.rows != "int8" else []:
        rows.append(oneshot(path, name, out, on_board))
        for context in (int(c) for c in args.contexts.split(",")):
            rows.append(generation(path, name, out, context, args.tokens, on_board))
    if args.rows != "float":
        rows.append(oneshot(FIXTURE, "llama260k v256", out, on_board, "w8a8", _calibration(out / "calib.npz", 256)))
        tokens = out / "calib-tokens.npz"
        np.savez(tokens, input_ids=np.random.default_rng(0).integers(0, 256, (8, SEQ)).astype(np.int64))
        for context in (int(c) for c in args.contexts.split(",")):
            rows.append(generation(FIXTURE, "llama260k v256", out, context, args.tokens, on_board, "w8a8", tokens))
    print(f"target {TARGET} (RAM {RAM // 1024} KiB, flash {FLASH // 1024 // 1024} MiB); board "
          f"{'mps2-an500 under qemu-system-arm' if on_board else '— (no toolchain: scripts/setup-mcu.sh)'}")
    print("| model | mode | host C vs onnxruntime | board vs onnxruntime | arena plan | arena map | RAM | flash "
          "| instructions / lmc_run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fits = "" if r.ram is None else (" ✓" if r.ram <= RAM and r.flash <= FLASH else " over")
        print(f"| {r.model} | {r.mode} | {r.check} | {r.board_check} | {_fmt(r.arena_plan)} | {_fmt(r.arena_map)} "
              f"| {_fmt(r.ram)}{fits} | {_fmt(r.flash)} | {_fmt(r.instructions)} |")


if __name__ == "__main__":
    main()
