"""``lmc.generate``: runs generation with a bundle built by ``lmc build --context N``. It picks the driver: an
encoder–decoder bundle decodes greedily through ``seq2seq_generate``; a decoder-only one runs a
``drivers.StateDecoder`` (its cache in place) under ``speculate.decode``, greedy or sampled (``sampling``),
with drafted tokens verified several per forward. It sits above ``drivers`` (the decoders) and
``seq2seq_generate`` (which builds on them), so the decoders never import what drives them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lmc.core.errors import LmcError
from lmc.compiler.drivers import GenerationResult, StateDecoder, bundle_model, check_token_ids, peak_rss_bytes
from lmc.compiler.sampling import Sampling
from lmc.compiler.seq2seq_generate import generate_seq2seq, seq2seq_info
from lmc.compiler.speculate import decode


def generate(bundle: str | Path, prompt: Sequence[int] | None, max_new_tokens: int = 32, threads: int = 0,
             on_token: Callable[[int], None] | None = None, encoder_inputs=None, *, speculate=None,
             draft: str | Path | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None,
             stop_tokens: Sequence[int] = ()) -> GenerationResult:
    """Generation with a bundle built by ``lmc build --context N``: the prompt is prefilled (in chunks of the
    bundle's prefill chunk), then tokens follow with the cache held in place — greedy, or sampled with
    ``temperature`` > 0, ``top_k``, ``top_p``, ``repetition_penalty`` and ``seed`` (``lmc.compiler.sampling``),
    ending early at any of ``stop_tokens``. ``speculate`` (``off``, ``lookup[:K]``, ``draft[:K]``; default:
    lookup drafts when greedy, ``draft`` bundle drafts when one is given, none when sampling) verifies K
    drafted tokens per forward with the same result (``lmc.compiler.speculate``). An encoder–decoder bundle
    takes ``encoder_inputs`` (the encoder's inputs by name, or an ``.npz`` path) and by default starts from its
    decoder start token (``lmc.compiler.seq2seq_generate``); it decodes greedily."""
    if encoder_inputs is not None or seq2seq_info(bundle_model(bundle)) is not None:
        if encoder_inputs is None:
            raise LmcError(f"{bundle}: an encoder–decoder bundle needs the encoder's inputs (--encoder-inputs x.npz)")
        if seq2seq_info(bundle_model(bundle)) is None:
            raise LmcError(f"{bundle}: not an encoder–decoder bundle; --encoder-inputs does not apply")
        if temperature or repetition_penalty != 1 or stop_tokens or draft is not None or speculate not in (None, "off"):
            raise LmcError("sampling, stop tokens and speculation apply to decoder-only generation bundles")
        return generate_seq2seq(bundle, prompt, max_new_tokens, encoder_inputs, threads, on_token)

    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
    if max_new_tokens < 1:
        raise LmcError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    prompt = [int(t) for t in prompt or []]
    if not prompt:
        raise LmcError("the prompt is empty")
    decoder = StateDecoder(bundle_model(bundle), threads=threads)
    check_token_ids(prompt, decoder.vocab_size())
    if len(prompt) + max_new_tokens - 1 > decoder.info.context:
        raise LmcError(f"prompt ({len(prompt)}) + {max_new_tokens} new tokens exceed the bundle's context of "
                       f"{decoder.info.context} tokens (rebuild with a larger --context)")
    drafter = StateDecoder(bundle_model(draft), threads=threads) if draft is not None else None
    run = decode(decoder, [prompt], max_new_tokens, sampling=sampling, speculate=speculate, draft=drafter,
                 stop_tokens=stop_tokens, on_token=None if on_token is None else lambda _, token: on_token(token))
    return GenerationResult(run.tokens[0], len(prompt), run.prefill_seconds, run.decode_seconds, peak_rss_bytes(),
                            run.speculation, run.drafted, run.accepted)
