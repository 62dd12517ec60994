"""A tiny GPT-2-style decoder written the way an older ``torch.onnx.export`` writes one.

LayerNorm decomposed (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add), learned positions gathered by a
Range over the sequence length, fused QKV projection (MatMul + Add bias) split three ways with ``Split``,
causal mask sliced from a stored [1, 1, P, P] bool buffer and applied with ``Where``, GELU in its erf form
x·0.5·(1 + erf(x/√2)), MatMul + Add projections, tied lm head stored transposed.

Input ``input_ids`` int64 [batch, sequence]; output ``logits`` float32 [batch, sequence, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from lmc.models.builder import FLOAT, INT64, GraphBuilder


@dataclass(frozen=True)
class Gpt2Config:
    vocab: int = 256
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    max_positions: int = 64
    eps: float = 1e-5
    attention_mask: bool = False   # an ``attention_mask`` int64 [batch, sequence] input, as HF exports have
    hf_style: bool = False         # as transformers' GPT2 exports at opset 17: LayerNormalization ops,
                                   # Conv1D as Reshape → Gemm → Reshape, GELU in its tanh form


def _layer_norm(b: GraphBuilder, x: str, name: str, d: int, eps: float) -> str:
    gamma = b.weight(f"{name}.weight", [d], value=1.0 + 0.1 * b.rng.standard_normal(d))
    beta = b.weight(f"{name}.bias", [d], value=0.1 * b.rng.standard_normal(d))
    mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centered = b.op("Sub", [x, mean])
    var = b.op("ReduceMean", [b.op("Pow", [centered, b.const(2.0)])], axes=[-1], keepdims=1)
    normed = b.op("Div", [centered, b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])])
    return b.op("Add", [b.op("Mul", [normed, gamma]), beta])


def _linear(b: GraphBuilder, x: str, name: str, n_in: int, n_out: int) -> str:
    y = b.op("MatMul", [x, b.weight(f"{name}.weight", [n_in, n_out])])
    return b.op("Add", [b.weight(f"{name}.bias", [n_out], scale=0.02), y])


def _conv1d(b: GraphBuilder, x: str, name: str, n_in: int, n_out: int, batch: str, seq: str) -> str:
    """transformers' Conv1D: addmm(bias, x.view(-1, n_in), weight) → Gemm on the flattened activation."""
    flat = b.op("Reshape", [x, b.const([-1, n_in], np.int64)])
    y = b.op("Gemm", [flat, b.weight(f"{name}.weight", [n_in, n_out]), b.weight(f"{name}.bias", [n_out], scale=0.02)],
             alpha=1.0, beta=1.0)
    return b.op("Reshape", [y, b.op("Concat", [batch, seq, b.const([n_out], np.int64)], axis=0)])


def _layer_norm_op(b: GraphBuilder, x: str, name: str, d: int, eps: float) -> str:
    gamma = b.weight(f"{name}.weight", [d], value=1.0 + 0.1 * b.rng.standard_normal(d))
    beta = b.weight(f"{name}.bias", [d], value=0.1 * b.rng.standard_normal(d))
    return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)


def _gelu_tanh(b: GraphBuilder, x: str) -> str:
    """transformers' NewGELUActivation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    cube = b.op("Mul", [b.const(0.044715), b.op("Pow", [x, b.const(3.0)])])
    inner = b.op("Mul", [b.const(float(np.sqrt(2.0 / np.pi))), b.op("Add", [x, cube])])
    return b.op("Mul", [b.op("Mul", [b.const(0.5), x]), b.op("Add", [b.const(1.0), b.op("Tanh", [inner])])])


def _gelu_erf(b: GraphBuilder, x: str) -> str:
    erf = b.op("Erf", [b.op("Div", [x, b.const(1.4142135381698608)])])
    return b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.const(1.0)])]), b.const(0.5)])


def build_gpt2(cfg: Gpt2Config = Gpt2Config(), seed: int = 1) -> onnx.ModelProto:
    b = GraphBuilder("tiny-gpt2", seed=seed)
    hd = cfg.d_model // cfg.heads
    ids = b.input("input_ids", INT64, ["batch", "sequence"])
    wte = b.weight("wte.weight", [cfg.vocab, cfg.d_model], scale=0.5)
    wte_value = onnx.numpy_helper.to_array(b.initializers[-1])
    wpe = b.weight("wpe.weight", [cfg.max_positions, cfg.d_model], scale=0.1)
    causal = b.weight("attn.bias", [1, 1, cfg.max_positions, cfg.max_positions],
                      value=np.tril(np.ones((cfg.max_positions, cfg.max_positions), dtype=bool))[None, None],
                      dtype=np.bool_)

    ext_mask = None
    if cfg.attention_mask:
        am = b.input("attention_mask", INT64, ["batch", "sequence"])
        am = b.op("Cast", [b.op("Unsqueeze", [am, b.const([1, 2], np.int64)])], to=1)
        ext_mask = b.op("Mul", [b.op("Sub", [b.const(1.0), am]), b.const(np.finfo(np.float32).min)])
    seq = b.op("Gather", [b.op("Shape", [ids]), b.const(1, np.int64)], axis=0)
    positions = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)]),
                                   b.const([0], np.int64)])
    x = b.op("Add", [b.op("Gather", [wte, ids]), b.op("Gather", [wpe, positions])])
    for layer in range(cfg.layers):
        p = f"h.{layer}"
        batch, s = b.dim(x, 0), b.dim(x, 1)
        norm = _layer_norm_op if cfg.hf_style else _layer_norm
        h = norm(b, x, f"{p}.ln_1", cfg.d_model, cfg.eps)
        if cfg.hf_style:
            qkv = _conv1d(b, h, f"{p}.attn.c_attn", cfg.d_model, 3 * cfg.d_model, batch, s)
        else:
            qkv = _linear(b, h, f"{p}.attn.c_attn", cfg.d_model, 3 * cfg.d_model)
        q, k, v = b.op("Split", [qkv, b.const([cfg.d_model] * 3, np.int64)], n_out=3, axis=2)
        heads = []
        for t in (q, k, v):
            shape = b.op("Concat", [batch, s, b.const([cfg.heads], np.int64), b.const([hd], np.int64)], axis=0)
            heads.append(b.op("Transpose", [b.op("Reshape", [t, shape])], perm=[0, 2, 1, 3]))
        q, k, v = heads
        w = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
        w = b.op("Div", [w, b.const(float(np.sqrt(hd)))])
        ql = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [q]), b.const(2, np.int64)], axis=0),
                                b.const([0], np.int64)])
        kl = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [k]), b.const(2, np.int64)], axis=0),
                                b.const([0], np.int64)])
        rows = b.op("Slice", [causal, b.op("Sub", [kl, ql]), kl, b.const([2], np.int64), b.const([1], np.int64)])
        mask = b.op("Slice", [rows, b.const([0], np.int64), kl, b.const([3], np.int64), b.const([1], np.int64)])
        w = b.op("Where", [mask, w, b.const(np.finfo(np.float32).min)])
        if ext_mask is not None:
            w = b.op("Add", [w, ext_mask])
        probs = b.op("Softmax", [w], axis=-1)
        a = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        merged = b.op("Reshape", [a, b.op("Concat", [batch, s, b.const([cfg.d_model], np.int64)], axis=0)])
        if cfg.hf_style:
            x = b.op("Add", [_conv1d(b, merged, f"{p}.attn.c_proj", cfg.d_model, cfg.d_model, batch, s), x])
            h = norm(b, x, f"{p}.ln_2", cfg.d_model, cfg.eps)
            m = _gelu_tanh(b, _conv1d(b, h, f"{p}.mlp.c_fc", cfg.d_model, 4 * cfg.d_model, batch, s))
            x = b.op("Add", [x, _conv1d(b, m, f"{p}.mlp.c_proj", 4 * cfg.d_model, cfg.d_model, batch, s)])
        else:
            x = b.op("Add", [x, _linear(b, merged, f"{p}.attn.c_proj", cfg.d_model, cfg.d_model)])
            h = norm(b, x, f"{p}.ln_2", cfg.d_model, cfg.eps)
            m = _gelu_erf(b, _linear(b, h, f"{p}.mlp.c_fc", cfg.d_model, 4 * cfg.d_model))
            x = b.op("Add", [x, _linear(b, m, f"{p}.mlp.c_proj", 4 * cfg.d_model, cfg.d_model)])
    h = (_layer_norm_op if cfg.hf_style else _layer_norm)(b, x, "ln_f", cfg.d_model, cfg.eps)
    b.op("MatMul", [h, b.weight("lm_head.weight_t", [cfg.d_model, cfg.vocab], value=wte_value.T.copy())])
    b.rename_last_output("logits")
    b.output("logits", FLOAT, ["batch", "sequence", cfg.vocab])
    return b.model()
