"""Choosing the next token from a generation bundle's logits, as apps do: greedy, or sampled with temperature,
top-k, top-p and a repetition penalty, reproducibly from a seed.

The order is Hugging Face generation's: repetition penalty (a token already in the prompt or the text so
far has its logit divided by the penalty when positive, multiplied when negative), then temperature, then
top-k (the k largest), then top-p (the smallest set of the most probable tokens whose probability reaches
p), then softmax. ``temperature`` 0 is greedy: the argmax of the penalised logits (top-k and top-p change
nothing there). One ``numpy.random.Generator`` (PCG64 from ``seed``) draws every random number of a run,
so a run with a seed repeats exactly; the same seed with and without speculation draws the same
distribution but not the same numbers (speculation also draws for its accept/reject tests).

Stop tokens end a row's generation at the first one produced (it is the last token returned);
``eos_token_ids`` finds a tokenizer's end-of-sequence token (``tokenizer_config.json``'s ``eos_token``,
``generation_config.json`` / ``config.json``'s ``eos_token_id`` beside it or the bundle, else a special
added token of a well-known name such as ``</s>`` or ``<|endoftext|>`` in tokenizer.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmc.core.errors import LmcError
from lmc.compiler.genai import TOKENIZER_FILES, special_token_ids


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. The defaults are greedy decoding."""

    temperature: float = 0.0          # 0: greedy (argmax)
    top_k: int = 0                    # 0: all tokens
    top_p: float = 1.0                # 1: all tokens
    repetition_penalty: float = 1.0   # 1: none
    seed: int | None = None           # None: a fresh seed from the OS

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise LmcError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise LmcError(f"--top-k must be a whole number ≥ 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LmcError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise LmcError(f"--repetition-penalty must be positive (1: none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def describe(self) -> str:
        if self.greedy:
            return "greedy" + (f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1 else "")
        parts = [f"temperature {self.temperature:g}"]
        parts += [f"top-k {self.top_k}"] if self.top_k else []
        parts += [f"top-p {self.top_p:g}"] if self.top_p < 1 else []
        parts += [f"repetition penalty {self.repetition_penalty:g}"] if self.repetition_penalty != 1 else []
        return "sampling: " + ", ".join(parts) + (f", seed {self.seed}" if self.seed is not None else "")


GREEDY = Sampling()


def penalised(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """The logits (float64) with the repetition penalty applied to the tokens of ``history``."""
    scores = np.asarray(logits, dtype=np.float64).copy()
    if penalty != 1 and len(history):
        seen = np.unique(np.asarray(history, dtype=np.int64))
        values = scores[seen]
        scores[seen] = np.where(values > 0, values / penalty, values * penalty)
    return scores


def distribution(logits: np.ndarray, history: Sequence[int], sampling: Sampling) -> np.ndarray:
    """The probabilities (float64, summing to 1) the next token is sampled from: ``logits`` [V] after the
    penalty, temperature, top-k and top-p. Greedy settings give the argmax's point mass."""
    scores = penalised(logits, history, sampling.repetition_penalty)
    if sampling.greedy:
        p = np.zeros_like(scores)
        p[int(np.argmax(scores))] = 1.0
        return p
    scores = scores / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.size:
        kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = int(np.searchsorted(cumulative, sampling.top_p)) + 1      # the first that reaches top_p stays
        drop = order[keep:]
        p[drop] = 0.0
        p /= p.sum()
    return p


def choose(logits: np.ndarray, history: Sequence[int], sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token: the penalised argmax when greedy, else a draw from ``distribution``."""
    if sampling.greedy:
        return int(np.argmax(penalised(logits, history, sampling.repetition_penalty)))
    return draw(distribution(logits, history, sampling), rng)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from probabilities ``p`` (inverse CDF of one uniform number: the same draw for the same
    generator state)."""
    cumulative = np.cumsum(p)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), p.size - 1))


def eos_token_ids(tokenizer: str | Path, bundle: str | Path | None = None) -> list[int]:
    """The end-of-sequence token id of a tokenizer.json (and the files beside it; ``bundle``'s folder is
    searched for configs too), or [] when none is known."""
    path = Path(tokenizer)
    folder = path if path.is_dir() else path.parent
    files = [path / "tokenizer.json" if path.is_dir() else path]
    files += [folder / name for name in TOKENIZER_FILES if name != "tokenizer.json" and (folder / name).is_file()]
    model = Path(bundle) / "model.onnx" if bundle is not None and Path(bundle).is_dir() else Path(bundle or folder / "x")
    _, found = special_token_ids(files, model)
    eos = found.get("eos")
    return [int(eos)] if isinstance(eos, int) else []
