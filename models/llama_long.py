"""A tiny one-shot Llama-style decoder (no KV cache) for long sequences, written the way ``torch.onnx.export``
(opset 17, TorchScript) writes a hand-written Llama with *decomposed* attention.

Export-shaped as :mod:`lmc.models.llama` is: Constant nodes for scalars and shape vectors, Shape → Gather →
Unsqueeze → Concat chains for the dynamic batch/sequence dims, RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul,
rotary embedding on cos/sin tables [seq_len, head_dim] sliced to S, SwiGLU MLP, tied embedding stored twice.
What differs, and what makes it a long-sequence model:

* the causal mask is built from the sequence length at run time, never stored, so its cost does not grow
  the file: ``mask="trilu"`` writes what ``torch.triu(torch.full((S, S), float('-inf')), 1)`` exports to,
  Concat(S, S) → ConstantOfShape(-inf) → Trilu(upper=1, k=1); ``mask="range"`` writes the arange-compare form,
  Range(0, S, 1) → Unsqueeze ([1, S] keys, [S, 1] queries) → LessOrEqual → Where(., 0, -inf) → Unsqueeze
  [1, 1, S, S] → Expand to [B, 1, S, S];
* attention is MatMul(q, Transpose(k)) → Div(., sqrt(head_dim)) → Add(mask) → Softmax(-1) → MatMul(v);
* GQA key/value heads are repeated as ``x[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)``
  exports: Unsqueeze(2) → Expand(Concat(B, kv, n, S, D)) → Reshape(Concat(B, kv·n, S, D));
* the rotary tables have ``seq_len`` rows: the graph runs at any S ≤ seq_len (default 2048).

Input ``input_ids`` int64 [batch, sequence]; output ``logits`` float32 [batch, sequence, vocab].

``python -m lmc.models.llama_long OUT.onnx [--seq-len N] [--mask trilu|range] [--no-check]`` writes it and
(unless ``--no-check``) runs it under onnxruntime at S = 16 and S = seq_len against a numpy reference.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from lmc.models.builder import FLOAT, INT64, GraphBuilder
from lmc.models.llama import _heads, _rms_norm, _rotate

MASKS = ("trilu", "range")


@dataclass(frozen=True)
class LongLlamaConfig:
    vocab: int = 256
    d_model: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    mlp: int = 128
    eps: float = 1e-5
    theta: float = 10000.0


def _causal_mask(b: GraphBuilder, mask: str, batch: str, seq: str, seq_scalar: str) -> str:
    """Additive causal mask, 0 on and below the diagonal and -inf above: [S, S] (trilu) or [B, 1, S, S] (range)."""
    if mask == "trilu":
        shape = b.op("Concat", [seq, seq], axis=0)
        full = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.array([-np.inf], np.float32)))
        return b.op("Trilu", [full, b.const(1, np.int64)], upper=1)
    if mask == "range":
        pos = b.op("Range", [b.const(0, np.int64), seq_scalar, b.const(1, np.int64)])
        keys = b.op("Unsqueeze", [pos, b.const([0], np.int64)])     # [1, S]
        queries = b.op("Unsqueeze", [pos, b.const([1], np.int64)])  # [S, 1]
        visible = b.op("LessOrEqual", [keys, queries])
        additive = b.op("Where", [visible, b.const(0.0), b.const(-np.inf)])
        mask4 = b.op("Unsqueeze", [additive, b.const([0, 1], np.int64)])
        shape = b.op("Concat", [batch, b.const([1], np.int64), seq, seq], axis=0)
        return b.op("Expand", [mask4, shape])
    raise ValueError(f"mask must be one of {MASKS}, not {mask!r}")


def _repeat_kv(b: GraphBuilder, x: str, kv_heads: int, groups: int, batch: str, seq: str, head_dim: int) -> str:
    u = b.op("Unsqueeze", [x, b.const([2], np.int64)])
    expanded = b.op("Expand", [u, b.op("Concat", [batch, b.const([kv_heads], np.int64), b.const([groups], np.int64),
                                                  seq, b.const([head_dim], np.int64)], axis=0)])
    shape = b.op("Concat", [batch, b.const([kv_heads * groups], np.int64), seq, b.const([head_dim], np.int64)],
                 axis=0)
    return b.op("Reshape", [expanded, shape], allowzero=0)


def build_llama_long(seq_len: int = 2048, cfg: LongLlamaConfig = LongLlamaConfig(), seed: int = 0,
                     mask: str = "trilu") -> onnx.ModelProto:
    """The decoder above; it runs at every S ≤ ``seq_len`` (the rotary tables' rows)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, not {mask!r}")
    b = GraphBuilder(f"llama-long-{seq_len}", seed=seed)
    head_dim = cfg.d_model // cfg.heads
    groups = cfg.heads // cfg.kv_heads
    ids = b.input("input_ids", INT64, ["batch", "sequence"])
    emb = b.weight("embed_tokens.weight", [cfg.vocab, cfg.d_model], scale=0.5)
    emb_value = numpy_helper.to_array(b.initializers[-1])

    inv_freq = 1.0 / (cfg.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(seq_len), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    cos_table = b.weight("cos_cached", list(angles.shape), value=np.cos(angles))
    sin_table = b.weight("sin_cached", list(angles.shape), value=np.sin(angles))

    seq_scalar = b.op("Gather", [b.op("Shape", [ids]), b.const(1, np.int64)], axis=0)
    seq_vec = b.op("Unsqueeze", [seq_scalar, b.const([0], np.int64)])
    x = b.op("Gather", [emb, ids])
    cos = b.op("Slice", [cos_table, b.const([0], np.int64), seq_vec, b.const([0], np.int64), b.const([1], np.int64)])
    sin = b.op("Slice", [sin_table, b.const([0], np.int64), b.op("Unsqueeze", [seq_scalar, b.const([0], np.int64)]),
                         b.const([0], np.int64), b.const([1], np.int64)])
    causal = _causal_mask(b, mask, b.dim(ids, 0), b.op("Unsqueeze", [seq_scalar, b.const([0], np.int64)]),
                          seq_scalar)

    for layer in range(cfg.layers):
        p = f"layers.{layer}"
        batch, seq = b.dim(x, 0), b.dim(x, 1)
        h = _rms_norm(b, x, b.weight(f"{p}.input_layernorm.weight", [cfg.d_model], value=np.ones(cfg.d_model) +
                                      0.1 * b.rng.standard_normal(cfg.d_model)), cfg.eps)
        q = _heads(b, b.op("MatMul", [h, b.weight(f"{p}.q_proj", [cfg.d_model, cfg.heads * head_dim])]), batch, seq,
                   cfg.heads, head_dim)
        k = _heads(b, b.op("MatMul", [h, b.weight(f"{p}.k_proj", [cfg.d_model, cfg.kv_heads * head_dim])]), batch,
                   seq, cfg.kv_heads, head_dim)
        v = _heads(b, b.op("MatMul", [h, b.weight(f"{p}.v_proj", [cfg.d_model, cfg.kv_heads * head_dim])]), batch,
                   seq, cfg.kv_heads, head_dim)
        q, k = _rotate(b, q, cos, sin), _rotate(b, k, cos, sin)
        k = _repeat_kv(b, k, cfg.kv_heads, groups, b.dim(k, 0), b.dim(k, 2), head_dim)
        v = _repeat_kv(b, v, cfg.kv_heads, groups, b.dim(v, 0), b.dim(v, 2), head_dim)
        scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = b.op("Div", [scores, b.const(float(np.sqrt(head_dim)))])
        probs = b.op("Softmax", [b.op("Add", [scores, causal])], axis=-1)
        attn = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        merged = b.op("Reshape", [attn, b.op("Concat", [batch, seq, b.const([cfg.heads * head_dim], np.int64)],
                                             axis=0)], allowzero=0)
        x = b.op("Add", [x, b.op("MatMul", [merged, b.weight(f"{p}.o_proj", [cfg.heads * head_dim, cfg.d_model])])])

        h = _rms_norm(b, x, b.weight(f"{p}.post_attention_layernorm.weight", [cfg.d_model],
                                     value=np.ones(cfg.d_model) + 0.1 * b.rng.standard_normal(cfg.d_model)), cfg.eps)
        gate = b.op("MatMul", [h, b.weight(f"{p}.gate_proj", [cfg.d_model, cfg.mlp])])
        up = b.op("MatMul", [h, b.weight(f"{p}.up_proj", [cfg.d_model, cfg.mlp])])
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        x = b.op("Add", [x, b.op("MatMul", [act, b.weight(f"{p}.down_proj", [cfg.mlp, cfg.d_model])])])

    h = _rms_norm(b, x, b.weight("norm.weight", [cfg.d_model], value=np.ones(cfg.d_model)), cfg.eps)
    b.op("MatMul", [h, b.weight("lm_head.weight_t", [cfg.d_model, cfg.vocab], value=emb_value.T.copy())])
    b.rename_last_output("logits")
    b.output("logits", FLOAT, ["batch", "sequence", cfg.vocab])
    return b.model()


def reference(model: onnx.ModelProto, ids: np.ndarray, cfg: LongLlamaConfig = LongLlamaConfig()) -> np.ndarray:
    """The same decoder in numpy (float64), from the model's initializers."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    head_dim, groups = cfg.d_model // cfg.heads, cfg.heads // cfg.kv_heads
    bsz, s = ids.shape

    def rms(x, weight):
        return weight * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.eps))

    def split(t, n):
        return t.reshape(bsz, s, n, head_dim).transpose(0, 2, 1, 3)

    def rot(t):
        half = head_dim // 2
        return t * cos + np.concatenate([-t[..., half:], t[..., :half]], -1) * sin

    cos, sin = w["cos_cached"][:s], w["sin_cached"][:s]
    causal = np.triu(np.full((s, s), -np.inf), 1)
    x = w["embed_tokens.weight"][ids]
    for layer in range(cfg.layers):
        p = f"layers.{layer}"
        h = rms(x, w[f"{p}.input_layernorm.weight"])
        q = rot(split(h @ w[f"{p}.q_proj"], cfg.heads))
        k = np.repeat(rot(split(h @ w[f"{p}.k_proj"], cfg.kv_heads)), groups, axis=1)
        v = np.repeat(split(h @ w[f"{p}.v_proj"], cfg.kv_heads), groups, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, s, -1) @ w[f"{p}.o_proj"]
        h = rms(x, w[f"{p}.post_attention_layernorm.weight"])
        gate = h @ w[f"{p}.gate_proj"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[f"{p}.up_proj"])) @ w[f"{p}.down_proj"]
    return rms(x, w["norm.weight"]) @ w["lm_head.weight_t"]


def check(model: onnx.ModelProto, seq_len: int, tol: float = 1e-4) -> dict[int, float]:
    """Run under onnxruntime at S = 16 and S = seq_len (batch 1; batch 2 at S = 16): logits finite and equal to
    :func:`reference` within ``tol``. Returns the max abs error per S."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = {}
    for batch, s in ((1, 16), (2, 16), (1, seq_len)):
        ids = np.random.default_rng(s).integers(0, 256, size=(batch, s), dtype=np.int64)
        got = session.run(["logits"], {"input_ids": ids})[0]
        if not np.isfinite(got).all():
            raise AssertionError(f"S={s}: non-finite logits")
        err = float(np.abs(got - reference(model, ids)).max())
        if err > tol:
            raise AssertionError(f"S={s}, batch {batch}: onnxruntime differs from the reference by {err:.3g}")
        errors[s] = max(err, errors.get(s, 0.0))
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="path of the .onnx file to write")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--mask", choices=MASKS, default="trilu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)
    model = build_llama_long(args.seq_len, seed=args.seed, mask=args.mask)
    onnx.save(model, args.out)
    msg = f"{args.out}: {len(model.graph.node)} nodes, mask {args.mask}, S <= {args.seq_len}"
    if not args.no_check:
        errors = check(model, args.seq_len)
        msg += ", max error vs numpy " + ", ".join(f"S={s}: {e:.1e}" for s, e in errors.items())
    print(msg)


if __name__ == "__main__":
    main()
