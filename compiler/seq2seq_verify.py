"""An encoder–decoder bundle against its original export: the same encoder input and prompt through both —
the original driven by optimum's own loop (``seq2seq_export.OriginalLoop``), the bundle with its state in place
(``seq2seq_generate.Seq2SeqDecoder``) — the original choosing the tokens greedily and the bundle fed the same
ones. Compared: the prefill logits, the worst decode step's logits (``verify.compare``, within the tolerance),
and the greedy tokens — the bundle's argmax at every step must be the original's token (``greedy tokens``:
``max_abs`` = steps that differ, allowed none).

Inputs: given (the encoder's inputs by name, unpadded: the original runs on them as they are, the bundle pads
them to its encoder length) or random with a fixed seed: float inputs ~ N(0, 1); token ids uniform in
[2, vocab) over three quarters of the encoder length (so padding is exercised), with an all-ones mask.
The prompt is the decoder start token and ``prompt − 1`` random tokens (a prefill, by default longer than one
prefill chunk when the context allows), then ``steps`` tokens — by default to the last position of the
context (at most ``HORIZON``), so every position the bundle serves is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from lmc.core import weights
from lmc.core.errors import LmcError
from lmc.compiler.drivers import LOW_MEMORY, generation_info
from lmc.compiler.seq2seq_export import OriginalLoop, Seq2SeqExport, find_export
from lmc.compiler.seq2seq_generate import (Seq2SeqDecoder, Seq2SeqInfo, load_encoder_inputs, seq2seq_info,
                                           start_tokens, unpadded)
from lmc.compiler.verify import DEFAULT_TOLERANCE, OutputError, VerifyReport, compare

log = logging.getLogger(__name__)

PROMPT = 4
HORIZON = 1024          # steps checked at most: the whole context up to this many positions


def random_encoder_inputs(info: Seq2SeqInfo, dtypes: dict[str, np.dtype], vocab: int,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """Encoder inputs for a check (see the module docstring): unpadded, as the original takes them."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dims in info.encoder_inputs.items():
        if name == info.mask_source:
            continue
        if np.dtype(dtypes[name]).kind == "f":
            out[name] = rng.standard_normal(dims).astype(dtypes[name])
        else:
            length = max(1, dims[-1] - dims[-1] // 4)
            out[name] = rng.integers(2, vocab, dims[:-1] + [length]).astype(np.int64)
    return unpadded(info, out)


def _vocab(model_path: Path, logits: str) -> int:
    model = onnx.load(str(model_path), load_external_data=False)
    return next(o for o in model.graph.output if o.name == logits).type.tensor_type.shape.dim[-1].dim_value


def compare_seq2seq(export: Seq2SeqExport, model_path: str | Path, encoder_inputs: Mapping[str, np.ndarray] | None = None,
                    prompt: int | None = None, steps: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                    seed: int = 0) -> VerifyReport:
    """The bundle at ``model_path`` against ``export`` (see the module docstring). ``prompt``: tokens
    prefilled (default: more than one prefill chunk, at most half the context); ``steps``: tokens decoded
    after it (default: to the last position of the context, at most ``HORIZON``)."""
    model_path = Path(model_path)
    info, gen = seq2seq_info(model_path), generation_info(model_path)
    if info is None or gen is None:
        raise LmcError(f"{model_path}: not an encoder–decoder bundle")
    vocab = _vocab(model_path, gen.logits)
    if encoder_inputs is None:
        encoder = onnx.load(str(model_path.parent / info.encoder), load_external_data=False)
        dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in encoder.graph.input}
        encoder_inputs = random_encoder_inputs(info, dtypes, vocab, seed)
    inputs = dict(encoder_inputs)
    if prompt is None:
        prompt = max(1, min(gen.context // 2, max(PROMPT, gen.prefill_chunk + 1)))
    rng = np.random.default_rng(seed + 1)
    tokens = start_tokens(info, None) + [int(t) for t in rng.integers(2, vocab, max(0, prompt - 1))]
    last = gen.context - len(tokens) + 1
    steps = max(1, min(steps if steps is not None else HORIZON, last))

    # one model at a time, without prepacked copies (as compare_generation)
    reference = OriginalLoop(export, LOW_MEMORY)
    reference.encode(unpadded(info, inputs))
    ref_logits = [reference.forward(np.array([tokens]))]
    chosen = []
    for i in range(steps):
        chosen.append(int(np.argmax(ref_logits[-1][0, -1])))
        if i + 1 < steps:
            ref_logits.append(reference.forward(np.array([[chosen[-1]]])))
    del reference
    weights.release_freed()
    bundle = Seq2SeqDecoder(model_path.parent, session_options=LOW_MEMORY, warm_up=False)
    bundle.encode(inputs)
    ours = [bundle.forward(np.array([tokens]))]
    for token in chosen[:-1]:
        ours.append(bundle.forward(np.array([[token]])))
    del bundle
    weights.release_freed()
    outputs = [compare(ref_logits[0], ours[0], "logits (prefill)")]
    decode = None
    for r, c in zip(ref_logits[1:], ours[1:]):
        err = compare(r, c, "logits (decode)")
        decode = err if decode is None or err.max_rel > decode.max_rel else decode
    if decode is not None:
        outputs.append(decode)
    picked = [int(np.argmax(c[0, -1])) for c in ours]
    differ = sum(a != b for a, b in zip(picked, chosen))
    outputs.append(OutputError(f"greedy tokens ({steps})", float(differ), differ / steps, 1.0 - differ / steps,
                               allowed=0.0))
    log.info("encoder–decoder check: %d/%d greedy tokens equal, logits max rel %.3g", steps - differ, steps,
             max(o.max_rel for o in outputs[:-1]))
    return VerifyReport(tuple(outputs), 1 + len(chosen), tolerance)


def verify_seq2seq(model_path: str | Path, against: str | Path, inputs: str | Path | None = None,
                   tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> VerifyReport:
    """``lmc verify BUNDLE --against FOLDER`` for an encoder–decoder bundle (``inputs``: the encoder's inputs
    as an ``.npz``, by name; default random)."""
    if not Path(against).exists():
        raise LmcError(f"{against}: no such file or folder")
    export = find_export(against)
    given = load_encoder_inputs(inputs) if inputs is not None else None
    return compare_seq2seq(export, model_path, given, tolerance=tolerance, seed=seed)
