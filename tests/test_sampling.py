"""Sampling (``lmc.compiler.sampling``): temperature, top-k, top-p and repetition penalty as Hugging Face
applies them; draws follow the distribution; a seed repeats a run; speculation under sampling (the rejection
rule, lookup drafts as point masses, a draft model's q) keeps every token's distribution exactly — checked
statistically against a bigram model whose continuations' probabilities are products, and a rule that keeps
every draft fails the same check; stop tokens and the tokenizer's end-of-sequence end a run; the CLI
streams text."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lmc
from lmc.compiler import speculate
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.cli import main
from lmc.compiler.sampling import Sampling, distribution, draw, eos_token_ids
from lmc.compiler.speculate import decode
from lmc.core.errors import LmcError

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"
LLAMA = FIXTURES / "llama-past-optimum.onnx"


def chi_square(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells expecting ≥ 5 (the rest pooled) and its degrees of freedom."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


def plausible(counts, expected) -> bool:
    """Far inside the chi-square's bulk: below df + 5·√(2·df) (a failure chance well under 1e-4)."""
    stat, df = chi_square(np.asarray(counts, float), np.asarray(expected, float))
    return stat < df + 5 * np.sqrt(2 * df)


def test_distribution_follows_the_settings():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert np.allclose(distribution(logits, [], Sampling(temperature=1)), [0.5, 0.2, 0.15, 0.1, 0.05])
    hot = distribution(logits, [], Sampling(temperature=2))
    assert np.allclose(hot, np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05]) / np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05]).sum())
    assert np.allclose(distribution(logits, [], Sampling(temperature=1, top_k=2)), [5 / 7, 2 / 7, 0, 0, 0])
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token that reaches it stays
    assert np.allclose(distribution(logits, [], Sampling(temperature=1, top_p=0.8)),
                       np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert np.allclose(distribution(logits, [], Sampling(temperature=1, top_p=0.7)), [5 / 7, 2 / 7, 0, 0, 0])
    # repetition penalty: a seen token's positive logit divided, a negative one multiplied
    raw = np.array([2.0, -1.0, 0.5])
    p = distribution(raw, [0, 1], Sampling(temperature=1, repetition_penalty=2))
    assert np.allclose(p, np.exp([1.0, -2.0, 0.5]) / np.exp([1.0, -2.0, 0.5]).sum())
    assert distribution(raw, [0], Sampling(repetition_penalty=5)).argmax() == 2          # greedy, penalised
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(LmcError):
            Sampling(**bad)


def test_draws_follow_the_distribution_and_repeat_with_a_seed():
    p = np.array([0.4, 0.3, 0.0, 0.2, 0.1])
    rng = np.random.default_rng(0)
    counts = np.bincount([draw(p, rng) for _ in range(20000)], minlength=5)
    assert counts[2] == 0 and plausible(counts, p * 20000)
    a, b = (Sampling(temperature=1, seed=7).rng() for _ in range(2))
    assert [draw(p, a) for _ in range(50)] == [draw(p, b) for _ in range(50)]


class Bigram:
    """A decoder whose next-token logits depend on the last token only, so a continuation's probability is a
    product; it keeps the tokens fed (``rewind`` drops the end), as a bundle keeps its cache."""

    def __init__(self, table: np.ndarray, chunk: int = 8):
        self.table = table
        self.info = SimpleNamespace(batch=1, context=64, prefill_chunk=chunk, windows=(), window=0)
        self.fed: list[int] = []

    @property
    def length(self) -> int:
        return len(self.fed)

    def reset(self) -> None:
        self.fed = []

    def positions(self) -> np.ndarray:
        return np.array([len(self.fed)])

    def rewind(self, length) -> None:
        n = int(np.max(length))
        assert n <= len(self.fed)
        self.fed = self.fed[:n]

    def forward(self, ids) -> np.ndarray:
        ids = np.asarray(ids).reshape(1, -1)
        self.fed += [int(t) for t in ids[0]]
        return self.table[ids[0]][None]

    def vocab_size(self) -> int:
        return self.table.shape[0]


V, NEW, RUNS = 5, 4, 3000
PROMPT = [0, 1, 2, 3, 0, 1, 2, 0, 1]          # repetitive: lookup drafts at almost every step
SETTINGS = Sampling(temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.2)


def exact(table: np.ndarray) -> dict[tuple[int, ...], float]:
    """The probability of every NEW-token continuation of PROMPT under SETTINGS."""
    out = {}
    for seq in itertools.product(range(V), repeat=NEW):
        prob, history = 1.0, list(PROMPT)
        for t in seq:
            prob *= distribution(table[history[-1]], history, SETTINGS)[t]
            history.append(t)
        out[seq] = prob
    return out


def sampled(target: Bigram, speculate_as: str, draft: Bigram | None = None) -> tuple[np.ndarray, int, int]:
    counts, drafted, accepted = {}, 0, 0
    for seed in range(RUNS):
        sampling = Sampling(SETTINGS.temperature, SETTINGS.top_k, SETTINGS.top_p, SETTINGS.repetition_penalty, seed)
        run = decode(target, [PROMPT], NEW, sampling=sampling, speculate=speculate_as, draft=draft)
        counts[tuple(run.tokens[0])] = counts.get(tuple(run.tokens[0]), 0) + 1
        drafted, accepted = drafted + run.drafted, accepted + run.accepted
    return counts, drafted, accepted


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(11)
    return rng.normal(0, 1.5, (V, V)), rng.normal(0, 1.5, (V, V))


@pytest.mark.parametrize("how", ["off", "lookup:3", "draft:2"])
def test_speculative_sampling_keeps_the_distribution(tables, how):
    table, other = tables
    target = Bigram(table)
    draft = Bigram(other) if how.startswith("draft") else None
    counts, drafted, accepted = sampled(target, how, draft)
    expected = exact(table)
    keys = list(expected)
    assert plausible([counts.get(k, 0) for k in keys], [expected[k] * RUNS for k in keys])
    if how != "off":
        assert 0 < accepted < drafted


def test_keeping_every_lookup_draft_is_caught(tables, monkeypatch):
    """The check above has the power to see a wrong rule: lookup drafts always kept."""
    def keep_all(logits, history, drafts, qs, sampling, rng):
        seen = history + drafts
        return len(drafts), draw(distribution(logits[len(drafts)], seen, sampling), rng)

    table, _ = tables
    monkeypatch.setattr(speculate, "verify", keep_all)
    counts, _, _ = sampled(Bigram(table), "lookup:3")
    expected = exact(table)
    keys = list(expected)
    assert not plausible([counts.get(k, 0) for k in keys], [expected[k] * RUNS for k in keys])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampling") / "gen"
    build(LLAMA, BuildOptions(target="cortex-a55", context=64, verify=False), out)
    return out


def test_a_seed_repeats_a_run(bundle):
    prompt = [5, 9, 2, 11, 7, 5, 9]
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    first = lmc.generate(bundle, prompt, 40, seed=3, **kw)
    assert first.speculation == "off"                         # not by default under sampling
    assert lmc.generate(bundle, prompt, 40, seed=3, **kw).tokens == first.tokens
    assert lmc.generate(bundle, prompt, 40, seed=4, **kw).tokens != first.tokens
    spec = lmc.generate(bundle, prompt, 40, seed=3, speculate="lookup:3", **kw)
    assert lmc.generate(bundle, prompt, 40, seed=3, speculate="lookup:3", **kw).tokens == spec.tokens
    assert spec.speculation == "lookup:3" and len(spec.tokens) == 40


def test_stop_tokens_end_the_run(bundle):
    prompt = [5, 9, 2, 11, 7]
    full = lmc.generate(bundle, prompt, 30, temperature=1.0, seed=1).tokens
    stop = full[6]
    cut = lmc.generate(bundle, prompt, 30, temperature=1.0, seed=1, stop_tokens=[stop]).tokens
    assert cut == full[:full.index(stop) + 1]


def _tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer over the fixture's 256 ids (255 bytes + <|endoftext|> = 255)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet[:255])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder / "tokenizer.json"


def test_cli_streams_text_and_stops_at_the_tokenizers_eos(bundle, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    path = _tokenizer(tmp_path / "tok")
    assert eos_token_ids(path) == [255]
    tok = Tokenizer.from_file(str(path))
    base = ["generate", str(bundle), "--tokenizer", str(path), "--max-new-tokens", "12"]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--prompt", "def f(x):", "--temperature", "0.8", "--seed", "2"])
    out = capsys.readouterr().out.splitlines()
    assert exc.value.code == 0
    ids = [int(t) for t in out[-1].split()]
    assert len(ids) <= 12 and out[0] == tok.decode(ids)              # the text streamed, then the ids
    # the fixture repeats its last token greedily: a prompt ending in <|endoftext|> stops at once
    with pytest.raises(SystemExit) as exc:
        main(base + ["--prompt", "ab<|endoftext|>", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and out["tokens"] == [255] and out["text"] == ""
    with pytest.raises(SystemExit) as exc:
        main(base + ["--prompt", "ab<|endoftext|>", "--json", "--max-new-tokens", "3", "--stop-token", "7"])
    assert json.loads(capsys.readouterr().out)["tokens"] == [255]


@pytest.mark.parametrize("args", [["--top-p", "0"], ["--temperature", "-1"], ["--top-k", "-1"],
                                  ["--repetition-penalty", "0"]])
def test_cli_refuses_bad_settings(bundle, tmp_path, capsys, args):
    (tmp_path / "p.txt").write_text("1 2 3")
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(bundle), "--prompt-tokens", str(tmp_path / "p.txt"), *args])
    assert exc.value.code == 2
