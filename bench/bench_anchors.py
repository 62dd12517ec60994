"""lmc vs each competitor at its best documented settings (not its defaults), side by side, one command.

    python bench/bench_anchors.py [--models llama-code,tiny-llama,tiny-gpt2,small-cnn,long-llama] [--no-gptq]

Competitors, as their documentation recommends them:
- onnxruntime ``quantize_static`` after ``shape_inference.quant_pre_process`` (skip_optimization=False), QDQ,
  per-channel weights, S8S8 with ActivationSymmetric=False / WeightSymmetric=True, only MatMul quantized for
  transformers (everything for the CNN), calibration MinMax / Percentile / Entropy over the calibration set,
  reduce_range off (this host has AVX512-VNNI, where the docs say it is not needed) and on;
- onnxruntime ``quantize_dynamic`` (per-channel, MatMul only for transformers, after pre-processing);
- onnxruntime ``MatMulNBitsQuantizer`` int4: RTN symmetric / asymmetric, block 32 and 128, accuracy_level=4
  (int8 compute), also with Gather (embedding) quantization (after an opset-21 conversion, which that mode
  needs), HQQ, and GPTQ (its defaults) over the calibration set;
- onnxruntime's offline graph optimizer (``SessionOptions.optimized_model_filepath``) at EXTENDED and ALL;
- onnxsim and onnxslim with the input shapes bound (their constant folding needs them);
- lmc ``build`` (exact, int8, int4 with GPTQ calibration, w8a8 calibrated), target x86-64 (this host).

Quality: llama-code — perplexity on the first 32 windows of 256 tokens of ../shared/data/code-val.u16; every
calibrating tool sees only the first 32 rows of code-calib.u16 reshaped [128, 256]. Small models — cosine and
max relative error of the first output vs fp32 over 8 held-out random inputs (seed 100), calibration on
32 other random inputs (seed 1). Size = model + external data on disk. Latency: onnxruntime, one intra-op
thread, default session options (ORT_ENABLE_ALL; lmc bundles with their session_options.json), the fp32
model and the variant in the same process, interleaved, best of 3 (each sample the mean of enough runs to
last ≥ 250 ms for fp32). Build time: in-process wall time to produce the model (ORT static/dynamic include
the pre-processing; lmc's includes its own onnxruntime verification of the bundle).
Needs the bench extra (pip install onnxsim onnxslim).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

sys.path.insert(0, str(Path(__file__).parent))
from measures import size_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LLAMA_CODE = SHARED / "models" / "llama-code.onnx"
VAL = SHARED / "data" / "code-val.u16"
CALIB = SHARED / "data" / "code-calib.u16"
LONG = ROOT / "models" / "fixtures" / "long" / "llama-long-transformers.onnx"
LMC_TARGET = "x86-64"
N_CALIB = 32
N_WINDOWS = 32


# ---------------------------------------------------------------- models and their data

class Spec:
    def __init__(self, name, path, shapes, kind, calib_feeds, eval_data, transformer=True, note=""):
        self.name, self.path, self.shapes, self.kind = name, path, shapes, kind
        self.calib_feeds, self.eval_data, self.transformer, self.note = calib_feeds, eval_data, transformer, note


def random_feeds(path: Path, shapes: dict, n: int, seed: int) -> list[dict]:
    from lmc.compiler.verify import random_inputs

    return random_inputs(path, shapes, samples=n, seed=seed)


def make_specs(names: list[str], tmp: Path) -> list[Spec]:
    from lmc.core.perplexity import load_tokens
    from lmc.models import build_cnn, build_gpt2, build_llama

    specs = []
    for name in names:
        if name == "llama-code":
            calib = np.fromfile(str(CALIB), dtype="<u2").reshape(128, 256)[:N_CALIB].astype(np.int64)
            specs.append(Spec(name, LLAMA_CODE, {"input_ids": (1, 256)}, "ppl",
                              [{"input_ids": row[None]} for row in calib], load_tokens(VAL, 256, N_WINDOWS),
                              note=f"input_ids 1×256; perplexity on the first {N_WINDOWS} windows × 256 of "
                                   f"code-val.u16; calibration: first {N_CALIB} rows of code-calib.u16"))
            continue
        if name == "long-llama":
            path, shapes = LONG, {"input_ids": (1, 256)}
            note = "models/fixtures/long/llama-long-transformers.onnx (transformers LlamaForCausalLM export), 1×256"
        else:
            builder, shapes, transformer = {
                "tiny-llama": (build_llama, {"input_ids": (1, 64)}, True),
                "tiny-gpt2": (build_gpt2, {"input_ids": (1, 64)}, True),
                "small-cnn": (build_cnn, {"image": (1, 3, 32, 32)}, False),
            }[name]
            path = tmp / f"{name}.onnx"
            onnx.save(builder(), str(path))
            note = f"lmc.models {builder.__name__}(), " + ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in shapes.items())
        specs.append(Spec(name, path, shapes, "cos", random_feeds(path, shapes, N_CALIB, 1),
                          random_feeds(path, shapes, 8, 100), transformer=name != "small-cnn", note=note))
    return specs


# ---------------------------------------------------------------- measurements

def nodes_of(model: Path) -> int:
    return len(onnx.load(str(model), load_external_data=False).graph.node)


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort
    from lmc.core.runtime import apply_session_options, bundle_session_options

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    apply_session_options(opts, bundle_session_options(path))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def quality(spec: Spec, path: Path, ref) -> dict:
    sess = ort_session(path)
    if spec.kind == "ppl":
        from lmc.core.perplexity import perplexity

        return {"ppl": perplexity(sess, spec.eval_data).perplexity}
    outs = np.concatenate([sess.run(None, feed)[0].astype(np.float64).ravel() for feed in spec.eval_data])
    if ref is None:
        return {"out": outs, "cos": 1.0, "rel": 0.0}
    cos = float(outs @ ref["out"] / (np.linalg.norm(outs) * np.linalg.norm(ref["out"]) + 1e-300))
    rel = float(np.abs(outs - ref["out"]).max() / (np.abs(ref["out"]).max() + 1e-300))
    return {"cos": cos, "rel": rel}


def latency_ratio(base, path: Path, feed: dict) -> float:
    """Best-of-3 one-thread latency of ``path`` over the fp32 session ``base``, interleaved."""
    var = ort_session(path, threads=1)
    for s in (base, var):
        for _ in range(2):
            s.run(None, feed)
    start = time.perf_counter()
    base.run(None, feed)
    n = max(1, int(0.25 / max(time.perf_counter() - start, 1e-6)))
    best = {id(base): float("inf"), id(var): float("inf")}
    for _ in range(3):
        for s in (base, var):
            start = time.perf_counter()
            for _ in range(n):
                s.run(None, feed)
            best[id(s)] = min(best[id(s)], (time.perf_counter() - start) / n)
    return best[id(var)] / best[id(base)]


# ---------------------------------------------------------------- the tools

class Reader:
    """onnxruntime CalibrationDataReader over the calibration feeds (fresh iterator per use)."""

    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)


def pre_process(spec: Spec, out: Path, cache: dict) -> tuple[Path, float]:
    """quant_pre_process once per model; its time is charged to every row that uses it."""
    if "pre" not in cache:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

        path = out / "pre.onnx"
        start = time.perf_counter()
        model = onnx.load(str(spec.path))   # symbolic shape inference needs the input shapes, as lmc gets them
        for name, dims in spec.shapes.items():
            make_input_shape_fixed(model.graph, name, list(dims))
        fixed = out / "fixed.onnx"
        onnx.save(model, str(fixed))
        quant_pre_process(str(fixed), str(path), skip_optimization=False)
        cache["pre"] = (path, time.perf_counter() - start)
    return cache["pre"]


def const_b_matmuls(path: Path) -> list[str]:
    """MatMuls whose B is a weight (QDQ ignores extra_options MatMulConstBOnly, so name them)."""
    m = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def ort_static(spec, out, cache, method: str, reduce_range: bool, const_b: bool = False):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre, pre_s = pre_process(spec, out, cache)
    path = out / f"static-{method}-{int(reduce_range)}-{int(const_b)}.onnx"
    options = {"ActivationSymmetric": False, "WeightSymmetric": True}
    start = time.perf_counter()
    quantize_static(str(pre), str(path), Reader(spec.calib_feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"] if spec.transformer else None, per_channel=True,
                    reduce_range=reduce_range, nodes_to_quantize=const_b_matmuls(pre) if const_b else None,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), extra_options=options)
    return path, pre_s + time.perf_counter() - start


def ort_dynamic(spec, out, cache):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre, pre_s = pre_process(spec, out, cache)
    path = out / "dynamic.onnx"
    start = time.perf_counter()
    quantize_dynamic(str(pre), str(path), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"] if spec.transformer else None)
    return path, pre_s + time.perf_counter() - start


def ort_nbits(spec, out, algo: str, block: int, symmetric: bool = True, gather: bool = False):
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    start = time.perf_counter()
    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    if algo == "RTN":
        config = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=4,
                                                 op_types_to_quantize=ops)
    elif algo == "HQQ":
        config = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    elif algo == "GPTQ":
        config = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(spec.calib_feeds), block_size=block)
    else:
        raise ValueError(algo)
    model = onnx.load(str(spec.path))
    if gather:   # Gather quantization forces opset 21 without converting the ops: convert first
        model = onnx.version_converter.convert_version(model, 21)
    q = mq.MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=symmetric,
                                accuracy_level=4, algo_config=config)
    q.process()
    path = out / f"nbits-{algo}-{block}-{int(symmetric)}-{int(gather)}.onnx"
    q.model.save_model_to_file(str(path), use_external_data_format=False)
    return path, time.perf_counter() - start


def ort_optimizer(spec, out, level: str):
    import onnxruntime as ort

    path = out / f"ortopt-{level}.onnx"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.optimized_model_filepath = str(path)
    start = time.perf_counter()
    ort.InferenceSession(str(spec.path), opts, providers=["CPUExecutionProvider"])
    return path, time.perf_counter() - start


def run_onnxsim(spec, out):
    import onnxsim

    start = time.perf_counter()
    model, ok = onnxsim.simplify(str(spec.path), overwrite_input_shapes={k: list(v) for k, v in spec.shapes.items()})
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    path = out / "onnxsim.onnx"
    onnx.save(model, str(path))
    return path, time.perf_counter() - start


def run_onnxslim(spec, out):
    import onnxslim

    start = time.perf_counter()
    model = onnxslim.slim(str(spec.path), input_shapes=[f"{k}:{','.join(map(str, v))}" for k, v in spec.shapes.items()])
    path = out / "onnxslim.onnx"
    onnx.save(model, str(path))
    return path, time.perf_counter() - start


def run_lmc(spec, out, mode: str, calib: Path):
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    start = time.perf_counter()
    build(spec.path, BuildOptions(target=LMC_TARGET, input_shapes=spec.shapes, quantize=QuantizeMode(mode),
                                  calib=str(calib) if mode in ("int4", "w8a8") else None, block_size=32),
          out / f"lmc-{mode}")
    return out / f"lmc-{mode}" / "model.onnx", time.perf_counter() - start


def variants(spec: Spec, out: Path, calib: Path, gptq: bool):
    cache: dict = {}
    ops = "op_types_to_quantize=[MatMul]" if spec.transformer else "all op types"
    common = f"shapes fixed, pre_process; QDQ S8S8, per_channel, {ops}, ActSym=F, WSym=T"
    shape = ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in spec.shapes.items())
    rows = [
        ("ort static", f"{common}, MinMax, reduce_range=F", lambda: ort_static(spec, out, cache, "MinMax", False)),
        ("ort static", f"{common}, MinMax, reduce_range=T", lambda: ort_static(spec, out, cache, "MinMax", True)),
    ] + ([("ort static", f"{common}, MinMax, nodes_to_quantize=MatMuls with weight B",
           lambda: ort_static(spec, out, cache, "MinMax", False, const_b=True))] if spec.transformer else []) + [
        ("ort static", f"{common}, Percentile 99.999", lambda: ort_static(spec, out, cache, "Percentile", False)),
        ("ort static", f"{common}, Entropy", lambda: ort_static(spec, out, cache, "Entropy", False)),
        ("ort dynamic", f"shapes fixed, pre_process; per_channel, {ops}, QInt8", lambda: ort_dynamic(spec, out, cache)),
        ("ort int4", "MatMulNBits RTN sym, block 32, accuracy_level=4", lambda: ort_nbits(spec, out, "RTN", 32)),
        ("ort int4", "MatMulNBits RTN asym, block 32, accuracy_level=4",
         lambda: ort_nbits(spec, out, "RTN", 32, symmetric=False)),
        ("ort int4", "MatMulNBits RTN sym, block 128, accuracy_level=4", lambda: ort_nbits(spec, out, "RTN", 128)),
        ("ort int4", "opset→21, MatMulNBits RTN sym, block 32, acc 4, +Gather (embeddings)",
         lambda: ort_nbits(spec, out, "RTN", 32, gather=True)),
        ("ort int4", "MatMulNBits HQQ, block 32 (writes no accuracy_level)", lambda: ort_nbits(spec, out, "HQQ", 32)),
        ("ort int4", "MatMulNBits HQQ, block 128 (writes no accuracy_level)", lambda: ort_nbits(spec, out, "HQQ", 128)),
    ]
    if gptq:
        rows.append(("ort int4", "MatMulNBits GPTQ, block 32, calibrated, accuracy_level=4",
                     lambda: ort_nbits(spec, out, "GPTQ", 32)))
    rows += [
        ("ort optimizer", "optimized_model_filepath, ORT_ENABLE_EXTENDED", lambda: ort_optimizer(spec, out, "ORT_ENABLE_EXTENDED")),
        ("ort optimizer", "optimized_model_filepath, ORT_ENABLE_ALL", lambda: ort_optimizer(spec, out, "ORT_ENABLE_ALL")),
        ("onnxsim", f"simplify(overwrite_input_shapes={shape})", lambda: run_onnxsim(spec, out)),
        ("onnxslim", f"slim(input_shapes={shape})", lambda: run_onnxslim(spec, out)),
        ("lmc", f"build --target {LMC_TARGET} (exact)", lambda: run_lmc(spec, out, "none", calib)),
        ("lmc", f"build --target {LMC_TARGET} --quantize int8", lambda: run_lmc(spec, out, "int8", calib)),
        ("lmc", f"build --target {LMC_TARGET} --quantize int4 --calib calib.npz", lambda: run_lmc(spec, out, "int4", calib)),
        ("lmc", f"build --target {LMC_TARGET} --quantize w8a8 --calib calib.npz", lambda: run_lmc(spec, out, "w8a8", calib)),
    ]
    return rows


# ---------------------------------------------------------------- one model

def bench_model(spec: Spec, tmp: Path, gptq: bool) -> list[dict]:
    out = tmp / spec.name
    out.mkdir()
    calib = out / "calib.npz"
    np.savez(calib, **{k: np.stack([f[k] for f in spec.calib_feeds]) for k in spec.calib_feeds[0]})
    latency_feed = spec.eval_data[0] if spec.kind == "cos" else {"input_ids": spec.eval_data[0][None]}
    ref = quality(spec, spec.path, None)
    base = ort_session(spec.path, threads=1)
    rows = [{"tool": "fp32", "settings": "original", "size": size_of(spec.path), "nodes": nodes_of(spec.path),
             "latency": 1.0, "seconds": 0.0, **{k: v for k, v in ref.items() if k != "out"}}]
    for tool, settings, make in variants(spec, out, calib, gptq):
        row = {"tool": tool, "settings": settings}
        print(f"[{spec.name}] {tool}: {settings}", file=sys.stderr, flush=True)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                path, seconds = make()
            row.update(size=size_of(path), nodes=nodes_of(path), seconds=seconds)
            row.update(quality(spec, path, ref))
            row["latency"] = latency_ratio(base, path, latency_feed)
        except Exception as exc:  # a tool failing is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")[:110]
        rows.append(row)
    return rows


def table(spec: Spec, rows: list[dict]) -> str:
    ref = rows[0]
    if spec.kind == "ppl":
        head = "| tool | settings | size MB | nodes | perplexity | Δ vs fp32 | latency × fp32 | build s |\n|---|---|---:|---:|---:|---:|---:|---:|"
    else:
        head = "| tool | settings | size MB | nodes | cosine | max rel err | latency × fp32 | build s |\n|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [f"### {spec.name}\n", spec.note + "\n", head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['settings']} | failed: {r['error']} | | | | | |")
            continue
        if spec.kind == "ppl":
            q = f"{r['ppl']:.2f} | {100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%"
        else:
            q = f"{r['cos']:.6f} | {r['rel']:.1e}"
        lat = r.get("latency")
        lines.append(f"| {r['tool']} | {r['settings']} | {r['size'] / 1e6:.2f} | {r['nodes']} | {q} | "
                     f"{'—' if lat is None else f'{lat:.2f}'} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-code,tiny-llama,tiny-gpt2,small-cnn,long-llama")
    parser.add_argument("--no-gptq", action="store_true", help="leave out onnxruntime's GPTQ (slow)")
    args = parser.parse_args()
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for spec in make_specs(args.models.split(","), tmp):
            rows = bench_model(spec, tmp, gptq=not args.no_gptq)
            results[spec.name] = rows
            print(table(spec, rows), flush=True)
    if os.environ.get("LMC_BENCH_JSON"):
        print(json.dumps(results))


if __name__ == "__main__":
    main()
