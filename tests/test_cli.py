"""The command line as a pipeline uses it: exit codes, one-line errors, --json, no half-written bundle."""

from __future__ import annotations

import json

import pytest

from lmc.compiler.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage-not-onnx" * 10, bytes(range(256)) * 20])
def test_corrupt_file_exit_2_one_line_no_output(tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, _, err = run(["build", str(bad), "-o", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "bad.onnx" in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_truncated_model_exit_2(model_dir, tmp_path, capsys):
    data = (model_dir / "tiny-llama.onnx").read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 3])
    code, _, err = run(["build", str(bad), "-o", str(tmp_path / "out"), "--input-shape", "input_ids=1x8"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_dynamic_dim_error_names_input_and_dim(model_dir, tmp_path, capsys):
    code, _, err = run(["build", str(model_dir / "tiny-llama.onnx"), "-o", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "input_ids" in err and "sequence" in err and "--input-shape" in err


def test_bad_input_shape_and_target(model_dir, tmp_path, capsys):
    m = str(model_dir / "tiny-llama.onnx")
    assert run(["build", m, "--input-shape", "nope=1x2", "-o", str(tmp_path / "o")], capsys)[0] == 2
    assert run(["build", m, "--input-shape", "input_ids=1xq", "-o", str(tmp_path / "o")], capsys)[0] == 2
    assert run(["build", m, "--target", "pdp-11", "-o", str(tmp_path / "o")], capsys)[0] == 2
    assert not (tmp_path / "o").exists()


def test_build_verify_inspect_json(model_dir, tmp_path, capsys):
    m = str(model_dir / "tiny-gpt2.onnx")
    out = tmp_path / "out"
    code, stdout, _ = run(["build", m, "-o", str(out), "--input-shape", "input_ids=1x16", "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["nodes_after"] < summary["nodes_before"]
    assert summary["verification"]["passed"]
    code, stdout, _ = run(["verify", str(out), "--against", m, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["passed"]
    code, stdout, _ = run(["inspect", m, "--json", "--input-shape", "input_ids=1x16"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["ops"]["MatMul"] > 0 and info["plan"]["arena_bytes"] > 0
    code, stdout, _ = run(["targets", "--json"], capsys)
    names = {t["name"] for t in json.loads(stdout)}
    assert {"cortex-a55", "x86-64"} <= names
    code, stdout, _ = run(["diff", m, str(out / "model.onnx"), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["b"]["nodes"] == summary["nodes_after"]


def test_verify_fails_on_a_different_model(model_dir, tmp_path, capsys):
    from lmc.models import build_gpt2
    import onnx

    other = tmp_path / "other.onnx"
    onnx.save(build_gpt2(seed=7), str(other))
    out = tmp_path / "out"
    assert run(["build", str(other), "-o", str(out), "--input-shape", "input_ids=1x8"], capsys)[0] == 0
    code, stdout, _ = run(["verify", str(out), "--against", str(model_dir / "tiny-gpt2.onnx")], capsys)
    assert code == 3 and "FAIL" in stdout


def test_existing_foreign_folder_is_not_overwritten(model_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(["build", str(model_dir / "small-cnn.onnx"), "-o", str(out),
                        "--input-shape", "image=1x3x32x32"], capsys)
    assert code == 2 and (out / "notes.txt").read_text() == "keep me"


def test_max_ram_budget(model_dir, tmp_path, capsys):
    m = str(model_dir / "tiny-llama.onnx")
    code, _, err = run(["build", m, "--input-shape", "input_ids=1x32", "--max-ram", "16KiB", "-o",
                        str(tmp_path / "o")], capsys)
    assert code == 2 and "no configuration fits --max-ram" in err and not (tmp_path / "o").exists()
    assert len(err.strip().splitlines()) == 1
    code, out, _ = run(["build", m, "--input-shape", "input_ids=1x32", "--max-ram", "8MiB", "-o",
                        str(tmp_path / "o"), "--json"], capsys)
    assert code == 0 and json.loads(out)["peak_ram_bytes"] <= 8 * 2**20
    assert run(["build", m, "--max-ram", "much", "-o", str(tmp_path / "p")], capsys)[0] == 2


# --- rough edges: JSON errors, option ranges, repeated shapes, flags anywhere, quiet, exit 3 -------------

def test_errors_under_json_are_json_on_stdout_and_one_line_on_stderr(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    code, out, err = run(["build", str(bad), "-o", str(tmp_path / "out"), "--json"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("lmc: error: ")
    data = json.loads(out)
    assert data["exit_code"] == 2 and "bad.onnx" in data["error"]
    code, out, _ = run(["build", str(bad), "--json", "--samples-typo", "1"], capsys)     # a usage error too
    assert code == 2 and json.loads(out)["exit_code"] == 2


@pytest.fixture(scope="module")
def gpt2_bundle(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    from lmc.compiler.build import BuildOptions, build

    build(model_dir / "tiny-gpt2.onnx", BuildOptions(input_shapes={"input_ids": (1, 8)}), out)
    return out


@pytest.mark.parametrize("args, option", [
    (["verify", "{out}", "--against", "{m}", "--samples", "0"], "--samples"),
    (["verify", "{out}", "--against", "{m}", "--windows", "0"], "--windows"),
    (["verify", "{out}", "--against", "{m}", "--tolerance", "-1e-4"], "--tolerance"),
    (["build", "{m}", "--input-shape", "input_ids=1x8", "--calib-samples", "0"], "--calib-samples"),
    (["build", "{m}", "--input-shape", "input_ids=1x8", "--tolerance", "-1"], "--tolerance"),
    (["generate", "{out}", "--prompt-tokens", "{m}", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_zero_counts_and_negative_tolerances_are_usage_errors(model_dir, gpt2_bundle, tmp_path, capsys, args,
                                                              option):
    m = str(model_dir / "tiny-gpt2.onnx")
    args = [a.format(out=str(gpt2_bundle), m=m) for a in args]
    code, out, err = run(args + ["-o", str(tmp_path / "o")] if args[0] == "build" else args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert option in err and not (tmp_path / "o").exists()


def test_repeated_input_shape_is_an_error(model_dir, tmp_path, capsys):
    code, _, err = run(["build", str(model_dir / "tiny-gpt2.onnx"), "--input-shape", "input_ids=1x8",
                        "--input-shape", "input_ids=1x16", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "input_ids" in err and "twice" in err and not (tmp_path / "o").exists()


def test_verbose_and_quiet_after_the_subcommand(model_dir, tmp_path, capsys):
    m = str(model_dir / "tiny-gpt2.onnx")
    code, out, err = run(["build", m, "--input-shape", "input_ids=1x8", "-o", str(tmp_path / "a"), "-v"], capsys)
    assert code == 0 and "built" in out
    code, out, err = run(["build", m, "--input-shape", "input_ids=1x8", "-o", str(tmp_path / "b"), "--quiet"],
                         capsys)
    assert code == 0 and out == "" and (tmp_path / "b" / "model.onnx").is_file()
    code, out, _ = run(["build", m, "--input-shape", "input_ids=1x8", "-o", str(tmp_path / "c"), "-q", "--json"],
                       capsys)
    assert code == 0 and json.loads(out)["verification"]["passed"]
    code, out, _ = run(["-q", "verify", str(tmp_path / "c"), "--against", m], capsys)
    assert code == 0 and out == ""


def test_onnxruntime_logs_fatal_only(monkeypatch, capsys):
    """onnxruntime's errors reach lmc as exceptions (one line); it must not print them itself as well."""
    import onnxruntime

    calls = []
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", calls.append)
    assert run(["targets", "--json"], capsys)[0] == 0
    assert calls == [4]


def test_no_color_progress_has_no_control_sequences(monkeypatch, capsys):
    from lmc.compiler.cli import _status

    monkeypatch.setenv("NO_COLOR", "1")
    _status("  fold-constants   0.01s", nl=False)
    assert "\033" not in capsys.readouterr().err
    monkeypatch.delenv("NO_COLOR")
    _status("  fold-constants   0.01s", nl=False)


def test_the_build_check_does_not_suggest_options_build_lacks(model_dir, gpt2_bundle):
    import numpy as np

    from lmc.core.errors import LmcError
    from lmc.compiler.verify import compare_models, verify

    m = model_dir / "tiny-gpt2.onnx"
    wrong = [{"input_ids": np.zeros((1, 8), np.float32)}]       # inputs the original cannot run on
    with pytest.raises(LmcError) as exc:                        # as lmc build's check calls it
        compare_models(m, gpt2_bundle / "model.onnx", wrong, candidate_is_ours=True)
    assert "--inputs" not in str(exc.value) and "--no-verify" in str(exc.value)
    bad = gpt2_bundle.parent / "wrong.npz"
    np.savez(bad, input_ids=wrong[0]["input_ids"])
    with pytest.raises(LmcError) as exc:                        # lmc verify has --inputs, and no --no-verify
        verify(gpt2_bundle, m, inputs=bad)
    assert "--inputs" in str(exc.value) and "--no-verify" not in str(exc.value)


def test_a_failed_build_verification_is_exit_3(model_dir, tmp_path, capsys, monkeypatch):
    import lmc.compiler.build as build_module
    from lmc.compiler.verify import OutputError, VerificationFailed, VerifyReport

    report = VerifyReport((OutputError("logits", 1.0, 0.5, 0.9, None, 1e-6, 1e-4),), 1, 1e-4)

    def failing_build(*args, **kwargs):
        raise VerificationFailed(f"the compiled model differs from the original: {report.explain()}", report)

    monkeypatch.setattr(build_module, "build", failing_build)
    m = str(model_dir / "tiny-gpt2.onnx")
    code, out, err = run(["build", m, "--input-shape", "input_ids=1x8", "-o", str(tmp_path / "o"), "--json"], capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "verification failed" in err and "logits" in err
    data = json.loads(out)
    assert data["exit_code"] == 3 and data["verification"]["outputs"][0]["spread"] == 1e-6


def test_verify_failure_explains_itself(model_dir, tmp_path, capsys):
    from lmc.models import build_gpt2
    import onnx

    other = tmp_path / "other.onnx"
    onnx.save(build_gpt2(seed=7), str(other))
    out = tmp_path / "out"
    assert run(["build", str(other), "-o", str(out), "--input-shape", "input_ids=1x8"], capsys)[0] == 0
    code, stdout, err = run(["verify", str(out), "--against", str(model_dir / "tiny-gpt2.onnx"), "--json"], capsys)
    data = json.loads(stdout)          # one JSON document: the report, with the error in it
    assert code == 3 and not data["passed"] and data["exit_code"] == 3 and "logits" in data["error"]
    assert data["spread"] is not None and "spread" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ --input-value
def _vad_model(path):
    """A voice-activity-detector-shaped model (``lmc.models.build_vad``): the If's branch is chosen by
    Equal(sr, 16000)."""
    import onnx

    from lmc.models import build_vad

    onnx.save(build_vad(), str(path))
    return path


@pytest.mark.parametrize("rate, rows", [(16000, 4), (8000, 8)])
def test_input_value_folds_control_flow_and_the_build_verifies(tmp_path, capsys, rate, rows):
    import onnx

    from lmc.core.metadata import build_metadata

    m, out = _vad_model(tmp_path / "vad.onnx"), tmp_path / "out"
    code, stdout, err = run(["build", str(m), "--target", "x86-64", "--input-value", f"sr={rate}", "-o", str(out),
                             "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["verification"]["passed"]
    bundle = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in bundle.graph.input] == ["x"]
    assert "If" not in {n.op_type for n in bundle.graph.node}
    assert [d.dim_value for d in bundle.graph.output[0].type.tensor_type.shape.dim] == [rows]
    assert build_metadata(bundle)["input_values"] == f'{{"sr":{rate}}}'
    # lmc verify reads the bound value from the bundle and feeds it to the original
    assert run(["verify", str(out), "--against", str(m)], capsys)[0] == 0
    # the same flags build the same bytes
    again = tmp_path / "again"
    assert run(["build", str(m), "--target", "x86-64", "--input-value", f"sr={rate}", "-o", str(again)], capsys)[0] == 0
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


@pytest.mark.parametrize("values, says", [
    (["sr=16000.5"], "not representable"),            # a float for an int64 input
    (["sr=abc"], "VALUE must be"),
    (["sr=16000,8000"], "rank"),                       # a list for a scalar
    (["sr=16000", "sr=8000"], "twice"),
    (["rate=16000"], "model's inputs are"),
    (["sr="], "NAME=VALUE"),
    (["sr=nan"], "VALUE must be"),
])
def test_bad_input_values_are_exit_2(tmp_path, capsys, values, says):
    m, out = _vad_model(tmp_path / "vad.onnx"), tmp_path / "out"
    args = ["build", str(m), "--target", "x86-64", "-o", str(out)]
    for v in values:
        args += ["--input-value", v]
    code, _, err = run(args, capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_parse_input_values():
    from lmc.compiler.cli import parse_input_values

    assert parse_input_values(("sr=16000", "scale=0.5,0.25", "n=-3", "f=1e-3")) == {
        "sr": 16000, "scale": (0.5, 0.25), "n": -3, "f": 1e-3}


# ------------------------------------------------------------------------ inputs a model cannot take (fuzz)
def test_a_zero_dim_is_refused_except_on_a_cache_input(model_dir, tmp_path, capsys):
    from lmc.core import ir, shapes
    from lmc.models import build_llama

    code, _, err = run(["build", str(model_dir / "tiny-gpt2.onnx"), "--input-shape", "input_ids=0x8",
                        "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "input_ids" in err and "past" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    graph = ir.to_graph(build_llama())
    graph.inputs[0].name = "past_key_values.0.key"        # an empty cache is a real input
    shapes.bind_input_shapes(graph, {"past_key_values.0.key": (1, 0)})
    assert graph.inputs[0].shape == [1, 0]


def test_a_sequence_longer_than_the_positions_is_a_user_error(tmp_path, capsys):
    import onnx

    from lmc.models import Gpt2Config, build_gpt2

    m = tmp_path / "gpt2-16.onnx"
    onnx.save(build_gpt2(Gpt2Config(vocab=64, d_model=16, heads=2, layers=1, max_positions=16)), str(m))
    code, _, err = run(["build", str(m), "--input-shape", "input_ids=1x17", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not accept --input-shape input_ids=1x17" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert run(["build", str(m), "--input-shape", "input_ids=1x16", "-o", str(tmp_path / "o")], capsys)[0] == 0


def _conv_bn(path, bias: int):
    """Conv (4 output channels, a bias of ``bias`` values) → BatchNormalization: the checker and shape
    inference accept a wrong bias length, onnxruntime fails when it runs the Conv."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(bias).astype(np.float32), "b")]
    inits += [numpy_helper.from_array(np.full(4, v, np.float32), n)
              for n, v in (("scale", 1.5), ("beta", 0.1), ("mean", 0.2), ("var", 2.0))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_model_onnxruntime_cannot_run_either_is_a_user_error(tmp_path, capsys):
    """lmc failing inside a pass on a model onnxruntime cannot run at the same shapes is the model's fault:
    exit 2 with both reasons; the same model with a right bias builds."""
    bad = _conv_bn(tmp_path / "bad.onnx", bias=8)
    code, _, err = run(["build", str(bad), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "inconsistent" in err and "onnxruntime cannot run it either" in err, err
    assert "bias" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert run(["build", str(_conv_bn(tmp_path / "good.onnx", bias=4)), "-o", str(tmp_path / "o")], capsys)[0] == 0


def test_lmc_failing_on_a_model_that_runs_stays_an_internal_error(model_dir, tmp_path, capsys, monkeypatch):
    import lmc.compiler.build as build_module

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(build_module, "plan_memory", broken)
    code, _, err = run(["build", str(model_dir / "tiny-gpt2.onnx"), "--input-shape", "input_ids=1x8",
                        "-o", str(tmp_path / "o")], capsys)
    assert code == 1 and "internal error" in err and "ValueError" in err


def test_sigterm_unwinds_and_removes_temporary_files(tmp_path):
    """SIGTERM under lmc's entry point unwinds like Ctrl-C: a build's spill file (and staged bundle) go."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import os, signal, sys
from lmc.core import weights
from lmc.compiler import cli
cli.stop_cleanly_on_sigterm()
spill = weights.SpillFile()
try:
    with spill:
        spill.add("w", 1, [4], bytes(16))
        print(spill.path, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
except cli.Terminated:
    sys.exit(143)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 143, out.stderr
    path = Path(out.stdout.strip())
    assert path.name == "spilled.data" and not path.exists() and not path.parent.exists()


@pytest.mark.parametrize("flags", [["--kv-cache", "int8"], ["--kv-cache", "float"], ["--batch", "2"], ["--batch", "1"],
                                   ["--prefill-chunk", "16"], ["--batch", "2", "--prefill-chunk", "16"]])
def test_generation_flags_without_context_exit_2_one_line(model_dir, tmp_path, capsys, flags):
    code, _, err = run(["build", str(model_dir / "tiny-llama.onnx"), "--input-shape", "input_ids=1x8", *flags,
                        "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(f in err for f in flags[::2]) and "--context" in err
    assert not (tmp_path / "out").exists()


def _restoring_signals(fn):
    """Run ``fn`` and put back the SIGTERM/SIGINT handlers ``main`` installs."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return fn()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_sigterm_through_main_exits_143_one_line(model_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM during a command run by ``main`` is exit 143 "terminated", not click's 130 "aborted"."""
    import os
    import signal

    import lmc.compiler.build

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()

    monkeypatch.setattr(lmc.compiler.build, "build", terminated)
    code, _, err = _restoring_signals(lambda: run(
        ["build", str(model_dir / "tiny-gpt2.onnx"), "--input-shape", "input_ids=1x8", "-o", str(tmp_path / "o")],
        capsys))
    assert code == 143 and err.strip() == "lmc: terminated"
    monkeypatch.setattr(lmc.compiler.build, "build", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = _restoring_signals(lambda: run(
        ["build", str(model_dir / "tiny-gpt2.onnx"), "--input-shape", "input_ids=1x8", "-o", str(tmp_path / "o")],
        capsys))
    assert code == 130 and err.strip() == "lmc: interrupted"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("signal_name, code_wanted, message", [("SIGINT", 130, "interrupted"),
                                                                ("SIGTERM", 143, "terminated")])
def test_interrupt_while_main_starts_up_exits_one_line(capsys, monkeypatch, signal_name, code_wanted, message):
    """Ctrl-C or SIGTERM while ``main`` is still importing what it needs (onnxruntime's C extension turns
    it into "ImportError: initialization failed"): exit 130/143 and one line, no traceback."""
    import importlib.abc
    import sys

    from lmc.compiler.cli import Terminated

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "onnxruntime":
                if signal_name == "SIGINT":
                    raise KeyboardInterrupt
                try:
                    raise Terminated()
                except Terminated:
                    raise ImportError("initialization failed")
            return None

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    try:
        code, _, err = _restoring_signals(lambda: run(["targets"], capsys))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main: the user sees a traceback")
    assert code == code_wanted and err.strip() == f"lmc: {message}"


# ------------------------------------------------------------------- README example, inspect/diff paths, help
def test_readme_generation_example_runs_from_a_clean_checkout(tmp_path):
    """The README's generation example, as written: what it writes is ignored by git, what it reads exists or
    an earlier line writes, and every line exits 0 (run in a scratch folder, at a smaller context and token
    count so that the test stays quick)."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "lmc generate" in b)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    if shutil.which("git") and (root / ".git").exists():
        for line in lines:
            words = shlex.split(line)
            written = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-o", ">")]
            for path in written:
                probe = path + ("plan.json" if path.endswith("/") else "")
                ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=root).returncode == 0
                assert ignored, f"README: `{line}` writes {path} into the checkout, which git does not ignore"
    (tmp_path / "models").symlink_to(root / "models")
    lmc = f"{shlex.quote(sys.executable)} -m lmc.compiler.cli"
    for line in lines:
        command = re.sub(r"^lmc ", lmc + " ", line)
        command = command.replace("--context 512", "--context 24").replace("--max-new-tokens 200", "--max-new-tokens 8")
        out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"README: `{line}` exits {out.returncode}: {out.stderr.strip()[-300:]}"


def _bad_reshape_model(path):
    """x [n] reshaped to [2, 3]: onnxruntime fails to run it at n = 5 (and used to log that itself, in red)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor("s", TensorProto.INT64, [2], [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnxruntime_log_lines_do_not_precede_the_one_line_error(tmp_path, capfd):
    model = _bad_reshape_model(tmp_path / "m.onnx")
    with pytest.raises(SystemExit) as exc:
        main(["build", str(model), "--input-shape", "x=5", "-o", str(tmp_path / "out")])
    err = capfd.readouterr().err                 # onnxruntime writes to fd 2 itself
    assert exc.value.code == 2 and "onnxruntime" in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lmc: error:"), err


def test_inspect_takes_a_bundle_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["build", str(model_dir / "tiny-gpt2.onnx"), "-o", str(out), "--input-shape", "input_ids=1x8"],
               capsys)[0] == 0
    code, stdout, err = run(["inspect", str(out), "--json"], capsys)
    assert code == 0, err
    by_folder = json.loads(stdout)
    code, stdout, _ = run(["inspect", str(out / "model.onnx"), "--json"], capsys)
    assert code == 0 and by_folder == json.loads(stdout)
    assert by_folder["built_with"]["target"] == "cortex-a55"
    code, _, err = run(["inspect", str(tmp_path)], capsys)                  # a folder that is not a bundle
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not an lmc bundle" in err
    # lmc diff with a folder that is not there: say so
    code, _, err = run(["diff", str(out), str(tmp_path / "missing")], capsys)
    assert code == 2 and err.strip() == f"lmc: error: {tmp_path / 'missing'}: no such folder"


@pytest.mark.parametrize("argv", [[], ["-v"]])
def test_bare_lmc_prints_the_help(capsys, argv):
    code, stdout, err = run(argv, capsys)
    assert code == 0 and not err
    assert stdout.startswith("Usage: lmc") and "Commands:" in stdout and "build" in stdout


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """The console script imports the CLI inside a guard: an interrupt during that import exits 130, one line."""
    import builtins

    import lmc.entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "lmc.compiler.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exc:
        lmc.entry.main()
    assert exc.value.code == 130 and capsys.readouterr().err == "lmc: interrupted\n"
