"""cortex-a55 bundles of llama-code checked on their instruction set: aarch64 (qemu-user) beside x86-64.

    python bench/bench_aarch64.py [--windows 8] [--calib-samples 32] [--out bench/_work/aarch64]

Bundles (``--target cortex-a55``): ``llama-code.onnx`` one-shot at ``input_ids=1x256`` in modes exact, int8,
int4 and w8a8, and ``llama-code-past.onnx --context 512`` exact and int4; the quantized ones calibrated on
the first ``calib-samples`` sequences of code-calib.u16 (as bench_quantize.py / bench_generate.py do).
Each bundle is checked as ``lmc verify BUNDLE --against ORIGINAL --tokens code-val.u16 --windows N`` checks it
(one-shot bundles with ``--inputs``: the first 256 tokens of code-val.u16), once with both models on the
host (x86-64) and once with both under ``qemu-aarch64 -cpu cortex-a76`` (``lmc verify --on aarch64``; both
through the same worker, the original run once per machine and input): max relative error of the logits
against the original, top-1 agreement with the original's argmax, perplexity of both over the first N windows
of 256 tokens (a generation bundle streamed token by token, as ``lmc verify`` does). The last columns compare
the bundle with itself across the two machines on its check's inputs: max relative difference and top-1
agreement. Needs ``scripts/setup-aarch64.sh`` first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
ONESHOT = SHARED / "models" / "llama-code.onnx"
PAST = SHARED / "models" / "llama-code-past.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"


def build_bundles(out: Path, calib: Path, rebuild: bool) -> list[tuple[str, Path, Path]]:
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    rows = []
    for mode in ("none", "int8", "int4", "w8a8"):
        path = out / f"oneshot-{mode}"
        if rebuild or not (path / "model.onnx").is_file():
            build(ONESHOT, BuildOptions(target="cortex-a55", input_shapes={"input_ids": (1, 256)},
                                        quantize=QuantizeMode(mode), calib=None if mode == "none" else str(calib),
                                        verify=False), path)
        rows.append((f"one-shot 1×256 {'exact' if mode == 'none' else mode}", path, ONESHOT))
    for mode in ("none", "int4"):
        path = out / f"past-{mode}"
        if rebuild or not (path / "model.onnx").is_file():
            build(PAST, BuildOptions(target="cortex-a55", context=512, quantize=QuantizeMode(mode),
                                     calib=None if mode == "none" else str(calib), verify=False), path)
        rows.append((f"generation --context 512 {'exact' if mode == 'none' else mode}", path, PAST))
    return rows


def bundle_outputs(cache: dict, bundle: Path) -> np.ndarray:
    """The bundle's logits from its check (the worker's ``cand`` task, kept in ``cache``)."""
    model = str(bundle / "model.onnx")
    found = [out for task, _, out, _ in cache.values() if task["model"] == model and task["id"] == "cand"]
    (out,) = found
    return next(v for k, v in out.items() if "logits" in k)


def cross_machine(host_cache: dict, arm_cache: dict, bundle: Path) -> tuple[float, str]:
    """The bundle on aarch64 against the bundle on x86-64, on its check's inputs: (max relative
    difference, top-1 agreement)."""
    from lmc.compiler.on_target import _top1
    from lmc.compiler.verify import compare

    x86, arm = bundle_outputs(host_cache, bundle), bundle_outputs(arm_cache, bundle)
    agree, n = _top1(x86, arm)
    return compare(x86, arm, "logits").max_rel, f"{agree}/{n}"


def kernel_sites(model) -> list[tuple[str, str, str]]:
    """(label, float input X, output Y) of the first matrix product of each kind (op, int8 activations or
    not, weight shape) in a bundle: X is the float tensor it reads before any activation Q/DQ."""
    import onnx

    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = {t.name: (tuple(t.dims), onnx.helper.tensor_dtype_to_string(t.data_type).split(".")[-1].lower())
              for t in model.graph.initializer}
    sites, seen = [], set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        x, quantized = node.input[0], False
        while x in producer and producer[x].op_type in ("DequantizeLinear", "QuantizeLinear"):
            x, quantized = producer[x].input[0], True
        if node.op_type == "MatMulNBits":
            a = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
            kind = f"MatMulNBits {a['bits']}-bit block {a['block_size']} [{a['K']}×{a['N']}]"
        else:
            w = producer.get(node.input[1])
            dims, dtype = shapes.get(w.input[0], ((), "?")) if w is not None else ((), "float")
            kind = f"{'Q/DQ int8 activations × ' if quantized else ''}DQ {dtype} weight [{'×'.join(map(str, dims))}]"
        if kind not in seen:
            seen.add(kind)
            sites.append((kind, x, node.output[0]))
    return sites


def kernels(out: Path, emulator) -> None:
    """Each kind of quantized matrix product of the int8, int4 and w8a8 one-shot bundles, cut out with its
    real weights and fed its real activation (the first 256 tokens of code-val.u16): the kernels onnxruntime
    makes of it on each machine (its optimized graph) and each machine's result against the float semantics
    (on the host, every graph optimisation and weight prepacking off: quantized weights dequantized, float
    GEMMs)."""
    import collections

    import onnx
    from onnx.utils import extract_model

    from lmc.compiler.on_target import run_worker, session_settings
    from lmc.compiler.verify import compare

    ids = np.fromfile(str(VAL), dtype="<u2")[:256].astype(np.int64)[None, :]
    work = out / "kernels"
    work.mkdir(exist_ok=True)

    def ops(path: Path) -> str:
        c = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        return " + ".join(f"{k}×{v}" if v > 1 else k for k, v in c.items())

    print("| bundle | product | kernels x86 | kernels aarch64 | max rel vs float: x86 | aarch64 | aarch64 vs x86 |")
    print("|---|---|---|---|---:|---:|---:|")
    for mode in ("int8", "int4", "w8a8"):
        bundle = out / f"oneshot-{mode}" / "model.onnx"
        settings = session_settings(bundle)
        sites = kernel_sites(onnx.load(str(bundle), load_external_data=False))
        host_tasks, arm_tasks, arrays = [], [], {}
        for i, (_, x, y) in enumerate(sites):
            head, cut = work / f"{mode}-{i}-x.onnx", work / f"{mode}-{i}.onnx"
            extract_model(str(bundle), str(head), ["input_ids"], [x], check_model=False)
            extract_model(str(bundle), str(cut), [x], [y], check_model=False)
            task = {"kind": "run", "id": "x", "model": str(head), "feeds": ["f"]}
            arrays[f"k{i}/{x}"] = run_worker([task], {"f/input_ids": ids})[1][f"x/0/{x}"]
            fused = {"kind": "run", "model": str(cut), "feeds": [f"k{i}"]}
            # the float semantics: no fusion, and no prepacking (MatMulNBits then dequantizes its weights)
            unpacked = {**settings, "config_entries": {**settings.get("config_entries", {}),
                                                       "session.disable_prepacking": "1"}}
            host_tasks += [dict(fused, id=f"ref{i}", optimize=False, settings=unpacked),
                           dict(fused, id=f"x86{i}", settings={**settings, "optimized_model_filepath":
                                                               str(work / f"{mode}-{i}-x86-opt.onnx")})]
            arm_tasks.append(dict(fused, id=f"arm{i}", settings={**settings, "optimized_model_filepath":
                                                                 str(work / f"{mode}-{i}-arm-opt.onnx")}))
        host = run_worker(host_tasks, arrays)[1]
        arm = run_worker(arm_tasks, arrays, emulator)[1]
        for i, (kind, _, y) in enumerate(sites):
            ref, x86, a64 = host[f"ref{i}/0/{y}"], host[f"x86{i}/0/{y}"], arm[f"arm{i}/0/{y}"]
            print(f"| {mode} | {kind} | {ops(work / f'{mode}-{i}-x86-opt.onnx')} | "
                  f"{ops(work / f'{mode}-{i}-arm-opt.onnx')} | {compare(ref, x86, y).max_rel:.2e} | "
                  f"{compare(ref, a64, y).max_rel:.2e} | {compare(x86, a64, y).max_rel:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "_work" / "aarch64")
    parser.add_argument("--rebuild", action="store_true", help="Build the bundles again even when present.")
    parser.add_argument("--only", help="Rows whose label contains this text.")
    parser.add_argument("--kernels", action="store_true",
                        help="Instead: the quantized bundles' matrix products one by one on both machines.")
    args = parser.parse_args()
    from lmc.compiler.on_target import find_emulator, verify_on

    emulator = find_emulator("cortex-a76")
    args.out.mkdir(parents=True, exist_ok=True)
    calib = args.out / "calib.npz"
    tokens = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    np.savez(calib, input_ids=tokens)
    rows = build_bundles(args.out, calib, args.rebuild)
    if args.kernels:
        kernels(args.out, emulator)
        return
    # one-shot checks on representative inputs (lmc verify --inputs): the first 256 tokens of code-val.u16
    inputs = args.out / "inputs.npz"
    np.savez(inputs, input_ids=np.fromfile(str(VAL), dtype="<u2")[:256].astype(np.int64)[None, :])
    print(f"llama-code cortex-a55 bundles; perplexity on {args.windows} windows × 256 of code-val.u16; aarch64: "
          f"qemu-aarch64 -cpu {emulator.cpu}, onnxruntime's aarch64 wheel (the host's version)\n")
    print("| bundle | max rel x86 | max rel aarch64 | top-1 x86 | top-1 aarch64 | ppl original x86 / aarch64 | "
          "ppl bundle x86 / aarch64 | bundle aarch64 vs x86: max rel, top-1 | aarch64 check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    host_cache, arm_cache = {}, {}        # the original runs once per machine and input
    for label, bundle, original in rows:
        if args.only and args.only not in label:
            continue
        given = inputs if original == ONESHOT else None
        x86 = verify_on(bundle, original, on="host", inputs=given, tokens=VAL, windows=args.windows, cache=host_cache)
        start = time.perf_counter()
        arm = verify_on(bundle, original, on="aarch64", inputs=given, tokens=VAL, windows=args.windows,
                        cache=arm_cache)
        minutes = (time.perf_counter() - start) / 60
        cross, cross_top1 = cross_machine(host_cache, arm_cache, bundle)

        def top1(r):
            return ", ".join(f"{a}/{n}" for a, n in r.top1.values())

        def rel(r):
            return ", ".join(f"{o.max_rel:.2e}" for o in r.outputs)

        print(f"| {label} | {rel(x86)} | {rel(arm)} | {top1(x86)} | {top1(arm)} | "
              f"{x86.perplexity['original']:.3f} / {arm.perplexity['original']:.3f} | "
              f"{x86.perplexity['bundle']:.3f} / {arm.perplexity['bundle']:.3f} | {cross:.2e}, {cross_top1} | "
              f"{minutes:.0f} min |", flush=True)
    print("\none-shot rows: logits on the first 256 tokens of code-val.u16; generation rows: prefill, decode — the "
          "check's 512 random-token positions, prefilled in chunks of 64, the last 16 decoded one at a time")


if __name__ == "__main__":
    main()
