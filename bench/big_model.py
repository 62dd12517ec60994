"""Large-model builds: time and peak RSS of ``lmc build`` per mode on a model over the 2 GB protobuf limit.

    python bench/make_tinyllama.py                  # once: bench/_work/tinyllama/model.onnx (4.1 GiB fp32)
    python bench/big_model.py [--model PATH] [--modes exact,int8,int4,int4-calib,context,ort-int4]
    python bench/big_model.py --gib 2.2             # the synthetic two-MatMul check instead

Each mode runs ``lmc.compiler.build.build`` in a fresh child process, so its peak RSS (VmHWM) is the build's
own; a thread in the child samples VmRSS and names the stage (pass, calibration, save, verification) where
the peak was reached, with its mapped-file and anonymous parts (`LMC_BENCH_TRACE=FILE`: a line a second).
Modes (one at a time — never two large builds at once):

- ``exact``: one-shot decode step, ``--input-shape input_ids=1x1 attention_mask=1x129 position_ids=1x1
  past_key_values.*=1x4x128x64`` (every ``past_key_values.*`` input of the model bound to that shape);
- ``int8`` / ``int4``: the same with ``--quantize``; ``int4-calib`` adds ``--calib`` with 8 random decode
  steps (written to ``bench/_work/``: token ids, positions and random caches of the bound shapes);
- ``context``: the generation bundle ``--context 512`` (compiled at two sequence lengths);
- ``ort-int4``: onnxruntime's own ``MatMulNBitsQuantizer`` (default settings) on the same model, saved
  with external data — for comparison.

The table gives peak RSS over the model's weight bytes (its external data on disk) and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from measures import status  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "_work" / "tinyllama" / "model.onnx"
MODES = ("exact", "int8", "int4", "int4-calib", "context", "ort-int4")
PAST_SHAPE = (1, 4, 128, 64)


def write_model(folder: Path, gib: float) -> Path:
    """x[1, 8192] → MatMul(w1) → Relu → MatMul(w2), ``gib`` GiB of fp32 weights written straight to
    ``big.data`` a slice at a time (page-aligned, as exporters write them): models larger than this
    machine's memory can be made."""
    d = 8192
    hidden = int(gib * 2**30 / 4 / (2 * d))
    rng = np.random.default_rng(0)
    inits, offset = [], 0
    with open(folder / "big.data", "wb") as f:
        for name, (rows, cols) in (("w1", (d, hidden)), ("w2", (hidden, d))):
            offset = -(-offset // 4096) * 4096
            f.seek(offset)
            step = max(1, (64 << 20) // (4 * cols))
            for r in range(0, rows, step):
                f.write((rng.standard_normal((min(step, rows - r), cols), dtype=np.float32) * 0.01).tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, cols],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "big.data"), ("offset", str(offset)), ("length", str(rows * cols * 4))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
            offset += rows * cols * 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "big", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------------------------- child
def child(spec: dict) -> None:
    """Run one build (or onnxruntime's quantizer) and print a JSON line: seconds, peak, peak stage."""
    import threading

    stage = ["load"]
    peak = [0, "load"]
    done = threading.Event()

    trace = os.environ.get("LMC_BENCH_TRACE")          # a file: one line a second (time, stage, RSS split)
    split = {}

    def sample():
        last = 0.0
        while not done.wait(0.05):
            rss = status("VmRSS")
            if rss > peak[0]:
                peak[0], peak[1] = rss, stage[0]
                split.update(file=status("RssFile"), anon=status("RssAnon"))
            if trace and time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                with open(trace, "a") as f:
                    f.write(f"{last:.0f} {stage[0]} rss={rss >> 20} file={status('RssFile') >> 20} "
                            f"anon={status('RssAnon') >> 20} MiB\n")

    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    info: dict = {}
    if spec["mode"] == "ort-int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(spec["model"])
        stage[0] = "quantize"
        quant = MatMulNBitsQuantizer(model)
        quant.process()
        stage[0] = "save"
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        quant.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    else:
        from lmc.compiler.build import BuildOptions, QuantizeMode, build
        from lmc.targets import emit

        def on_pass(record):
            stage[0] = f"after {record.name}"

        def progress(what, i, n):
            stage[0] = what

        real_stage = emit.stage_model
        import lmc.compiler.build as build_module

        def staging(*args, **kwargs):
            stage[0] = "save"
            return real_stage(*args, **kwargs)

        build_module.emit.stage_model = staging
        for name in ("compare_models", "compare_generation"):
            real = getattr(build_module, name, None)
            if real is None:
                import lmc.compiler.verify as verify_module
                real = getattr(verify_module, name)

            def verifying(*args, _real=real, **kwargs):
                stage[0] = "verify"
                return _real(*args, **kwargs)

            if hasattr(build_module, name):
                setattr(build_module, name, verifying)
            else:
                import lmc.compiler.verify as verify_module
                setattr(verify_module, name, verifying)
        options = BuildOptions(target=spec["target"], input_shapes=spec.get("shapes") or {},
                               quantize=QuantizeMode(spec.get("quantize", "none")), calib=spec.get("calib"),
                               context=spec.get("context"))
        result = build(spec["model"], options, spec["out"], on_pass=on_pass, progress=progress)
        info = {"weights_after": result.weight_bytes_after,
                "max_rel": result.verification.max_rel if result.verification else None}
    seconds = time.perf_counter() - t
    done.set()
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    info["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    print(json.dumps({"seconds": seconds, "peak": max(status("VmHWM"), peak[0]), "peak_stage": peak[1], "peak_file": split.get("file"), "peak_anon": split.get("anon"), **info}))


# ------------------------------------------------------------------------------------------ driver
def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def _weights(model: Path) -> int:
    proto = onnx.load(str(model), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data)
    return total


def shapes_for(model: Path) -> dict[str, list[int]]:
    """``input_ids=1x1 attention_mask=1x129 position_ids=1x1 past_key_values.*=1x4x128x64``."""
    proto = onnx.load(str(model), load_external_data=False)
    shapes = {"input_ids": [1, 1], "attention_mask": [1, PAST_SHAPE[2] + 1], "position_ids": [1, 1]}
    for i in proto.graph.input:
        if i.name.startswith("past_key_values."):
            shapes[i.name] = list(PAST_SHAPE)
    return shapes


def write_calibration(path: Path, shapes: dict[str, list[int]], samples: int = 8) -> None:
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, 32000, (samples, 1, 1), dtype=np.int64),
              "attention_mask": np.ones((samples, *shapes["attention_mask"]), np.int64),
              "position_ids": np.full((samples, 1, 1), PAST_SHAPE[2], np.int64)}
    for name, dims in shapes.items():
        if name.startswith("past_key_values."):
            arrays[name] = rng.standard_normal((samples, *dims), dtype=np.float32)
    np.savez(path, **arrays)


def run_mode(mode: str, model: Path, work: Path, target: str) -> dict:
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    spec: dict = {"mode": mode, "model": str(model), "out": str(out), "target": target}
    if mode == "context":
        spec["context"] = 512
    else:
        spec["shapes"] = shapes_for(model)
    if mode in ("int8", "int4", "int4-calib"):
        spec["quantize"] = mode.split("-")[0]
    if mode == "int4-calib":
        calib = work / "tinyllama-calib.npz"
        write_calibration(calib, spec["shapes"])
        spec["calib"] = str(calib)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"mode": mode, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return {"mode": mode, **json.loads(lines[-1])}


COMMANDS = {
    "exact": "lmc build M --input-shape input_ids=1x1 attention_mask=1x129 position_ids=1x1 "
             "past_key_values.*=1x4x128x64",
    "int8": "… --quantize int8", "int4": "… --quantize int4", "int4-calib": "… --quantize int4 --calib (8 decode steps)",
    "context": "lmc build M --context 512",
    "ort-int4": "onnxruntime MatMulNBitsQuantizer (defaults: 4 bits, block 128, asymmetric)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--target", default="x86-64")
    parser.add_argument("--gib", type=float, help="the synthetic two-MatMul model of this size instead")
    parser.add_argument("--keep")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.gib:
        return synthetic(args.gib, args.keep)
    model = Path(args.model)
    if not model.is_file():
        sys.exit(f"{model}: not found; write it with python bench/make_tinyllama.py")
    weights = _weights(model)
    work = HERE / "_work"
    work.mkdir(exist_ok=True)
    print(f"{model}: {weights / 2**30:.2f} GiB of weights", flush=True)
    rows = []
    for mode in args.modes.split(","):
        if _available() < 12 * 2**30:
            print(f"{mode}: waiting for 12 GiB of available memory", flush=True)
            while _available() < 12 * 2**30:
                time.sleep(10)
        r = run_mode(mode, model, work, args.target)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| mode | command | build time (wall) | CPU time | peak RSS | peak / weights | peak reached in |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {COMMANDS.get(r['mode'], '')} | — | — | — | — | {r['error']} |")
            continue
        print(f"| {r['mode']} | {COMMANDS.get(r['mode'], '')} | {r['seconds']:.0f} s | {r.get('cpu_seconds', 0):.0f} s "
              f"| {r['peak'] / 2**30:.2f} GiB "
              f"| {r['peak'] / weights:.2f}× | {r['peak_stage']} |")


def synthetic(gib: float, keep: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lmc-big-"))
    try:
        path = write_model(tmp, gib)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        spec = {"mode": "exact", "model": str(path), "out": str(tmp / "out"), "target": "x86-64"}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        seconds, peak = info["seconds"], info["peak"]
        print("| model on disk | build time | bundle weights | verified max rel err | build process peak RSS | peak / weights |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {size / 2**30:.2f} GiB | {seconds:.1f} s | {(tmp / 'out' / 'model.weights').stat().st_size / 2**30:.2f} GiB"
              f" | {info['max_rel']:.1e} | {peak / 2**30:.2f} GiB | {peak / size:.2f}× |")
        if keep:
            shutil.copytree(tmp / "out", keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
