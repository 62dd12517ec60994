"""Speculative decoding (``lmc.compiler.speculate``): drafts from prompt lookup or a draft bundle, verified
several per forward, give exactly plain greedy's tokens — on a full-attention bundle, a windowed ring
(``--prefill-chunk 4``), batch rows that accept different counts, and with a draft bundle; a verifier that
keeps every draft does not (so the equality is a real check); rewinding a ring is exact up to the prefill
chunk and refused beyond."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lmc
from lmc.compiler import speculate
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.cli import main
from lmc.compiler.drivers import StateDecoder, greedy
from lmc.compiler.speculate import Speculate, decode
from lmc.core.errors import LmcError

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"
LLAMA = FIXTURES / "llama-past-optimum.onnx"
QWEN2 = FIXTURES / "qwen2-past-optimum.onnx"
MISTRAL_SW = FIXTURES / "families" / "mistral-sw-past-optimum.onnx"      # every layer a window of 8
CONTEXT = 64
NO_GQA = ("fuse-late",)       # batch rows: ONNX Attention (GroupQueryAttention takes no multi-token rows)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculate")
    specs = {"llama": (LLAMA, {}), "llama-b2": (LLAMA, dict(batch=2, disabled_passes=NO_GQA)),
             "mistral": (MISTRAL_SW, dict(prefill_chunk=4)), "qwen2": (QWEN2, {}),
             "qwen2-b2": (QWEN2, dict(batch=2, disabled_passes=NO_GQA))}
    out = {}
    for name, (model, extra) in specs.items():
        build(model, BuildOptions(target="cortex-a55", context=CONTEXT, verify=False, **extra), root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def decoders(bundles) -> dict[str, StateDecoder]:
    return {name: StateDecoder(path / "model.onnx") for name, path in bundles.items()}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts and repetitive ones, whose earlier text gives lookup drafts: a piece repeated, then its
    start; or a piece with its last token doubled, other tokens, and the piece again (the fixtures' random
    models tend to repeat the last token: lookup then drafts what followed the doubled token before)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        piece = [int(t) for t in rng.integers(0, 256, int(rng.integers(3, 7)))]
        other = [int(t) for t in rng.integers(0, 256, int(rng.integers(1, 5)))]
        out.append([piece * 2 + piece[:2], [int(t) for t in rng.integers(0, 256, int(rng.integers(3, 12)))],
                    piece + piece[-1:] + other + piece][i % 3])
    return out


def test_lookup_greedy_equals_plain_greedy(decoders):
    d = decoders["llama"]
    drafted = accepted = forwards = 0
    for p in prompts(16):
        run = decode(d, [p], 40)
        assert run.tokens[0] == greedy(d, p, 40), p
        assert run.speculation == "lookup:4"
        drafted, accepted, forwards = drafted + run.drafted, accepted + run.accepted, forwards + run.forwards
    assert 0 < accepted < drafted               # drafts were kept and drafts were refused
    assert forwards < 16 * 39                   # fewer forwards than one per token


def test_a_verifier_keeping_every_draft_is_caught(decoders, monkeypatch):
    """The equality above is a real check: keeping wrong drafts changes the tokens."""
    def keep_all(logits, history, drafts, qs, sampling, rng):
        return len(drafts), int(np.argmax(logits[len(drafts)]))

    d = decoders["llama"]
    plain = {tuple(p): greedy(d, p, 40) for p in prompts(16)}
    monkeypatch.setattr(speculate, "verify", keep_all)
    assert any(decode(d, [list(p)], 40).tokens[0] != tokens for p, tokens in plain.items())


def test_windowed_ring_bundle(decoders):
    """Window 8, ring of 8 + 4 − 1 slots: 45 tokens wrap it several times while verify steps write up to
    4 positions (K is capped at chunk − 1 = 3) and are rewound."""
    d = decoders["mistral"]
    assert d.info.windows == (8,) and d.info.prefill_chunk == 4
    drafted = accepted = 0
    for p in prompts(8, seed=1):
        run = decode(d, [p], 45)
        assert run.tokens[0] == greedy(d, p, 45), p
        assert run.speculation == "lookup:3"
        drafted, accepted = drafted + run.drafted, accepted + run.accepted
    assert 0 < accepted < drafted


def test_ring_rewind_is_exact_up_to_the_chunk_and_refused_beyond(decoders):
    """After 30 positions, rewinding by b and continuing equals a fresh run of the same tokens for b ≤ chunk
    (4); at b = chunk + 1 the ring has lost a key the window still needs: refused, and wrong if forced."""
    d = decoders["mistral"]
    rng = np.random.default_rng(2)
    first, then = rng.integers(0, 256, 30), rng.integers(0, 256, 12)

    def run(tokens) -> np.ndarray:
        d.reset()
        return np.array([d.forward(np.array([[t]]))[0, 0] for t in tokens])

    for back in (1, 4, 5):
        expected = run(list(first[:30 - back]) + list(then))[30 - back:]
        run(first)
        if back <= 4:
            d.rewind(30 - back)
        else:
            with pytest.raises(LmcError, match="at most 4 positions"):
                d.rewind(30 - back)
            d._written[:], d._decoded_to = 30 - back, 0          # force it
            d.rewind(30 - back)
        got = np.array([d.forward(np.array([[t]]))[0, 0] for t in then])
        assert (np.abs(got - expected).max() < 1e-5) == (back <= 4), back


def test_rewind_refuses_going_forward(decoders):
    d = decoders["llama"]
    d.reset()
    d.forward(np.array([[1, 2, 3]]))
    with pytest.raises(LmcError, match="between 0 and the current"):
        d.rewind(4)
    d.rewind(1)
    assert d.length == 1 and list(d.positions()) == [1]


def test_batch_rows_advance_by_their_own_counts(decoders, monkeypatch):
    """Two rows (a repetitive and a random prompt, different lengths) accept different numbers of drafts:
    each is rewound to its own length (per-row positions), and each row's tokens equal its prompt alone."""
    d, alone = decoders["llama-b2"], decoders["llama"]
    rewinds = []
    original = StateDecoder.rewind

    def spy(self, length):
        rewinds.append(np.broadcast_to(np.asarray(length), (self.info.batch,)).tolist())
        return original(self, length)

    monkeypatch.setattr(StateDecoder, "rewind", spy)
    ps = prompts(8, seed=3)
    for p0, p1 in zip(ps[0::2], ps[1::2]):
        run = decode(d, [p0, p1], 30)
        assert run.speculation == "lookup:4"
        assert run.tokens == [greedy(alone, p0, 30), greedy(alone, p1, 30)]
    assert any(a != b for a, b in rewinds)         # rows were apart


def test_batch_with_group_query_attention_decodes_plainly(decoders, monkeypatch):
    monkeypatch.setattr(speculate, "_has_group_query_attention", lambda decoder: True)
    d, alone = decoders["llama-b2"], decoders["llama"]
    p0, p1 = prompts(2, seed=4)
    run = decode(d, [p0, p1], 20)
    assert run.speculation == "off" and "GroupQueryAttention" in run.notes[0] and run.drafted == 0
    assert run.tokens == [greedy(alone, p0, 20), greedy(alone, p1, 20)]


def test_draft_bundle(decoders):
    """Another model with the same vocabulary drafts (qwen2 for llama, for the windowed mistral, and in a
    batch); the bundle drafting for itself has every draft kept."""
    llama = decoders["llama"]
    for p in prompts(4, seed=5):
        expected = greedy(llama, p, 40)
        run = decode(llama, [p], 40, draft=decoders["qwen2"])
        assert run.tokens[0] == expected and run.speculation == "draft:4" and run.drafted > 0
    p = prompts(1, seed=6)[0]
    twin = StateDecoder(decoders["llama"].model_path)
    run = decode(llama, [p], 40, draft=twin)
    assert run.tokens[0] == greedy(llama, p, 40) and run.acceptance_rate == 1.0
    mistral = decoders["mistral"]
    for p in prompts(2, seed=7):
        run = decode(mistral, [p], 45, draft=decoders["qwen2"])
        assert run.tokens[0] == greedy(mistral, p, 45) and run.speculation == "draft:3"
    p0, p1 = prompts(2, seed=8)
    run = decode(decoders["llama-b2"], [p0, p1], 30, draft=decoders["qwen2-b2"])
    assert run.tokens == [greedy(llama, p0, 30), greedy(llama, p1, 30)] and run.drafted > 0
    with pytest.raises(LmcError, match="batch rows"):
        decode(llama, [p], 10, draft=decoders["qwen2-b2"])


def test_repetition_penalty_stays_exact(decoders):
    from lmc.compiler.sampling import Sampling

    d = decoders["llama"]
    penalised = Sampling(repetition_penalty=1.3)
    for p in prompts(6, seed=9):
        plain = decode(d, [p], 30, sampling=penalised, speculate="off")
        run = decode(d, [p], 30, sampling=penalised)
        assert run.tokens == plain.tokens and run.speculation == "lookup:4"


def test_speculate_values():
    assert Speculate.parse("lookup") == Speculate("lookup", 4) and str(Speculate.parse("lookup:7")) == "lookup:7"
    assert Speculate.parse("off").mode == "off" and Speculate.parse(None) is None and Speculate.parse("auto") is None
    for bad in ("lookup:0", "lookup:x", "ngram"):
        with pytest.raises(LmcError, match="--speculate"):
            Speculate.parse(bad)


def test_cli_and_api(bundles, tmp_path, capsys):
    bundle = bundles["llama"]
    p = prompts(1, seed=10)[0]
    (tmp_path / "p.txt").write_text(" ".join(map(str, p)))
    outs = {}
    for spec in ("off", "lookup:3"):
        with pytest.raises(SystemExit) as exc:
            main(["generate", str(bundle), "--prompt-tokens", str(tmp_path / "p.txt"), "--max-new-tokens", "30",
                  "--speculate", spec, "--json"])
        assert exc.value.code == 0
        outs[spec] = json.loads(capsys.readouterr().out)
    assert outs["off"]["tokens"] == outs["lookup:3"]["tokens"] and outs["off"]["acceptance_rate"] is None
    on = outs["lookup:3"]
    assert on["speculation"] == "lookup:3" and on["drafted"] >= on["accepted"] > 0
    assert on["acceptance_rate"] == pytest.approx(on["accepted"] / on["drafted"], abs=1e-4) and on["tokens_per_s"] > 0
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(bundle), "--prompt-tokens", str(tmp_path / "p.txt"), "--draft", str(bundles["qwen2"]),
              "--json"])
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["speculation"] == "draft:4"
    for args, message in ((["--speculate", "lookup:0"], "--speculate"), (["--speculate", "draft"], "--draft"),
                          (["--speculate", "lookup", "--draft", str(bundles["qwen2"])], "--draft")):
        with pytest.raises(SystemExit) as exc:
            main(["generate", str(bundle), "--prompt-tokens", str(tmp_path / "p.txt"), *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    api = lmc.generate(bundle, p, 30, speculate="lookup:2")
    assert api.tokens == outs["off"]["tokens"] and api.speculation == "lookup:2"
    assert lmc.generate(bundle, p, 30, speculate="off").drafted == 0


def test_rows_sharing_row0_positions_never_stand_apart(tmp_path):
    """Gemma's export computes positions from the cache length (no position_ids input): the bundle's rows
    share row 0's positions, so its rows are never rewound apart — batch speculation is off, with the reason,
    and each row still generates its prompt alone's tokens; onnxruntime-genai (which pads rows apart) gets no
    config."""
    gemma = FIXTURES / "more" / "gemma-past-optimum.onnx"
    build(gemma, BuildOptions(target="cortex-a55", context=48, batch=2, prefill_chunk=8,
                              disabled_passes=("fuse-late",)), tmp_path / "b2")
    build(gemma, BuildOptions(target="cortex-a55", context=48, prefill_chunk=8), tmp_path / "b1")
    d, alone = StateDecoder(tmp_path / "b2" / "model.onnx"), StateDecoder(tmp_path / "b1" / "model.onnx")
    assert not d.info.rows_apart and alone.info.rows_apart is False
    assert not (tmp_path / "b2" / "genai_config.json").exists()
    p0, p1 = prompts(2, seed=5)
    n = min(len(p0), len(p1))
    p0, p1 = p0[:n], p1[:n]                  # rows at one position throughout
    run = decode(d, [p0, p1], 12)
    assert run.speculation == "off" and "row 0" in run.notes[0]
    assert run.tokens == [greedy(alone, p0, 12), greedy(alone, p1, 12)]
    d.forward(np.zeros((2, 3), np.int64))
    with pytest.raises(LmcError, match="row 0"):
        d.rewind([1, 2])


def test_quantized_bundles_do_not_speculate_unless_asked(tmp_path):
    """int4 kernels round a multi-token step differently from one-token steps: by default such a bundle decodes
    one token at a time (tokens = plain greedy), and speculates only when asked."""
    build(LLAMA, BuildOptions(target="cortex-a55", context=48, quantize="int4", block_size=16), tmp_path / "q")
    d = StateDecoder(tmp_path / "q" / "model.onnx")
    p = prompts(1, seed=6)[0]
    plain = decode(d, [p], 16)
    assert plain.speculation == "off" and "quantized" in plain.notes[0]
    assert plain.tokens == [greedy(d, p, 16)]
    assert decode(d, [p], 16, speculate="lookup").speculation.startswith("lookup")
