"""Masks judged over the whole horizon, and generation checks that can fail.

Windowed decoders from real exporters (``models/fixtures/families``, sliding window 8): every layer's mask
is proven causal or windowed at every past length up to ``--context``; windowed layers become window
attention over a ring (or a windowed mask over the full cache), full layers keep the full cache, and the
bundle generates the original's own greedy tokens well past the window. A bundle whose window was dropped
must fail the build's check, ``lmc verify`` (exit 3) and the perplexity judgement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import lmc.passes.static_cache as static_cache
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.cli import main
from lmc.compiler.drivers import PastDecoder, StateDecoder, generation_info, greedy
from lmc.compiler.generation import precheck_masks
from lmc.compiler.verify import VerificationFailed, check_spans, verify
from lmc.passes.cache_masks import MaskPattern, classify, horizon

FAMILIES = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "families"
MISTRAL = FAMILIES / "mistral-sw-past-optimum.onnx"        # window 8 on both layers
GEMMA3 = FAMILIES / "gemma3-past-optimum.onnx"             # window 8, full, window 8
CONTEXT = 40
WINDOW = 8

pytestmark = pytest.mark.skipif(not MISTRAL.exists() or not GEMMA3.exists(), reason="family fixtures absent")


def state_slots(model: Path) -> dict[str, int]:
    m = onnx.load(str(model), load_external_data=False)
    return {i.name: i.type.tensor_type.shape.dim[2].dim_value for i in m.graph.input if i.name.startswith("past")}


def test_pattern_semantics_and_classification():
    keep = MaskPattern(3).keep(5, 2)           # queries 5, 6 over keys 0 … 6
    assert keep.tolist() == [[False] * 3 + [True] * 3 + [False], [False] * 4 + [True] * 3]
    assert classify(keep, 5) == MaskPattern(3)
    assert classify(MaskPattern().keep(5, 2), 5) == MaskPattern()
    holes = MaskPattern().keep(5, 1)
    holes[0, 2] = False                          # a causal row with a hole: neither
    assert classify(holes, 5) is None
    points = horizon(100, 1, {8}, dense=False)
    assert {7, 8, 9, 15, 16, 17, 99} <= set(points) and max(points) == 99


def test_model_windows_are_found_per_layer():
    """The window (8) is far beyond the 7 keys a short probe sees: only probing the horizon finds it."""
    assert precheck_masks(MISTRAL, 1, CONTEXT) == {"present.0.key": MaskPattern(WINDOW),
                                                   "present.1.key": MaskPattern(WINDOW)}
    assert precheck_masks(GEMMA3, 1, CONTEXT) == {"present.0.key": MaskPattern(WINDOW),
                                                  "present.1.key": MaskPattern(),
                                                  "present.2.key": MaskPattern(WINDOW)}


@pytest.mark.parametrize("chunk", [4, 64])
def test_mixed_layers_generate_the_originals_tokens(tmp_path, chunk):
    """Gemma-3-style sliding and full layers: per-layer state (a ring of W + chunk − 1 slots where that is
    smaller than the context), and the original's greedy tokens over 4× the window."""
    out = tmp_path / "gemma3"
    result = build(GEMMA3, BuildOptions(target="cortex-a55", context=CONTEXT, prefill_chunk=chunk), out)
    assert result.verification.passed
    ring = WINDOW + chunk - 1
    slots = state_slots(out / "model.onnx")
    expect = ring if ring < CONTEXT else CONTEXT
    assert {n: s for n, s in slots.items() if ".1." not in n} == {n: expect for n in slots if ".1." not in n}
    assert slots["past_key_values.1.key"] == CONTEXT and slots["past_key_values.1.value"] == CONTEXT
    assert generation_info(out / "model.onnx").windows == (WINDOW,)
    notes = " ".join(n for r in result.records for n in r.notes)
    assert "present.1.key: full" in notes and f"present.0.key: window {WINDOW}" in notes
    rng = np.random.default_rng(1)
    for _ in range(2):
        prompt = rng.integers(0, 256, 5).tolist()
        assert greedy(StateDecoder(out / "model.onnx"), prompt, 4 * WINDOW) == \
            greedy(PastDecoder(GEMMA3), prompt, 4 * WINDOW)


def test_check_spans_cross_every_window():
    class Info:
        context, prefill_chunk, windows = 2048, 64, (512,)
    spans = check_spans(Info)
    assert spans[-1][1] == 1152 and sum(b - a == 1 for a, b in spans) == 1025
    assert all(b - a <= 64 for a, b in spans) and [a for a, _ in spans] == sorted(a for a, _ in spans)

    class Full:
        context, prefill_chunk, windows = 256, 64, ()
    spans = check_spans(Full)
    assert spans[-1][1] == 256 and sum(b - a == 1 for a, b in spans) == 16


def _drop_windows(monkeypatch):
    """A deliberately broken compiler: every layer is laid out as full attention, the window dropped."""
    original = static_cache.layout_for
    monkeypatch.setattr(static_cache, "layout_for", lambda pattern, *rest: original(MaskPattern(), *rest))


def test_dropped_window_fails_the_build(tmp_path, monkeypatch):
    _drop_windows(monkeypatch)
    with pytest.raises(VerificationFailed, match="logits"):
        build(MISTRAL, BuildOptions(target="cortex-a55", context=CONTEXT), tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_dropped_window_fails_verify_and_perplexity(tmp_path, monkeypatch, capsys):
    good, broken = tmp_path / "good", tmp_path / "broken"
    build(MISTRAL, BuildOptions(target="cortex-a55", context=CONTEXT), good)
    _drop_windows(monkeypatch)
    build(MISTRAL, BuildOptions(target="cortex-a55", context=CONTEXT, verify=False), broken)
    monkeypatch.undo()
    tokens = tmp_path / "tokens.u16"
    np.random.default_rng(0).integers(0, 256, 4 * CONTEXT).astype(np.uint16).tofile(tokens)
    ok = verify(good, MISTRAL, tokens=tokens, seq_len=CONTEXT, windows=2)
    assert ok.passed and ok.perplexity_passed and ok.perplexity["allowed"] >= 1e-4
    bad = verify(broken, MISTRAL, tokens=tokens, seq_len=CONTEXT, windows=2)
    assert not bad.passed and not bad.perplexity_passed
    assert "perplexity" in bad.explain() and "logits" in bad.explain()
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(broken), "--against", str(MISTRAL)])
    assert exc.value.code == 3 and "FAIL" in capsys.readouterr().out


def test_user_window_composes_with_the_models(tmp_path):
    """A user window wider than the model's leaves the windowed layers exact (the model's window wins); a
    narrower one applies everywhere, approximate."""
    wide = build(MISTRAL, BuildOptions(target="cortex-a55", context=CONTEXT, attention="sliding:16",
                                       prefill_chunk=4), tmp_path / "wide")
    assert set(state_slots(tmp_path / "wide" / "model.onnx").values()) == {WINDOW + 3}
    notes = " ".join(n for r in wide.records for n in r.notes)
    assert "(approximate)" not in notes and wide.verification.passed and wide.approximations == ()
    narrow = build(GEMMA3, BuildOptions(target="cortex-a55", context=CONTEXT, attention="sliding:4,sinks=2",
                                        prefill_chunk=4), tmp_path / "narrow")
    assert set(state_slots(tmp_path / "narrow" / "model.onnx").values()) == {2 + 4 + 3}
    notes = " ".join(n for r in narrow.records for n in r.notes)
    assert notes.count("window 4 + 2 sinks (approximate)") == 3
    assert narrow.approximations == ("sliding:4,sinks=2 on 3 of 3 attentions",)


def test_checks_run_a_bundle_as_built_when_that_holds_no_more_than_the_reference(tmp_path):
    """A 4-bit bundle (MatMulNBits: small packed copies) is checked under its own session options — unpacked
    its decode step is ~100× slower; an exact one without prepacked copies (they would be its weights again),
    and so is any bundle whose plan predicts packed copies beyond half the reference's bytes."""
    from lmc.compiler.build import QuantizeMode
    from lmc.compiler.drivers import LOW_MEMORY
    from lmc.compiler.verify import candidate_session_options

    source = FAMILIES.parent / "llama-past-optimum.onnx"
    for mode, expected in ((QuantizeMode.INT4, {}), (QuantizeMode.NONE, LOW_MEMORY)):
        out = tmp_path / mode.value
        build(source, BuildOptions(context=32, quantize=mode, block_size=16, verify=False, target="x86-64"), out)
        assert candidate_session_options(source, out / "model.onnx") == expected, mode
    huge = {"items": {"prepacked_weights": 1 << 40}}
    assert candidate_session_options(source, tmp_path / "int4" / "model.onnx", runtime=huge) == LOW_MEMORY


XGLM = FAMILIES / "xglm-past-dynamo.onnx"       # its masks are judged on bound copies, one per probe


def test_probes_on_worker_processes_judge_as_probes_here(monkeypatch):
    """Bound-copy probes run on worker processes once they would take long (``POOL_SECONDS``): the same
    patterns as probing in this process, and a worker's refusal reaches the caller as its LmcError."""
    from lmc.compiler import generation
    from lmc.core.errors import LmcError
    from lmc.models import build_llama

    used = []
    exit_ = generation._ProbeRunner.__exit__
    monkeypatch.setattr(generation._ProbeRunner, "__exit__",
                        lambda self, *exc: used.append(self._pool is not None) or exit_(self, *exc))
    monkeypatch.setattr(generation, "POOL_SECONDS", float("inf"))
    here = precheck_masks(XGLM, 1, CONTEXT)
    monkeypatch.setattr(generation, "POOL_SECONDS", 0.0)
    pooled = precheck_masks(XGLM, 1, CONTEXT)
    assert used == [False, True] and pooled == here and len(here) == 2

    runner = generation._ProbeRunner(build_llama(), 1)        # no cache: every probe is refused
    runner.seconds = 1.0                                       # as if timed: the probes go to the workers
    with runner, pytest.raises(LmcError, match="past key/values"):
        list(runner([(4, 1), (5, 1)]))
    assert used == [False, True, True]


def test_probe_workers_never_rerun_the_callers_script(tmp_path):
    """A script without a ``__main__`` guard (and one read from stdin) that builds: the probe workers start
    from lmc's own empty main module, so the script's top level runs once and the probes still finish."""
    import subprocess
    import sys

    script = (f"from lmc.compiler import generation as G\nprint('top level', flush=True)\n"
              f"G.POOL_SECONDS = 0.0\nprint(len(G.precheck_masks({str(XGLM)!r}, 1, {CONTEXT})))\n")
    path = tmp_path / "unguarded.py"
    path.write_text(script)
    for argv, stdin in (([sys.executable, str(path)], None), ([sys.executable, "-"], script)):
        run = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["top", "level", "2"] and "Traceback" not in run.stderr
