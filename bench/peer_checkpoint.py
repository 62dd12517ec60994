"""Rebuild a transformers ``LlamaForCausalLM`` checkpoint folder (config.json, model.safetensors, a tokenizer)
from an optimum past/present Llama export's initializers, so tools that start from a checkpoint (onnxruntime-genai's
model builder) get exactly the weights lmc compiles.

    python bench/peer_checkpoint.py PAST.onnx OUT_DIR [--tokenizer tokenizer.json] [--rope-theta 10000]
                                    [--max-positions 2048] [--no-check]

Each initializer is named by the node that consumes it:
- ``MatMul`` ``/model/layers.N/{self_attn,mlp}/P_proj/MatMul`` -> ``model.layers.N.{self_attn,mlp}.P_proj.weight``
  and ``/lm_head/MatMul`` -> ``lm_head.weight``; ONNX computes x·W with W [in, out], torch x·Wᵀ with W [out, in],
  so the weight is stored transposed;
- ``Gather`` ``/model/embed_tokens/Gather`` -> ``model.embed_tokens.weight``;
- the RMSNorm scales (``Mul`` inputs): ``/model/layers.N/input_layernorm/Mul_1`` ->
  ``model.layers.N.input_layernorm.weight``, ``/model/norm/Mul_1`` -> ``model.norm.weight``; where the exporter
  shared equal scales (all ones at initialisation) as one initializer behind ``Identity`` nodes, each Mul still
  gets its own copy.
The shape comes from the weights (hidden = embedding width, vocabulary = its rows, layers, intermediate = gate
width), the key/value heads and head size from the ``past_key_values.0.key`` input [batch, kv_heads, past, head],
query heads = q_proj width / head size, RMSNorm ε from layer 0's ``input_layernorm/Add`` constant; the embeddings
are tied when the lm-head weight is the embedding transposed bit for bit. A ``config.json`` beside the export wins
over all of these (and gives ``rope_theta``, otherwise ``--rope-theta``). Preconditions: a Llama export by optimum
(TorchScript exporter, node names kept), fp32 weights, no biases.

Memory: external data is memory-mapped (``onnx.load(..., load_external_data=False)`` + ``numpy.memmap`` at each
tensor's offset) and safetensors is written tensor by tensor, so one transposed tensor is the only copy held.

The check (on unless ``--no-check``): for a 12-token prompt, the export's logits under onnxruntime (empty past)
and the rebuilt torch model's must agree within ``TOLERANCE`` — a wrong name, a missed transpose or a wrong head
count fails it; the script asserts it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TOLERANCE = 1e-3          # max |logits difference|; float32 sums in another order stay ~1e-5..1e-4 apart
CHECK_PROMPT = [1, 450, 4996, 17354, 1701, 432, 29891, 975, 278, 17366, 11203, 29889]

MATMUL = re.compile(r"^/model/layers\.(\d+)/(self_attn|mlp)/(\w+_proj)/MatMul$")
NORM = re.compile(r"^/model/(?:layers\.(\d+)/)?(\w*norm)/Mul(?:_\d+)?$")
NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass
class Checkpoint:
    """The rebuilt folder, its config, and the logits check's max abs difference (None when not checked)."""

    folder: Path
    config: dict
    tensors: int
    bytes: int
    max_abs_diff: float | None = None


def tensor_array(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """The initializer's values without loading external data into memory (a read-only memmap)."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(NUMPY[t.data_type])
        count = int(np.prod(t.dims)) if t.dims else 1
        return np.memmap(base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=tuple(t.dims) or (count,))
    return numpy_helper.to_array(t)


def checkpoint_name(op: str, node: str, initializer: str) -> tuple[str, bool] | None:
    """(the checkpoint name, whether ONNX stores it transposed) of an initializer consumed by node ``node``."""
    if op == "MatMul":
        if node == "/lm_head/MatMul":
            return "lm_head.weight", True
        m = MATMUL.match(node)
        if m:
            return f"model.layers.{m[1]}.{m[2]}.{m[3]}.weight", True
    if op == "Gather" and node == "/model/embed_tokens/Gather":
        return "model.embed_tokens.weight", False
    if op == "Mul":
        m = NORM.match(node)
        if m:
            return (f"model.layers.{m[1]}.{m[2]}.weight" if m[1] else f"model.{m[2]}.weight"), False
        if re.fullmatch(r"model\.(layers\.\d+\.)?\w*norm\.weight", initializer):
            return initializer, False
    return None


def read_weights(model: onnx.ModelProto, base: Path) -> dict[str, tuple[np.ndarray, bool]]:
    """Checkpoint name -> (the ONNX array, transposed?) for every weight the nodes name."""
    inits = {t.name: t for t in model.graph.initializer}
    alias = {}                 # the exporter shares equal weights (RMSNorm scales at init) through Identity nodes
    for node in model.graph.node:
        if node.op_type == "Identity":
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    out: dict[str, tuple[np.ndarray, bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            name = alias.get(name, name)
            if name not in inits or node.op_type == "Identity":
                continue
            mapped = checkpoint_name(node.op_type, node.name, name)
            if mapped is None:
                continue
            key, transposed = mapped
            if key in out:
                raise ValueError(f"{key} named twice (by {node.name})")
            out[key] = (tensor_array(inits[name], base), transposed)
    return out


def constant_value(model: onnx.ModelProto, node_name: str, base: Path) -> float | None:
    """The scalar among a node's inputs that is a Constant node's value or an initializer."""
    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None:
        return None
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] in node.input and n.attribute and n.attribute[0].name == "value":
            value = tensor_array(n.attribute[0].t, base)
            if value.size == 1:
                return float(value.reshape(()))
    for t in model.graph.initializer:
        if t.name in node.input and int(np.prod(t.dims)) == 1:
            return float(tensor_array(t, base).reshape(()))
    return None


def derive_config(model: onnx.ModelProto, weights: dict, beside: Path, rope_theta: float,
                  max_positions: int) -> dict:
    """A LlamaConfig dict from the weights and the graph's inputs; ``beside`` (config.json) wins where present."""
    embed = weights["model.embed_tokens.weight"][0]
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers."))
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    dims = past.type.tensor_type.shape.dim
    kv_heads, head = dims[1].dim_value, dims[3].dim_value
    q_out = weights["model.layers.0.self_attn.q_proj.weight"][0].shape[1]
    gate = weights["model.layers.0.mlp.gate_proj.weight"][0].shape[1]
    eps = constant_value(model, "/model/layers.0/input_layernorm/Add", beside.parent)
    lm = weights.get("lm_head.weight")
    tied = lm is None or (lm[0].shape == embed.shape[::-1] and np.array_equal(lm[0].T, embed))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": int(embed.shape[1]), "vocab_size": int(embed.shape[0]), "num_hidden_layers": layers,
        "intermediate_size": int(gate), "num_attention_heads": int(q_out // head), "num_key_value_heads": int(kv_heads),
        "head_dim": int(head), "rms_norm_eps": float(f"{np.float32(eps):.7g}") if eps is not None else 1e-5,
        "rope_theta": rope_theta, "max_position_embeddings": max_positions, "tie_word_embeddings": bool(tied),
        "attention_bias": False, "mlp_bias": False, "dtype": "float32", "bos_token_id": 1, "eos_token_id": 0,
        "use_cache": True,
    }
    if beside.is_file():
        config.update(json.loads(beside.read_text()))
        config.pop("torch_dtype", None)
        config["dtype"] = "float32"
    # transformers 4.x reads rope_scaling null as plain RoPE; genai's builder iterates it, so spell it out
    config["rope_scaling"] = config.get("rope_scaling") or {"rope_type": "default"}
    if config["tie_word_embeddings"] != tied:
        raise ValueError(f"config.json says tie_word_embeddings={config['tie_word_embeddings']}, the weights {tied}")
    return config


def write_safetensors(path: Path, tensors: dict[str, tuple[np.ndarray, bool]]) -> int:
    """Write ``tensors`` (float32) as safetensors one at a time (header: u64 length + JSON of offsets);
    a transposed tensor is copied while it is written, and only then."""
    header, offset = {}, 0
    for name, (array, transposed) in tensors.items():
        shape = list(array.shape[::-1] if transposed else array.shape)
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (array, transposed) in tensors.items():
            data = np.ascontiguousarray(array.T if transposed else array, dtype=np.float32)
            f.write(memoryview(data).cast("B"))
            del data
    return offset


def write_tokenizer(folder: Path, tokenizer: Path | None, vocab: int, eos: int) -> None:
    """The tokenizer the builder loads: a given tokenizer.json, else a word-level one with a token per id."""
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / "tokenizer.json")
        special = json.loads(tokenizer.read_text()).get("added_tokens", [])
        eos_text = next((t["content"] for t in special if t["id"] == eos), None)
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = {f"<{i}>": i for i in range(vocab)}
        tok = Tokenizer(models.WordLevel(words, unk_token="<0>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(folder / "tokenizer.json"))
        eos_text = f"<{eos}>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos_text is not None:
        config["eos_token"] = eos_text
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export_logits(model_path: Path, ids: list[int]) -> np.ndarray:
    """The export's logits [T, V] for ``ids`` with an empty past (one onnxruntime session, freed after)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], dtype=np.int64),
             "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    out = sess.run(["logits"], feeds)[0][0]
    del sess
    return out


def torch_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].numpy()
    del model
    return out


def check(model_path: Path, folder: Path, vocab: int) -> float:
    """Max |logits difference| between the export (onnxruntime) and the rebuilt checkpoint (torch)."""
    ids = [t % vocab for t in CHECK_PROMPT]
    theirs = export_logits(model_path, ids)
    ours = torch_logits(folder, ids)
    return float(np.abs(theirs - ours).max())


def rebuild(model_path: Path, folder: Path, *, tokenizer: Path | None = None, rope_theta: float = 10000.0,
            max_positions: int = 2048, verify: bool = True) -> Checkpoint:
    """Write the checkpoint folder (replaced whole; written beside and renamed into place) and check it."""
    model = onnx.load(str(model_path), load_external_data=False)
    weights = read_weights(model, model_path.parent)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight",
                           "model.layers.0.self_attn.q_proj.weight") if k not in weights]
    if missing:
        raise ValueError(f"{model_path}: no initializer maps to {missing} (not an optimum Llama export?)")
    config = derive_config(model, weights, model_path.parent / "config.json", rope_theta, max_positions)
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    expected = 3 + 9 * config["num_hidden_layers"] - config["tie_word_embeddings"]
    if len(weights) != expected:
        raise ValueError(f"{model_path}: {len(weights)} weights mapped, a Llama of this shape has {expected}")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = write_safetensors(tmp / "model.safetensors", weights)
    del weights
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
    write_tokenizer(tmp, tokenizer, config["vocab_size"], config["eos_token_id"])
    result = Checkpoint(folder, config, expected, size)
    if verify:
        result.max_abs_diff = check(model_path, tmp, config["vocab_size"])
        assert result.max_abs_diff <= TOLERANCE, (
            f"rebuilt checkpoint's logits differ from the export's by {result.max_abs_diff:.3g} > {TOLERANCE}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    done = rebuild(args.model, args.out, tokenizer=args.tokenizer, rope_theta=args.rope_theta,
                   max_positions=args.max_positions, verify=not args.no_check)
    c = done.config
    print(f"{done.folder}: {done.tensors} tensors, {done.bytes / 2**20:.1f} MiB, layers {c['num_hidden_layers']}, "
          f"hidden {c['hidden_size']}, heads {c['num_attention_heads']}/{c['num_key_value_heads']}, "
          f"tied {c['tie_word_embeddings']}"
          + (f"; logits vs the export: max abs diff {done.max_abs_diff:.2e}" if done.max_abs_diff is not None else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()
