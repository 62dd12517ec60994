"""Predicted vs measured runtime memory: the plan's ``runtime.predicted_peak_bytes`` against onnxruntime's real
peak RSS, for every model the bench knows and every ``--quantize`` mode.

Measured, in a fresh process per bundle with one onnxruntime thread: the peak RSS (VmHWM) of loading the
bundle (under its session_options.json) and running it twice, minus the RSS after the imports — the same
"above the process before the session" the prediction is about (it includes the runtime's own session
cost, itemised in the plan).

    python bench/bench_memory.py [--out bench/_work/memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def worker(model: str, feeds: str) -> dict:
    import onnxruntime as ort

    from lmc.compiler.runtime import apply_session_options, bundle_session_options

    data = dict(np.load(feeds))
    base = _status("VmRSS:")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    apply_session_options(opts, bundle_session_options(model))      # what the bundle's plan assumes
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    for _ in range(2):
        sess.run(None, data)
    return {"peak": _status("VmHWM:") - base}


def measure(model: Path, feeds: dict, work: Path) -> int:
    path = work / "feeds.npz"
    np.savez(path, **feeds)
    done = subprocess.run([sys.executable, __file__, "--worker", str(model), str(path)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def cases(work: Path):
    """(label, model path, input shapes, calibration npz or None)."""
    import onnx

    from lmc.models import build_cnn, build_gpt2, build_llama

    llama_code = SHARED / "models" / "llama-code.onnx"
    calib = work / "calib.npz"
    if llama_code.is_file():
        ids = np.fromfile(str(SHARED / "data" / "code-calib.u16"), dtype="<u2").reshape(-1, 256)[:16]
        np.savez(calib, input_ids=ids.astype(np.int64)[:, None, :])
        yield "llama-code 1×256", llama_code, {"input_ids": (1, 256)}, calib
    for name, builder, shape in (("tiny-gpt2", build_gpt2, {"input_ids": (1, 64)}),
                                 ("tiny-llama", build_llama, {"input_ids": (1, 64)}),
                                 ("small-cnn", build_cnn, {"image": (1, 3, 32, 32)})):
        path = work / f"{name}.onnx"
        onnx.save(builder(), str(path))
        yield name, path, shape, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from lmc.compiler.build import BuildOptions, QuantizeMode, build
    from lmc.compiler.verify import random_inputs

    print("| model | mode | predicted | measured | measured / predicted | largest predicted items |")
    print("|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, path, shapes, calib in cases(work):
            for mode in QuantizeMode:
                if mode is QuantizeMode.W8A8 and calib is None:
                    continue
                if mode is not QuantizeMode.NONE and label == "small-cnn" and mode is QuantizeMode.INT4:
                    continue
                out = work / f"{label}-{mode.value}".replace(" ", "_").replace("×", "x")
                try:
                    build(path, BuildOptions(target="x86-64", input_shapes=shapes, quantize=mode,
                                             calib=str(calib) if calib and mode is not QuantizeMode.NONE else None,
                                             verify=False), out)
                except Exception as exc:  # a mode a model cannot take: say so in the table
                    print(f"| {label} | {mode.value} | — | — | — | {str(exc).splitlines()[0][:80]} |")
                    continue
                plan = json.loads((out / "plan.json").read_text())
                predicted = plan["runtime"]["predicted_peak_bytes"]
                feeds = random_inputs(out / "model.onnx", {k: list(v) for k, v in shapes.items()})[0]
                measured = measure(out / "model.onnx", feeds, work)
                items = sorted(plan["runtime"]["items"].items(), key=lambda kv: -kv[1])[:3]
                print(f"| {label} | {mode.value} | {predicted / 1e6:.1f} MB | {measured / 1e6:.1f} MB | "
                      f"{measured / predicted:.2f} | " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in items) + " |")


if __name__ == "__main__":
    main()
