"""Encoder–decoder generation bundles (``lmc build FOLDER --context N``) from optimum's own exports: greedy
tokens equal to optimum's loop (encoder → decoder → decoder with past, present → past), cross keys/values
computed once by the encoder and read as state, a plan with encoder/prefill/decode profiles counting that
state, checks that fail on a bundle with the wrong cross state, and one-line refusals of what is not
supported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import lmc
from lmc.compiler.cli import main
from lmc.compiler.drivers import greedy
from lmc.compiler.seq2seq_export import OriginalLoop, find_export
from lmc.compiler.seq2seq_generate import seq2seq_info
from lmc.compiler.verify import verify

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "seq2seq"
WHISPER, T5 = FIXTURES / "whisper-tiny", FIXTURES / "t5-small"
CONTEXT, ENCODER_LENGTH, NEW, CHUNK = 32, 16, 20, 8
LAYERS, HEADS, HEAD_DIM = 2, 4, 16


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("seq2seq")
    lmc.build(WHISPER, lmc.BuildOptions(context=CONTEXT, prefill_chunk=CHUNK), out / "whisper")
    # the merged decoder file, given by path, with the encoder beside it
    lmc.build(T5 / "decoder_model_merged.onnx", lmc.BuildOptions(context=CONTEXT, encoder_length=ENCODER_LENGTH),
              out / "t5")
    return {"whisper": out / "whisper", "t5": out / "t5"}


def _inputs(name: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "whisper":
        return {"input_features": rng.standard_normal((1, 80, 32)).astype(np.float32)}
    return {"input_ids": rng.integers(2, 256, (1, 11))}           # shorter than the encoder length: padded


def _original_tokens(name: str, inputs: dict, new: int) -> list[int]:
    export = find_export(WHISPER if name == "whisper" else T5)
    loop = OriginalLoop(export)
    given = dict(inputs)
    if name == "t5":
        given["attention_mask"] = np.ones_like(given["input_ids"])
    loop.encode(given)
    return greedy(loop, [export.decoder_start_token_id], new)


@pytest.mark.parametrize("name", ["whisper", "t5"])
def test_greedy_tokens_equal_optimums_loop(bundles, name):
    seen = []
    for seed in (1, 2):
        inputs = _inputs(name, seed)
        ours = lmc.generate(bundles[name], None, NEW, encoder_inputs=inputs).tokens
        assert ours == _original_tokens(name, inputs, NEW)
        seen.append(ours)
    assert seen[0] != seen[1] and len(set(seen[0] + seen[1])) > 3     # tokens vary: equality means something


@pytest.mark.parametrize("name", ["whisper", "t5"])
def test_cross_state_is_computed_by_the_encoder_and_read_in_place(bundles, name):
    decoder = onnx.load(str(bundles[name] / "model.onnx"), load_external_data=False)
    encoder = onnx.load(str(bundles[name] / "encoder.onnx"), load_external_data=False)
    info = seq2seq_info(bundles[name] / "model.onnx")
    cross = [f"past_key_values.{i}.encoder.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert sorted(info.cross) == sorted(cross)
    assert [o.name for o in encoder.graph.output] == list(info.cross)       # the encoder writes exactly them
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    for name_ in cross:
        assert inputs[name_] == [1, HEADS, 16, HEAD_DIM]
    produced = {o for n in decoder.graph.node for o in n.output}
    assert not produced & set(cross) and "encoder_hidden_states" not in inputs
    ops = {n.op_type for n in decoder.graph.node}
    assert "TensorScatter" in ops or "GroupQueryAttention" in ops          # self-attention cache in place


def test_plan_has_encoder_prefill_decode_and_counts_the_cross_state(bundles):
    plan = json.loads((bundles["whisper"] / "plan.json").read_text())
    profiles = {p["name"]: p for p in plan["profiles"]}
    assert set(profiles) == {"encoder", "decode", "prefill"}
    assert profiles["decode"]["sequence"] == 1 and profiles["prefill"]["sequence"] == CHUNK
    buffers = {b["input"]: b["size"] for b in plan["state"]["buffers"]}
    cross = sum(size for n, size in buffers.items() if ".encoder." in n)
    own = sum(size for n, size in buffers.items() if ".decoder." in n)
    assert cross == 2 * LAYERS * HEADS * 16 * HEAD_DIM * 4 and own == 2 * LAYERS * HEADS * CONTEXT * HEAD_DIM * 4
    assert plan["state"]["bytes"] == cross + own
    assert plan["peak_ram_bytes"] == max(p["peak_ram_bytes"] for p in plan["profiles"])
    for p in plan["profiles"]:
        assert p["peak_ram_bytes"] >= p["arena_bytes"] + cross + own
    assert plan["encoder"]["schema"] == "lmc.plan/1" and plan["encoder"]["arena_bytes"] == profiles["encoder"]["arena_bytes"]
    assert {"encoder.onnx", "model.onnx"} <= set((bundles["whisper"] / ".lmc-bundle").read_text().split())


def test_cli_generate_and_verify(bundles, tmp_path, capsys):
    inputs = _inputs("t5", 3)
    np.savez(tmp_path / "x.npz", **inputs)
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(bundles["t5"]), "--encoder-inputs", str(tmp_path / "x.npz"), "--max-new-tokens",
              "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and out["tokens"] == _original_tokens("t5", inputs, 16)
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(bundles["t5"]), "--against", str(T5), "--inputs", str(tmp_path / "x.npz")])
    assert exc.value.code == 0 and "PASS" in capsys.readouterr().out
    report = verify(bundles["whisper"], WHISPER)
    steps = CONTEXT - (CHUNK + 1) + 1        # a prompt over two prefill chunks, then to the last position
    assert report.passed and report.outputs[-1].name == f"greedy tokens ({steps})" and report.outputs[-1].max_abs == 0


def _broken(bundle: Path, dst: Path, edit) -> Path:
    shutil.copytree(bundle, dst)
    model = onnx.load(str(dst / "encoder.onnx"), load_external_data=False)
    edit(model.graph)
    (dst / "encoder.onnx").write_bytes(model.SerializeToString())
    return dst


def _swap_layers(graph):
    """The cross keys of layer 0 and layer 1 exchanged (the encoder writes each into the other's buffer)."""
    outs = {o.name: o for o in graph.output}
    a, b = outs["past_key_values.0.encoder.key"], outs["past_key_values.1.encoder.key"]
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in (a.name, b.name):
                node.output[i] = b.name if name == a.name else a.name
        for i, name in enumerate(node.input):
            if name in (a.name, b.name):
                node.input[i] = b.name if name == a.name else a.name


def _zero_values(graph):
    """Layer 1's cross values multiplied by zero before they are written."""
    name = "past_key_values.1.encoder.value"
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out == name:
                node.output[i] = name + "_raw"
        for i, inp in enumerate(node.input):
            if inp == name:
                node.input[i] = name + "_raw"
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "lmc_test_zero"))
    graph.node.append(onnx.helper.make_node("Mul", [name + "_raw", "lmc_test_zero"], [name]))


@pytest.mark.parametrize("name, edit", [("t5", _swap_layers), ("whisper", _zero_values)])
def test_wrong_cross_state_fails_verification(bundles, tmp_path, capsys, name, edit):
    broken = _broken(bundles[name], tmp_path / "broken", edit)
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(broken), "--against", str(WHISPER if name == "whisper" else T5)])
    captured = capsys.readouterr()
    assert exc.value.code == 3 and "FAIL" in captured.out, captured


def _one_line_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_what_is_not_supported_is_one_line_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    no_past = tmp_path / "no-past"
    no_past.mkdir()
    for f in ("encoder_model.onnx", "decoder_model.onnx", "config.json"):
        shutil.copyfile(WHISPER / f, no_past / f)
    err = _one_line_error(capsys, ["build", str(no_past), "--context", "16", "-o", out])
    assert "no decoder with past" in err and "needs a decoder exported with past" not in err
    err = _one_line_error(capsys, ["build", str(no_past / "decoder_model.onnx"), "--context", "16", "-o", out])
    assert "no decoder with past" in err
    assert "--batch 2" in _one_line_error(capsys, ["build", str(WHISPER), "--context", "16", "--batch", "2", "-o", out])
    assert "--quantize int8" in _one_line_error(capsys, ["build", str(T5), "--context", "16", "--quantize", "int8",
                                                          "-o", out])
    assert "fixed shapes" in _one_line_error(capsys, ["build", str(WHISPER), "--context", "16", "--encoder-length",
                                                      "8", "-o", out])
    assert "learned positions" in _one_line_error(capsys, ["build", str(WHISPER), "--context", "256", "-o", out])
    assert "add --context" in _one_line_error(capsys, ["build", str(WHISPER), "-o", out])
    assert not Path(out).exists()


def test_the_builds_own_check_fails_on_wrong_cross_state(tmp_path, monkeypatch):
    from lmc.compiler import seq2seq
    from lmc.compiler.verify import VerificationFailed

    copy = seq2seq._copy_encoder

    def zeroed(bundle: Path, staged: Path) -> None:       # the staged encoder writes zeros for layer 1's values
        copy(bundle, staged)
        model = onnx.load(str(staged / "encoder.onnx"), load_external_data=False)
        _zero_values(model.graph)
        (staged / "encoder.onnx").write_bytes(model.SerializeToString())

    monkeypatch.setattr(seq2seq, "_copy_encoder", zeroed)
    with pytest.raises(VerificationFailed, match="original loop"):
        lmc.build(WHISPER, lmc.BuildOptions(context=16), tmp_path / "gen")
    assert not (tmp_path / "gen").exists() and not list(tmp_path.iterdir())     # nothing left behind
