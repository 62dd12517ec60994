"""Speculative decoding over a generation bundle: draft tokens cheaply, verify k of them in one forward
through the bundle's multi-token path, keep the longest prefix the bundle itself would have produced.

Drafts come from
- *prompt lookup* (``lookup[:K]``): the last n tokens (n = 3, 2, 1) are looked up in the prompt and the text
  so far, and the K tokens that followed their latest earlier occurrence are the draft (code and edits repeat
  themselves); no model, almost no time;
- a *draft bundle* (``draft[:K]``, ``--draft BUNDLE``): a smaller lmc generation bundle with the same
  vocabulary, driven in step with the main one (its own cache rewound with it), proposes K tokens one by one.

One verify step feeds the last accepted token and the d ≤ K drafts at consecutive positions p … p + d (one
forward of d + 1 ≤ prefill-chunk tokens), compares each draft with the token the bundle chooses after the
tokens before it, takes the agreeing drafts plus the bundle's own next token (1 … d + 1 new tokens per
forward), and rewinds the bundle's position to the accepted length (``StateDecoder.rewind``): the rows a
rejected draft wrote are overwritten by the next forward and never read before (a query sees keys at
positions ≤ its own). A windowed ring of W + chunk − 1 slots (``passes.static_cache.layout_for``) stays exact
too: the d + 1 ≤ chunk positions a verify step writes displace ring keys at positions r = W + chunk − 1 earlier,
which no query at or after the accepted length can still see (q − (p' − r) ≥ W for every displaced p' <
accepted + chunk), and the stale rows hold positions its mask already excludes for the same reason.

Greedy decoding stays exactly greedy: a draft is kept only when it equals the argmax (of the penalised
logits, with a repetition penalty) at its position, so the tokens are plain greedy's as far as the bundle
computes a token's logits alike alone or among others. Float bundles do (within 1e-5); onnxruntime runs an int4
bundle's 4-bit MatMuls with int8 activations in kernels that round one row differently from several (logits
0.1–0.4 apart on the reference model), so there speculation can leave plain greedy at a near-tie — the tokens
are then greedy under multi-token steps, as a chunked prefill's are (bench/RESULTS.md). Sampling stays exact by the
standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): draft x is kept with probability
min(1, p(x) / q(x)) and on rejection the token is drawn from max(0, p − q) normalised; a lookup draft is a
point mass (q(x) = 1: kept with probability p(x), else drawn from p without x); if every draft is kept, one
more token is drawn from p. Each token so follows the sampling distribution p exactly. Lookup speculation
is on by default only when decoding greedily with a float bundle (under sampling, drafts are accepted less often;
on a quantized bundle, multi-token steps round differently from one-token ones: ask for it).

Batch rows advance by their own accepted counts: the bundle takes per-row positions (its attention_mask
holds a row's 0s between its tokens and the step's), so each row is rewound to its own length. Where the
bundle cannot take multi-token steps per row — onnxruntime's GroupQueryAttention refuses a batch above 1
with past and more than one new token — speculation is off (``Decoded.speculation`` says why); such a
bundle built with ``--disable-pass fuse-late`` keeps ONNX Attention and speculates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lmc.compiler.draft_policy import DraftPolicy
from lmc.compiler.sampling import GREEDY, Sampling, choose, distribution, draw, penalised
from lmc.core.errors import LmcError

DEFAULT_K = 4
NGRAM = 3          # longest n-gram prompt lookup matches (then shorter ones, down to 1)


@dataclass(frozen=True)
class Speculate:
    """``off``, ``lookup`` (prompt lookup) or ``draft`` (a draft bundle), with ``k`` draft tokens per verify."""

    mode: str = "lookup"
    k: int = DEFAULT_K

    def __str__(self) -> str:
        return "off" if self.mode == "off" else f"{self.mode}:{self.k}"

    @classmethod
    def parse(cls, value: "str | bool | Speculate | None") -> "Speculate | None":
        """``off`` | ``lookup[:K]`` | ``draft[:K]`` | ``auto`` / None (decide by the sampling and a draft)."""
        if value is None or isinstance(value, Speculate):
            return value
        if value is True:
            return None
        if value is False:
            return cls("off", 0)
        text = str(value).strip().lower()
        if text in ("", "auto"):
            return None
        if text == "off":
            return cls("off", 0)
        mode, _, k = text.partition(":")
        if mode not in ("lookup", "draft"):
            raise LmcError(f"--speculate: expected off, lookup[:K] or draft[:K], got {value!r}")
        try:
            k = int(k) if k else DEFAULT_K
        except ValueError:
            raise LmcError(f"--speculate {value}: K must be a whole number of draft tokens") from None
        if k < 1:
            raise LmcError(f"--speculate {value}: K must be at least 1 draft token")
        return cls(mode, k)


def resolve(speculate, sampling: Sampling, has_draft: bool) -> Speculate:
    """What runs: as asked, or by default a draft bundle's drafts when one is given, lookup drafts when
    greedy, none when sampling."""
    spec = Speculate.parse(speculate)
    if spec is None:
        spec = Speculate("draft") if has_draft else Speculate("lookup") if sampling.greedy else Speculate("off", 0)
    if spec.mode == "draft" and not has_draft:
        raise LmcError("--speculate draft needs a draft bundle (--draft BUNDLE)")
    if has_draft and spec.mode != "draft":
        raise LmcError(f"--draft gives drafts; it does not go with --speculate {spec}")
    return spec


def multi_token_limit(decoder) -> tuple[int, str]:
    """(the most tokens one verify forward may take, or 1 with the reason why not more)."""
    info = decoder.info
    chunk = info.prefill_chunk or info.context
    if not hasattr(decoder, "rewind"):
        return 1, f"{type(decoder).__name__} cannot rewind its cache"
    if chunk < 2:
        return 1, "the bundle's prefill chunk is 1 token"
    if info.batch > 1 and not info.rows_apart:
        return 1, "the bundle's rows share row 0's positions (computed from the cache length), so rows cannot accept apart"
    if info.batch > 1 and _has_group_query_attention(decoder):
        return 1, ("onnxruntime's GroupQueryAttention takes no multi-token steps at batch > 1 "
                   "(build with --disable-pass fuse-late to keep ONNX Attention)")
    return chunk, ""


def _op_types(decoder) -> frozenset[str]:
    """The op types of the bundle ``decoder`` runs (empty for a decoder without a model file), read once."""
    import onnx

    path = getattr(decoder, "model_path", None)
    if path is None:
        return frozenset()
    if getattr(decoder, "_op_types", None) is None:
        model = onnx.load(str(path), load_external_data=False)
        decoder._op_types = frozenset(n.op_type for n in model.graph.node)
    return decoder._op_types


QUANTIZED_MATMULS = frozenset({"MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})


def _rounds_steps_apart(decoder) -> bool:
    """Whether the bundle runs kernels whose multi-token steps round differently from one-token steps
    (MatMulNBits' and the integer MatMuls' int8 activations): a quantized bundle."""
    return bool(_op_types(decoder) & QUANTIZED_MATMULS)


def _has_group_query_attention(decoder) -> bool:
    return "GroupQueryAttention" in _op_types(decoder)


class Lookup:
    """Prompt lookup: per row, an index of every n-gram (n ≤ ``NGRAM``) of its tokens to where it last ended."""

    def __init__(self, batch: int, ngram: int = NGRAM, shortest: int = 1):
        self.ngram, self.shortest = ngram, shortest
        self.last: list[dict[tuple[int, ...], int]] = [{} for _ in range(batch)]
        self.indexed = [0] * batch

    def propose(self, row: int, history: list[int], k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the history's longest suffix
        (of ``ngram`` … 1 tokens) found, and that suffix's length (0: none found)."""
        if k < 1 or len(history) < 2:
            return [], 0
        last, end = self.last[row], len(history) - 1
        for e in range(self.indexed[row], end):          # n-grams ending before the last token
            for n in range(1, min(self.ngram, e + 1) + 1):
                last[tuple(history[e - n + 1:e + 1])] = e
        self.indexed[row] = max(self.indexed[row], end)
        for n in range(min(self.ngram, end), self.shortest - 1, -1):
            e = last.get(tuple(history[-n:]))
            if e is not None:
                return history[e + 1:e + 1 + k], n
        return [], 0


class DraftModel:
    """A draft bundle driven in step with the main one: before each verify it has consumed every token of
    a row but the last; it then feeds that (and one more after a fully accepted verify) and proposes k tokens
    one forward each; after the verify it is rewound to what was accepted."""

    def __init__(self, decoder, sampling: Sampling):
        self.decoder = decoder
        self.sampling = sampling

    def propose(self, histories: list[list[int]], active: list[bool], k: int, rng) -> tuple[list, list]:
        d = self.decoder
        pos = d.positions()
        ends = [len(h) for h in histories]
        need = [max(1, ends[r] - int(pos[r])) if active[r] else 1 for r in range(len(histories))]
        width = max(need)
        ids = []
        for r, h in enumerate(histories):
            feed = h[int(pos[r]):ends[r]] if active[r] else [h[-1]]
            ids.append(feed + [h[-1]] * (width - len(feed)))
        self.frozen = pos.copy()
        logits = d.forward(np.array(ids, dtype=np.int64))
        last = [logits[r, need[r] - 1] for r in range(len(histories))]
        if width > min(need):
            d.rewind([int(pos[r]) + need[r] for r in range(len(histories))])
        drafts: list[list[int]] = [[] for _ in histories]
        qs: list[list[np.ndarray]] = [[] for _ in histories]
        for i in range(k):
            step = []
            for r, h in enumerate(histories):
                if not active[r]:
                    step.append(h[-1])
                    continue
                seen = h + drafts[r]
                if self.sampling.greedy:
                    x = int(np.argmax(penalised(last[r], seen, self.sampling.repetition_penalty)))
                else:
                    q = distribution(last[r], seen, self.sampling)
                    x = draw(q, rng)
                    qs[r].append(q)
                drafts[r].append(x)
                step.append(x)
            if i + 1 < k:
                logits = d.forward(np.array(step, dtype=np.int64)[:, None])
                last = [logits[r, -1] for r in range(len(histories))]
        return drafts, qs

    def settle(self, lengths: Sequence[int], active: list[bool]) -> None:
        """Rewind to what the main bundle kept (``lengths``: its rows' accepted lengths); rows that had
        finished go back to where they stood."""
        pos = self.decoder.positions()
        self.decoder.rewind([min(int(pos[r]), int(lengths[r])) if active[r] else int(self.frozen[r])
                             for r in range(len(lengths))])


@dataclass
class Decoded:
    """New tokens per row and what speculation did: ``drafted`` draft tokens verified, ``accepted`` of them
    kept, ``forwards`` forwards of the main bundle after the prefill."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    speculation: str = "off"
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    draft_forwards: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def prefill(decoder, prompts: list[list[int]]) -> np.ndarray:
    """Run the prompts (rows right-padded to the longest; each row then rewound to its own length) and
    return each row's last logits [B, V]."""
    width = max(len(p) for p in prompts)
    ids = np.array([p + [p[-1]] * (width - len(p)) for p in prompts], dtype=np.int64)
    decoder.reset()
    logits = decoder.forward(ids)
    lengths = [len(p) for p in prompts]
    if min(lengths) < width:
        decoder.rewind(lengths)
    return np.stack([logits[r, n - 1] for r, n in enumerate(lengths)])


def verify(logits: np.ndarray, history: list[int], drafts: list[int], qs, sampling: Sampling,
           rng: np.random.Generator) -> tuple[int, int]:
    """(how many of ``drafts`` to keep, the token after them) from the main bundle's ``logits`` [d + 1, V] at
    the positions of the last accepted token and the drafts."""
    if sampling.greedy:
        if sampling.repetition_penalty == 1:
            preds = np.argmax(logits[:len(drafts) + 1], axis=-1)
        else:
            preds = [int(np.argmax(penalised(logits[i], history + drafts[:i], sampling.repetition_penalty)))
                     for i in range(len(drafts) + 1)]
        a = 0
        while a < len(drafts) and drafts[a] == int(preds[a]):
            a += 1
        return a, int(preds[a])
    seen = list(history)
    for i, x in enumerate(drafts):
        p = distribution(logits[i], seen, sampling)
        q = qs[i] if qs else None
        ratio = p[x] if q is None else p[x] / q[x]
        if rng.random() < ratio:
            seen.append(x)
            continue
        residual = p.copy()
        if q is None:
            residual[x] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return i, draw(residual / total if total > 0 else p, rng)
    return len(drafts), draw(distribution(logits[len(drafts)], seen, sampling), rng)


def decode(decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling = GREEDY,
           speculate=None, draft=None, stop_tokens: Sequence[int] = (),
           on_token: Callable[[int, int], None] | None = None) -> Decoded:
    """Generate ``max_new_tokens`` per row (fewer when a row produces a stop token, which ends it) after
    prefilling ``prompts`` (one per batch row of the bundle), speculating as ``speculate`` says
    (``Speculate.parse``; None: by default, see ``resolve``) with ``draft`` (a ``StateDecoder`` of a draft
    bundle) or prompt lookup. ``on_token(row, token)`` sees every new token as it is accepted."""
    batch = decoder.info.batch
    prompts = [[int(t) for t in p] for p in prompts]
    if len(prompts) != batch:
        raise LmcError(f"the bundle has {batch} batch row{'s' if batch > 1 else ''}; {len(prompts)} prompts given")
    if any(not p for p in prompts):
        raise LmcError("the prompt is empty")
    if max_new_tokens < 1:
        raise LmcError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    asked = Speculate.parse(speculate) is not None or draft is not None
    spec = resolve(speculate, sampling, draft is not None)
    notes: list[str] = []
    if not asked and spec.mode != "off" and _rounds_steps_apart(decoder):
        spec = Speculate("off", 0)
        notes.append("speculation off by default: this bundle's quantized kernels round a multi-token step "
                     "differently from one-token steps, so drafts could change greedy tokens at near-ties "
                     "(--speculate lookup turns it on)")
    widest, why = multi_token_limit(decoder)
    k_max = spec.k if spec.mode != "off" else 0
    if draft is not None:
        if draft.info.batch != batch:
            raise LmcError(f"--draft: the draft bundle has {draft.info.batch} batch rows, the bundle {batch}")
        ours, theirs = decoder.vocab_size(), draft.vocab_size()
        if ours != theirs:
            raise LmcError(f"--draft: the draft bundle's vocabulary ({theirs} ids) is not the bundle's ({ours})")
        need = max(len(p) for p in prompts) + max_new_tokens
        if need > draft.info.context:
            raise LmcError(f"--draft: prompt + {max_new_tokens} new tokens exceed the draft bundle's context of "
                           f"{draft.info.context} tokens")
        d_widest, d_why = multi_token_limit(draft)
        if d_widest < 2:
            widest, why = 1, f"the draft bundle: {d_why}"
        k_max = min(k_max, max(d_widest - 1, 1))
    if k_max and widest < 2:
        notes.append(f"speculation off: {why}")
        k_max = 0
    k_max = min(k_max, widest - 1)
    ran = f"{spec.mode}:{k_max}" if k_max else "off"
    stops = {int(t) for t in stop_tokens}
    rng = sampling.rng()
    lookup = Lookup(batch) if spec.mode == "lookup" and k_max else None
    policy = None
    # greedy only: the drafts it verifies follow measured times, and under sampling which drafts are verified
    # decides which random numbers are drawn — a seed must repeat a run, so there every draft is verified
    if lookup is not None and sampling.greedy:   # kept with the decoder: it serves its next prompts too
        policy = getattr(decoder, "draft_policy", None)
        if policy is None or policy.k != k_max:
            policy = DraftPolicy(k_max)
            decoder.draft_policy = policy
    matched = [0] * batch
    model = DraftModel(draft, sampling) if draft is not None and k_max else None

    start = time.perf_counter()
    last = prefill(decoder, prompts)
    if model is not None:
        prefill(draft, prompts)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    histories = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    active = [True] * batch
    result = Decoded(out, prefill_seconds, 0.0, ran, notes=notes)

    def emit(row: int, token: int) -> None:
        histories[row].append(token)
        out[row].append(token)
        if on_token is not None:
            on_token(row, token)
        if token in stops or len(out[row]) >= max_new_tokens:
            active[row] = False

    for r in range(batch):
        emit(r, choose(last[r], histories[r], sampling, rng))
    # plain greedy while every row runs: one token per row per forward, nothing drafted, nothing to rewind —
    # what the loop below does then, without its per-step bookkeeping
    argmax_only = sampling.greedy and sampling.repetition_penalty == 1      # each step's token: its argmax
    plain = k_max == 0 and model is None and argmax_only
    step = getattr(decoder, "decode_step", None)
    while plain and all(active):
        if step is not None:
            last = step([h[-1] for h in histories], greedy=True)     # its buffer: read before the next step
        else:
            last = decoder.forward(np.array([[h[-1]] for h in histories], dtype=np.int64))[:, -1]
        result.forwards += 1
        # the array's method and one tolist: right after a run every numpy call is slow (cold caches)
        for r, token in enumerate(last.argmax(axis=-1).tolist()):
            emit(r, token)
    context = decoder.info.context
    while any(active):
        pos = decoder.positions()
        room = min(context - int(pos[r]) - 1 for r in range(batch))
        if model is not None:        # the draft writes up to k − 1 positions past a row's (or where it stopped)
            room = min(room, draft.info.context - int(max(pos.max(), draft.positions().max())) - 1)
        limits = [min(k_max, max_new_tokens - len(out[r]) - 1) if active[r] else 0 for r in range(batch)]
        k = max(0, min(max(limits), room))
        drafts: list[list[int]] = [[] for _ in range(batch)]
        qs: list = [None] * batch
        if k and lookup is not None:
            for r in range(batch):
                found, matched[r] = lookup.propose(r, histories[r], min(k, limits[r]))
                drafts[r] = policy.choose(found, matched[r]) if policy is not None else found
        elif k and model is not None:
            drafts, qs = model.propose(histories, active, k, rng)
            result.draft_forwards += k
            drafts = [drafts[r][:limits[r]] for r in range(batch)]
            qs = [q[:limits[r]] if q else None for r, q in enumerate(qs)]
        width = max(len(x) for x in drafts)
        ids = np.array([[h[-1]] + x + [h[-1]] * (width - len(x)) for h, x in zip(histories, drafts)], dtype=np.int64)
        began = time.perf_counter()
        if not width and argmax_only and step is not None:      # nothing drafted: a plain (greedy-head) step
            logits = step(ids[:, 0], greedy=True)[:, None]
        else:
            logits = decoder.forward(ids)
        if policy is not None:
            policy.timed(1 + width, time.perf_counter() - began)
        result.forwards += 1
        lengths = [int(p) for p in pos]
        was_active = list(active)
        for r in range(batch):
            if not was_active[r]:
                continue
            kept, token = verify(logits[r], histories[r], drafts[r], qs[r], sampling, rng)
            result.drafted += len(drafts[r])
            result.accepted += kept
            if policy is not None:
                policy.verified(matched[r], len(drafts[r]), kept)
            lengths[r] += 1 + kept
            for t in drafts[r][:kept] + [token]:
                emit(r, t)
                if not active[r]:
                    break
        if width or not all(was_active):
            decoder.rewind(lengths)
        if model is not None and k:
            model.settle(lengths, was_active)
    result.decode_seconds = time.perf_counter() - start
    return result
