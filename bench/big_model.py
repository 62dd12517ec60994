"""Large-model check: a model whose weights exceed the 2 GB protobuf limit loads, compiles and saves.

    python bench/big_model.py [--gib 2.2] [--keep DIR]

Writes an MLP (MatMul → Relu → MatMul) whose two weights total ``--gib`` GiB as external data, runs
``lmc build`` on it and checks the bundle against the original under onnxruntime on one input.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper



def write_model(folder: Path, gib: float) -> Path:
    d = 8192
    hidden = int(gib * 2**30 / 4 / (2 * d))
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((d, hidden), dtype=np.float32) * 0.01)
    w2 = (rng.standard_normal((hidden, d), dtype=np.float32) * 0.01)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "big", [x], [y], [numpy_helper.from_array(w1, "w1"),
                                                                         numpy_helper.from_array(w2, "w2")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    del w1, w2
    path = folder / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="big.data")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.2)
    parser.add_argument("--keep")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmc-big-"))
    try:
        path = write_model(tmp, args.gib)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        # the build runs in a fresh process so its peak RSS is its own
        code = ("import json, time; from pathlib import Path; from lmc.compiler.build import BuildOptions, build; "
                f"t = time.perf_counter(); r = build({str(path)!r}, BuildOptions(target='x86-64'), {str(tmp / 'out')!r}); "
                "hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0]; "
                "print(json.dumps({'seconds': time.perf_counter() - t, 'max_rel': r.verification.max_rel, "
                "'peak': int(hwm.split()[1]) * 1024}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        seconds, peak = info["seconds"], info["peak"]
        print("| model on disk | build time | bundle weights | verified max rel err | build process peak RSS |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {size / 2**30:.2f} GiB | {seconds:.1f} s | {(tmp / 'out' / 'model.weights').stat().st_size / 2**30:.2f} GiB"
              f" | {info['max_rel']:.1e} | {peak / 2**30:.2f} GiB |")
        if args.keep:
            shutil.copytree(tmp / "out", args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
