"""Driving an encoder–decoder generation bundle: the encoder once per input, then the decoder token by token.

The bundle's ``model.onnx`` is a generation bundle (``lmc.generation``: self-attention cache as in-place state)
whose cross-attention keys/values are more inputs (``lmc.seq2seq``: ``cross``); ``encoder.onnx`` maps the
encoder's inputs to exactly those tensors (same names). ``Seq2SeqDecoder`` allocates each cross tensor once as
an OrtValue, binds it as the encoder's output (onnxruntime writes it there) and as the decoder's input: the
keys/values are computed once per input and read in place at every step, never copied or recomputed. A text
encoder's inputs shorter than the bundle's encoder length are padded (``input_ids`` with the pad token,
``attention_mask`` with 0 — masked keys, so the result is the unpadded one's); the decoder's
``encoder_attention_mask`` is that mask. Float inputs (Whisper's ``input_features``) must have the bound shape. Generation starts from ``decoder_start_token_id`` unless a prompt is
given, and is greedy (exactly ``max_new_tokens`` tokens, as ``lmc generate`` does for decoders).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lmc.core.errors import LmcError
from lmc.compiler.drivers import (GenerationResult, StateDecoder, _options, bundle_model, check_token_ids,
                                   continue_greedy, peak_rss_bytes)
from lmc.core.runtime import bundle_session_options, loading

SEQ2SEQ_KEY = "lmc.seq2seq"
ENCODER_MODEL = "encoder.onnx"
ENCODER_WEIGHTS = "encoder.weights"


@dataclass(frozen=True)
class Seq2SeqInfo:
    """What drives an encoder–decoder bundle besides ``GenerationInfo`` (JSON in ``model.onnx``'s metadata)."""

    encoder: str                               # the encoder's file in the bundle
    encoder_inputs: dict[str, list[int]]       # its inputs and their bound dims
    cross: tuple[str, ...]                     # decoder inputs the encoder's outputs of the same names fill
    mask: str | None                           # decoder input given the encoder's attention mask
    mask_source: str | None                    # the encoder input it copies
    encoder_length: int                        # L of the cross state [1, H, L, D]
    decoder_start_token_id: int | None
    eos_token_id: int | None = None
    pad_token_id: int = 0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "cross": list(self.cross)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Seq2SeqInfo":
        d = json.loads(text)
        return cls(d["encoder"], {k: list(v) for k, v in d["encoder_inputs"].items()}, tuple(d["cross"]),
                   d.get("mask"), d.get("mask_source"), int(d["encoder_length"]), d.get("decoder_start_token_id"),
                   d.get("eos_token_id"), int(d.get("pad_token_id", 0)))


def seq2seq_info(model_path: str | Path) -> Seq2SeqInfo | None:
    """The encoder–decoder metadata of a bundle's model, or None for other bundles."""
    model = onnx.load(str(model_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == SEQ2SEQ_KEY:
            return Seq2SeqInfo.from_json(prop.value)
    return None


def load_encoder_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (the encoder's inputs by name)."""
    try:
        with np.load(str(path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise LmcError(f"{path}: cannot read encoder inputs ({exc})") from exc
    if not arrays:
        raise LmcError(f"{path}: holds no arrays")
    return arrays


def prepare_encoder_inputs(info: Seq2SeqInfo, given: Mapping[str, np.ndarray],
                           dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """The encoder's feeds at the bundle's bound shapes: a missing batch axis added, a shorter sequence
    padded (``input_ids`` with the pad token, ``attention_mask`` with 0; an absent mask is all ones over
    the given tokens); LmcError naming what does not fit."""
    unknown = sorted(set(given) - set(info.encoder_inputs))
    if unknown:
        raise LmcError(f"encoder inputs: '{unknown[0]}' is not an input of the encoder "
                       f"(it takes {', '.join(info.encoder_inputs)})")
    given = {k: np.asarray(v) for k, v in given.items()}
    feeds: dict[str, np.ndarray] = {}
    real = None
    for name, dims in info.encoder_inputs.items():
        if name not in given:
            continue
        value = given[name]
        if value.ndim == len(dims) - 1:
            value = value[None]
        if value.ndim != len(dims) or value.shape[0] != dims[0]:
            raise LmcError(f"encoder input '{name}' has shape {list(value.shape)}; the bundle takes {dims}")
        short = [k for k, (got, want) in enumerate(zip(value.shape, dims)) if got != want]
        tokens = np.dtype(dtypes.get(name, value.dtype)).kind in "iub"
        if short and (short != [len(dims) - 1] or value.shape[-1] > dims[-1] or not tokens):
            raise LmcError(f"encoder input '{name}' has shape {list(value.shape)}; the bundle takes {dims} "
                           f"(rebuild with --encoder-length for longer inputs)")
        if short:
            real = value.shape[-1] if real is None else real
            pad = 0 if name == info.mask_source else info.pad_token_id
            value = np.concatenate([value, np.full(value.shape[:-1] + (dims[-1] - value.shape[-1],), pad,
                                                   value.dtype)], axis=-1)
        feeds[name] = value.astype(dtypes.get(name, value.dtype), copy=False)
    if info.mask_source is not None and info.mask_source in info.encoder_inputs and info.mask_source not in feeds:
        dims = info.encoder_inputs[info.mask_source]
        mask = np.zeros(dims, dtypes.get(info.mask_source, np.int64))
        mask[..., :real if real is not None else dims[-1]] = 1
        feeds[info.mask_source] = mask
    missing = [n for n in info.encoder_inputs if n not in feeds]
    if missing:
        raise LmcError(f"encoder inputs missing: {', '.join(missing)} (give them in the .npz by name)")
    return feeds


def unpadded(info: Seq2SeqInfo, given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder inputs as the original export takes them: batch axis added, an absent attention mask
    made all ones (the original is run on the tokens given, not on the bundle's padding)."""
    out = {}
    for name, value in given.items():
        value = np.asarray(value)
        dims = info.encoder_inputs.get(name)
        out[name] = value[None] if dims is not None and value.ndim == len(dims) - 1 else value
    if info.mask_source is not None and info.mask_source in info.encoder_inputs and info.mask_source not in out:
        ids = next((v for k, v in out.items() if k != info.mask_source), None)
        if ids is not None:
            out[info.mask_source] = np.ones(ids.shape, np.int64)
    return out


class Seq2SeqDecoder:
    """An encoder–decoder bundle under onnxruntime: ``encode(inputs)`` fills the cross state in place,
    then ``forward(ids)``/``reset()`` as ``StateDecoder`` (which it wraps)."""

    def __init__(self, bundle: str | Path, threads: int = 0, session_options: dict | None = None,
                 warm_up: bool = True):
        model_path = bundle_model(bundle)
        info = seq2seq_info(model_path)
        if info is None:
            raise LmcError(f"{bundle}: not an encoder–decoder bundle (build one from an encoder–decoder export "
                           f"with lmc build FOLDER --context N)")
        self.info = info
        self.decoder = StateDecoder(model_path, threads, session_options, warm_up=False)
        settings = {**bundle_session_options(model_path), **(session_options or {})}
        with loading(settings, model_path.parent / info.encoder):
            self.encoder = ort.InferenceSession(str(model_path.parent / info.encoder), _options(threads, settings),
                                                providers=["CPUExecutionProvider"])
        self.encoder_dtypes = {i.name: _np_dtype(i.type) for i in self.encoder.get_inputs()}
        inputs = {i.name: i for i in self.decoder.session.get_inputs()}
        self.cross = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros([int(d) for d in inputs[name].shape],
                                                                      _np_dtype(inputs[name].type)))
                      for name in info.cross}
        self.encoder_binding = self.encoder.io_binding()
        for name, value in self.cross.items():
            self.encoder_binding.bind_ortvalue_output(name, value)      # the encoder writes the state in place
            self.decoder.binding.bind_ortvalue_input(name, value)
        self.mask = None
        if info.mask is not None:
            self.mask = ort.OrtValue.ortvalue_from_numpy(np.zeros([int(d) for d in inputs[info.mask].shape],
                                                                  _np_dtype(inputs[info.mask].type)))
            self.decoder.binding.bind_ortvalue_input(info.mask, self.mask)
        self.encoded = False
        if warm_up:           # one step at the last position, as StateDecoder does: memory flat from here on
            self.decoder.length = self.decoder.info.context - 1
            self.decoder.forward(np.zeros((1, 1), np.int64))
            self.decoder.reset()

    @property
    def state_bytes(self) -> int:
        return self.decoder.state_bytes + sum(v.numpy().nbytes for v in self.cross.values())

    def encode(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Run the encoder on ``inputs`` (by name; see ``prepare_encoder_inputs``): the cross state now holds
        this input's keys/values; the decoder's cache is reset."""
        feeds = prepare_encoder_inputs(self.info, inputs, self.encoder_dtypes)
        for name, value in feeds.items():
            self.encoder_binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.encoder.run_with_iobinding(self.encoder_binding)
        if self.mask is not None:
            self.mask.update_inplace(np.ascontiguousarray(feeds[self.info.mask_source].astype(
                self.mask.numpy().dtype)))
        self.encoded = True
        self.reset()

    def reset(self) -> None:
        self.decoder.reset()

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if not self.encoded:
            raise LmcError("encode() the encoder's inputs before decoding")
        return self.decoder.forward(ids)

    @property
    def context(self) -> int:
        return self.decoder.info.context


def _np_dtype(onnx_type: str) -> np.dtype:
    name = onnx_type[len("tensor("):-1] if onnx_type.startswith("tensor(") else onnx_type
    return np.dtype({"float": "float32", "double": "float64", "bool": "bool"}.get(name, name))


def start_tokens(info: Seq2SeqInfo, prompt: Sequence[int] | None) -> list[int]:
    """The prompt, or [decoder_start_token_id] when none is given."""
    tokens = [int(t) for t in prompt] if prompt is not None else []
    if tokens:
        return tokens
    if info.decoder_start_token_id is None:
        raise LmcError("the bundle records no decoder_start_token_id (no config.json in the export): give the "
                       "decoder's first tokens with --prompt-tokens")
    return [info.decoder_start_token_id]


def generate_seq2seq(bundle: str | Path, prompt: Sequence[int] | None, max_new_tokens: int,
                     encoder_inputs: Mapping[str, np.ndarray] | str | Path, threads: int = 0,
                     on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Greedy generation with an encoder–decoder bundle: the encoder on ``encoder_inputs`` (a mapping or an
    ``.npz`` path), the prompt (default: the decoder start token) prefilled, then one token per step."""
    if max_new_tokens < 1:
        raise LmcError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if isinstance(encoder_inputs, str | Path):
        encoder_inputs = load_encoder_inputs(encoder_inputs)
    decoder = Seq2SeqDecoder(bundle, threads=threads)
    tokens = start_tokens(decoder.info, prompt)
    check_token_ids(tokens, decoder.decoder.vocab_size())
    if len(tokens) + max_new_tokens - 1 > decoder.context:
        raise LmcError(f"prompt ({len(tokens)}) + {max_new_tokens} new tokens exceed the bundle's context of "
                       f"{decoder.context} tokens (rebuild with a larger --context)")
    start = time.perf_counter()
    decoder.encode(encoder_inputs)
    logits = decoder.forward(np.asarray(tokens, dtype=np.int64)[None, :])
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    new = continue_greedy(decoder, logits, max_new_tokens, on_token)
    return GenerationResult(new, len(tokens), prefill, time.perf_counter() - start, peak_rss_bytes())
