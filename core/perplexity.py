"""Perplexity of a causal LM over a token file, under onnxruntime.

Token file: uint16 little-endian ids, one flat stream. Window i is tokens [L·i, L·i + L); the model reads
the window and predicts tokens 1..L−1 from positions 0..L−2. With p the softmax of the logits,
    NLL = mean over all predictions of −log p[target],   perplexity = exp(NLL).
Precondition: the model has one integer input [batch, L] (batch 1 is used) and its first output is the
logits [batch, L, vocab].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmc.core.errors import LmcError


@dataclass(frozen=True)
class Perplexity:
    nll: float
    perplexity: float
    windows: int
    seq_len: int
    predictions: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_tokens(path: str | Path, seq_len: int, windows: int) -> np.ndarray:
    """[windows, seq_len] int64 token windows from a uint16 token file."""
    p = Path(path)
    if not p.is_file():
        raise LmcError(f"{path}: no such token file")
    data = np.fromfile(str(p), dtype="<u2")
    available = data.size // seq_len
    if available == 0:
        raise LmcError(f"{path}: holds {data.size} tokens, fewer than one window of {seq_len}")
    n = min(windows, available)
    return data[: n * seq_len].reshape(n, seq_len).astype(np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Σ −log p[target] of one window's predictions (logits [L, vocab] of window [L]: L − 1 of them)."""
    lp = log_softmax(np.asarray(logits)[:-1])
    targets = window[1:]
    return float(-lp[np.arange(targets.size), targets].sum())


def from_nll(total: float, tokens: np.ndarray) -> Perplexity:
    """The perplexity of windows [N, L] whose predictions sum to ``total`` negative log-likelihood."""
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    nll = total / count
    return Perplexity(nll, math.exp(nll), len(tokens), tokens.shape[1], count)


def window_perplexity(logits_of, tokens: np.ndarray) -> Perplexity:
    """Perplexity over token windows [N, L], given ``logits_of(window [L]) -> logits [L, vocab]``."""
    return from_nll(sum(window_nll(logits_of(window), window) for window in tokens), tokens)


def perplexity(session, tokens: np.ndarray) -> Perplexity:
    """Evaluate ``session`` (an onnxruntime InferenceSession) on token windows [N, L]."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise LmcError(f"perplexity needs a model with one token input; this one has {len(inputs)}")
    name = inputs[0].name
    return window_perplexity(lambda w: session.run(None, {name: w[None, :]})[0][0], tokens)


def streaming_perplexity(decoder, tokens: np.ndarray, chunk: int = 1) -> Perplexity:
    """Perplexity of a token-by-token decoder (``lmc.compiler.drivers``): each window from an empty cache,
    fed ``chunk`` tokens per step (1: pure decoding, as generation runs)."""
    def logits_of(window):
        decoder.reset()
        return np.concatenate([decoder.forward(window[None, i:i + chunk])[0] for i in range(0, len(window), chunk)])
    return window_perplexity(logits_of, tokens)
