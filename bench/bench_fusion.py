"""Fusion side by side: each model's exact bundle vs its original under onnxruntime, in one process run.

    python bench/bench_fusion.py [--runs 30]

Models: llama-code (when ../shared is present, seq 256) and the export-shaped builders in lmc.models
(tiny-llama, tiny-gpt2 with and without an attention_mask input, small-cnn). Per model: nodes before and
after, decomposed ops left (Pow/ReduceMean/Sqrt/Erf/Softmax/BatchNormalization), max relative error,
planned arena with and without the fusion passes, and the single-thread latency ratio bundle / original
(median of interleaved runs, ORT_ENABLE_ALL for both).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).parent))

from latency import measure  # noqa: E402

from lmc.compiler.build import BuildOptions, build  # noqa: E402
from lmc.models import Gpt2Config, build_cnn, build_gpt2, build_llama  # noqa: E402

LLAMA_CODE = Path(__file__).resolve().parents[2] / "shared" / "models" / "llama-code.onnx"
DECOMPOSED = ("Pow", "ReduceMean", "Sqrt", "Erf", "Softmax", "BatchNormalization", "Sigmoid")


def models(tmp: Path) -> list[tuple[str, Path, dict]]:
    out = []
    if LLAMA_CODE.is_file():
        out.append(("llama-code", LLAMA_CODE, {"input_ids": (1, 256)}))
    for name, model, shapes in (
        ("tiny-llama", build_llama(), {"input_ids": (1, 64)}),
        ("tiny-gpt2", build_gpt2(), {"input_ids": (1, 64)}),
        ("tiny-gpt2 + attention_mask", build_gpt2(Gpt2Config(attention_mask=True)),
         {"input_ids": (1, 64), "attention_mask": (1, 64)}),
        ("gpt2 as transformers exports it (hf-style)", build_gpt2(Gpt2Config(hf_style=True, d_model=128, layers=4,
                                                                         vocab=1024, max_positions=128)),
         {"input_ids": (1, 128)}),
        ("hf-style gpt2 + attention_mask", build_gpt2(Gpt2Config(hf_style=True, attention_mask=True, d_model=128,
                                                                 layers=4, vocab=1024, max_positions=128)),
         {"input_ids": (1, 128), "attention_mask": (1, 128)}),
        ("small-cnn", build_cnn(), {"image": (1, 3, 32, 32)}),
    ):
        path = tmp / f"{''.join(ch for ch in name if ch.isalnum())}.onnx"
        onnx.save(model, str(path))
        out.append((name, path, shapes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print("| model | nodes | decomposed ops left | max rel err | arena (no fusion → fusion) | latency bundle/original |")
    print("|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, path, shapes in models(tmp):
            fused = build(path, BuildOptions(target="cortex-a55", input_shapes=shapes), tmp / "fused")
            plain = build(path, BuildOptions(target="cortex-a55", input_shapes=shapes,
                                             disabled_passes=("fuse", "fuse-late", "fuse-mask")), tmp / "plain")
            ops = collections.Counter(n.op_type for n in onnx.load(str(tmp / "fused" / "model.onnx"),
                                                                    load_external_data=False).graph.node)
            left = ", ".join(f"{op} {ops[op]}" for op in DECOMPOSED if ops[op]) or "none"
            orig_s, bundle_s = measure(path, tmp / "fused", shapes, args.runs)
            print(f"| {name} | {fused.nodes_before} → {fused.nodes_after} | {left} | "
                  f"{fused.verification.max_rel:.1e} | {plain.plan.arena_bytes / 2**20:.2f} → "
                  f"{fused.plan.arena_bytes / 2**20:.2f} MiB | {bundle_s / orig_s:.3f} |")


if __name__ == "__main__":
    main()
