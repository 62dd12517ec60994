"""``lmc verify BUNDLE --against MODEL --on cortex-m55|cortex-m7`` (lmc.compiler.on_board) on the hand-written
C bundle of tests/board_fixture.py: it passes as written and fails (exit 3) when a kernel is off, when the
plan's arena differs from the linker's, and when the image's RAM is over the target's. Skipped when the cross
compiler or qemu is absent (scripts/setup-mcu.sh)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from board_fixture import ARENA, fixture_model, write_bundle

from lmc.compiler.cli import ON_BOARDS, main
from lmc.targets.cbundle.board import board_targets

needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in ("arm-none-eabi-gcc", "qemu-system-arm")),
                                 reason="arm-none-eabi-gcc or qemu-system-arm absent: run scripts/setup-mcu.sh")


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture
def original(tmp_path):
    path = tmp_path / "original.onnx"
    onnx.save(fixture_model(), str(path))
    return path


def test_the_command_line_offers_every_board_target():
    assert tuple(ON_BOARDS) == board_targets()


@needs_tools
def test_bundle_passes_on_the_board_with_its_figures(tmp_path, original, capsys):
    bundle = write_bundle(tmp_path / "b", target="cortex-m7")
    code, out, err = run(["verify", str(bundle), "--against", str(original), "--on", "cortex-m7", "--samples", "2"],
                         capsys)
    assert code == 0, err
    assert "ran on mps2-an500 (qemu-system-arm -M mps2-an500 -cpu cortex-m7)" in out
    assert f"arena: plan {ARENA} B, model.h {ARENA} B, linker .bss.lmc_arena {ARENA} B" in out
    assert "of the target's 524,288" in out and "instructions per inference" in out and "PASS" in out
    code, out, _ = run(["verify", str(bundle), "--against", str(original), "--on", "cortex-m7", "--json"], capsys)
    board = json.loads(out)["board"]
    assert code == 0 and board["linker_arena"] == board["plan_arena"] == ARENA
    assert 0 < board["stack_used"] < board["stack_bytes"] and board["instructions"] > 0


@needs_tools
def test_a_wrong_kernel_fails_exit_3(tmp_path, original, capsys):
    bundle = write_bundle(tmp_path / "b", skew=" * 1.0001f")         # y off by 1e-4 relative
    code, out, err = run(["verify", str(bundle), "--against", str(original), "--on", "cortex-m55"], capsys)
    assert code == 3
    assert "output 'y [C vs model.onnx]' max relative error" in err and "FAIL" in out


@needs_tools
def test_an_arena_other_than_the_plan_fails_exit_3(tmp_path, original, capsys):
    bundle = write_bundle(tmp_path / "b", plan_arena=ARENA + 16)
    code, _, err = run(["verify", str(bundle), "--against", str(original), "--on", "cortex-m55"], capsys)
    assert code == 3
    assert f"arena sizes disagree: plan.json {ARENA + 16} B, model.h {ARENA} B, the linker map {ARENA} B" in err


@needs_tools
def test_ram_over_the_target_fails_exit_3(tmp_path, original, capsys):
    # 2 MiB of arena fits the board's 4 MiB ISRAM but not the cortex-m55 target's 1 MiB
    bundle = write_bundle(tmp_path / "b", arena=2 << 20)
    code, _, err = run(["verify", str(bundle), "--against", str(original), "--on", "cortex-m55"], capsys)
    assert code == 3
    assert "of RAM on mps3-an547" in err and "over target cortex-m55's ram_bytes 1,048,576" in err


def test_not_a_c_bundle_and_tokens_are_refused_exit_2(tmp_path, original, capsys):
    (tmp_path / "onnx-only").mkdir()
    onnx.save(fixture_model(), str(tmp_path / "onnx-only" / "model.onnx"))
    code, _, err = run(["verify", str(tmp_path / "onnx-only"), "--against", str(original), "--on", "cortex-m7"],
                       capsys)
    assert code == 2 and "runs a C bundle" in err
    bundle = write_bundle(tmp_path / "b")
    tokens = tmp_path / "t.u16"
    tokens.write_bytes(b"\0" * 64)
    code, _, err = run(["verify", str(bundle), "--against", str(original), "--on", "cortex-m55", "--tokens",
                        str(tokens)], capsys)
    assert code == 2 and "--tokens applies to language models" in err


def test_lmc_targets_names_each_board(capsys):
    code, out, _ = run(["targets"], capsys)
    assert code == 0
    assert ("board    mps3-an547 (qemu-system-arm -M mps3-an547 -cpu cortex-m55): code ITCM 512 KiB, constants "
            "QSPI 8 MiB, data ISRAM 4 MiB (stack 8 KiB, heap 4 KiB reserved); lmc verify --on cortex-m55") in out
    code, out, _ = run(["targets", "--json"], capsys)
    found = {t["name"]: t.get("board") for t in json.loads(out)}
    assert found["cortex-m7"]["machine"] == "mps2-an500" and found["cortex-m7"]["ram"]["origin"] == 0x20000000
    assert found["cortex-a55"] is None
