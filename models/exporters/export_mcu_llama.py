"""Write a 260K-parameter Llama with the shape of llama2.c's ``stories260K`` (random weights) for the
microcontroller C bundle: ``mcu/llama260k-past-optimum.onnx``.

Run ``python models/exporters/export_mcu_llama.py [OUT_DIR]`` (after ``pip install -e ".[export]"``); OUT_DIR
defaults to ``models/fixtures/mcu``. ``--vocab 512`` writes the exact stories260K vocabulary instead (for the
benchmark, into a folder of its own: 1.39 MB, over the fixture limit).

Config (transformers ``LlamaConfig``): dim 64, 5 layers, 8 heads / 4 kv heads (head_dim 8), hidden 172
(SwiGLU), vocab 256 (stories260K has 512; see below), rms_norm_eps 1e-5, rope_theta 10000,
max_position_embeddings 512, tied embeddings;
random weights (seed 0) drawn with standard deviation 0.2 (``initializer_range``; transformers' 0.02 makes a
model whose greedy continuation repeats one token, which would not test the cache), every 1-D parameter
perturbed as in ``export_fixtures.py``. Exported by
``optimum.exporters.onnx.main_export(task="text-generation-with-past")`` at opset 18, so the file has the
past/present layout lmc's generation bundles take (``lmc build … --context N``) and serves the one-shot build
too (``--input-shape input_ids=1x16`` with an empty past).

The file is checked under onnxruntime before it is kept (the check ``export_fixtures.validate`` makes: a
batch of two rows, one left-padded, prefill of 5 plus 3 decode steps feeding ``present`` back as ``past``
equal an 8-token full run within 1e-4, and the full run equals torch within 1e-4). optimum stores the tied
embedding twice (the Gather table and its transpose for the logits MatMul) and its 1350 nodes take 0.21 MB:
with stories260K's vocabulary of 512 the file is 1.39 MB, over the 1.2 MiB allowed this one fixture (others stay
under 1 MiB), so the committed fixture has vocabulary 256 (244K parameters, 1.25 MB); everything else is
stories260K's shape.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # the sibling exporters
import export_fixtures as base  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "mcu"
NAME = "llama260k-past-optimum"
MAX_BYTES = int(1.2 * (1 << 20))
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 256, 64, 5, 8, 4, 172
RMS_EPS, ROPE_THETA, MAX_POS = 1e-5, 10000.0, 512
INIT_STD = 0.2


def _describe(vocab: int) -> str:
    return (f"LlamaForCausalLM (stories260K shape): vocab {vocab}, dim {DIM}, {LAYERS} layers, {HEADS} heads / "
            f"{KV_HEADS} kv heads, head_dim {DIM // HEADS}, hidden {HIDDEN} (SwiGLU), rms_norm_eps {RMS_EPS:g}, "
            f"rope_theta {ROPE_THETA:g}, max_position_embeddings {MAX_POS}, tied embeddings, "
            f"initializer_range {INIT_STD:g}")


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = list(sys.argv[1:] if argv is None else argv)
    vocab = VOCAB
    if "--vocab" in args:
        at = args.index("--vocab")
        vocab = int(args[at + 1])
        del args[at:at + 2]
    out = Path(args[0]) if args else DEFAULT_OUT
    name = NAME if vocab == VOCAB else f"llama260k-v{vocab}-past-optimum"
    desc = _describe(vocab)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=DIM // HEADS, intermediate_size=HIDDEN,
                         rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=True,
                         max_position_embeddings=MAX_POS, initializer_range=INIT_STD)
    base.LAYERS = LAYERS  # validate() feeds one past pair per layer
    v = base._versions()
    fx = base.Fixture(name, f"optimum {v['optimum']} / optimum-onnx {v['optimum-onnx']} (`main_export`, "
                      "text-generation-with-past)", desc, out / f"{name}.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        model = base.export_optimum(name, LlamaForCausalLM, config, Path(tmp), fx.path)
    params = sum(p.numel() for p in model.parameters())
    err = base.validate(fx.path, model)
    base.MAX_BYTES = MAX_BYTES + 1 if vocab == VOCAB else 1 << 30   # the fixture's limit; a benchmark copy has none
    base._summarize(fx)
    ops = ", ".join(f"{op} {n}" for op, n in fx.ops[:10])
    (out / "README.md").write_text(
        "# Microcontroller fixture\n\n"
        f"`{name}.onnx` — {desc}; {params} parameters (the tied embedding stored twice by the exporter), "
        f"random weights (seed {base.SEED}). Written by {fx.exporter}, opset {fx.opset}, {fx.nodes} nodes, "
        f"{fx.size} bytes. Checked under onnxruntime: prefill + decode equal a full run and torch within "
        f"{base.TOL:g} (max error {err:.2g}).\n\n"
        "Regenerate (needs the `export` extra):\n\n```sh\npip install -e \".[export]\"\n"
        "python models/exporters/export_mcu_llama.py models/fixtures/mcu\n```\n\n"
        "stories260K has vocabulary 512; with it the file is 1.39 MB, over the fixture limit (`--vocab 512 DIR` "
        "writes it elsewhere, for the benchmark).\n\n"
        f"Versions: {', '.join(f'{k} {val}' for k, val in v.items())}.\n\nTop operators: {ops}.\n")


if __name__ == "__main__":
    main()
