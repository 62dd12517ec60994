"""A tiny Llama-style decoder written the way ``torch.onnx.export`` (opset 17, TorchScript) writes one.

Export-shaped on purpose: Constant nodes for scalars, Shape → Gather → Unsqueeze → Concat chains for
the dynamic batch/sequence dims, RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul, rotary embedding as
Slice/Neg/Concat/Mul/Add on tables sliced by the sequence length, GQA key/value heads repeated with
Unsqueeze/Tile/Reshape, attention as MatMul/Mul(scale)/Add(mask from Expand/Trilu/Equal/Where)/Softmax/MatMul,
SwiGLU MLP as Sigmoid·Mul, and the tied embedding stored twice (Gather table [V, D] and the lm-head
MatMul weight [D, V], its transpose).

Input ``input_ids`` int64 [batch, sequence]; output ``logits`` float32 [batch, sequence, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from lmc.models.builder import FLOAT, INT64, GraphBuilder


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 256
    d_model: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    mlp: int = 128
    max_positions: int = 64
    eps: float = 1e-5
    theta: float = 10000.0


def _rms_norm(b: GraphBuilder, x: str, weight: str, eps: float) -> str:
    pow_ = b.op("Pow", [x, b.const(2.0)])
    mean = b.op("ReduceMean", [pow_], axes=[-1], keepdims=1)
    add = b.op("Add", [mean, b.const(eps)])
    sqrt = b.op("Sqrt", [add])
    inv = b.op("Div", [b.const(1.0), sqrt])
    normed = b.op("Mul", [x, inv])
    return b.op("Mul", [weight, normed])


def _heads(b: GraphBuilder, x: str, batch: str, seq: str, heads: int, head_dim: int) -> str:
    shape = b.op("Concat", [batch, seq, b.const([heads], np.int64), b.const([head_dim], np.int64)], axis=0)
    r = b.op("Reshape", [x, shape], allowzero=0)
    return b.op("Transpose", [r], perm=[0, 2, 1, 3])


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """x·cos + rotate_half(x)·sin, with the half-size computed from the shape as exporters do."""
    dim = b.op("Gather", [b.op("Shape", [x]), b.const(3, np.int64)], axis=0)
    half = b.op("Cast", [b.op("Cast", [b.op("Div", [dim, b.const(2, np.int64)])], to=7)], to=7)
    x1 = b.op("Slice", [x, b.const([0], np.int64), b.op("Unsqueeze", [half, b.const([0], np.int64)]),
                        b.const([3], np.int64), b.const([1], np.int64)])
    x2 = b.op("Slice", [x, b.op("Unsqueeze", [half, b.const([0], np.int64)]),
                        b.const([np.iinfo(np.int64).max], np.int64), b.const([3], np.int64), b.const([1], np.int64)])
    rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])])


def _repeat_kv(b: GraphBuilder, x: str, groups: int) -> str:
    u = b.op("Unsqueeze", [x, b.const([2], np.int64)])
    t = b.op("Tile", [u, b.const([1, 1, groups, 1, 1], np.int64)])
    shape = b.op("Shape", [t])
    head = b.op("Slice", [shape, b.const([0], np.int64), b.const([1], np.int64), b.const([0], np.int64)])
    tail = b.op("Slice", [shape, b.const([3], np.int64), b.const([5], np.int64), b.const([0], np.int64)])
    new_shape = b.op("Concat", [head, b.const([-1], np.int64), tail], axis=0)
    return b.op("Reshape", [t, new_shape], allowzero=0)


def build_llama(cfg: LlamaConfig = LlamaConfig(), seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder("tiny-llama", seed=seed)
    head_dim = cfg.d_model // cfg.heads
    ids = b.input("input_ids", INT64, ["batch", "sequence"])
    emb = b.weight("emb.weight", [cfg.vocab, cfg.d_model], scale=0.5)
    emb_value = onnx.numpy_helper.to_array(b.initializers[-1])

    inv_freq = 1.0 / (cfg.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(cfg.max_positions), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    cos_table = b.weight("rope.cos", list(angles.shape), value=np.cos(angles))
    sin_table = b.weight("rope.sin", list(angles.shape), value=np.sin(angles))

    seq_len = b.op("Gather", [b.op("Shape", [ids]), b.const(1, np.int64)], axis=0)
    x = b.op("Gather", [emb, ids])
    cos = b.op("Slice", [cos_table, b.const([0], np.int64), b.op("Unsqueeze", [seq_len, b.const([0], np.int64)]),
                         b.const([0], np.int64), b.const([1], np.int64)])
    sin = b.op("Slice", [sin_table, b.const([0], np.int64), b.op("Unsqueeze", [seq_len, b.const([0], np.int64)]),
                         b.const([0], np.int64), b.const([1], np.int64)])

    for layer in range(cfg.layers):
        p = f"blocks.{layer}"
        batch, seq = b.dim(x, 0), b.dim(x, 1)
        h = _rms_norm(b, x, b.weight(f"{p}.ln1.weight", [cfg.d_model], value=np.ones(cfg.d_model) +
                                      0.1 * b.rng.standard_normal(cfg.d_model)), cfg.eps)
        q = _heads(b, b.op("MatMul", [h, b.weight(f"{p}.q", [cfg.d_model, cfg.d_model])]), batch, seq,
                   cfg.heads, head_dim)
        k = _heads(b, b.op("MatMul", [h, b.weight(f"{p}.k", [cfg.d_model, cfg.kv_heads * head_dim])]), batch,
                   seq, cfg.kv_heads, head_dim)
        v = _heads(b, b.op("MatMul", [h, b.weight(f"{p}.v", [cfg.d_model, cfg.kv_heads * head_dim])]), batch,
                   seq, cfg.kv_heads, head_dim)
        q, k = _rotate(b, q, cos, sin), _rotate(b, k, cos, sin)
        k = _repeat_kv(b, k, cfg.heads // cfg.kv_heads)
        v = _repeat_kv(b, v, cfg.heads // cfg.kv_heads)
        # scale = sqrt(1/sqrt(head_dim)) applied to both q and k^T, computed from the shape
        last = b.op("Slice", [b.op("Shape", [q]), b.const([-1], np.int64), b.const([np.iinfo(np.int64).max], np.int64)])
        scale = b.op("Cast", [b.op("Div", [b.const([1.0]), b.op("Sqrt", [b.op("Cast", [last], to=1)])])], to=1)
        q_shape, k_shape = b.op("Shape", [q]), b.op("Shape", [k])
        mask_shape = b.op("Concat", [
            b.op("Slice", [q_shape, b.const([-2], np.int64), b.const([-1], np.int64)]),
            b.op("Slice", [k_shape, b.const([-2], np.int64), b.const([-1], np.int64)])], axis=0)
        ones = b.op("Expand", [b.const([1.0]), mask_shape])
        tril = b.op("Trilu", [ones], upper=0)
        mask = b.op("Where", [b.op("Equal", [tril, b.const([0.0])]), b.const([-np.inf]), b.const([0.0])])
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = b.op("MatMul", [b.op("Mul", [q, b.op("Sqrt", [scale])]), b.op("Mul", [kt, b.op("Sqrt", [scale])])])
        probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
        attn = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        d = b.dim(x, 2)
        merged = b.op("Reshape", [attn, b.op("Concat", [batch, seq, d], axis=0)], allowzero=0)
        x = b.op("Add", [x, b.op("MatMul", [merged, b.weight(f"{p}.o", [cfg.d_model, cfg.d_model])])])

        h = _rms_norm(b, x, b.weight(f"{p}.ln2.weight", [cfg.d_model], value=np.ones(cfg.d_model)), cfg.eps)
        gate = b.op("MatMul", [h, b.weight(f"{p}.gate", [cfg.d_model, cfg.mlp])])
        up = b.op("MatMul", [h, b.weight(f"{p}.up", [cfg.d_model, cfg.mlp])])
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        x = b.op("Add", [x, b.op("MatMul", [act, b.weight(f"{p}.down", [cfg.mlp, cfg.d_model])])])

    h = _rms_norm(b, x, b.weight("norm.weight", [cfg.d_model], value=np.ones(cfg.d_model)), cfg.eps)
    b.op("MatMul", [h, b.weight("lm_head.weight_t", [cfg.d_model, cfg.vocab], value=emb_value.T.copy())])
    b.rename_last_output("logits")
    b.output("logits", FLOAT, ["batch", "sequence", cfg.vocab])
    return b.model()
