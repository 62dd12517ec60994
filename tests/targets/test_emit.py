"""-o DIR: lmc replaces only a bundle it wrote itself; any other non-empty folder is refused untouched."""

from __future__ import annotations

import pytest

from lmc.compiler.cli import main
from lmc.targets import emit

SHAPE = ["--input-shape", "input_ids=1x8"]


def _build(model_dir, out, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", str(model_dir / "tiny-gpt2.onnx"), "-o", str(out), *SHAPE, "--no-verify"])
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def test_user_folder_holding_plan_json_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "work"
    (out / "src").mkdir(parents=True)
    (out / "plan.json").write_text('{"my": "plan"}')
    (out / "notes.txt").write_text("notes")
    (out / "src" / "a.py").write_text("print('hi')\n")
    before = _snapshot(out)
    code, err = _build(model_dir, out, capsys)
    assert code == 2
    assert str(out) in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]          # no temporary folder left behind


def test_bundle_with_a_file_added_by_the_user_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _build(model_dir, out, capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    code, err = _build(model_dir, out, capsys)
    assert code == 2 and str(out) in err
    assert _snapshot(out) == before


def test_own_bundle_is_replaced_and_empty_folder_accepted(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()                                                          # empty existing folder: fine
    assert _build(model_dir, out, capsys)[0] == 0
    listed = emit.bundle_files(out)
    assert listed is not None and {emit.MODEL_FILE, emit.PLAN_FILE, emit.REPORT_FILE, emit.MARKER_FILE} <= set(listed)
    assert _build(model_dir, out, capsys)[0] == 0                        # lmc's own bundle: replaced
    assert emit.bundle_files(out) == listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]          # the old bundle is gone


def test_stage_refuses_a_foreign_folder_before_writing(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    with pytest.raises(emit.LmcError, match="data"):
        emit.stage_model(None, out, 64, 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
