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
    assert code == 2 and "exceeds the budget" in err and not (tmp_path / "o").exists()
    code, out, _ = run(["build", m, "--input-shape", "input_ids=1x32", "--max-ram", "8MiB", "-o",
                        str(tmp_path / "o"), "--json"], capsys)
    assert code == 0 and json.loads(out)["peak_ram_bytes"] <= 8 * 2**20
    assert run(["build", m, "--max-ram", "much", "-o", str(tmp_path / "p")], capsys)[0] == 2
