"""Write small ONNX fixtures produced by the real exporters, so tests can check lmc's rewrite rules against
genuine exporter output without torch at test time.

Run ``python models/exporters/export_fixtures.py [OUT_DIR]`` (after ``pip install -e ".[export]"``); OUT_DIR defaults to ``models/fixtures``.
Every model has random weights from a fixed seed and a tiny config. Written:

* ``llama-past-optimum.onnx``  - transformers ``LlamaForCausalLM`` (GQA 4/2 heads, tied embeddings) exported by
  ``optimum.exporters.onnx.main_export(task="text-generation-with-past")`` from a local folder.
* ``qwen2-past-optimum.onnx``  - the same for ``Qwen2ForCausalLM`` (q/k/v projections with biases).
* ``gpt2-past-optimum.onnx``   - the same for ``GPT2LMHeadModel`` (learned positions, fused ``c_attn``).
* ``llama-past-torchscript.onnx`` / ``llama-past-dynamo.onnx`` - a hand-written Llama-style decoder
  (:class:`TinyDecoder`: RMSNorm, rotary cos/sin computed from ``position_ids``, GQA ``repeat_kv`` by
  expand+reshape, ``F.scaled_dot_product_attention`` with an explicit additive causal+padding mask, SwiGLU)
  exported by ``torch.onnx.export(dynamo=False)`` and ``torch.onnx.export(dynamo=True)``.

All have inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` and
outputs ``logits``, ``present.{i}.key/value`` with dynamic batch, sequence and past length (optimum's GPT-2
lists the past inputs before ``attention_mask``; inputs are always fed by name).

Each fixture is checked under onnxruntime before it is kept: a batch of two rows (the second left-padded by
two) runs a 5-token prefill with past length 0, then 3 one-token decode steps feeding ``present`` back as
``past``; the decode logits (and the prefill logits of non-padded positions) must equal an 8-token
full-sequence run's within 1e-4, and the full run must match the torch model within 1e-4.

Exporter notes. ``torch.onnx.export(dynamo=True)`` handles the dynamic past length: ``torch.export`` assumes
dynamic sizes are >= 2 while tracing, so the model is traced with past length 4 and sequence length 3, and the
exported graph is verified above with past length 0 (prefill) and sequence length 1 (decode). Its
``attention_mask`` axis is a symbol of its own, ``total_sequence_length`` (``torch.export.Dim`` names must be
identifiers; the exporter names the present outputs' axis ``past_sequence_length + sequence_length``). Its nodes
carry the exporter's ``metadata_props`` (fx node, stack trace with this file's path). optimum-onnx exports
through the TorchScript exporter (``dynamo=False``); both it and ``torch.onnx.export(dynamo=False)`` store the
tied embedding a second time, transposed, for the logits MatMul, while the dynamo exporter keeps one copy and a
Transpose node. transformers initialises norm weights to 1 and biases to 0, which the exporter would collapse
into one shared initializer (Identity nodes); every 1-D parameter is therefore perturbed before export.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures"
SEED = 0
OPSET = 18
MAX_BYTES = 1 << 20
TOL = 1e-4
PREFILL, DECODE = 5, 3

# The tiny config every Llama-style fixture shares.
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 256, 64, 2, 4, 2, 16, 128
RMS_EPS, ROPE_THETA, MAX_POS = 1e-5, 10000.0, 256


@dataclass
class Fixture:
    name: str
    exporter: str
    config: str
    path: Path
    opset: int = 0
    nodes: int = 0
    size: int = 0
    ops: list | None = None


# ---------------------------------------------------------------------------------------------------------
# transformers + optimum


def _hf_models():
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
                        rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=True,
                        max_position_embeddings=MAX_POS)
    qwen2 = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, rms_norm_eps=RMS_EPS,
                        rope_theta=ROPE_THETA, tie_word_embeddings=True, max_position_embeddings=MAX_POS,
                        use_sliding_window=False)
    gpt2 = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128)
    common = (f"vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads / {KV_HEADS} kv heads, head_dim "
              f"{HEAD_DIM}, intermediate {INTERMEDIATE}, rms_norm_eps {RMS_EPS:g}, rope_theta {ROPE_THETA:g}, "
              f"tied embeddings, max_position_embeddings {MAX_POS}")
    return [
        ("llama-past-optimum", LlamaForCausalLM, llama, f"LlamaForCausalLM: {common}"),
        ("qwen2-past-optimum", Qwen2ForCausalLM, qwen2, f"Qwen2ForCausalLM (q/k/v biases): {common}"),
        ("gpt2-past-optimum", GPT2LMHeadModel, gpt2,
         f"GPT2LMHeadModel: vocab {VOCAB}, n_embd {HIDDEN}, {LAYERS} layers, {HEADS} heads, n_positions 128, "
         "learned positions, fused c_attn (Conv1D), tied embeddings"),
    ]


def export_optimum(name, model_cls, config, work: Path, out: Path):
    import torch
    from optimum.exporters.onnx import main_export

    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    # transformers initialises norm weights to 1 and biases to 0; the exporter would then store one shared
    # tensor (Identity nodes) and trivial biases. Perturb every 1-D parameter so each is distinct, as trained.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    src, dst = work / f"{name}-src", work / f"{name}-onnx"
    model.save_pretrained(src)
    main_export(str(src), output=str(dst), task="text-generation-with-past", opset=OPSET, device="cpu",
                do_validation=False, no_post_process=False, library_name="transformers")
    onnx_files = sorted(p.name for p in dst.iterdir() if p.suffix == ".onnx" or "onnx_data" in p.name)
    if onnx_files != ["model.onnx"]:
        raise RuntimeError(f"{name}: expected one self-contained model.onnx, optimum wrote {onnx_files}")
    shutil.copyfile(dst / "model.onnx", out)
    return model


# ---------------------------------------------------------------------------------------------------------
# hand-written decoder for torch.onnx.export


def _decoder_module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def repeat_kv(x, n_rep):
        b, kvh, t, d = x.shape
        return x[:, :, None, :, :].expand(b, kvh, n_rep, t, d).reshape(b, kvh * n_rep, t, d)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(HIDDEN, RMS_EPS)
            self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
            self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
            self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
            self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
            self.post_attention_layernorm = RMSNorm(HIDDEN, RMS_EPS)
            self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
            self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
            self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

        def forward(self, x, cos, sin, mask, past_k, past_v):
            b, s, _ = x.shape
            h = self.input_layernorm(x)
            q = self.q_proj(h).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            k = self.k_proj(h).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = self.v_proj(h).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            n_rep = HEADS // KV_HEADS
            a = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
            x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))
            h = self.post_attention_layernorm(x)
            x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
            return x, k, v

    class TinyDecoder(nn.Module):
        """forward(input_ids, attention_mask, position_ids, past_k_0, past_v_0, past_k_1, past_v_1)
        -> (logits, present_k_0, present_v_0, present_k_1, present_v_1)"""

        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.norm = RMSNorm(HIDDEN, RMS_EPS)
            inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def forward(self, input_ids, attention_mask, position_ids, past_k_0, past_v_0, past_k_1, past_v_1):
            past = (past_k_0, past_v_0, past_k_1, past_v_1)  # LAYERS == 2
            b, s = input_ids.shape
            x = self.embed_tokens(input_ids)
            # Rotary: cos/sin of position_ids * inv_freq, shape [b, 1, s, head_dim].
            freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[:, None], emb.sin()[:, None]
            # Additive mask [b, 1, s, total]: key j is visible to query i iff j <= past + i and attention_mask[j].
            total = attention_mask.shape[1]
            k_pos = torch.arange(total, device=input_ids.device)
            q_pos = torch.arange(s, device=input_ids.device) + (total - s)
            causal = k_pos[None, :] <= q_pos[:, None]
            visible = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
            mask = torch.where(visible, torch.zeros((), dtype=x.dtype), torch.finfo(x.dtype).min)
            presents = []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
                presents += [k, v]
            logits = self.norm(x) @ self.embed_tokens.weight.t()
            return (logits, *presents)

    # Stable names in the dynamo exporter's node metadata, however the script is invoked.
    for cls in (RMSNorm, Layer, TinyDecoder):
        cls.__module__, cls.__qualname__ = "lmc.models.export_fixtures", cls.__name__
    return TinyDecoder


def _io_names():
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(LAYERS):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _example_args(batch=2, seq=3, past=4):
    import torch

    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, KV_HEADS, past, HEAD_DIM, generator=g) for _ in range(2 * LAYERS)]
    return (ids, mask, pos, *kv)


def export_torch(model, out: Path, dynamo: bool):
    import torch

    inputs, outputs = _io_names()
    args = _example_args()
    if dynamo:
        Dim = torch.export.Dim
        batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
        shapes = [{0: batch, 1: seq}, {0: batch, 1: Dim("total_sequence_length")}, {0: batch, 1: seq}]
        shapes += [{0: batch, 2: past}] * (2 * LAYERS)
        program = torch.onnx.export(model, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=tuple(shapes), opset_version=OPSET, external_data=False,
                                    optimize=True, verbose=False)
        program.save(str(out), external_data=False)
    else:
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
                "position_ids": {0: "batch_size", 1: "sequence_length"},
                "logits": {0: "batch_size", 1: "sequence_length"}}
        for name in inputs[3:]:
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
        for name in outputs[1:]:
            axes[name] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
        torch.onnx.export(model, args, str(out), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)


# ---------------------------------------------------------------------------------------------------------
# validation


def _test_batch():
    """Two rows of 8 tokens; the second is left-padded by two. Position ids as transformers derives them."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, VOCAB, size=(2, PREFILL + DECODE), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
    return ids, mask, pos


def _feed(session, ids, mask, pos, past):
    names = [i.name for i in session.get_inputs()]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(LAYERS):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[i]
    assert set(feed) == set(names), (sorted(feed), names)
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(None, feed)))
    presents = [(values[f"present.{i}.key"], values[f"present.{i}.value"]) for i in range(LAYERS)]
    return values["logits"], presents


def validate(path: Path, torch_model) -> float:
    """Prefill + decode under onnxruntime against a full-sequence run (and against torch); returns max error."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask, pos = _test_batch()
    shape = next(i.shape for i in session.get_inputs() if i.name == "past_key_values.0.key")
    kv_heads, head_dim = int(shape[1]), int(shape[3])
    empty = np.zeros((ids.shape[0], kv_heads, 0, head_dim), np.float32)
    full, _ = _feed(session, ids, mask, pos, [(empty, empty)] * LAYERS)

    logits, past = _feed(session, ids[:, :PREFILL], mask[:, :PREFILL], pos[:, :PREFILL], [(empty, empty)] * LAYERS)
    valid = mask[:, :PREFILL].astype(bool)
    err = float(np.abs(logits - full[:, :PREFILL])[valid].max())
    for t in range(PREFILL, PREFILL + DECODE):
        logits, past = _feed(session, ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past)
        err = max(err, float(np.abs(logits[:, 0] - full[:, t]).max()))
    if err > TOL:
        raise AssertionError(f"{path.name}: prefill+decode logits differ from the full run by {err:.3g}")

    with torch.no_grad():
        t_ids, t_mask, t_pos = (torch.from_numpy(a) for a in (ids, mask, pos))
        if hasattr(torch_model, "config"):  # transformers
            ref = torch_model(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos).logits.numpy()
        else:
            t_empty = torch.zeros(ids.shape[0], kv_heads, 0, head_dim)
            ref = torch_model(t_ids, t_mask, t_pos, *[t_empty] * (2 * LAYERS))[0].numpy()
    valid = mask.astype(bool)
    torch_err = float(np.abs(ref - full)[valid].max())
    if torch_err > TOL:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch by {torch_err:.3g}")
    return max(err, torch_err)


# ---------------------------------------------------------------------------------------------------------


def _summarize(fx: Fixture) -> None:
    import onnx

    model = onnx.load(str(fx.path))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise RuntimeError(f"{fx.path.name}: uses external data")
    fx.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fx.nodes = len(model.graph.node)
    fx.size = fx.path.stat().st_size
    fx.ops = collections.Counter(n.op_type for n in model.graph.node).most_common()
    if fx.size >= MAX_BYTES:
        raise RuntimeError(f"{fx.path.name}: {fx.size} bytes, the fixtures must stay under 1 MiB")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "-"
    return found


PATTERNS = """
- **optimum (Llama, Qwen2, GPT-2), one boolean mask for all layers.** `cache_position = Range(past, past+seq)`,
  `kv_idx = Range(0, past+seq)`; causal = `LessOrEqual(kv_idx[None,None,None,:], cache_position[None,None,:,None])`
  -> Cast(bool) -> `And(ConstantOfShape(true), .)`; padding = `attention_mask` Cast(bool) -> `Flatten(axis=2)`
  -> `Gather` at `batch_idx*L + kv_idx` -> Reshape -> Cast(bool); `And` -> `Expand` to [B,1,S,L]. Per layer:
  `Slice(mask, 0:kv_len, axis 3)` -> `Where(mask, 0, -inf)` -> `Add(scores, .)` -> `Softmax(-1)` ->
  `IsNaN` -> `Where(isnan, 0, probs)` -> `MatMul(., V)`.
- **optimum Llama/Qwen2 attention.** q/k/v `MatMul` (Qwen2: `Add(bias, .)`) -> Reshape [B,S,-1,16] ->
  Transpose(0,2,1,3); `Concat(past, k_rot, axis=-2)` = `present.i.key`; repeat_kv on present k and v:
  `Unsqueeze(2)` -> `Expand` ([B,kv,2,T,D], shape from Shape/Gather/Concat and a `Where(shape==-1, 1, shape)`
  guard) -> Reshape [B,kv*2,T,D]; scores = `MatMul(Mul(q, 0.5), Mul(Transpose(k, 0,1,3,2), 0.5))` (sqrt of
  1/sqrt(head_dim) on both sides, constants).
- **optimum Llama/Qwen2 rotary, once for all layers.** inv_freq [1,8,1] -> `Expand` [B,8,1] -> Cast ->
  `MatMul(., Cast(Unsqueeze(position_ids, 1)))` -> Transpose(0,2,1) -> `Concat(f, f, -1)` -> `Cos`/`Sin` ->
  `Mul(., 1.0)` (attention_scaling) -> Cast; per layer `Unsqueeze(., 1)` and `q*cos + rotate_half(q)*sin`,
  rotate_half = `Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2), -1)` with D/2 computed from Shape(x)[3] / 2.
- **optimum GPT-2.** `Gather(wpe, position_ids)` added to `Gather(wte, input_ids)`; `LayerNormalization`;
  Conv1D = Reshape to 2-D -> `Gemm` -> Reshape; `Split([64,64,64], axis 2)` of c_attn; no repeat_kv; the scale
  is computed at run time: Shape(q) -> Slice(-1:) -> Cast -> Sqrt -> `Div(1, .)` -> Cast -> Sqrt, then `Mul` on
  q and on `Transpose(present.key, 0,1,3,2)`; GELU tanh expanded (Mul 0.5, Pow 3, Mul 0.044715, Add, Mul
  0.79788, Tanh, Add 1, Mul).
- **torch.onnx.export, dynamo=False (TinyDecoder).** Rotary: `Unsqueeze(position_ids, 2)` -> Cast -> `Mul`
  inv_freq [1,1,8] -> Concat -> Cos/Sin -> Unsqueeze(1); rotate_half as in optimum. Float additive mask:
  `LessOrEqual(Range(0,L)[None,:], (Range(0,S) + (L-S))[:,None])` -> Unsqueeze x2 -> `And` Cast(bool) of the
  unsqueezed attention_mask -> `Where(., 0, -3.4028235e38)`; per layer `Add` -> `Softmax` -> `MatMul` (no
  IsNaN guard). Scale computed at run time as for GPT-2; repeat_kv as in optimum. RMSNorm: Pow 2 ->
  ReduceMean -> Add eps -> Sqrt -> `Div(1, .)` -> Mul -> Mul weight.
- **torch.onnx.export, dynamo=True (TinyDecoder).** Shapes are mostly constant-folded. Rotary as above, with
  constant Slice bounds (8:, 0:8). Same float mask (`Unsqueeze` with axes [0,1] / [1,2]). SDPA: `Mul(q, 0.5)`;
  K^T as Reshape to [-1,T,D] -> Transpose(0,2,1) -> Reshape back; `Mul(kT, 0.5)` -> MatMul -> `Add(mask)` ->
  Softmax -> MatMul. repeat_kv: Unsqueeze(2) -> Expand -> Reshape(allowzero=1). RMSNorm uses `Reciprocal`
  instead of `Div(1, .)`; the logits use `Transpose(embed_tokens.weight)` at run time.
"""


def write_readme(out: Path, fixtures: list[Fixture]) -> None:
    v = _versions()
    lines = [
        "# Exporter fixtures",
        "",
        "Small decoder models with past key/values written by the real exporters (random weights, fixed seed "
        f"{SEED}), so tests can check lmc's rewrite rules against genuine exporter output without torch at test "
        "time. Every fixture is checked by the script under onnxruntime: a 5-token prefill (past length 0) "
        "plus 3 decode steps feeding `present.*` back as `past_key_values.*` reproduces an 8-token full run "
        "within 1e-4 (batch of 2, one row left-padded), and the full run matches torch within 1e-4.",
        "",
        "Regenerate (needs the `export` extra):",
        "",
        "```sh",
        'pip install -e ".[export]"',
        "python models/exporters/export_fixtures.py models/fixtures",
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "I/O: `input_ids`, `attention_mask` [batch, past+seq], `position_ids`, `past_key_values.{i}.key/value` "
        "[batch, kv_heads, past, head_dim] -> `logits`, `present.{i}.key/value`; batch, sequence and past "
        "length are dynamic.",
        "",
        "| file | exporter | opset | nodes | bytes | config |",
        "|---|---|---|---|---|---|",
    ]
    for fx in fixtures:
        lines.append(f"| `{fx.path.name}` | {fx.exporter} | {fx.opset} | {fx.nodes} | {fx.size} | {fx.config} |")
    lines += ["", "Top operators:", ""]
    for fx in fixtures:
        lines.append(f"- `{fx.path.name}`: " + ", ".join(f"{op} {n}" for op, n in fx.ops[:10]))
    lines += ["", "## Patterns rewrite rules meet", "", *PATTERNS.strip().splitlines(), ""]
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
    torch.manual_seed(SEED)
    v = _versions()
    optimum_tag = f"optimum {v['optimum']} / optimum-onnx {v['optimum-onnx']} (`main_export`, text-generation-with-past)"
    fixtures: list[tuple[Fixture, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls, config, desc in _hf_models():
            fx = Fixture(name, optimum_tag, desc, out / f"{name}.onnx")
            fixtures.append((fx, export_optimum(name, cls, config, Path(tmp), fx.path)))
    decoder_desc = ("hand-written TinyDecoder: vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, "
                    "intermediate 128 (SwiGLU), RMSNorm eps 1e-5, rope_theta 10000, tied embeddings, SDPA with "
                    "additive causal+padding mask")
    for dynamo in (False, True):
        torch.manual_seed(SEED)
        model = _decoder_module()().eval()
        kind = "dynamo" if dynamo else "torchscript"
        fx = Fixture(f"llama-past-{kind}", f"torch {v['torch']} `torch.onnx.export(dynamo={dynamo})`",
                     decoder_desc, out / f"llama-past-{kind}.onnx")
        export_torch(model, fx.path, dynamo)
        fixtures.append((fx, model))
    for fx, model in fixtures:
        err = validate(fx.path, model)
        _summarize(fx)
        top = " ".join(f"{op}:{n}" for op, n in fx.ops[:10])
        print(f"{fx.path.name}: opset {fx.opset}, {fx.nodes} nodes, {fx.size} bytes, max err {err:.2e} | {top}")
    write_readme(out, [fx for fx, _ in fixtures])


if __name__ == "__main__":
    main()
