"""Write small one-shot decoder-only LMs (no KV cache) with *decomposed* attention and a dynamic sequence axis,
produced by the real exporters, so lmc can be checked on long sequences (``--input-shape input_ids=1x2048``)
against genuine exporter output without torch at test time.

Run ``python models/exporters/export_long_fixtures.py [OUT_DIR]`` (after ``pip install -e ".[export]"``); OUT_DIR defaults to ``models/fixtures/long``. Random weights
from seed 0; every model has input ``input_ids`` int64 [batch, sequence] and output ``logits`` float32
[batch, sequence, 256]. Written:

* ``llama-long-torchscript.onnx`` - :class:`LongLlama` (RMSNorm, rotary from cos/sin tables [4096, 8] sliced
  to S and duplicated (``cat((c, c), -1)``), GQA ``repeat_kv`` by expand+reshape, causal mask
  ``torch.triu(torch.full((S, S), -inf), 1)`` added to ``q @ kᵀ / sqrt(d)``, softmax, ``@ v``),
  ``torch.onnx.export(dynamo=False)``, opset 17.
* ``llama-long-dynamo.onnx`` - the same module, ``torch.onnx.export(dynamo=True)``, opset 18.
* ``llama-long-sdpa.onnx`` - the same module with ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``,
  ``torch.onnx.export(dynamo=False)``, opset 17 (the exporter decomposes SDPA).
* ``gpt2-long-buffer.onnx`` - :class:`LongGpt2`, transformers' old GPT-2 attention: stored boolean buffer
  ``bias = tril(ones(P, P, bool)).view(1, 1, P, P)`` sliced to S, ``torch.where(mask, scores,
  finfo.min)``; ``dynamo=False``, opset 17. P = 512 (see ``GPT2_POSITIONS``): a P×P bool initializer costs P²
  bytes (1 MiB at 1024), so this fixture reaches S ≤ 512 only.
* ``llama-long-transformers.onnx`` - transformers ``LlamaForCausalLM`` (eager attention, ``use_cache=False``),
  ``torch.onnx.export(dynamo=False)``, opset 17, input ``input_ids`` only.

Each is validated under onnxruntime (batch 1): at S = 16 and 256 the logits equal torch's within 1e-4; at
S = 2048 (GPT-2: S = 512, its largest) they are finite, and the error against torch is recorded.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "long"
SEED = 0
MAX_BYTES = 1 << 20
TOL = 1e-4
CHECK_LENGTHS = (16, 256)
LONG = 2048

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 256, 64, 2, 4, 2, 16, 64
RMS_EPS, ROPE_THETA, MAX_POS = 1e-5, 10000.0, 4096
GPT2_POSITIONS, GPT2_INNER = 512, 128


@dataclass
class Fixture:
    name: str
    exporter: str
    config: str
    mask: str
    opset: int = 0
    nodes: int = 0
    size: int = 0
    max_seq: int = LONG
    errors: dict = field(default_factory=dict)
    ops: list | None = None
    inputs: list | None = None


# ---------------------------------------------------------------------------------------------------------
# hand-written modules


def _modules():
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

    class Attention(nn.Module):
        def __init__(self, sdpa):
            super().__init__()
            self.sdpa = sdpa
            self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
            self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
            self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
            self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

        def forward(self, x, cos, sin, mask):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            k = self.k_proj(x).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = self.v_proj(x).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            n_rep = HEADS // KV_HEADS
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            if self.sdpa:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HEAD_DIM)
                scores = scores + mask
                a = torch.matmul(torch.softmax(scores, dim=-1), v)
            return self.o_proj(a.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))

    class LlamaLayer(nn.Module):
        def __init__(self, sdpa):
            super().__init__()
            self.input_layernorm = RMSNorm(HIDDEN, RMS_EPS)
            self.self_attn = Attention(sdpa)
            self.post_attention_layernorm = RMSNorm(HIDDEN, RMS_EPS)
            self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
            self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
            self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

        def forward(self, x, cos, sin, mask):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
            h = self.post_attention_layernorm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class LongLlama(nn.Module):
        """forward(input_ids [B, S]) -> logits [B, S, V]; one-shot, no cache."""

        def __init__(self, sdpa=False):
            super().__init__()
            self.sdpa = sdpa
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList(LlamaLayer(sdpa) for _ in range(LAYERS))
            self.norm = RMSNorm(HIDDEN, RMS_EPS)
            # cos/sin tables [max_positions, head_dim / 2], sliced to S and duplicated along the last axis
            # (rotate-half layout). Full-width tables ([4096, 16], as transformers' Llama <= 4.37 cached them)
            # would add 256 KiB to a file that must stay small.
            inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
            freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
            self.register_buffer("cos_cached", freqs.cos(), persistent=False)
            self.register_buffer("sin_cached", freqs.sin(), persistent=False)

        def forward(self, input_ids):
            s = input_ids.shape[1]
            x = self.embed_tokens(input_ids)
            cos, sin = self.cos_cached[:s], self.sin_cached[:s]
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            mask = None if self.sdpa else torch.triu(torch.full((s, s), float("-inf"), device=x.device), 1)
            for layer in self.layers:
                x = layer(x, cos, sin, mask)
            return self.norm(x) @ self.embed_tokens.weight.t()

    class Gpt2Attention(nn.Module):
        def __init__(self):
            super().__init__()
            p = GPT2_POSITIONS
            self.register_buffer("bias", torch.tril(torch.ones(p, p, dtype=torch.bool)).view(1, 1, p, p),
                                 persistent=False)
            self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.c_proj = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.c_attn(x).split(HIDDEN, dim=2)
            q, k, v = (t.view(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2) for t in (q, k, v))
            w = torch.matmul(q, k.transpose(-1, -2))
            w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
            query_length, key_length = q.size(-2), k.size(-2)
            causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
            mask_value = torch.finfo(w.dtype).min
            mask_value = torch.full([], mask_value, dtype=w.dtype, device=w.device)
            w = torch.where(causal_mask, w.to(w.dtype), mask_value)
            a = torch.matmul(torch.softmax(w, dim=-1), v)
            return self.c_proj(a.transpose(1, 2).reshape(b, s, HIDDEN))

    class Gpt2Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(HIDDEN)
            self.attn = Gpt2Attention()
            self.ln_2 = nn.LayerNorm(HIDDEN)
            self.c_fc = nn.Linear(HIDDEN, GPT2_INNER)
            self.mlp_proj = nn.Linear(GPT2_INNER, HIDDEN)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class LongGpt2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(VOCAB, HIDDEN)
            self.wpe = nn.Embedding(GPT2_POSITIONS, HIDDEN)
            self.h = nn.ModuleList(Gpt2Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(HIDDEN)
            with torch.no_grad():  # distinct norm weights/biases, as trained
                for param in self.parameters():
                    if param.dim() == 1:
                        param.add_(0.1 * torch.randn_like(param))

        def forward(self, input_ids):
            s = input_ids.shape[1]
            pos = torch.arange(0, s, dtype=torch.long, device=input_ids.device).unsqueeze(0)
            x = self.wte(input_ids) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.t()

    for cls in (RMSNorm, Attention, LlamaLayer, LongLlama, Gpt2Attention, Gpt2Block, LongGpt2):
        cls.__module__, cls.__qualname__ = "lmc.models.export_long_fixtures", cls.__name__
    return LongLlama, LongGpt2


def _transformers_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
                      rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=True,
                      max_position_embeddings=MAX_POS, use_cache=False, attn_implementation="eager")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))

    class Wrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Wrapper(model).eval()


# ---------------------------------------------------------------------------------------------------------
# export


def _ids(seq: int, batch: int = 1, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed + seq).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def _transformers_mask_patches():
    """transformers >= 4.53 builds masks with ``torch.vmap`` (and finds packed sequences with ``torch.diff``),
    which TorchScript tracing cannot follow; optimum's exporter swaps in its vmap-free mask functions while
    exporting. Do the same, with optimum's own functions."""
    import contextlib

    import transformers.masking_utils as mu
    from optimum.exporters.onnx import model_patcher as mp

    @contextlib.contextmanager
    def patched():
        original = mu.find_packed_sequence_indices
        mu.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", mp.sdpa_mask_without_vmap)
        mu.ALL_MASK_ATTENTION_FUNCTIONS.register("eager", mp.eager_mask_without_vmap)
        mu.find_packed_sequence_indices = mp.find_packed_sequence_indices_patched
        try:
            yield
        finally:
            mu.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", mu.sdpa_mask)
            mu.ALL_MASK_ATTENTION_FUNCTIONS.register("eager", mu.eager_mask)
            mu.find_packed_sequence_indices = original

    return patched()


def export_transformers(model, out: Path, opset: int = 17) -> None:
    with _transformers_mask_patches():
        export_torchscript(model, out, opset)


def export_torchscript(model, out: Path, opset: int = 17) -> None:
    import torch

    args = (torch.from_numpy(_ids(8, batch=2)),)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    torch.onnx.export(model, args, str(out), dynamo=False, input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def export_dynamo(model, out: Path, opset: int = 18) -> None:
    import torch

    args = (torch.from_numpy(_ids(8, batch=2)),)
    Dim = torch.export.Dim
    shapes = ({0: Dim("batch_size"), 1: Dim("sequence_length", max=MAX_POS)},)
    program = torch.onnx.export(model, args, dynamo=True, input_names=["input_ids"], output_names=["logits"],
                                dynamic_shapes=shapes, opset_version=opset, external_data=False, optimize=True,
                                verbose=False)
    program.save(str(out), external_data=False)


# ---------------------------------------------------------------------------------------------------------
# validation and summary


def validate(fx: Fixture, path: Path, model) -> None:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fx.inputs = [(i.name, i.shape) for i in session.get_inputs()]
    if [i.name for i in session.get_inputs()] != ["input_ids"]:
        raise AssertionError(f"{path.name}: inputs {fx.inputs}")
    for seq in (*CHECK_LENGTHS, fx.max_seq):
        ids = _ids(seq)
        got = session.run(["logits"], {"input_ids": ids})[0]
        if got.shape != (1, seq, VOCAB) or not np.isfinite(got).all():
            raise AssertionError(f"{path.name}: S={seq} logits {got.shape}, finite={np.isfinite(got).all()}")
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).numpy()
        err = float(np.abs(ref - got).max())
        fx.errors[seq] = err
        if seq in CHECK_LENGTHS and err > TOL:
            raise AssertionError(f"{path.name}: S={seq} onnxruntime differs from torch by {err:.3g}")
    # batch 2, dynamic batch
    ids = _ids(16, batch=2)
    got = session.run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    if float(np.abs(ref - got).max()) > TOL:
        raise AssertionError(f"{path.name}: batch 2 differs from torch")


def summarize(fx: Fixture, path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise RuntimeError(f"{path.name}: uses external data")
    fx.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fx.nodes = len(model.graph.node)
    fx.size = path.stat().st_size
    fx.ops = collections.Counter(n.op_type for n in model.graph.node).most_common()
    if fx.size >= MAX_BYTES:
        raise RuntimeError(f"{path.name}: {fx.size} bytes, the fixtures must stay under 1 MiB")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "-"
    return found


# How each fixture's mask is built, read off the exported graphs (the README repeats it).
MASKS = {
    "llama-long-torchscript":
        "once for both layers: `Shape(input_ids)` -> `Gather(1)` = S -> `Unsqueeze` x2 -> `Concat` [S, S] -> "
        "`ConstantOfShape(value=-inf)` -> `Trilu(upper=1, k=Constant 1)`. Per layer: "
        "`MatMul(q, Transpose(k, perm 0,1,3,2))` -> `Div(., Constant 4.0)` -> `Add(., mask)` -> `Softmax(-1)` -> "
        "`MatMul(., v)`; k and v repeated by `Unsqueeze(2)` -> `Expand` (shape through the "
        "`Where(shape == -1, 1, shape)` guard) -> `Reshape`.",
    "llama-long-dynamo":
        "once for both layers: `Shape(input_ids, start=1, end=2)` x2 -> `Concat` [S, S] -> "
        "`Expand(initializer -inf scalar, .)` -> `Trilu(upper=1, k=initializer 1)`. Per layer: "
        "`MatMul(q, Transpose(k, perm 0,1,3,2))` -> `Div(., 4.0)` -> `Add(., mask)` -> `Softmax(-1)` -> "
        "`MatMul(., v)`; repeat_kv `Unsqueeze(2)` -> `Expand` -> `Reshape(allowzero=1)`; most shapes folded.",
    "llama-long-sdpa":
        "per layer (the SDPA decomposition): `Shape(q)`, `Shape(k)` -> `Slice(-2:-1)` each -> `Concat` [L, S] -> "
        "`Expand(Constant 1.0, .)` -> `Trilu(upper=0)` -> `Equal(., 0.0)` -> `Where(., -inf, 0.0)`. Scale "
        "computed at run time, `Shape(q)` -> `Slice(-1:)` -> Cast -> Sqrt -> `Div(1, .)` -> Cast -> `Sqrt`, "
        "applied as `Mul` on q and on `Transpose(k, perm 0,1,3,2)`; `MatMul` -> `Add(scores, mask)` -> "
        "`Softmax(-1)` -> `MatMul(., v)`.",
    "gpt2-long-buffer":
        "per layer: the buffer is a `Constant` node bool [1, 1, 512, 512] (not an initializer) -> "
        "`Slice(axis 2, start=Sub(kv_len, q_len), end=kv_len)` -> `Slice(axis 3, 0:kv_len)`, the lengths "
        "`Squeeze(Slice(Shape(k or q), -2:-1))`; scores `MatMul(q, Transpose(Reshape(k), perm 0,2,3,1))` (the "
        "exporter merged `.transpose(1, 2)` and `.transpose(-1, -2)` into one Transpose) -> "
        "`Div(., Add(ConstantOfShape([], 0.0), Pow(Cast(Squeeze(Slice(Shape(v), -1:))), 0.5)))` -> `Cast(float)` "
        "-> `Where(mask, ., Constant -3.4028235e38)` -> `Softmax(-1)` -> `MatMul(., v)` (no Add).",
    "llama-long-transformers":
        "once for both layers (optimum's vmap-free `eager_mask`): `Range(0, S)` (cache_position) and "
        "`Range(0, S)` (kv_idx) -> Unsqueeze chains -> `LessOrEqual(kv[None,None,None,:], q[None,None,:,None])` -> "
        "`Cast(bool)` -> `And(ConstantOfShape(true), .)`; packed-sequence term (zeros, optimum's patch): "
        "`Equal(Gather(Flatten(zeros [B,S]), b*S + q), Gather(., b*S + kv))` -> `And`; -> `Expand` to "
        "[B, 1, S, S] (shape through the `Where(shape == -1, 1, shape)` guard) -> `Where(., 0.0, "
        "-3.4028235e38)`. Per layer: `Slice(mask, 0:kv_len, axis 3)`; `MatMul(q, Transpose(k, perm 0,1,3,2))` -> "
        "`Mul(., 0.25)` -> `Add(., mask)` -> `Softmax(-1)` -> `MatMul(., v)`.",
}


NOTES = f"""
- **GPT-2 reaches S <= {GPT2_POSITIONS} only.** Its causal mask is a stored P x P bool buffer, one byte per element:
  P = 4096 would be 16 MiB and P = 1024 alone 1 MiB, so the buffer and the learned positions have
  P = {GPT2_POSITIONS} (256 KiB of mask) to keep the file under 1 MiB. It is checked at S = 16, 256 and
  {GPT2_POSITIONS}; at S > {GPT2_POSITIONS} the exported graph fails (the wpe Gather index is out of range), as
  the torch module does.
- **Rotary tables of the hand-written Llama are [4096, 8]**, sliced to S and duplicated with
  `Concat(c, c, axis -1)` at run time, so q/k meet `x * cos + rotate_half(x) * sin` with cos/sin [S, 16] as usual;
  full-width [4096, 16] tables would add 256 KiB per file.
- **transformers Llama** needs no `attention_mask` input: the wrapper calls the model with `input_ids` only.
  transformers >= 4.53 builds the mask with `torch.vmap` and looks for packed sequences with `torch.diff`, which
  TorchScript tracing cannot follow; the export runs under the same substitution optimum's exporter makes
  (`optimum.exporters.onnx.model_patcher.eager_mask_without_vmap` / `sdpa_mask_without_vmap` registered for
  "eager" / "sdpa", `find_packed_sequence_indices` returning zeros), restored afterwards.
- All exports are traced at batch 2, S = 8; the dynamo export declares `sequence_length` with max {MAX_POS}.
  The hand-written modules are defined in the script (`LongLlama`, `LongGpt2`); norm weights and GPT-2 biases
  are perturbed from 1 / 0 so each parameter is distinct.
"""


def write_readme(out: Path, fixtures: list[Fixture]) -> None:
    v = _versions()
    lines = [
        "# Long-sequence exporter fixtures",
        "",
        "One-shot decoder-only LMs (no KV cache) whose attention is decomposed (MatMul, scale, causal mask, "
        "Softmax, MatMul), written by the real exporters with a dynamic sequence axis, so "
        "`lmc build X --input-shape input_ids=1x2048` binds it. Random weights, seed "
        f"{SEED}. I/O: `input_ids` int64 [batch_size, sequence_length] -> `logits` float32 "
        f"[batch_size, sequence_length, {VOCAB}]; no `attention_mask`.",
        "",
        "Checked by the script under onnxruntime (batch 1): at S = 16 and S = 256 the logits equal the torch "
        "module's within 1e-4; at the longest S (2048; 512 for the GPT-2 buffer fixture) they are finite, and "
        "the error against torch is listed; batch 2 at S = 16 also matches.",
        "",
        "Regenerate (needs the `export` extra):",
        "",
        "```sh",
        'pip install -e ".[export]"',
        "python models/exporters/export_long_fixtures.py models/fixtures/long",
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Config (hand-written Llama and transformers Llama): vocab 256, hidden 64, 2 layers, 4 heads / 2 kv "
        f"heads, head_dim 16, intermediate {INTERMEDIATE} (SwiGLU), RMSNorm eps 1e-5, rope_theta 10000, tied "
        f"embeddings, max positions {MAX_POS}. GPT-2: vocab 256, n_embd 64, 2 layers, 4 heads, n_inner "
        f"{GPT2_INNER}, GELU tanh, LayerNorm, learned positions and mask buffer of {GPT2_POSITIONS}, tied "
        "embeddings.",
        "",
        "| file | exporter | opset | nodes | bytes | max S | err S=16 | err S=256 | err at max S |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fx in fixtures:
        e = fx.errors
        lines.append(f"| `{fx.name}.onnx` | {fx.exporter} | {fx.opset} | {fx.nodes} | {fx.size} | {fx.max_seq} | "
                     f"{e[16]:.1e} | {e[256]:.1e} | {e[fx.max_seq]:.1e} |")
    lines += ["", "Model per file:", ""]
    for fx in fixtures:
        lines.append(f"- `{fx.name}.onnx`: {fx.config}")
    lines += ["", "## How each mask is built (op sequence in the exported graph)", ""]
    for fx in fixtures:
        lines.append(f"- `{fx.name}.onnx`: {MASKS[fx.name]}")
    lines += ["", "Top operators:", ""]
    for fx in fixtures:
        lines.append(f"- `{fx.name}.onnx`: " + ", ".join(f"{op} {n}" for op, n in fx.ops[:12]))
    lines += ["", "## Notes", "", *NOTES.strip().splitlines(), ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    v = _versions()
    LongLlama, LongGpt2 = _modules()
    llama_desc = ("hand-written LongLlama: RMSNorm, rotary from cos/sin tables [4096, 8] sliced to S then "
                  "`cat((c, c), -1)`, GQA repeat_kv (expand+reshape), SwiGLU, tied embeddings")
    ts = f"torch {v['torch']} `torch.onnx.export(dynamo=False)`"
    dy = f"torch {v['torch']} `torch.onnx.export(dynamo=True)`"
    plan = [
        ("llama-long-torchscript", lambda: LongLlama(), ts, llama_desc + "; mask `triu(full((S,S), -inf), 1)` added",
         export_torchscript, LONG),
        ("llama-long-dynamo", lambda: LongLlama(), dy, llama_desc + "; mask `triu(full((S,S), -inf), 1)` added",
         export_dynamo, LONG),
        ("llama-long-sdpa", lambda: LongLlama(sdpa=True), ts,
         llama_desc + "; `F.scaled_dot_product_attention(q, k, v, is_causal=True)`", export_torchscript, LONG),
        ("gpt2-long-buffer", lambda: LongGpt2(), ts,
         f"hand-written LongGpt2 (transformers' old GPT-2 attention): stored bool buffer `bias` "
         f"[1,1,{GPT2_POSITIONS},{GPT2_POSITIONS}] sliced to S, `torch.where(mask, w, finfo.min)`, scores `/ "
         "full([], sqrt(d))`; fused c_attn Linear + split; reaches S <= "
         f"{GPT2_POSITIONS} only", export_torchscript, GPT2_POSITIONS),
        ("llama-long-transformers", _transformers_llama,
         f"torch {v['torch']} `torch.onnx.export(dynamo=False)` of transformers {v['transformers']}",
         "transformers `LlamaForCausalLM`, attn_implementation=\"eager\", use_cache=False, called with "
         "input_ids only", export_transformers, LONG),
    ]
    only = set(os.environ.get("LMC_LONG_ONLY", "").split(",")) - {""}
    fixtures = []
    for name, make, exporter, desc, export, max_seq in plan:
        if only and name not in only:
            continue
        torch.manual_seed(SEED)
        model = make().eval()
        path = out / f"{name}.onnx"
        export(model, path)
        fx = Fixture(name, exporter, desc, MASKS[name], max_seq=max_seq)
        validate(fx, path, model)
        summarize(fx, path)
        errs = " ".join(f"S={s}:{e:.1e}" for s, e in fx.errors.items())
        print(f"{path.name}: opset {fx.opset}, {fx.nodes} nodes, {fx.size} bytes, {errs}")
        fixtures.append(fx)
    if not only:
        write_readme(out, fixtures)


if __name__ == "__main__":
    main()
