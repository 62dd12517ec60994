"""onnxruntime-genai's view of a generation bundle: ``genai_config.json`` and the tokenizer beside the model.

onnxruntime-genai (the runtime phone apps ship: C, C#, Java/Kotlin, Swift; sampling and tokenizer included)
loads a folder holding ``genai_config.json``. For a decoder it reads (field names as its ``config.cpp``
parses them, values as its model builder writes them for a static cache):
- ``model``: ``type`` (a decoder-only type; ``decoder`` is its generic one), ``context_length``,
  ``vocab_size``, ``bos_token_id``, ``eos_token_id`` (int or list, each in [0, vocab)), ``pad_token_id``;
- ``model.decoder``: ``filename``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
  ``head_size``, ``hidden_size``, ``session_options`` (its ``SessionOptions`` attributes; any other string
  entry is an onnxruntime config entry), ``inputs`` / ``outputs`` (graph names; the cache pairs as
  ``%d`` templates: ``past_key_names``, ``past_value_names``, ``present_key_names``,
  ``present_value_names``), and for layers whose cache is smaller than the context a ``sliding_window``
  block (below);
- ``search``: ``max_length`` (the sequences' length: prompt + new tokens), ``past_present_share_buffer``
  (each past/present pair is one buffer of ``max_length`` rows — or of the model's own static length — bound
  to input and output), ``num_beams`` 1, ``do_sample``, ``top_k``/``top_p``/``temperature``, …, and
  ``chunk_size`` (a first prompt longer than this runs in steps of this many tokens).

The bundle (``passes.attention_mask_input``) takes ``input_ids`` [B, S] and ``attention_mask`` [B, total],
and its cache pairs are static [B, kv_heads, slots, head_size]: slots = the context for full layers, which
genai sizes at max_length (= context) or, all layers alike, at the model's own length; a windowed layer's
ring (W + chunk − 1 slots) is genai's windowed cache of ``sliding_window.window_size`` +
max(``cache_slack``, ``chunk_size`` − 1) rows on the listed ``layers`` (with ``slide_key_value_cache`` and
``slide_inputs`` off genai only sizes that buffer: the bundle writes and masks its ring itself; a zero slack
means genai's default, 16 rows, so a ring of exactly W slots is W − 1 + a slack of 1). A ring needs the
prompt in steps of at most the prefill chunk, which is ``search.chunk_size`` — genai chunks a batch-1 first
prompt only: a batch's prompt would be cut across its rows (no chunk_size for B > 1), and tokens appended
later (continuous decoding) run in one step. What genai cannot drive — rings of different sizes, a batch
over rings, int8 cache rows with scales, cache names without a ``%d`` pattern, outputs besides logits and
the cache — leaves ``genai_config.json`` out, with a one-line statement why; the limits it can live with
(appended turns at most a chunk long over rings; ``max_length`` kept at the context when full and windowed
layers mix, as genai sizes full layers at it) are in the statement.

Token ids come from ``--tokenizer`` (``tokenizer_config.json``'s special tokens looked up in
``tokenizer.json``; ``config.json`` / ``generation_config.json`` beside them) or from an optimum export's
``config.json`` / ``generation_config.json`` beside the model; unknown ids are 0.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.metadata import GenerationInfo
from lmc.core.pass_manager import PassRecord
from lmc.core.runtime import CONFIG_ENTRIES, SESSION_OPTIONS_FILE
from lmc.passes.attention_mask_input import add_attention_mask

CONFIG_FILE = "genai_config.json"
MODEL_TYPE = "decoder"               # onnxruntime-genai's generic decoder-only type
# the tokenizer files a Hugging Face tokenizer folder holds (copied into the bundle as they are)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
MODEL_CONFIGS = ("config.json", "generation_config.json")
# genai's model types it runs as a plain decoder (its ModelType::IsLLM); another config type maps to ``decoder``
GENAI_TYPES = frozenset({"decoder", "gemma", "gemma2", "gpt2", "granite", "llama", "mistral", "nemotron", "olmo",
                         "phi", "qwen2", "qwen3", "smollm3"})


def tokenizer_sources(path: str | Path) -> list[Path]:
    """The tokenizer files ``--tokenizer`` names: a tokenizer.json, or a folder's tokenizer files (it must hold
    tokenizer.json). An LmcError (one line) for anything else."""
    p = Path(path)
    if p.is_file():
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise LmcError(f"--tokenizer {path}: not a tokenizer.json (JSON)") from None
        return [p]
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise LmcError(f"--tokenizer {path}: the folder has no tokenizer.json")
        return [p / name for name in TOKENIZER_FILES if (p / name).is_file()]
    raise LmcError(f"--tokenizer {path}: no such file or folder")


@dataclass
class GenaiBundle:
    """What a generation build adds for onnxruntime-genai: the attention_mask interface (done by
    ``prepare``), the config (None when genai cannot drive the bundle, ``statement`` says why) and the
    tokenizer files to copy; ``record`` is its row in the report's pass table."""

    info: GenerationInfo
    config: dict | None
    statement: str
    tokenizer: list[Path] = field(default_factory=list)
    record: PassRecord | None = None
    tokens: dict = field(default_factory=dict)          # the special tokens found (``special_token_ids``)

    @classmethod
    def prepare(cls, graph: gs.Graph, info: GenerationInfo, templates: dict, options, model_path) -> "GenaiBundle":
        """Give ``graph`` the ``attention_mask`` input genai feeds (``passes.attention_mask_input``) and
        make the config for it."""
        start = time.perf_counter()
        info = add_attention_mask(graph, info, templates)
        tokenizer = tokenizer_sources(options.tokenizer) if getattr(options, "tokenizer", None) else []
        chunk = min(int(options.prefill_chunk or info.context), info.context)
        config, statement = genai_config(graph, info, chunk, tokenizer, Path(model_path))
        tokens = special_token_ids(tokenizer, Path(model_path))[1]
        notes = ["attention_mask [B, total] input: positions derived in the graph (onnxruntime-genai's interface)",
                 statement]
        record = PassRecord("genai-interface", time.perf_counter() - start, len(graph.nodes), ir.weight_bytes(graph),
                            None, True, {"genai_config": int(config is not None), "tokenizer_files": len(tokenizer)},
                            tuple(notes))
        return cls(info, config, statement, tokenizer, record, tokens)

    def write(self, folder: Path) -> None:
        """Write ``genai_config.json`` (when genai can drive the bundle) and copy the tokenizer files."""
        if self.config is not None:
            settings = _read_json(folder / SESSION_OPTIONS_FILE)
            self.config["model"]["decoder"]["session_options"] = genai_session_options(settings)
            (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=4) + "\n")
        for source in self.tokenizer:
            name = source.name if source.name in TOKENIZER_FILES else "tokenizer.json"
            shutil.copyfile(source, folder / name)
        if self.tokenizer and not (folder / "tokenizer_config.json").exists():
            # genai's tokenizer reads tokenizer_config.json beside tokenizer.json: the class and special tokens
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      **{k: v for k, v in self.tokens.items() if k.endswith("_token")}}
            (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _template(names: list[str]) -> tuple[str, list[int]] | None:
    """``prefix%dsuffix`` and the layer indices for names that differ only in one integer, else None."""
    parts = [re.fullmatch(r"(.*?)(\d+)(\D*)", n) for n in names]
    if not parts or any(p is None for p in parts):
        return None
    shapes = {(p.group(1), p.group(3)) for p in parts}
    if len(shapes) != 1:
        return None
    prefix, suffix = shapes.pop()
    return f"{prefix}%d{suffix}", [int(p.group(2)) for p in parts]


def _role(name: str) -> str | None:
    """``key`` or ``value`` for a cache name (``past_key_values.3.key``, ``past_value_3``), else None."""
    rest = re.sub(r"\d+", "", name.replace("key_values", ""))
    found = [role for role in ("key", "value") if role in rest]
    return found[0] if len(found) == 1 else None


def _heads(graph: gs.Graph, kv_heads: int) -> int:
    """Query heads: a GroupQueryAttention's ``num_heads``, or an Attention's query [B, H, S, D]."""
    for node in graph.nodes:
        if node.op == "GroupQueryAttention" and "num_heads" in node.attrs:
            return int(node.attrs["num_heads"])
    for node in graph.nodes:
        if ir.is_op(node, "Attention") and node.inputs and node.inputs[0].shape and len(node.inputs[0].shape) == 4:
            return int(node.inputs[0].shape[1])
    return kv_heads


def genai_config(graph: gs.Graph, info: GenerationInfo, chunk: int, tokenizer: list[Path],
                 model_path: Path) -> tuple[dict | None, str]:
    """(genai_config.json as a dict, a one-line statement); the dict is None when genai cannot drive the
    bundle (the statement says why)."""
    inputs = {t.name: t for t in graph.inputs}
    outputs = {t.name: t for t in graph.outputs}
    pairs = list(info.state)
    keys = [(p, o) for p, o in pairs if _role(p) == "key"]
    values = [(p, o) for p, o in pairs if _role(p) == "value"]
    why = None
    if any(not np.issubdtype(np.dtype(inputs[p].dtype), np.floating) for p, _ in pairs):
        why = "its cache is int8 rows with scales (--kv-cache int8), which genai's cache does not hold"
    elif len(keys) + len(values) != len(pairs) or len(keys) != len(values):
        why = f"its state {[p for p, _ in pairs][:4]} is not key/value pairs per layer"
    templates = [_template([n for n, _ in keys]), _template([n for n, _ in values]),
                 _template([o for _, o in keys]), _template([o for _, o in values])]
    if why is None and (any(t is None for t in templates) or len({tuple(t[1]) for t in templates}) != 1):
        why = "its cache names do not follow one per-layer pattern (past_key_values.%d.key)"
    if why is None and len(outputs) != len(pairs) + 1:
        why = f"it has outputs besides logits and the cache ({sorted(set(outputs) - {o for _, o in pairs})})"
    if why is None and info.batch > 1 and not info.rows_apart:
        why = ("its rows share row 0's positions (the export computes them from the cache length), and genai "
               "pads a batch's rows to different lengths")
    if why is not None:
        return None, f"genai_config.json not written: onnxruntime-genai cannot drive this bundle ({why})"
    layers = templates[0][1]
    shapes = {p: [int(d) for d in inputs[p].shape] for p, _ in pairs}
    first = shapes[keys[0][0]]
    counts = {int(n.attrs["num_heads"]) for n in graph.nodes if n.op == "GroupQueryAttention" and "num_heads" in n.attrs}
    if len({s[1] for s in shapes.values()}) > 1 or len(counts) > 1:      # pruned (--prune) unevenly
        return None, ("genai_config.json not written: onnxruntime-genai cannot drive this bundle (its layers keep "
                      "different numbers of heads; genai sizes every layer alike — --prune-per-layer keeps them so)")
    kv_heads, head_size = first[1], first[3]
    slots = {layer: shapes[p][2] for layer, (p, _) in zip(layers, keys)}
    rings = sorted({s for s in slots.values() if s < info.context})
    sliding = None
    if rings:
        if len(rings) > 1:
            return None, (f"genai_config.json not written: onnxruntime-genai cannot drive this bundle (its windowed "
                          f"layers keep rings of {rings} slots; genai sizes every windowed layer alike)")
        if info.batch > 1:
            return None, (f"genai_config.json not written: onnxruntime-genai cannot drive this bundle (its windowed "
                          f"layers' rings need prompts in chunks of {chunk}; genai does not chunk a batch's prompts)")
        slack = max(chunk - 1, 1)              # genai reads a zero slack as its default (16 rows on CPU)
        sliding = {"window_size": rings[0] - slack, "slide_key_value_cache": False, "slide_inputs": False,
                   "layers": sorted(layer for layer, s in slots.items() if s < info.context), "cache_slack": slack}
    heads = _heads(graph, kv_heads)
    ids, found = special_token_ids(tokenizer, model_path)
    vocab = int(outputs[info.logits].shape[-1])
    ids = {k: v if 0 <= v < vocab else 0 for k, v in ids.items()}
    model_type = found.pop("model_type", MODEL_TYPE)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": head_size,
        "hidden_size": heads * head_size,
        "inputs": {"input_ids": info.input_ids, "attention_mask": info.attention_mask,
                   "past_key_names": templates[0][0], "past_value_names": templates[1][0]},
        "outputs": {"logits": info.logits, "present_key_names": templates[2][0],
                    "present_value_names": templates[3][0]},
        "num_attention_heads": heads,
        "num_hidden_layers": len(layers),
        "num_key_value_heads": kv_heads,
    }
    if sliding is not None:
        decoder["sliding_window"] = sliding
    config = {
        "model": {"bos_token_id": ids["bos"], "context_length": info.context, "decoder": decoder,
                  "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                  "type": model_type if model_type in GENAI_TYPES else MODEL_TYPE, "vocab_size": vocab},
        "search": {"batch_size": info.batch, "diversity_penalty": 0.0, "do_sample": False,
                   "early_stopping": True, "length_penalty": 1.0, "max_length": info.context, "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50,
                   "top_p": 1.0},
    }
    if info.batch == 1:           # genai chunks a batch-1 prompt only (a batch's would be cut across its rows)
        config["search"]["chunk_size"] = chunk
    where = "; token ids " + ", ".join(f"{k} {ids[k]}" + (f" {found[k + '_token']}" if k + "_token" in found else "")
                                      + ("" if k in found and found[k] == ids[k] else " (unknown)")
                                      for k in ("bos", "eos", "pad"))
    ring = (f", windowed layers {sliding['layers']} in rings of {rings[0]}: tokens appended after the first "
            f"prompt must come at most {chunk} at a time, genai chunks only the first" if sliding else "")
    if sliding and len(sliding["layers"]) < len(layers):     # genai sizes the full layers' buffers at max_length
        ring += f"; search.max_length must stay {info.context}"
    steps = f"prompts in chunks of {chunk}" if info.batch == 1 else "a batch's prompts in one step"
    return config, (f"genai_config.json: onnxruntime-genai drives the bundle (max_length {info.context}, "
                    f"batch {info.batch}, {steps}{ring}{where})")


# session_options.json attributes genai's session options take as they are
GENAI_SESSION_ATTRIBUTES = ("intra_op_num_threads", "inter_op_num_threads", "enable_cpu_mem_arena",
                            "enable_mem_pattern", "log_severity_level")


def genai_session_options(settings: dict) -> dict:
    """The bundle's ``session_options.json`` as genai's decoder ``session_options``: the attributes it has
    and the config entries (strings); the process-wide arena and the heap trim are lmc's drivers' own."""
    out = {"log_id": "onnxruntime-genai", "provider_options": []}
    for key, value in settings.items():
        if key in GENAI_SESSION_ATTRIBUTES:
            out[key] = value
        elif key == CONFIG_ENTRIES:
            out.update({str(k): str(v) for k, v in value.items()})
    return out


# well-known special tokens, for a tokenizer.json without tokenizer_config.json (its special added tokens)
KNOWN_SPECIALS = {"eos": ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|eot|>", "<|im_end|>"),
                  "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
                  "pad": ("<pad>", "<|pad|>", "[PAD]")}


def special_token_ids(tokenizer: list[Path], model_path: Path) -> tuple[dict[str, int], dict[str, int | str]]:
    """({"bos", "eos", "pad"} → id (0 when unknown), what was found (those keys, ``model_type`` and the
    tokens' text as ``bos_token`` …)): the ids of ``generation_config.json`` / ``config.json`` beside the
    tokenizer, then beside the model (an optimum export's folder); then ``tokenizer_config.json``'s special
    tokens looked up in ``tokenizer.json``, or, without it, its special added tokens of well-known names."""
    found: dict[str, int | str] = {}
    folders = ([tokenizer[0].parent] if tokenizer else []) + [model_path.parent]
    for folder in folders:
        for name in reversed(MODEL_CONFIGS):                # generation_config.json's ids win over config.json's
            data = _read_json(folder / name)
            for key in ("bos", "eos", "pad"):
                value = data.get(f"{key}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if isinstance(value, int) and not isinstance(value, bool) and key not in found:
                    found[key] = value
            if isinstance(data.get("model_type"), str) and "model_type" not in found:
                found["model_type"] = data["model_type"]
    if tokenizer:
        for key, (token, value) in _tokenizer_ids(tokenizer).items():
            found.setdefault(key, value)
            if found[key] == value:
                found[f"{key}_token"] = token
    ids = {k: int(found.get(k, 0)) for k in ("bos", "eos", "pad")}
    if "pad" not in found and "eos" in found:        # as Hugging Face generation does without a pad token
        ids["pad"] = found["pad"] = ids["eos"]
        if "eos_token" in found:
            found["pad_token"] = found["eos_token"]
    return ids, found


def _tokenizer_ids(files: list[Path]) -> dict[str, tuple[str, int]]:
    """{"bos"|"eos"|"pad": (token, id)}: ``tokenizer_config.json``'s special tokens (strings or {"content": …})
    looked up in ``tokenizer.json``; without that file, its special added tokens named as ``KNOWN_SPECIALS``."""
    by_name = {f.name: f for f in files}
    tok = _read_json(by_name.get("tokenizer.json") or files[0])
    ids: dict[str, int] = {}
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids.update({k: int(v) for k, v in vocab.items() if isinstance(v, int)})
    special = {}
    for entry in tok.get("added_tokens", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
            ids[entry["content"]] = entry["id"]
            if entry.get("special"):
                special[entry["content"]] = entry["id"]
    out = {}
    if "tokenizer_config.json" in by_name:
        config = _read_json(by_name["tokenizer_config.json"])
        for key in ("bos", "eos", "pad"):
            token = config.get(f"{key}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and token in ids:
                out[key] = (token, ids[token])
        return out
    for key, names in KNOWN_SPECIALS.items():
        token = next((n for n in names if n in special), None)
        if token is not None:
            out[key] = (token, special[token])
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
