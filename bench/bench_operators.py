"""The full ONNX operator test suite (``onnx.backend.test`` node cases) through ``lmc build`` in exact mode.

Each case that onnxruntime itself can load is built for x86-64 with verification against the original:
- built: the bundle equals the original (within the verification's tolerance and the original's spread);
- user error: a clean refusal (exit 2: e.g. a data-dependent shape a static plan cannot size);
- miscompile: built, but the bundle differs from the original (exit 3);
- crash: any other exception (an exit 1).

    python bench/bench_operators.py [--every 1]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=1, help="take every N-th case")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    from lmc.compiler.build import BuildOptions, build
    from lmc.core.errors import LmcError
    from lmc.compiler.verify import VerificationFailed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        cases = collect_testcases("")[:: args.every]
    ort.set_default_logger_severity(4)     # the cases that fail do so on purpose: no runtime log lines
    counts, examples = Counter(), {}
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            try:
                ort.InferenceSession(case.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            except Exception:
                counts["onnxruntime cannot load"] += 1
                continue
            work = Path(tmp) / str(i)
            work.mkdir()
            onnx.save(case.model, str(work / "model.onnx"))
            try:
                build(work / "model.onnx", BuildOptions(target="x86-64"), work / "out")
                outcome = "built and verified"
            except VerificationFailed as exc:
                outcome = "miscompile"
                examples.setdefault(outcome, []).append(f"{case.name}: {exc}")
            except LmcError:
                outcome = "user error (exit 2)"
            except Exception as exc:  # an internal error: what the sweep is for
                outcome = "crash (exit 1)"
                examples.setdefault(outcome, []).append(f"{case.name}: {type(exc).__name__}: {str(exc)[:120]}")
            counts[outcome] += 1
    print(f"{len(cases)} cases (every {args.every})\n")
    print("| outcome | cases |\n|---|---:|")
    for outcome in ("built and verified", "user error (exit 2)", "miscompile", "crash (exit 1)",
                    "onnxruntime cannot load"):
        print(f"| {outcome} | {counts[outcome]} |")
    for outcome, items in examples.items():
        print(f"\n{outcome}:")
        for line in items[:40]:
            print(f"- {line}")


if __name__ == "__main__":
    main()
