"""Quantization side by side: lmc vs onnxruntime's quantizers on llama-code, one process run.

    python bench/bench_quantize.py [--windows 64] [--calib-samples 32]

Perplexity over the first ``windows`` windows of 256 tokens of ../shared/data/code-val.u16; every
calibrating tool sees the same first ``calib-samples`` sequences of code-calib.u16 (never the validation
file). Bundle size = model + external data on disk. Peak RSS is model-attributable: the peak RSS of a
fresh process that loads the model in onnxruntime and runs one 1×256 window, minus the same process
running a one-node model. Needs the bench extra (pip install -e .[bench]).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from latency import measure  # noqa: E402
from measures import size_of, status  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "llama-code.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"


def rss_child(model: str) -> None:
    """(child) peak RSS in bytes after loading ``model`` and running one window."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = np.zeros((1, 256), dtype=np.int64) if "int" in inp.type else np.zeros((1,), dtype=np.float32)
    sess.run(None, {inp.name: feed})
    print(status("VmHWM"))


def peak_rss(model: Path) -> int:
    out = subprocess.run([sys.executable, __file__, "--rss", str(model)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def one_node_model(path: Path) -> Path:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    m = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "one", [x], [y]),
                               opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


def lmc_variant(mode: str, out: Path, calib: Path, block: int) -> Path:
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    build(MODEL, BuildOptions(target="cortex-a55", input_shapes={"input_ids": (1, 256)},
                              quantize=QuantizeMode(mode), calib=str(calib), block_size=block), out)
    return out / "model.onnx"


class _Reader:
    def __init__(self, tokens: np.ndarray):
        self.items = iter([{"input_ids": t[None]} for t in tokens])

    def get_next(self):
        return next(self.items, None)


def ort_dynamic(out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = out / "ort-dynamic.onnx"
    quantize_dynamic(str(MODEL), str(path), weight_type=QuantType.QInt8)
    return path


def ort_static(out: Path, tokens: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = out / "ort-static.onnx"
    quantize_static(str(MODEL), str(path), _Reader(tokens), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return path


def ort_int4(out: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(MODEL)), bits=4, block_size=32, is_symmetric=True)
    q.process()
    path = out / "ort-int4.onnx"
    q.model.save_model_to_file(str(path), use_external_data_format=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rss", help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--int4-block", type=int, default=128)
    args = parser.parse_args()
    if args.rss:
        rss_child(args.rss)
        return
    from lmc.core.perplexity import load_tokens, perplexity
    from lmc.core.runtime import session

    windows = load_tokens(VAL, 256, args.windows)
    calib_tokens = np.fromfile(str(CALIB), dtype="<u2").reshape(-1, 256)[: args.calib_samples].astype(np.int64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.npz"
        np.savez(calib, input_ids=calib_tokens)
        base_rss = peak_rss(one_node_model(tmp / "one.onnx"))
        variants = [
            ("fp32 original", lambda: MODEL),
            ("lmc exact (--quantize none)", lambda: lmc_variant("none", tmp / "exact", calib, 32)),
            ("lmc --quantize int8", lambda: lmc_variant("int8", tmp / "int8", calib, 32)),
            (f"lmc --quantize int4 --block-size {args.int4_block}",
             lambda: lmc_variant("int4", tmp / "int4", calib, args.int4_block)),
            ("lmc --quantize w8a8", lambda: lmc_variant("w8a8", tmp / "w8a8", calib, 32)),
            ("onnxruntime quantize_dynamic int8", lambda: ort_dynamic(tmp)),
            ("onnxruntime quantize_static QDQ int8 (MinMax, per-channel)", lambda: ort_static(tmp, calib_tokens)),
            ("onnxruntime MatMulNBits int4 (block 32)", lambda: ort_int4(tmp)),
        ]
        for name, make in variants:
            start = time.perf_counter()
            try:
                path = make()
            except Exception as exc:  # an anchor failing is a row, not a crash
                rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:120]})
                continue
            seconds = time.perf_counter() - start
            ppl = perplexity(session(path), windows).perplexity
            orig_s, var_s = measure(MODEL, path, {"input_ids": (1, 256)}, runs=10)
            rows.append({"variant": name, "ppl": ppl, "size": size_of(path), "rss": peak_rss(path) - base_rss,
                         "seconds": seconds, "latency": var_s / orig_s})
    ref = rows[0]["ppl"]
    print(f"llama-code, {args.windows} windows × 256 of code-val.u16; calibration: {args.calib_samples} × 256 of "
          f"code-calib.u16\n")
    print("| variant | perplexity | Δ vs fp32 | bundle MB | model peak RSS MB | latency vs fp32 (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        print(f"| {r['variant']} | {r['ppl']:.2f} | {100 * (r['ppl'] / ref - 1):+.2f}% | {r['size'] / 1e6:.2f} | "
              f"{r['rss'] / 1e6:.1f} | {r['latency']:.2f} |")
    if os.environ.get("LMC_BENCH_JSON"):
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
