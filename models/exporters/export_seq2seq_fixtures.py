"""Write small encoder–decoder models exported by optimum, so lmc's encoder–decoder generation bundles are tested
against genuine exporter output without torch at test time.

Run ``python models/exporters/export_seq2seq_fixtures.py [OUT_DIR]`` (after ``pip install -e ".[export]"``); OUT_DIR defaults to ``models/fixtures/seq2seq``. Each
model is built from a transformers config (random weights, seed 0; every 1-D parameter perturbed so norms and
biases are distinct, as in ``export_fixtures.py``; untied output projections and, for Whisper, a larger
init_std, so that greedy tokens vary with the input instead of repeating the start token), saved to a local
folder and exported by
``optimum.exporters.onnx.main_export`` into ``OUT_DIR/<name>/``:

* ``whisper-tiny`` - ``WhisperForConditionalGeneration`` (task ``automatic-speech-recognition-with-past``):
  ``encoder_model.onnx``, ``decoder_model.onnx`` and ``decoder_with_past_model.onnx`` are kept.
* ``t5-small`` - ``T5ForConditionalGeneration`` (task ``text2text-generation-with-past``):
  ``encoder_model.onnx`` and ``decoder_model_merged.onnx`` (both decoders in one file, an ``If`` on
  ``use_cache_branch``) are kept.

optimum writes all four files for each; the ones not listed are removed after validation (each layout is then
covered once). ``config.json`` and ``generation_config.json`` are kept beside them.

Validation under onnxruntime, before anything is kept (batch 1, 10 decoder tokens: the decoder start token and 9
random ones): the encoder's output fed to ``decoder_model.onnx`` gives the full run's logits; optimum's loop —
``decoder_model.onnx`` on the first 4 tokens, then ``decoder_with_past_model.onnx`` one token at a time with
``present.*.decoder.*`` fed back as ``past_key_values.*.decoder.*`` and the first step's
``present.*.encoder.*`` as ``past_key_values.*.encoder.*`` — reproduces them within 1e-4; the full run equals
torch within 1e-4; and ``decoder_model_merged.onnx`` driven the same way (``use_cache_branch`` false, then true)
equals the two-file loop within 1e-5.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))     # the sibling exporters
import export_fixtures as base  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "seq2seq"
SEED, OPSET, TOL, MAX_BYTES = base.SEED, base.OPSET, base.TOL, base.MAX_BYTES
VOCAB, HIDDEN, LAYERS, HEADS, FFN = base.VOCAB, base.HIDDEN, base.LAYERS, 4, 128
MEL_BINS, SOURCE_POSITIONS, TARGET_POSITIONS = 80, 16, 128      # Whisper: 2 × 16 = 32 input frames
T5_TEXT = 12                                                    # encoder tokens in the validation run
TOKENS, FIRST = 10, 4                                           # decoder tokens; the first step's share
MERGED_TOL = 1e-5
INIT_STD = 0.2          # Whisper's 0.02 leaves the residual stream to the token embedding: every greedy token the same
ENCODER, DECODER, WITH_PAST, MERGED = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx",
                                       "decoder_model_merged.onnx")


@dataclass
class Fixture:
    name: str
    model_class: str
    task: str
    config: str
    keep: tuple[str, ...]
    folder: Path
    files: dict[str, dict] = field(default_factory=dict)     # file -> {"bytes", "nodes", "opset", "ops"}
    errors: dict[str, float] = field(default_factory=dict)


def _specs():
    """(name, model class, config, task, dummy-shape kwargs for main_export, files kept, description)."""
    from transformers import T5Config, T5ForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

    whisper = WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                            decoder_ffn_dim=FFN, num_mel_bins=MEL_BINS, max_source_positions=SOURCE_POSITIONS,
                            max_target_positions=TARGET_POSITIONS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            decoder_start_token_id=3, suppress_tokens=[], begin_suppress_tokens=[],
                            init_std=INIT_STD, tie_word_embeddings=False)
    t5 = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                  num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, feed_forward_proj="relu", decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return [
        ("whisper-tiny", WhisperForConditionalGeneration, whisper, "automatic-speech-recognition-with-past",
         {"nb_max_frames": 2 * SOURCE_POSITIONS}, (ENCODER, DECODER, WITH_PAST),
         f"vocab {VOCAB}, d_model {HIDDEN}, {LAYERS} encoder + {LAYERS} decoder layers, {HEADS} heads, ffn {FFN}, "
         f"{MEL_BINS} mel bins × {2 * SOURCE_POSITIONS} frames (max_source_positions {SOURCE_POSITIONS}), "
         f"max_target_positions {TARGET_POSITIONS}, decoder_start_token_id 3, eos 2, init_std {INIT_STD}, untied "
         "output projection"),
        ("t5-small", T5ForConditionalGeneration, t5, "text2text-generation-with-past", {}, (ENCODER, MERGED),
         f"vocab {VOCAB}, d_model {HIDDEN}, d_kv {HIDDEN // HEADS}, {LAYERS} encoder + {LAYERS} decoder layers, "
         f"{HEADS} heads, d_ff {FFN} (relu), relative attention 32 buckets / max distance 128, "
         "decoder_start_token_id 0, eos 1, untied lm_head"),
    ]


def export(name, model_cls, config, task, shapes: dict, work: Path, dst: Path):
    import torch
    from optimum.exporters.onnx import main_export

    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    with torch.no_grad():       # distinct norms and biases, as trained (see export_fixtures.export_optimum)
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    src = work / f"{name}-src"
    model.save_pretrained(src)
    main_export(str(src), output=str(dst), task=task, opset=OPSET, device="cpu", do_validation=False,
                no_post_process=False, library_name="transformers", **shapes)
    written = sorted(p.name for p in dst.iterdir() if p.suffix == ".onnx" or "onnx_data" in p.name)
    if written != sorted([ENCODER, DECODER, WITH_PAST, MERGED]):
        raise RuntimeError(f"{name}: expected the four self-contained optimum files, got {written}")
    return model


# ---------------------------------------------------------------------------------------------------------
# validation


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _encoder_inputs(session) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    names = [i.name for i in session.get_inputs()]
    if "input_features" in names:
        return {"input_features": rng.standard_normal((1, MEL_BINS, 2 * SOURCE_POSITIONS)).astype(np.float32)}
    return {"input_ids": rng.integers(2, VOCAB, (1, T5_TEXT)), "attention_mask": np.ones((1, T5_TEXT), np.int64)}


def _decoder_feeds(session, values: dict) -> dict:
    """The values ``session`` takes, by input name (the encoder's attention mask as ``encoder_attention_mask``)."""
    return {i.name: values[i.name] for i in session.get_inputs()}


def optimum_loop(folder: Path, enc_inputs: dict, ids: np.ndarray, first: int, merged: bool) -> np.ndarray:
    """Logits [1, T, V] of optimum's loop: the decoder without past on ``ids[:, :first]``, then the decoder with
    past one token at a time (present → past); ``merged``: one file, ``use_cache_branch`` false then true."""
    encoder = _session(folder / ENCODER)
    hidden = encoder.run(None, enc_inputs)[0]
    mask = enc_inputs.get("attention_mask")
    values = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
    if merged:
        step = _session(folder / MERGED)
        cached = step
        heads, depth = _past_dims(step)
        for i in range(LAYERS):
            for kind in ("key", "value"):
                values[f"past_key_values.{i}.decoder.{kind}"] = np.zeros((1, heads, 0, depth), np.float32)
                values[f"past_key_values.{i}.encoder.{kind}"] = np.zeros((1, heads, hidden.shape[1], depth),
                                                                         np.float32)
        values["use_cache_branch"] = np.array([False])
    else:
        step, cached = _session(folder / DECODER), _session(folder / WITH_PAST)
    logits = []
    spans = [(0, first)] + [(t, t + 1) for t in range(first, ids.shape[1])]
    session = step
    for a, b in spans:
        values["input_ids"] = ids[:, a:b]
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, _decoder_feeds(session, values))))
        logits.append(out["logits"])
        for i in range(LAYERS):
            for kind in ("key", "value"):
                values[f"past_key_values.{i}.decoder.{kind}"] = out[f"present.{i}.decoder.{kind}"]
                if a == 0:
                    values[f"past_key_values.{i}.encoder.{kind}"] = out[f"present.{i}.encoder.{kind}"]
        session = cached
        values["use_cache_branch"] = np.array([True])
    return np.concatenate(logits, axis=1)


def _past_dims(session) -> tuple[int, int]:
    shape = next(i.shape for i in session.get_inputs() if i.name == "past_key_values.0.decoder.key")
    return int(shape[1]), int(shape[3])


def validate(fx: Fixture, torch_model, start: int) -> None:
    """The loop against the full decoder run, the full run against torch, the merged file against the loop."""
    import torch

    encoder = _session(fx.folder / ENCODER)
    enc_inputs = _encoder_inputs(encoder)
    hidden = encoder.run(None, enc_inputs)[0]
    rng = np.random.default_rng(SEED + 1)
    ids = np.concatenate([[[start]], rng.integers(2, VOCAB, (1, TOKENS - 1))], axis=1).astype(np.int64)
    decoder = _session(fx.folder / DECODER)
    full = decoder.run(["logits"], _decoder_feeds(decoder, {"input_ids": ids, "encoder_hidden_states": hidden,
                                                            "encoder_attention_mask": enc_inputs.get("attention_mask")}))[0]
    loop = optimum_loop(fx.folder, enc_inputs, ids, FIRST, merged=False)
    fx.errors["loop vs full decoder run"] = float(np.abs(loop - full).max())
    merged = optimum_loop(fx.folder, enc_inputs, ids, FIRST, merged=True)
    fx.errors["merged vs two-file loop"] = float(np.abs(merged - loop).max())
    with torch.no_grad():
        kwargs = {k: torch.from_numpy(v) for k, v in enc_inputs.items()}
        ref = torch_model(**kwargs, decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
    fx.errors["full run vs torch"] = float(np.abs(ref - full).max())
    for what, err in fx.errors.items():
        limit = MERGED_TOL if what.startswith("merged") else TOL
        if not err <= limit:
            raise AssertionError(f"{fx.name}: {what} differ by {err:.3g} (> {limit:g})")


def _summarize(fx: Fixture) -> None:
    import onnx

    for name in fx.keep:
        path = fx.folder / name
        model = onnx.load(str(path))
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            raise RuntimeError(f"{fx.name}/{name}: uses external data")
        size = path.stat().st_size
        if size >= MAX_BYTES:
            raise RuntimeError(f"{fx.name}/{name}: {size} bytes, the fixtures must stay under 1 MiB each")
        fx.files[name] = {
            "bytes": size, "nodes": len(model.graph.node),
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": [(i.name, _dims(i)) for i in model.graph.input],
            "outputs": [(o.name, _dims(o)) for o in model.graph.output],
            "ops": collections.Counter(n.op_type for n in model.graph.node).most_common(8)}


def _dims(value_info) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in value_info.type.tensor_type.shape.dim) + "]"


def _io_line(entries: list[tuple[str, str]]) -> str:
    """Names with their dims, layers folded: ``past_key_values.{i}.…`` for i = 0 … LAYERS − 1."""
    shown, seen = [], set()
    for name, dims in entries:
        generic = name.replace(".0.", ".{i}.")
        if any(f".{i}." in name for i in range(1, LAYERS)):
            continue
        if generic not in seen:
            seen.add(generic)
            shown.append(f"`{generic}` {dims}")
    return ", ".join(shown)


def write_readme(out: Path, fixtures: list[Fixture]) -> None:
    v = base._versions()
    lines = [
        "# Encoder–decoder fixtures",
        "",
        "Small encoder–decoder models exported by optimum's `main_export` (random weights, fixed seed "
        f"{SEED}, every 1-D parameter perturbed), one folder each as optimum writes it, so tests can build "
        "encoder–decoder generation bundles from genuine exporter output without torch at test time.",
        "",
        "Regenerate (needs the `export` extra):",
        "",
        "```sh",
        'pip install -e ".[export]"',
        "python models/exporters/export_seq2seq_fixtures.py models/fixtures/seq2seq   "
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Layout: optimum writes `encoder_model.onnx`, `decoder_model.onnx` (no past: it computes the "
        "cross-attention keys/values from `encoder_hidden_states` and returns them as `present.{i}.encoder.*`), "
        "`decoder_with_past_model.onnx` (reads them as `past_key_values.{i}.encoder.*`, returns only "
        "`present.{i}.decoder.*`) and `decoder_model_merged.onnx` (both decoders as the branches of an `If` on "
        "`use_cache_branch`). `whisper-tiny` keeps the two decoder files, `t5-small` the merged one; the "
        "script removes the rest after validating all four, so each layout is here once. `config.json` and "
        "`generation_config.json` (decoder start and end tokens) are optimum's.",
        "",
        "Validation (the script, under onnxruntime, batch 1, 10 decoder tokens starting with the decoder start "
        f"token): optimum's loop — `decoder_model.onnx` on the first {FIRST} tokens, then "
        "`decoder_with_past_model.onnx` one token at a time, `present.*.decoder.*` fed back as past and the "
        "first step's `present.*.encoder.*` as the encoder past — reproduces the non-cached decoder run within "
        "1e-4; that run equals torch within 1e-4; the merged file driven the same way (`use_cache_branch` false, "
        "then true) equals the two-file loop within 1e-5.",
        "",
    ]
    for fx in fixtures:
        lines += [f"## `{fx.name}/`", "", f"`{fx.model_class}`, task `{fx.task}`: {fx.config}.", "",
                  "Max errors: " + ", ".join(f"{k} {e:.2e}" for k, e in fx.errors.items()) + ".", "",
                  "| file | opset | nodes | bytes | inputs | outputs |", "|---|---|---|---|---|---|"]
        for name, info in fx.files.items():
            lines.append(f"| `{name}` | {info['opset']} | {info['nodes']} | {info['bytes']} | "
                         f"{_io_line(info['inputs'])} | {_io_line(info['outputs'])} |")
        lines += ["", "Top operators:", ""]
        for name, info in fx.files.items():
            lines.append(f"- `{name}`: " + ", ".join(f"{op} {n}" for op, n in info["ops"]))
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    fixtures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls, config, task, shapes, keep, desc in _specs():
            folder = Path(tmp) / f"{name}-onnx"
            model = export(name, cls, config, task, shapes, Path(tmp), folder)
            fx = Fixture(name, cls.__name__, task, desc, keep, folder)
            validate(fx, model, int(config.decoder_start_token_id))
            _summarize(fx)
            dst = out / name
            if dst.exists():
                shutil.rmtree(dst)
            dst.mkdir(parents=True)
            for file in (*keep, "config.json", "generation_config.json"):
                shutil.copyfile(folder / file, dst / file)
            config_json = json.loads((dst / "config.json").read_text())
            config_json.pop("_name_or_path", None)          # the temporary folder it was saved to
            (dst / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
            fx.folder = dst
            fixtures.append(fx)
            errs = ", ".join(f"{k} {e:.2e}" for k, e in fx.errors.items())
            print(f"{name}: " + ", ".join(f"{f} {i['bytes']} bytes" for f, i in fx.files.items()) + f" | {errs}")
    torch.manual_seed(SEED)
    write_readme(out, fixtures)


if __name__ == "__main__":
    main()
