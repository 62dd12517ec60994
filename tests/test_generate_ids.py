"""``lmc generate`` and ``lmc.generate`` refuse prompt token ids outside the bundle's vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmc
from lmc.compiler.build import BuildOptions, build
from lmc.compiler.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "llama-past-optimum.onnx"
VOCAB = 256          # the fixture's embedding rows and logits' last dim


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "gen"
    build(FIXTURE, BuildOptions(target="cortex-a55", context=16), out)
    return out


@pytest.mark.parametrize("bad", [VOCAB, 99999, -1, -2])
def test_out_of_vocabulary_ids_are_exit_2_one_line(bundle, tmp_path, capfd, bad):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(f"5 9 {bad} 7\n")
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(bundle), "--prompt-tokens", str(prompt), "--max-new-tokens", "3"])
    err = capfd.readouterr().err          # (capfd: onnxruntime's own log lines go to fd 2 directly)
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and "vocabulary" in err and f"{VOCAB - 1}" in err
    with pytest.raises(lmc.LmcError, match="vocabulary"):
        lmc.generate(bundle, [5, bad], max_new_tokens=2)


def test_ids_at_the_vocabulary_edges_run(bundle):
    assert len(lmc.generate(bundle, [0, VOCAB - 1], max_new_tokens=2).tokens) == 2
