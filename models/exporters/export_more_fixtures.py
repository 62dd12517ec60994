"""Write more small ONNX decoders with past key/values produced by optimum's exporter, one per architecture, so
lmc's generation path is tested on a wider set of genuine exporter outputs (see ``export_fixtures.py`` for the
first five).

Run ``python models/exporters/export_more_fixtures.py [OUT_DIR]`` (after ``pip install -e ".[export]"``); OUT_DIR defaults to ``models/fixtures/more``. Each model is
built from a transformers config (random weights, seed 0; every 1-D parameter perturbed so norms and biases
are distinct, as in ``export_fixtures.py``), saved to a local folder and exported by
``optimum.exporters.onnx.main_export(task="text-generation-with-past")``; ``--only NAME[,NAME]`` exports a subset.
One more, ``llama-hf-past-dynamo.onnx``, is transformers' ``LlamaForCausalLM`` exported by
``torch.onnx.export(dynamo=True)`` through a wrapper taking and returning the cache as flat tensors (a
``DynamicCache`` filled inside ``forward``), with the dynamic axes and tracing sizes ``export_fixtures.py`` uses.

Every fixture is validated under onnxruntime as ``export_fixtures.validate`` does (batch of two rows, the
second left-padded by two: a 5-token prefill plus 3 decode steps feeding ``present`` back as ``past`` equal an
8-token full run within 1e-4, and the full run equals torch within 1e-4), except that inputs the export does
not have (``position_ids`` for ALiBi models) are not fed. Architectures the exporter cannot handle are
skipped and listed, with the reason, in the README this script writes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))     # the sibling exporters
import export_fixtures as base  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "more"
SEED, OPSET, TOL = base.SEED, base.OPSET, base.TOL
PREFILL, DECODE = base.PREFILL, base.DECODE
V, H, L, I = base.VOCAB, base.HIDDEN, base.LAYERS, base.INTERMEDIATE  # 256, 64, 2, 128


def _specs():
    """(name, model class, config, description) for every architecture tried."""
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=I,
                  max_position_embeddings=256)
    specs = []

    def add(name, cls_name, cfg_name, desc, **kw):
        cls, cfg = getattr(tf, cls_name, None), getattr(tf, cfg_name, None)
        if cls is None or cfg is None:
            specs.append((name, None, None, f"transformers {tf.__version__} has no {cls_name}"))
            return
        specs.append((name, cls, cfg(**kw), f"{cls_name}: {desc}"))

    add("mistral-past-optimum", "MistralForCausalLM", "MistralConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, intermediate 128, no sliding window, "
        "untied embeddings",
        **common, num_key_value_heads=2, head_dim=16, sliding_window=None, tie_word_embeddings=False)
    add("phi3-past-optimum", "Phi3ForCausalLM", "Phi3Config",
        "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, fused qkv_proj and gate_up_proj, "
        "untied embeddings",
        **common, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        original_max_position_embeddings=256)
    add("phi-past-optimum", "PhiForCausalLM", "PhiConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads (MHA), head_dim 16, partial_rotary_factor 0.5 (8 of 16 dims), "
        "LayerNorm, parallel attention/MLP, q/k/v/dense biases, gelu_new, untied embeddings with lm_head bias",
        **common, num_key_value_heads=4, partial_rotary_factor=0.5, tie_word_embeddings=False)
    add("gpt-neox-past-optimum", "GPTNeoXForCausalLM", "GPTNeoXConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads (MHA), head_dim 16, rotary_pct 0.25 (4 of 16 dims), fused "
        "query_key_value (per-head interleaved), use_parallel_residual, LayerNorm, gelu, untied embeddings",
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=I,
        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    add("gemma-past-optimum", "GemmaForCausalLM", "GemmaConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, RMSNorm (1 + w), embeddings scaled by "
        "sqrt(hidden), gelu_pytorch_tanh GeGLU, tied embeddings",
        **common, num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    add("gemma2-past-optimum", "Gemma2ForCausalLM", "Gemma2Config",
        "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, query_pre_attn_scalar 16, attention "
        "soft-capping 50, final logit soft-capping 30, sliding window 4096 on even layers, pre/post norms, tied",
        **common, num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        query_pre_attn_scalar=16, sliding_window=4096)
    add("stablelm-past-optimum", "StableLmForCausalLM", "StableLmConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, partial_rotary_factor 0.25 (4 of 16 "
        "dims), LayerNorm, no qkv bias, untied embeddings",
        **common, num_key_value_heads=2, partial_rotary_factor=0.25, tie_word_embeddings=False)
    add("opt-past-optimum", "OPTForCausalLM", "OPTConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads (MHA), head_dim 16, ffn_dim 128, learned positions (offset 2), "
        "pre-LayerNorm, relu, q/k/v biases, tied embeddings",
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, ffn_dim=I,
        word_embed_proj_dim=H, max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    add("falcon-past-optimum", "FalconForCausalLM", "FalconConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads / 1 kv head (multi-query), head_dim 16, rotary, fused "
        "query_key_value, parallel attention/MLP, one LayerNorm, no biases, tied embeddings",
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, alibi=False, bias=False, max_position_embeddings=256)
    add("bloom-past-optimum", "BloomForCausalLM", "BloomConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads (MHA), head_dim 16, ALiBi (no position_ids), embedding "
        "LayerNorm, fused query_key_value, tied embeddings",
        vocab_size=V, hidden_size=H, n_layer=L, n_head=4)
    add("llama-hd12-past-optimum", "LlamaForCausalLM", "LlamaConfig",
        "SmolLM-style: vocab 256, hidden 48, 2 layers, 4 heads / 2 kv heads, head_dim 12 (not a multiple of 8), "
        "intermediate 128, tied embeddings",
        vocab_size=V, hidden_size=48, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, intermediate_size=I, max_position_embeddings=256, tie_word_embeddings=True)
    add("llama-mha-untied-past-optimum", "LlamaForCausalLM", "LlamaConfig",
        "vocab 256, hidden 64, 2 layers, 4 heads / 4 kv heads (MHA), head_dim 16, intermediate 128, untied "
        "embeddings (separate lm_head)",
        **common, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False)
    add("qwen3-past-optimum", "Qwen3ForCausalLM", "Qwen3Config",
        "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, q_norm/k_norm (RMSNorm per head), "
        "no sliding window, tied embeddings",
        **common, num_key_value_heads=2, head_dim=16, use_sliding_window=False, tie_word_embeddings=True)
    return specs


# ---------------------------------------------------------------------------------------------------------
# transformers LlamaForCausalLM through torch.onnx.export(dynamo=True)

DYNAMO_NAME = "llama-hf-past-dynamo"
DYNAMO_DESC = ("LlamaForCausalLM (transformers, sdpa) wrapped to take/return the cache as tensors (a DynamicCache "
               "filled with `update` inside forward): vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, "
               "head_dim 16, intermediate 128, rms_norm_eps 1e-05, rope_theta 10000, tied embeddings")


def export_dynamo(out: Path):
    """``torch.onnx.export(dynamo=True)`` of a transformers Llama whose cache is passed as flat tensors; traced
    with batch 2, past 4, sequence 3 (torch.export assumes dynamic sizes >= 2), as export_fixtures does."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=I, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))

    class CacheAsTensors(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, past_k_0, past_v_0, past_k_1, past_v_1):
            past = (past_k_0, past_v_0, past_k_1, past_v_1)  # L == 2
            cache = DynamicCache()
            for i in range(L):
                cache.update(past[2 * i], past[2 * i + 1], i)
            result = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = result.past_key_values
            return (result.logits, *[t for i in range(L) for t in (present.layers[i].keys,
                                                                    present.layers[i].values)])

    CacheAsTensors.__module__ = "lmc.models.export_more_fixtures"
    wrapper = CacheAsTensors(model).eval()
    g = torch.Generator().manual_seed(SEED)
    b, s, p = 2, 3, 4
    args = (torch.randint(0, V, (b, s), generator=g), torch.ones(b, p + s, dtype=torch.int64),
            torch.arange(p, p + s).expand(b, s).contiguous(),
            *[torch.randn(b, 2, p, 16, generator=g) for _ in range(2 * L)])
    Dim = torch.export.Dim
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim("total_sequence_length")}, {0: batch, 1: seq},
              *[{0: batch, 2: past}] * (2 * L))
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(L):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    program = torch.onnx.export(wrapper, args, dynamo=True, input_names=inputs, output_names=outputs,
                                dynamic_shapes=shapes, opset_version=OPSET, external_data=False, optimize=True,
                                verbose=False)
    program.save(str(out), external_data=False)
    return model


# ---------------------------------------------------------------------------------------------------------
# validation (export_fixtures.validate, with only the inputs the export has)


def _feed(session, ids, mask, pos, past):
    names = {i.name for i in session.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feed = {k: v for k, v in feed.items() if k in names}
    for i, (k, v) in enumerate(past):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    assert set(feed) == names, (sorted(feed), sorted(names))
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(None, feed)))
    presents = [(values[f"present.{i}.key"], values[f"present.{i}.value"]) for i in range(len(past))]
    return values["logits"], presents


def validate(path: Path, torch_model) -> float:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layers = sum(1 for i in session.get_inputs() if i.name.startswith("past_key_values") and i.name.endswith(".key"))
    ids, mask, pos = base._test_batch()
    shape = next(i.shape for i in session.get_inputs() if i.name == "past_key_values.0.key")
    kv_heads, head_dim = int(shape[1]), int(shape[3])
    empty = np.zeros((ids.shape[0], kv_heads, 0, head_dim), np.float32)
    full, _ = _feed(session, ids, mask, pos, [(empty, empty)] * layers)

    logits, past = _feed(session, ids[:, :PREFILL], mask[:, :PREFILL], pos[:, :PREFILL], [(empty, empty)] * layers)
    valid = mask[:, :PREFILL].astype(bool)
    err = float(np.abs(logits - full[:, :PREFILL])[valid].max())
    for t in range(PREFILL, PREFILL + DECODE):
        logits, past = _feed(session, ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past)
        err = max(err, float(np.abs(logits[:, 0] - full[:, t]).max()))
    if err > TOL:
        raise AssertionError(f"{path.name}: prefill+decode logits differ from the full run by {err:.3g}")
    with torch.no_grad():
        kwargs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if "position_ids" in {i.name for i in session.get_inputs()}:
            kwargs["position_ids"] = torch.from_numpy(pos)
        ref = torch_model(**kwargs).logits.numpy()
    torch_err = float(np.abs(ref - full)[mask.astype(bool)].max())
    if torch_err > TOL:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch by {torch_err:.3g}")
    return max(err, torch_err)


# ---------------------------------------------------------------------------------------------------------


PATTERNS = """
- **Gemma / Gemma2 (optimum): no `position_ids` input** (optimum's Gemma config is a plain text-decoder config).
  `past_len = Shape(past_key_values.0.key)[2]`, `total = past_len + Shape(input_ids)[1]`;
  `cache_position = Range(past_len, total)` -> `Unsqueeze(0)` = position_ids, feeding both the rotary
  (`inv_freq` `MatMul` -> Transpose -> Concat -> Cos/Sin) and the causal mask (`LessOrEqual` against
  `Range(0, total)`); the embedding is multiplied by sqrt(hidden) and RMSNorm by `(1 + w)`. Gemma2 adds
  `query_pre_attn_scalar`, pre/post-feedforward norms and the final logit soft-capping (`Div 30 -> Tanh ->
  Mul 30`); its attention soft-capping is not in the export (transformers' sdpa path, used by both the
  export and the torch reference, leaves it out).
- **Bloom (optimum): ALiBi, heads folded into the batch.** No `position_ids`. q `Reshape [B*H, S, D]`;
  `present.key` `Reshape [B*H, -1, D]` -> `Transpose(0,2,1)`; scores `MatMul` (3-D) -> `Mul 0.25`, plus
  `Mul(alibi, 1.0)` where alibi = `slopes[H,1] * Cast((CumSum(attention_mask) - 1) * attention_mask)[:, None, :]`
  reshaped to [B*H, 1, T]; -> `Reshape [B, H, S, T]` -> `Add(Slice(mask))` (float mask from `Trilu(upper)` *
  `Greater(Range(0,T), Range(P,P+S)[:,None])`, padding applied with a `ScatterND` slice assignment and
  `Where(Equal(., 0), finfo.min, .)`) -> `Softmax` -> Cast -> `Reshape [B*H, S, T]` -> `MatMul` with
  `Reshape(present.value, [B*H, -1, D])` -> `Reshape [B, H, S, D]` -> Transpose -> Reshape [B, S, 64].
- **transformers Llama through `torch.onnx.export(dynamo=True)`.** Batch size and past length are read as
  `Shape(past_key_values.0.value, start=0, end=1)` and `Shape(., start=2, end=3)` -> `Squeeze`; the mask is
  built with `LessOrEqual`/`And`/`Expand` from `Range(past, past+seq)`, then `Where(mask, 0, -3.4028235e38)` -> `Add` ->
  `Softmax` -> `Where(IsNaN, 0, .)`; SDPA as in `../README.md` (Reshape [-1,T,D] -> Transpose -> Reshape back).
- **Partial rotary (Phi 8/16, StableLM 4/16, GPT-NeoX 4/16) and Phi3.** `Slice(x, :r)` rotated (rotate-half),
  then `Concat(rotated, Slice(x, r:), -1)`; Phi3 (full rotary) writes the same form with an empty pass-through
  slice. Phi3 splits the fused `qkv_proj` and `gate_up_proj` outputs with `Slice`; GPT-NeoX reshapes the fused
  `query_key_value` to [B, S, -1, 3D] (per-head interleaved q|k|v) and slices the last axis; Falcon (multi-query) reshapes its fused
  projection to [B, S, H + 2, D]; Qwen3 applies `q_norm`/`k_norm` (RMSNorm over head_dim) between the head
  reshape and the transpose.
- **OPT.** Learned positions `Gather(embed_positions, Add(position_ids, 2))`; q/k/v biases, MHA, no repeat_kv.
"""


def write_readme(out: Path, fixtures: list, skipped: list[tuple[str, str]]) -> None:
    v = base._versions()
    lines = [
        "# More exporter fixtures",
        "",
        "Small decoders with past key/values, one per architecture, exported by optimum's `main_export` "
        "(task `text-generation-with-past`) from a transformers model built from a tiny config (random weights, "
        f"seed {SEED}; every 1-D parameter perturbed). Each is checked by the script under onnxruntime as the "
        "fixtures one folder up are: a 5-token prefill plus 3 decode steps feeding `present.*` back as "
        "`past_key_values.*` reproduce an 8-token full run within 1e-4 (batch of 2, one row left-padded), and "
        "the full run matches torch within 1e-4.",
        "",
        "Regenerate (needs the `export` extra):",
        "",
        "```sh",
        "python models/exporters/export_more_fixtures.py models/fixtures/more",
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "I/O as in `../README.md`: `input_ids`, `attention_mask`, `position_ids` (absent for ALiBi models), "
        "`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim] -> `logits`, `present.{i}.key/value`.",
        "",
        "| file | exporter | opset | nodes | bytes | config |",
        "|---|---|---|---|---|---|",
    ]
    for fx in fixtures:
        lines.append(f"| `{fx.path.name}` | {fx.exporter} | {fx.opset} | {fx.nodes} | {fx.size} | {fx.config} |")
    lines += ["", "Top operators:", ""]
    for fx in fixtures:
        lines.append(f"- `{fx.path.name}`: " + ", ".join(f"{op} {n}" for op, n in fx.ops[:10]))
    lines += ["", "## Patterns rewrite rules meet", "", *PATTERNS.strip().splitlines()]
    if skipped:
        lines += ["", "## Not exported", ""]
        for name, why in skipped:
            lines.append(f"- `{name}`: {why}")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    only = None
    if "--only" in argv:
        k = argv.index("--only")
        only = set(argv[k + 1].split(","))
        argv = argv[:k] + argv[k + 2:]
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    v = base._versions()
    tag = f"optimum {v['optimum']} / optimum-onnx {v['optimum-onnx']} (`main_export`, text-generation-with-past)"
    done, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls, config, desc in _specs():
            if only and name not in only:
                continue
            if cls is None:
                skipped.append((name, desc))
                continue
            fx = base.Fixture(name, tag, desc, out / f"{name}.onnx")
            try:
                torch.manual_seed(SEED)
                model = base.export_optimum(name, cls, config, Path(tmp), fx.path)
                err = validate(fx.path, model)
                base._summarize(fx)
            except Exception as exc:  # record and go on: the exporter cannot handle this architecture
                traceback.print_exc()
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" if str(exc).strip() \
                    else type(exc).__name__
                skipped.append((name, why))
                fx.path.unlink(missing_ok=True)
                print(f"{name}: SKIPPED ({why})")
                continue
            done.append(fx)
            top = " ".join(f"{op}:{n}" for op, n in fx.ops[:10])
            print(f"{fx.path.name}: opset {fx.opset}, {fx.nodes} nodes, {fx.size} bytes, max err {err:.2e} | {top}")
    if only is None or DYNAMO_NAME in only:
        fx = base.Fixture(DYNAMO_NAME, f"torch {v['torch']} `torch.onnx.export(dynamo=True)` of a transformers model",
                          DYNAMO_DESC, out / f"{DYNAMO_NAME}.onnx")
        try:
            err = validate(fx.path, export_dynamo(fx.path))
            base._summarize(fx)
            done.append(fx)
            top = " ".join(f"{op}:{n}" for op, n in fx.ops[:10])
            print(f"{fx.path.name}: opset {fx.opset}, {fx.nodes} nodes, {fx.size} bytes, max err {err:.2e} | {top}")
        except Exception as exc:
            traceback.print_exc()
            skipped.append((DYNAMO_NAME, f"{type(exc).__name__}: {str(exc).strip()[:300]}"))
            fx.path.unlink(missing_ok=True)
    if only is None:
        write_readme(out, done, skipped)


if __name__ == "__main__":
    main()
