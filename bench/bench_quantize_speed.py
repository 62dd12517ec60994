"""Weight-quantization speed on TinyLlama-1.1B shapes: lmc's ``QuantizeWeights`` vs onnxruntime's int4 quantizer.

    python bench/bench_quantize_speed.py [--bits 4|8] [--repeat 2] [--no-ort] [--table] [--threads N]

Random float32 weights (seed 0) with the shapes and counts of a TinyLlama-1.1B export (22 layers; hidden
2048, 32 heads, 4 kv heads, MLP 5632, vocabulary 32000). Each distinct shape is quantized ``--repeat`` times
(the fastest counts) through the code path ``lmc build --quantize int4`` takes without calibration: the
``QuantizeWeights`` pass on a graph holding one ``MatMul(x, W[K, N])`` (W as MatMul reads it: [in, out]),
its weighted-error report included. The total extrapolates per-shape times by the counts. Beside it:
onnxruntime's ``DefaultWeightOnlyQuantizer.qbits_block_quant`` (the RTN core of ``MatMulNBitsQuantizer``,
default settings: asymmetric 4-bit blocks of 128; the C++ kernel) on the same array, and at lmc's block
size 32. ``--table`` adds the token-embedding table (a Gather of [32000, 2048], 8-bit blocks in int4 mode).

The last lines give the Gram-matrix bytes GPTQ (``--quantize int4 --calib``) holds for these shapes: every
distinct MatMul input's K×K float64 Gram at once, vs grouped under ``GRAM_BUDGET_BYTES``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx_graphsurgeon as gs

LAYERS = 22
HIDDEN, KV, MLP, VOCAB = 2048, 256, 5632, 32000

# (name, K, N, count): MatMul weights [K, N] (x[…, K] · W)
SHAPES = [
    ("q_proj", HIDDEN, HIDDEN, LAYERS),
    ("k_proj", HIDDEN, KV, LAYERS),
    ("v_proj", HIDDEN, KV, LAYERS),
    ("o_proj", HIDDEN, HIDDEN, LAYERS),
    ("gate_proj", HIDDEN, MLP, LAYERS),
    ("up_proj", HIDDEN, MLP, LAYERS),
    ("down_proj", MLP, HIDDEN, LAYERS),
    ("lm_head", HIDDEN, VOCAB, 1),
]
TABLE = ("embed_tokens", VOCAB, HIDDEN, 1)


def _graph(w: np.ndarray, table: bool) -> gs.Graph:
    if table:
        ids = gs.Variable("ids", dtype=np.int64, shape=[1, 4])
        y = gs.Variable("y", dtype=np.float32, shape=[1, 4, w.shape[1]])
        node = gs.Node("Gather", inputs=[gs.Constant("w", w), ids], outputs=[y], attrs={"axis": 0})
        return gs.Graph(nodes=[node], inputs=[ids], outputs=[y], opset=21)
    x = gs.Variable("x", dtype=np.float32, shape=[1, w.shape[0]])
    y = gs.Variable("y", dtype=np.float32, shape=[1, w.shape[1]])
    node = gs.Node("MatMul", inputs=[x, gs.Constant("w", w)], outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=21)


def time_lmc(w: np.ndarray, bits: int, table: bool, repeat: int, target) -> tuple[float, float, float]:
    """(best wall seconds, its CPU seconds over all threads, weighted relative error) of the QuantizeWeights
    pass on one weight."""
    from lmc.core.pass_manager import PassContext
    from lmc.passes.quantize.weight_only import QuantizeConfig, QuantizeWeights, WeightBits

    best, cpu, err = float("inf"), float("inf"), float("nan")
    for _ in range(repeat):
        graph = _graph(w, table)
        qpass = QuantizeWeights(QuantizeConfig(bits=WeightBits(bits), block_size=32))
        t, c = time.perf_counter(), time.process_time()
        qpass.run(graph, PassContext(target=target))
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
        err = qpass.reports[0].rel_error
        del graph, qpass
    return best, cpu, err


def time_ort(w: np.ndarray, block: int, repeat: int) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        quantizer.qbits_block_quant(w)
        best = min(best, time.perf_counter() - t)
    return best


def gram_bytes() -> tuple[int, int, int]:
    """(all at once, largest group under the budget, groups) of GPTQ's float64 Grams for these shapes: one
    Gram per distinct MatMul input (q/k/v share the attention norm's output, gate/up the MLP norm's)."""
    from lmc.passes.quantize.weight_only import GRAM_BUDGET_BYTES, plan_gram_groups

    per_layer = [("attn_norm", HIDDEN), ("attn_out", HIDDEN), ("mlp_norm", HIDDEN), ("mlp_act", MLP)]
    needs = [f"{i}.{name}" for i in range(LAYERS) for name, _ in per_layer] + ["final_norm"]
    sizes = {f"{i}.{name}": k * k * 8 for i in range(LAYERS) for name, k in per_layer}
    sizes["final_norm"] = HIDDEN * HIDDEN * 8
    # jobs in the pass's order: q, k, v | o | gate, up | down per layer, then lm_head
    jobs = []
    for i in range(LAYERS):
        jobs += [f"{i}.attn_norm"] * 3 + [f"{i}.attn_out", f"{i}.mlp_norm", f"{i}.mlp_norm", f"{i}.mlp_act"]
    jobs.append("final_norm")
    groups = plan_gram_groups(jobs, sizes, GRAM_BUDGET_BYTES)
    return sum(sizes[n] for n in needs), max(g.peak_bytes for g in groups), len(groups)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantizer")
    ap.add_argument("--table", action="store_true", help="add the token-embedding table (a Gather)")
    ap.add_argument("--only", help="comma-separated shape names to time (the total is then partial)")
    ap.add_argument("--threads", type=int, help="at most this many search threads (default: the CPUs, up to 4)")
    args = ap.parse_args(argv)
    if args.threads:
        import lmc.passes.quantize.scales as scales

        scales.MAX_THREADS = args.threads

    from lmc.targets.target import load_target

    target = load_target("cortex-a55")
    shapes = SHAPES + ([TABLE] if args.table else [])
    if args.only:
        shapes = [s for s in shapes if s[0] in args.only.split(",")]
    rng = np.random.default_rng(0)
    ort = args.bits == 4 and not args.no_ort
    threads = ""
    try:
        from lmc.passes.quantize.scales import threads as search_threads
        threads = f", search threads {search_threads()}"
    except ImportError:
        pass
    print(f"lmc --quantize int{args.bits} (no calibration) vs onnxruntime int4 RTN; best of {args.repeat}{threads}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    head = "| weight | shape [K, N] | count | lmc s/weight | lmc CPU s | lmc weighted rel err |"
    line = "|---|---|---:|---:|---:|---:|"
    if ort:
        head += " ort s/weight (block 128) | ort s/weight (block 32) | lmc / ort-128 |"
        line += "---:|---:|---:|"
    print(head + "\n" + line)
    totals = {"lmc": 0.0, "cpu": 0.0, "ort128": 0.0, "ort32": 0.0}
    weights = 0
    for name, k, n, count in shapes:
        w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02)
        table = name == TABLE[0]
        t_lmc, t_cpu, err = time_lmc(w, args.bits, table, args.repeat, target)
        totals["lmc"] += t_lmc * count
        totals["cpu"] += t_cpu * count
        weights += count
        row = f"| {name} | {k}×{n} | {count} | {t_lmc:.3f} | {t_cpu:.3f} | {err:.4f} |"
        if ort:
            # onnxruntime quantizes MatMul B [K, N] in blocks along K; a Gather table along its rows' D
            arr = np.ascontiguousarray(w.T) if table else w
            t128, t32 = time_ort(arr, 128, args.repeat), time_ort(arr, 32, args.repeat)
            totals["ort128"] += t128 * count
            totals["ort32"] += t32 * count
            row += f" {t128:.3f} | {t32:.3f} | {t_lmc / t128:.1f}× |"
        print(row, flush=True)
        del w
    total = f"| **total** ({weights} weights) | | | **{totals['lmc']:.1f} s** | {totals['cpu']:.1f} s | |"
    if ort:
        total += f" {totals['ort128']:.1f} s | {totals['ort32']:.1f} s | {totals['lmc'] / totals['ort128']:.1f}× |"
    print(total)
    try:
        everything, peak, groups = gram_bytes()
        print(f"\nGPTQ Gram matrices (float64, one per distinct MatMul input): all at once {everything / 2**30:.2f} GiB; "
              f"grouped: peak {peak / 2**20:.0f} MiB over {groups} calibration passes")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
