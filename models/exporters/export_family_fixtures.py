"""Write small ONNX decoders with past key/values for the decoder *families* lmc's generation path meets beyond
Llama: sliding-window attention (everywhere, or alternating with full layers), local/global attention, mixture
of experts, ALiBi, attention sinks and the older GPT-J/CodeGen/XGLM layouts.

Run ``python models/exporters/export_family_fixtures.py [OUT_DIR]`` (after ``pip install -e ".[export]"``); OUT_DIR defaults to ``models/fixtures/families``;
``--only NAME[,NAME]`` exports a subset (the README is written only by a full run).

Each model is built from a tiny transformers config (vocab 256, hidden 64, head_dim 16, 2 layers — 3 or 4 where
the family alternates sliding and full layers, so both kinds are in the file; MoE with 4 experts, top-2; random
weights, seed 0, every 1-D parameter perturbed as in ``export_fixtures.py``). Architectures optimum supports
are exported by ``optimum.exporters.onnx.main_export(task="text-generation-with-past")``; the others by
``torch.onnx.export`` of a wrapper taking and returning the cache as flat tensors through a transformers
``DynamicCache`` (as ``export_more_fixtures.llama-hf-past-dynamo``), dynamo first, the TorchScript exporter if
dynamo fails. Mixtral's and Qwen2-MoE's sparse blocks loop over the experts the router hit
(``nonzero`` -> Python loop), which no exporter can trace into a graph valid for other inputs; they are exported
with the loop over *all* experts that optimum itself patches into Qwen3-MoE (``qwen3_moe_forward_patched``).

Every file is validated under onnxruntime before it is kept:

* as ``export_fixtures.validate``: a batch of two rows (the second left-padded by two), a 5-token prefill plus
  3 decode steps feeding ``present`` back as ``past`` reproduce an 8-token full run within 1e-4;
* the full run is compared with torch; where it differs by more than 1e-4 the exporter is not faithful, which
  is recorded in the README (the fixture is then judged against the ONNX file itself, i.e. the cache check);
* windowed families, with a 24-token sequence and window 8: a 16-token prefill plus 8 decode steps reproduce
  the 24-token full run within 1e-4, the ONNX logits match the windowed torch model, and they *differ* from
  the same torch weights with the window disabled (positions past the window) — the window is in the graph.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))     # the sibling exporters
import export_fixtures as base  # noqa: E402
import export_more_fixtures as more  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "families"
SEED, OPSET, TOL = base.SEED, base.OPSET, base.TOL
V, H, I = base.VOCAB, base.HIDDEN, base.INTERMEDIATE  # 256, 64, 128
WINDOW = 8
LONG, LONG_PREFILL = 24, 16  # the window proof: a sequence three windows long
WINDOW_EFFECT = 1e-3  # the smallest logit change disabling the window must make (10x the tolerance)


@dataclass
class Family:
    name: str                   # file stem
    cls: str                    # transformers model class
    cfg: str                    # transformers config class
    kw: dict                    # config keywords
    desc: str                   # config, as the README shows it
    exporter: str = "optimum"   # "optimum" or "torch" (dynamo, then TorchScript)
    windowed: str = ""          # which layers are windowed, for the README ("" = none)
    unwindowed: dict = field(default_factory=dict)  # config overrides that disable the window
    moe_all_experts: bool = False  # export with the all-experts loop (see the module docstring)


def _families() -> list[Family]:
    rope = dict(vocab_size=V, hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=I, max_position_embeddings=256)
    big = 4096  # a window longer than any test sequence: full attention with the same weights
    fams = [
        Family("starcoder2-sw-past-dynamo", "Starcoder2ForCausalLM", "Starcoder2Config",
               dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=I, max_position_embeddings=256, sliding_window=WINDOW, use_bias=True),
               "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, intermediate 128 (gelu MLP "
               "c_fc/c_proj), LayerNorm, q/k/v/o biases, sliding_window 8, tied embeddings",
               exporter="torch", windowed=f"all layers, window {WINDOW}", unwindowed=dict(sliding_window=big)),
        Family("mistral-sw-past-optimum", "MistralForCausalLM", "MistralConfig",
               dict(rope, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False),
               "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, intermediate 128, "
               "sliding_window 8, untied embeddings",
               windowed=f"all layers, window {WINDOW}", unwindowed=dict(sliding_window=big)),
        Family("qwen2-sw-past-optimum", "Qwen2ForCausalLM", "Qwen2Config",
               dict(rope, num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                    tie_word_embeddings=True),
               "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, intermediate 128, q/k/v biases, "
               "use_sliding_window, sliding_window 8, max_window_layers 1 (layer 0 full, layer 1 sliding), tied",
               windowed=f"layer 1 (layer 0 full), window {WINDOW}", unwindowed=dict(sliding_window=big)),
        Family("gemma3-past-optimum", "Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(rope, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    pad_token_id=0, bos_token_id=1, eos_token_id=2),
               "Gemma3 text-only: vocab 256, hidden 64, 3 layers (sliding, full, sliding), 4 heads / 2 kv heads, "
               "head_dim 16, q/k RMSNorm, query_pre_attn_scalar 16, rope_theta 1e6 (full) / 1e4 (local), "
               "sliding_window 8, tied",
               windowed=f"layers 0 and 2 (layer 1 full), window {WINDOW}", unwindowed=dict(sliding_window=big)),
        Family("exaone4-past-dynamo", "Exaone4ForCausalLM", "Exaone4Config",
               dict(rope | dict(intermediate_size=64), num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=4,
                    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
               "vocab 256, hidden 64, 4 layers (LLLG: 3 sliding, 1 full), 4 heads / 2 kv heads, head_dim 16, "
               "intermediate 64, q/k RMSNorm, post-norms, sliding_window 8, tied",
               exporter="torch", windowed=f"layers 0-2 (layer 3 full), window {WINDOW}",
               unwindowed=dict(sliding_window=big)),
        Family("gpt-oss-past-optimum", "GptOssForCausalLM", "GptOssConfig",
               dict(rope | dict(intermediate_size=32), num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"]),
               "vocab 256, hidden 64, 2 layers (sliding, full), 4 heads / 2 kv heads, head_dim 16, attention "
               "sinks, q/k/v/o biases, MoE 4 experts top-2 (expert intermediate 32, clamped SwiGLU), yarn rope, "
               "sliding_window 8, untied",
               windowed=f"layer 0 (layer 1 full), window {WINDOW}", unwindowed=dict(sliding_window=big)),
        Family("gpt-neo-past-optimum", "GPTNeoForCausalLM", "GPTNeoConfig",
               dict(vocab_size=V, hidden_size=H, num_layers=2, num_heads=4, intermediate_size=I,
                    attention_types=[[["global", "local"], 1]], window_size=WINDOW, max_position_embeddings=256),
               "vocab 256, hidden 64, 2 layers (global, local), 4 heads (MHA), head_dim 16, intermediate 128, "
               "learned positions, unscaled scores, window_size 8 on the local layer, tied",
               windowed=f"layer 1 \"local\" (layer 0 global), window {WINDOW}", unwindowed=dict(window_size=256)),
        Family("mixtral-past-dynamo", "MixtralForCausalLM", "MixtralConfig",
               dict(rope | dict(intermediate_size=32), num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False),
               "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, MoE 4 experts top-2 (expert "
               "intermediate 32, SwiGLU), no sliding window, untied",
               exporter="torch", moe_all_experts=True),
        Family("qwen2-moe-past-dynamo", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
               dict(rope, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=64, norm_topk_prob=False, use_sliding_window=False,
                    tie_word_embeddings=False),
               "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, q/k/v biases, MoE 4 experts "
               "top-2 (intermediate 32, no top-k renormalisation) + sigmoid-gated shared expert (intermediate 64), "
               "untied",
               exporter="torch", moe_all_experts=True),
        Family("qwen3-moe-past-optimum", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
               dict(rope, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    norm_topk_prob=True, use_sliding_window=False, tie_word_embeddings=False),
               "vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, q/k RMSNorm, MoE 4 experts top-2 "
               "(intermediate 32, top-k renormalised), untied"),
        Family("mpt-past-optimum", "MptForCausalLM", "MptConfig",
               dict(vocab_size=V, d_model=H, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256),
               "vocab 256, d_model 64, 2 layers, 4 heads (MHA), head_dim 16, expansion 2, ALiBi (no position_ids), "
               "fused Wqkv, LayerNorm without bias, tied"),
        Family("codegen-past-optimum", "CodeGenForCausalLM", "CodeGenConfig",
               dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, n_ctx=256,
                    n_inner=I, tie_word_embeddings=False),
               "vocab 256, n_embd 64, 2 layers, 4 heads (MHA), head_dim 16, rotary_dim 8 (interleaved), fused "
               "qkv_proj (mp_num 4 layout), parallel attention/MLP, untied lm_head with bias"),
        Family("gptj-past-optimum", "GPTJForCausalLM", "GPTJConfig",
               dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, n_inner=I,
                    tie_word_embeddings=False),
               "vocab 256, n_embd 64, 2 layers, 4 heads (MHA), head_dim 16, rotary_dim 8 (interleaved), parallel "
               "attention/MLP, untied lm_head with bias"),
        Family("xglm-past-dynamo", "XGLMForCausalLM", "XGLMConfig",
               dict(vocab_size=V, d_model=H, num_layers=2, attention_heads=4, ffn_dim=I, max_position_embeddings=256,
                    pad_token_id=1),
               "vocab 256, d_model 64, 2 layers, 4 heads (MHA), head_dim 16, ffn 128, sinusoidal positions "
               "(offset 2), embeddings scaled by sqrt(d_model), q/k/v biases, tied",
               exporter="torch"),
    ]
    return fams


# ---------------------------------------------------------------------------------------------------------
# models


def _build(fam: Family, overrides: dict | None = None):
    import torch
    import transformers as tf

    cls, cfg_cls = getattr(tf, fam.cls, None), getattr(tf, fam.cfg, None)
    if cls is None or cfg_cls is None:
        raise LookupError(f"transformers {tf.__version__} has no {fam.cls}")
    config = cfg_cls(**{**fam.kw, **(overrides or {})})
    torch.manual_seed(SEED)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _unwindowed(fam: Family, model):
    """The same weights with the window disabled (the config overrides), for the window proof."""
    other = _build(fam, fam.unwindowed)
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:  # only non-persistent buffers may differ
        raise RuntimeError(f"{fam.name}: state dicts differ: {missing} {unexpected}")
    return other.eval()


def _moe_all_experts_forward(self, hidden_states):
    """Mixtral/Qwen2-MoE sparse block, looping over every expert (optimum's ``qwen3_moe_forward_patched``)
    rather than over the experts ``nonzero`` found; numerically the same."""
    import torch
    import torch.nn.functional as F

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                        device=hidden_states.device)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current = self.experts[expert_idx](current) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, current.to(hidden_states.dtype))
    if hasattr(self, "shared_expert"):
        shared = self.shared_expert(hidden_states)
        final = final + F.sigmoid(self.shared_expert_gate(hidden_states)) * shared
    return final.reshape(batch_size, sequence_length, hidden_dim), router_logits


@contextlib.contextmanager
def _patched_moe(model):
    blocks = {type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")}
    saved = {cls: cls.forward for cls in blocks}
    try:
        for cls in blocks:
            cls.forward = _moe_all_experts_forward
        yield
    finally:
        for cls, fwd in saved.items():
            cls.forward = fwd


def _cache_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's cache."""
    c = model.config
    layers = next(getattr(c, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if hasattr(c, k))
    heads = next(getattr(c, k) for k in ("num_attention_heads", "n_head", "num_heads", "attention_heads", "n_heads")
                 if hasattr(c, k))
    kv = getattr(c, "num_key_value_heads", None) or heads
    hidden = next(getattr(c, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(c, k))
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return layers, kv, head_dim


def export_torch(model, out: Path, dynamo: bool) -> None:
    """``torch.onnx.export`` of ``model`` wrapped to take/return its cache as flat tensors (a ``DynamicCache``
    filled with ``update`` inside forward); traced with batch 2, past 12 (beyond the window), sequence 3."""
    import torch
    from transformers import DynamicCache

    layers, kv, head_dim = _cache_shape(model)

    class CacheAsTensors(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            result = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = result.past_key_values
            return (result.logits, *[t for i in range(layers) for t in (present.layers[i].keys,
                                                                         present.layers[i].values)])

    CacheAsTensors.__module__ = "lmc.models.export_family_fixtures"
    wrapper = CacheAsTensors(model).eval()
    g = torch.Generator().manual_seed(SEED)
    b, s, p = 2, 3, 12
    past = [torch.randn(b, kv, p, head_dim, generator=g) for _ in range(2 * layers)]
    args = (torch.randint(0, V, (b, s), generator=g), torch.ones(b, p + s, dtype=torch.int64),
            torch.arange(p, p + s).expand(b, s).contiguous(), past)
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    if dynamo:
        Dim = torch.export.Dim
        batch, seq, plen = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
        shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim("total_sequence_length")}, {0: batch, 1: seq},
                  [{0: batch, 2: plen}] * (2 * layers))
        program = torch.onnx.export(wrapper, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=shapes, opset_version=OPSET, external_data=False, optimize=True,
                                    verbose=False)
        program.save(str(out), external_data=False)
        _strip_metadata(out)
    else:
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
                "position_ids": {0: "batch_size", 1: "sequence_length"},
                "logits": {0: "batch_size", 1: "sequence_length"}}
        for name in inputs[3:]:
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
        for name in outputs[1:]:
            axes[name] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
        torch.onnx.export(wrapper, args, str(out), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)


BULKY_METADATA = ("pkg.torch.onnx.stack_trace", "namespace", "pkg.torch.onnx.class_hierarchy")


def _strip_metadata(path: Path) -> None:
    """Drop the dynamo exporter's bulkiest per-node metadata (stack traces with this machine's paths, the module
    namespace and class hierarchy: half a 2-layer file's bytes); ``fx_node`` and ``name_scopes`` stay."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key not in BULKY_METADATA]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_optimum(fam: Family, model, work: Path, out: Path) -> None:
    """``base.export_optimum`` with an already-built (perturbed) model."""
    import shutil

    from optimum.exporters.onnx import main_export

    src, dst = work / f"{fam.name}-src", work / f"{fam.name}-onnx"
    model.save_pretrained(src)
    main_export(str(src), output=str(dst), task="text-generation-with-past", opset=OPSET, device="cpu",
                do_validation=False, no_post_process=False, library_name="transformers")
    onnx_files = sorted(p.name for p in dst.iterdir() if p.suffix == ".onnx" or "onnx_data" in p.name)
    if onnx_files != ["model.onnx"]:
        raise RuntimeError(f"{fam.name}: expected one self-contained model.onnx, optimum wrote {onnx_files}")
    shutil.copyfile(dst / "model.onnx", out)


# ---------------------------------------------------------------------------------------------------------
# validation


@dataclass
class Check:
    cache_err: float = 0.0        # prefill + decode vs the full run (8 tokens, padded batch)
    torch_err: float = 0.0        # the full run vs torch
    long_cache_err: float | None = None   # windowed: 16-token prefill + 8 decodes vs the 24-token full run
    long_torch_err: float | None = None   # windowed: the 24-token run vs windowed torch
    window_effect: float | None = None    # windowed: max |ONNX - torch without the window| at 24 tokens
    first_affected: int | None = None     # windowed: first position where that difference exceeds TOL

    @property
    def faithful(self) -> bool:
        return self.torch_err <= TOL and (self.long_torch_err is None or self.long_torch_err <= TOL)


def _torch_logits(model, ids, mask, pos, with_pos: bool):
    import torch

    with torch.no_grad():
        kwargs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if with_pos:
            kwargs["position_ids"] = torch.from_numpy(pos)
        return model(**kwargs).logits.float().numpy()


def _cache_run(session, ids, mask, pos, prefill, layers, kv_heads, head_dim):
    """Prefill ``prefill`` tokens then decode the rest one at a time; returns the logits of every position."""
    empty = np.zeros((ids.shape[0], kv_heads, 0, head_dim), np.float32)
    logits, past = more._feed(session, ids[:, :prefill], mask[:, :prefill], pos[:, :prefill], [(empty, empty)] * layers)
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, past = more._feed(session, ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def validate(path: Path, fam: Family, model) -> Check:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    with_pos = "position_ids" in names
    layers = sum(1 for n in names if n.startswith("past_key_values") and n.endswith(".key"))
    shape = next(i.shape for i in session.get_inputs() if i.name == "past_key_values.0.key")
    kv_heads, head_dim = int(shape[1]), int(shape[3])
    empty = np.zeros((2, kv_heads, 0, head_dim), np.float32)
    check = Check()

    ids, mask, pos = base._test_batch()
    full, _ = more._feed(session, ids, mask, pos, [(empty, empty)] * layers)
    stepped = _cache_run(session, ids, mask, pos, base.PREFILL, layers, kv_heads, head_dim)
    valid = mask.astype(bool)
    check.cache_err = float(np.abs(stepped - full)[valid].max())
    if check.cache_err > TOL:
        raise AssertionError(f"{path.name}: prefill+decode logits differ from the full run by {check.cache_err:.3g}")
    check.torch_err = float(np.abs(_torch_logits(model, ids, mask, pos, with_pos) - full)[valid].max())

    if fam.windowed:
        rng = np.random.default_rng(SEED + 1)
        ids = rng.integers(0, V, size=(1, LONG), dtype=np.int64)
        mask = np.ones_like(ids)
        pos = np.arange(LONG, dtype=np.int64)[None]
        one = [(empty[:1], empty[:1])] * layers
        full, _ = more._feed(session, ids, mask, pos, one)
        stepped = _cache_run(session, ids, mask, pos, LONG_PREFILL, layers, kv_heads, head_dim)
        check.long_cache_err = float(np.abs(stepped - full).max())
        if check.long_cache_err > TOL:
            raise AssertionError(f"{path.name}: {LONG_PREFILL}-token prefill + decode differ from the {LONG}-token "
                                 f"full run by {check.long_cache_err:.3g}")
        check.long_torch_err = float(np.abs(_torch_logits(model, ids, mask, pos, with_pos) - full).max())
        dense = _torch_logits(_unwindowed(fam, model), ids, mask, pos, with_pos)
        per_pos = np.abs(dense - full).max(axis=-1)[0]
        check.window_effect = float(per_pos.max())
        hit = np.nonzero(per_pos > TOL)[0]
        check.first_affected = int(hit[0]) if hit.size else None
        if check.window_effect < WINDOW_EFFECT:
            raise AssertionError(f"{path.name}: the exported graph does not window: logits at {LONG} tokens equal "
                                 f"full attention's within {check.window_effect:.3g}")
    return check


# ---------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    fam: Family
    fx: object          # base.Fixture
    check: Check
    exporter_note: str  # e.g. "dynamo failed: ..., TorchScript used"


def export_one(fam: Family, work: Path, out: Path, versions: dict) -> Result:
    model = _build(fam)
    path = out / f"{fam.name}.onnx"
    note = ""
    if fam.exporter == "optimum":
        tag = f"optimum-onnx {versions['optimum-onnx']} `main_export`"
        export_optimum(fam, model, work, path)
    else:
        patch = _patched_moe(model) if fam.moe_all_experts else contextlib.nullcontext()
        tag = f"torch {versions['torch']} `torch.onnx.export(dynamo=True)`"
        with patch:
            try:
                export_torch(model, path, dynamo=True)
            except Exception as exc:  # dynamo cannot trace it: the TorchScript exporter
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                note = f"dynamo failed ({type(exc).__name__}: {first}); TorchScript exporter used"
                print(f"{fam.name}: {note}")
                path.unlink(missing_ok=True)
                tag = f"torch {versions['torch']} `torch.onnx.export(dynamo=False)`"
                export_torch(model, path, dynamo=False)
    fx = base.Fixture(fam.name, tag, f"{fam.cls}: {fam.desc}", path)
    with (_patched_moe(model) if fam.moe_all_experts else contextlib.nullcontext()):
        check = validate(path, fam, model)
    base._summarize(fx)
    return Result(fam, fx, check, note)


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

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    versions = base._versions()
    done, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in _families():
            if only and fam.name not in only:
                continue
            try:
                result = export_one(fam, Path(tmp), out, versions)
            except Exception as exc:  # record and go on: the exporter cannot handle this architecture
                traceback.print_exc()
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" if str(exc).strip() \
                    else type(exc).__name__
                skipped.append((fam.name, fam.cls, why))
                (out / f"{fam.name}.onnx").unlink(missing_ok=True)
                print(f"{fam.name}: SKIPPED ({why})")
                continue
            done.append(result)
            c, fx = result.check, result.fx
            extra = (f", window: long cache {c.long_cache_err:.1e}, long torch {c.long_torch_err:.1e}, effect "
                     f"{c.window_effect:.2e} from position {c.first_affected}") if fam.windowed else ""
            top = " ".join(f"{op}:{n}" for op, n in fx.ops[:10])
            print(f"{fx.path.name}: opset {fx.opset}, {fx.nodes} nodes, {fx.size} bytes, cache {c.cache_err:.1e}, "
                  f"torch {c.torch_err:.1e}{extra} | {top}")
    if only is None:
        write_readme(out, done, skipped, versions)


# ---------------------------------------------------------------------------------------------------------
# README

QUIRKS = """
- **Every cache is whole.** All exporters here write `present.{i}.key/value = Concat(past, new, axis=2)` on sliding
  layers too (optimum rebuilds the cache with `DynamicCache.from_legacy_cache`, the dynamo wrapper with
  `DynamicCache()`, neither of which knows the layer types, so no `DynamicSlidingWindowLayer` trims it): the
  window exists only in the mask, and the cache grows like a full layer's.
- **Window in the mask (Mistral, Qwen2, Starcoder2, Gemma3, Exaone4, gpt-oss).** transformers' mask functions
  are traced: causal `LessOrEqual(kv_idx, q_idx)` and window `Greater(kv_idx, Sub(q_idx, 8))`, both over
  `Range`s of the cache positions, `And`-ed (optimum: with `ConstantOfShape(true)` and the padding `Gather` as
  in `../README.md`; dynamo: `Expand`), then `Where(mask, 0, -inf)` (optimum) / `Where(mask, 0, finfo.min)`
  (dynamo) added to the scores. With `sliding_window=8` key j is visible from query i iff i - 8 < j <= i, so
  the first position the window changes is 8. Alternating families compute one mask per layer kind: Qwen2's
  full layer 0 sees the causal mask alone, Exaone4's dynamo graph has two `Where` masks (layers 0-2 share one,
  layer 3 has the causal one), Gemma3 and gpt-oss one per kind; Mistral and Starcoder2 share one windowed mask.
- **Gemma3** has two rotary tables (`rotary_emb` theta 1e6 for the full layer, `rotary_emb_local` 1e4 for the
  sliding ones), q/k RMSNorm before rotary, the scale `query_pre_attn_scalar**-0.5` split as `Mul 0.5` on q and
  kᵀ. **Exaone4**'s full layer has no rotary at all (NoPE when a sliding window is configured): its
  `present.3.key` is `Mul(w, k * Reciprocal(Sqrt(...)))` (k RMSNorm) straight into the Concat.
- **gpt-oss attention sinks.** Scores `Mul(MatMul(q, kT), 0.25)` + the mask slice, then
  `Concat([scores, Expand(sinks[H] reshaped to [1,H,1,1])], axis=-1)`, `Sub(., ReduceMax(., -1, keepdims))`,
  `Softmax`, `Cast`, `Slice(.., :-1)` dropping the sink column, `MatMul` with v (repeat_kv by Expand/Reshape).
  The transformers code runs eager attention (no sdpa), so no `IsNaN` guard.
- **GPT-Neo local/global.** Two causal tables are baked in as [1,1,256,256] bool constants (the `bias` buffer,
  one per layer; the local one banded: `tril(ones) ^ tril(ones, -8)`), sliced to `[kv_len - q_len : kv_len,
  :kv_len]` and applied with `Where(bias, MatMul(q, kT), finfo.min)` on *unscaled* scores (GPT-Neo has no
  1/sqrt(d)), then a second, additive padding/causal mask `Add(., Slice(mask))` before `Softmax`. Contexts are
  bounded by the 256-position table. q is `Cast` to float before the MatMul; `present.{i}.key =
  Cast(Concat(past, k))` (float to float).
- **GPT-J / CodeGen.** Interleaved (rotate-every-two) partial rotary on 8 of 16 dims, sin/cos `Gather`ed from an
  `embed_positions` table by `position_ids`; `present.{i}.key = Cast(Concat(past_key, Cast(k)))` - float to
  float casts on the cache path (value has none). GPT-J: `Softmax(Add(Div(MatMul(q, kT), 4), mask))`; CodeGen
  adds the mask *before* scaling: `Softmax(Div(Add(MatMul(q, kT), mask), 4))`, masks made with `ScatterND` of
  the padding into an `Expand`ed causal table. CodeGen's fused `qkv_proj` is split through its mp_num=4
  layout (`Reshape` -> `Split` -> `Reshape`).
- **MPT (ALiBi).** No `position_ids`. The bias is a constant [H=4, 1, 256] (`slope_h * (j - 255)`), sliced to the
  last `kv_len` columns (`Slice(C, 256 - kv_len, end, axis 2)`), so it is `slope * (j - (kv_len - 1))`: relative
  to the last key rather than the query, equal up to a per-row constant that Softmax removes. Scores
  `Add(Mul(MatMul(q, Transpose(Concat(past, k))), 0.25), alibi)`, then two `Where(mask, finfo.min, .)` (padding,
  causal) through bool `Cast`s, a `Cast` to float, `Softmax`. The key's transpose is applied to `present.key`
  (the Concat), not to the new key.
- **XGLM (dynamo).** Heads folded into the batch as in Bloom: q `* 0.25` then `Reshape [B*H, S, D]`, k/v
  `Reshape(present, [B*H, -1, D])`; scores `Reshape [B, H, S, T]`, `Add(mask)`, `Max(., finfo.min)`, `Reshape
  [B*H, S, T]` -> `Softmax` -> `MatMul` -> `Reshape [B, H, S, D]`. Sinusoidal positions are a table `Gather`ed at
  `position_ids + 2`.
- **MoE routing.** optimum Qwen3-MoE (its own all-experts patch): router `MatMul` -> `Softmax` -> `TopK(2)` ->
  `Div` by the sum; `OneHot(TopK indices, 4)` -> `Transpose` -> per expert `Gather(e)` -> `NonZero` -> `Split` into
  (slot, token) -> `Gather` tokens -> expert MLP -> `Mul` by the routing weight -> `ScatterElements(
  ConstantOfShape(zeros [tokens, 64]), Expand(token idx), ., axis 0)` (no reduction) `Add`ed to the running
  sum (index_add_): the zeros' shape is `batch * sequence`. Dynamo Mixtral / Qwen2-MoE: the same loop as `Gemm`s over `GatherND`-selected rows and
  a chain of `ScatterND(reduction=add)` starting from an `Expand`ed zeros tensor; Qwen2-MoE adds the shared
  expert times `Sigmoid(shared_expert_gate)`. gpt-oss (optimum's patch, dense): router `Gemm` -> `TopK` ->
  `Softmax` over the two values -> `ScatterElements(ConstantOfShape(zeros [tokens, 4]), indices, weights)`
  (the routing matrix, again sized by the sequence), then every expert on every token (`Tile`/`MatMul` over
  [E, tokens, 64], clamped SwiGLU on even/odd columns) weighted and `ReduceSum`med over experts.
- **dynamo files** keep the exporter's `fx_node` and `name_scopes` node metadata; the stack traces (this
  machine's paths), namespaces and class hierarchies are dropped to keep the files small.
"""


def write_readme(out: Path, done: list[Result], skipped: list, versions: dict) -> None:
    lines = [
        "# Decoder-family fixtures",
        "",
        "Small decoders with past key/values for the families beyond Llama: sliding-window attention "
        "(everywhere or alternating with full layers), local/global attention, mixture of experts, ALiBi, "
        "attention sinks, GPT-J/CodeGen/XGLM. Written by `models/exporters/export_family_fixtures.py` from tiny transformers "
        f"configs (random weights, seed {SEED}, every 1-D parameter perturbed).",
        "",
        "Regenerate (needs the `export` extra):",
        "",
        "```sh",
        "python models/exporters/export_family_fixtures.py models/fixtures/families",
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in versions.items()) + ".",
        "",
        "I/O as in `../README.md`: `input_ids`, `attention_mask`, `position_ids` (absent for ALiBi), "
        "`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim] -> `logits`, `present.{i}.key/value` "
        "(`present` = past + new: every exporter here keeps the whole cache, sliding layers included).",
        "",
        "Checks (by the script, under onnxruntime): a 5-token prefill plus 3 decode steps reproduce an 8-token full "
        "run within 1e-4 (batch of 2, one row left-padded) — `cache`; the full run against torch — `torch` "
        "(faithful when <= 1e-4). Windowed files also: a 16-token prefill plus 8 decodes reproduce a 24-token run "
        "(`long cache`), the 24-token run against the windowed torch model (`long torch`), and against the same "
        "weights with the window disabled: `window effect` is the largest logit difference (it must be >= 1e-3: "
        "the window is in the graph), `from` the first position it exceeds 1e-4.",
        "",
        "| file | exporter | opset | nodes | bytes | config | windowed layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in done:
        fx = r.fx
        lines.append(f"| `{fx.path.name}` | {fx.exporter} | {fx.opset} | {fx.nodes} | {fx.size} | {fx.config} | "
                     f"{r.fam.windowed or '-'} |")
    lines += ["", "| file | cache | torch | long cache | long torch | window effect | from |", "|---|---|---|---|---|---|---|"]
    for r in done:
        c = r.check
        w = (f"{c.long_cache_err:.1e} | {c.long_torch_err:.1e} | {c.window_effect:.2e} | {c.first_affected}"
             if r.fam.windowed else "- | - | - | -")
        lines.append(f"| `{r.fx.path.name}` | {c.cache_err:.1e} | {c.torch_err:.1e} | {w} |")
    notes = [(r.fx.path.name, r.exporter_note) for r in done if r.exporter_note]
    unfaithful = [r.fx.path.name for r in done if not r.check.faithful]
    if notes or unfaithful:
        lines += [""]
        for name, note in notes:
            lines.append(f"- `{name}`: {note}.")
        for name in unfaithful:
            lines.append(f"- `{name}`: the ONNX file differs from torch by more than 1e-4 (see the table); it is "
                         "judged against itself (the cache checks).")
    lines += ["", "Top operators:", ""]
    for r in done:
        lines.append(f"- `{r.fx.path.name}`: " + ", ".join(f"{op} {n}" for op, n in r.fx.ops[:12]))
    if QUIRKS.strip():
        lines += ["", "## Exporter quirks", "", *QUIRKS.strip().splitlines()]
    if skipped:
        lines += ["", "## Not exported", ""]
        for name, cls, why in skipped:
            lines.append(f"- `{name}` ({cls}): {why}")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
