"""Write a TinyLlama-1.1B-shaped decoder (random weights, fixed seed) as an optimum past/present export.

    python bench/make_tinyllama.py [--out bench/_work/tinyllama] [--layers 22]

LlamaConfig as TinyLlama-1.1B (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000),
weights drawn with ``torch.manual_seed(0)``, saved as a bfloat16 checkpoint (2.2 GB) and exported in fp32 by
optimum ``main_export(task="text-generation-with-past")`` with external data (4.1 GiB). The checkpoint is
written first and the model freed, so only the exporter holds weights (its peak is about twice the fp32
weights). The export runs in a child process so its peak RSS is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_checkpoint(folder: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    # initialise in bfloat16: 2.2 GB rather than 4.4 GB resident while writing the checkpoint
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(folder, safe_serialization=True)


def export(checkpoint: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), output=str(out), task="text-generation-with-past", dtype="fp32",
                device="cpu", no_post_process=True, do_validation=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "_work" / "tinyllama"))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--stage", choices=["checkpoint", "export"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    checkpoint = out.parent / (out.name + "-checkpoint")
    if args.stage == "checkpoint":
        return write_checkpoint(checkpoint, args.layers)
    if args.stage == "export":
        return export(checkpoint, out)
    for stage in ("checkpoint", "export"):
        t = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, __file__, "--out", str(out), "--layers", str(args.layers),
                        "--stage", stage], check=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(f"{stage}: {time.perf_counter() - t:.0f} s, peak RSS {peak / 2**20:.2f} GiB"
              + ("" if peak > before else " (below an earlier stage's)"), flush=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(json.dumps({"model": str(out / "model.onnx"), "bytes_on_disk": size}))


if __name__ == "__main__":
    main()
