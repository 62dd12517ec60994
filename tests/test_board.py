"""C bundles on the emulated boards (lmc.targets.cbundle.board): a small bundle written by hand to the
C-bundle contract, compiled with arm-none-eabi-gcc and run under qemu-system-arm on mps3-an547 (Cortex-M55)
and mps2-an500 (Cortex-M7). Skipped when the cross compiler or qemu is absent (scripts/setup-mcu.sh).

The bundle is tests/board_fixture.py's (float and int8 outputs, two inputs, a 64-byte arena).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from board_fixture import ARENA, expected, write_bundle

from lmc.targets.cbundle.board import (BoardError, BoardImage, board_for, boards, function_table, parse_map,
                                       parse_memory_usage, profile_bundle, run_bundle)
from lmc.targets.target import load_target

TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm")
needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="arm-none-eabi-gcc or qemu-system-arm absent: run scripts/setup-mcu.sh")


def test_boards_are_data_and_every_board_target_exists():
    names = {b.name: b for b in boards()}
    assert set(names) == {"mps3-an547", "mps2-an500"}
    assert board_for("cortex-m55").machine == "mps3-an547" and board_for("cortex-m7").cpu == "cortex-m7"
    for board in names.values():
        for t in board.targets:
            load_target(t)
        assert board.ram.length >= max(load_target(t).memory.ram_bytes for t in board.targets)
        assert "INCLUDE sections.ld" in board.linker_script()
    with pytest.raises(BoardError, match="no emulated board runs target cortex-a55"):
        board_for("cortex-a55")


def test_map_and_memory_usage_parsing():
    text = """Discarded input sections
 .bss.lmc_arena  0x00000000      0x10 dead.o
Linker script and memory map
.text           0x00000000     0x3568
 .text.lmc_run  0x00000040       0x20 model.o
.ARM.extab
 *(.ARM.extab*)
.data           0x21000000       0x70 load address 0x00003858
.bss            0x21000070     0x1150 load address 0x000038c8
 .bss.lmc_arena
                0x21000070     0x1000 model.o
 .bss.lmc_arena_copy
                0x21001070       0x40 other.o
.stack          0x210031c0     0x2000 load address 0x000038c8
"""
    sections, arena = parse_map(text)
    assert arena == 0x1000          # not the discarded one, not a longer name
    assert sections == {".text": 0x3568, ".data": 0x70, ".bss": 0x1150, ".stack": 0x2000}
    starts, names = function_table("""Linker script and memory map
.text           0x00000000     0x3568
 .text.lmc_run  0x00000040       0x20 /tmp/model.o
 .text.lmc_conv2d_f32
                0x00000060      0x100 /tmp/lmc_kernels_cnn.o
 .text          0x00000160       0x40 /usr/lib/libgcc.a(_arm_addsubdf3.o)
                0x00000160                __aeabi_dadd
                0x00000181                __aeabi_dsub
 .text.empty    0x000001a0        0x0 /tmp/model.o
.rodata         0x00003568      0x2f0
                0x00003568                not_code
""")
    assert starts.tolist() == [0x40, 0x60, 0x160, 0x160, 0x180]
    assert names == ["lmc_run", "lmc_conv2d_f32", "libgcc.a(_arm_addsubdf3.o)", "__aeabi_dadd", "__aeabi_dsub"]
    usage = parse_memory_usage("Memory region Used Size Region Size %age Used\n"
                               "           FLASH:       14536 B       512 KB      2.77%\n"
                               "             RAM:          16 KB         4 MB      0.50%\n")
    assert usage == {"FLASH": 14536, "RAM": 16384}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    if any(shutil.which(t) is None for t in TOOLS):
        pytest.skip("arm-none-eabi-gcc or qemu-system-arm absent: run scripts/setup-mcu.sh")
    bundle = write_bundle(tmp_path_factory.mktemp("bundle"))
    built = {t: BoardImage(bundle, board_for(t)) for t in ("cortex-m55", "cortex-m7")}
    yield built
    for image in built.values():
        image.close()


@needs_tools
@pytest.mark.parametrize("target", ["cortex-m55", "cortex-m7"])
def test_bundle_runs_on_the_board_with_its_figures(images, target):
    image = images[target]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    gate = np.array([1, -2, 3, -128], dtype=np.int8)
    run = image.run([x, gate])
    assert run.exit_code == 0
    y, r, g = expected(x, gate)
    np.testing.assert_allclose(run.outputs[0], y, rtol=1e-5, atol=1e-6)
    assert np.abs(run.outputs[1].astype(int) - r.astype(int)).max() <= 1
    np.testing.assert_array_equal(run.outputs[2], g)
    # the linker's figures: the arena section is LMC_ARENA_BYTES; RAM holds .data, .bss, heap and stack
    assert run.arena_bytes == ARENA
    s = run.sizes.sections
    assert s[".bss"] >= ARENA + 32 + 4 + 32 + 8 + 4              # the arena and the runner's I/O buffers
    assert run.ram_bytes >= s.get(".data", 0) + s[".bss"] + s[".heap"] + s[".stack"]
    assert run.flash_bytes >= s[".text"] + s[".rodata"] + s.get(".data", 0)
    assert s[".rodata"] >= 8 * 4                                # the weights are in flash
    assert 0 < run.stack_used < image.board.stack_bytes and 0 < run.heap_used <= image.board.heap_bytes
    assert run.lmc_run_calls == 1 and 20 < run.instructions < 20000
    if target == "cortex-m7":
        assert run.mvfr0 & 0xF0 == 0x20                         # the core has a single-precision FPU


@needs_tools
def test_exit_codes_propagate(images):
    image = images["cortex-m7"]
    x = np.zeros((1, 8), np.float32)
    assert image.run([x, np.array([99, 99, 0, 0], np.int8)]).exit_code == 9     # lmc_run's code
    missing = image.run([x])                                                    # lmc_in_1.bin not written
    assert missing.exit_code == 2 and missing.outputs == ()


@needs_tools
def test_instructions_scale_with_the_work(tmp_path):
    # a known loop: 2 instructions per iteration (subs, bne), 10^6 iterations, counted by SysTick under -icount
    bundle = write_bundle(tmp_path / "loop")
    text = (bundle / "model.c").read_text().replace(
        "    /* step 1: Add 'add' */\n", "    /* step 1: Add 'add' */\n"
        '    { uint32_t n = 1000000u; __asm__ volatile("1: subs %0, %0, #1\\n bne 1b" : "+r"(n) : : "cc"); }\n')
    (bundle / "model.c").write_text(text)
    feeds = [np.zeros((1, 8), np.float32), np.zeros(4, np.int8)]
    for target in ("cortex-m55", "cortex-m7"):
        run = run_bundle(bundle, target, feeds)
        assert 2_000_000 <= run.instructions <= 2_000_000 + 2000, (target, run.instructions)
    # the sampling profile finds them in lmc_run (model.c): ~1000 samples of 64 ticks (2000 instructions), the
    # sampling handler's ~20 instructions per sample stretching the run by ~1%
    profiled = profile_bundle(bundle, "cortex-m55", feeds)
    (top, n), *rest = profiled.profile
    assert top == "lmc_run" and abs(n - 2_000_000) < 60_000 and sum(m for _, m in rest) < 10_000
    # and its steps (the /* step i */ lines of model.c) are counted exactly: the loop is in step 1
    steps = dict(profiled.steps)
    assert list(steps) == ["(lmc_run outside its steps)", "Mul 'mul'", "Add 'add'"]
    assert abs(sum(steps.values()) - profiled.instructions) < 0.02 * profiled.instructions
    assert steps["Mul 'mul'"] < 1000
    assert 2_000_000 <= steps["Add 'add'"] < 2_000_000 + 40_000


@needs_tools
def test_an_arena_larger_than_the_board_ram_is_refused_with_the_numbers(tmp_path):
    bundle = write_bundle(tmp_path / "big", arena=5 << 20)
    with pytest.raises(BoardError, match=r"does not fit board mps3-an547: RAM needs [\d,]+ B, its ISRAM "
                                         r"\(4,194,304 B at 0x21000000\).*arena 5,242,880"):
        BoardImage(bundle, board_for("cortex-m55"))


def test_missing_toolchain_names_the_setup_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BoardError, match=r"arm-none-eabi-gcc not found: run scripts/setup-mcu.sh"):
        BoardImage(write_bundle(tmp_path / "b"), board_for("cortex-m7"))


@needs_tools
def test_a_run_over_its_time_is_stopped(images):
    with pytest.raises(BoardError, match="did not finish on mps3-an547 within"):
        images["cortex-m55"].run([np.zeros((1, 8), np.float32), np.zeros(4, np.int8)], timeout=0.001)


@needs_tools
def test_a_short_output_file_is_refused(images, monkeypatch):
    image = images["cortex-m7"]
    spec = image.outputs[0]
    monkeypatch.setattr(image, "outputs", [type(spec)(spec.name, spec.dtype, (1, 9)), *image.outputs[1:]])
    with pytest.raises(BoardError, match=r"output 0 \(y\) on mps2-an500 has 32 bytes, expected 36"):
        image.run([np.zeros((1, 8), np.float32), np.zeros(4, np.int8)])


@needs_tools
def test_a_stack_overflow_is_caught_on_both_boards(tmp_path):
    # lmc_run takes 10 KiB of stack, more than the boards reserve: the Cortex-M55's stack limit register
    # faults; the Cortex-M7 has none, and the painted stack is found used to its last word
    bundle = write_bundle(tmp_path / "deep")
    text = (bundle / "model.c").read_text().replace(
        "    if (gate[0] == 99",
        "    { volatile uint8_t deep[10240]; for (i = 0; i < 10240; i++) deep[i] = (uint8_t)i; t[0] = deep[100]; }\n"
        "    if (gate[0] == 99")
    (bundle / "model.c").write_text(text)
    feeds = [np.zeros((1, 8), np.float32), np.zeros(4, np.int8)]
    with pytest.raises(BoardError, match=r"faulted on mps3-an547: HardFault \(STKOF: the stack limit\) at pc"):
        run_bundle(bundle, "cortex-m55", feeds)
    with pytest.raises(BoardError, match="the main stack overflowed on mps2-an500"):
        run_bundle(bundle, "cortex-m7", feeds)


@needs_tools
def test_weights_beyond_the_code_memory_go_to_flash(tmp_path):
    # 600 KB of constants: over the AN547's 512 KiB ITCM (its code memory), placed in its 8 MiB QSPI flash
    bundle = write_bundle(tmp_path / "big-weights")
    (bundle / "weights.c").write_text((bundle / "weights.c").read_text()
                                      + "const float lmc_w_big[150000] = {1.0f, [149999] = 2.0f};\n")
    text = (bundle / "model.c").read_text()
    text = text.replace("extern const float lmc_w_b[1];", "extern const float lmc_w_b[1];\nextern const float lmc_w_big[150000];")
    text = text.replace("        t[i] = x[i] * lmc_w_w[i];",
                        "        t[i] = x[i] * lmc_w_w[i] + 0.0f * lmc_w_big[(uint8_t)gate[2] + 149000u];")
    (bundle / "model.c").write_text(text)
    x = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    gate = np.array([0, 1, 2, 3], np.int8)
    run = run_bundle(bundle, "cortex-m55", [x, gate])
    assert run.exit_code == 0 and run.flash_bytes > 600_000 > board_for("cortex-m55").flash.length
    np.testing.assert_allclose(run.outputs[0], expected(x, gate)[0], rtol=1e-5, atol=1e-6)
