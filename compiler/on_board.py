"""Checks on an emulated microcontroller: ``lmc verify BUNDLE --against MODEL --on cortex-m55|cortex-m7``.

The C bundle is compiled with arm-none-eabi-gcc for the board the target runs on and run under
qemu-system-arm (``lmc.targets.cbundle.board``) on the inputs the host check uses (``--inputs``, or the same
seeded random feeds), and judged as the host check of a C bundle judges (``lmc.compiler.cbundle_check``):
each output of the board against onnxruntime on the bundle's ``model.onnx`` (float within
``C_TOLERANCE`` relative, quantized outputs within one quantum), and ``model.onnx`` against the original
(within ``--tolerance`` or the original's own spread). The board's outputs are the only thing that differs:
the comparison is that module's ``compare_c``, given the board in place of the host build.

The memory the image really takes is checked too — what the linker placed against what the plan promised:
- the arena: plan.json's ``arena_bytes`` = model.h's ``LMC_ARENA_BYTES`` = the size of section
  ``.bss.lmc_arena`` in the linker map, else the check fails;
- RAM: the image's RAM (.data + .bss — arena and I/O buffers — + heap and stack reserved) must fit the
  target's ``ram_bytes``, else the check fails.
Reported beside: flash (code, constants, .data initial values), the stack and heap the run used, and the
instructions one inference executes (``lmc_run`` under ``-icount shift=0``; the largest over the samples).
Failures exit 3 like any verification. Nothing is written into the bundle (its file list stays lmc's): the
figures are printed, and are in ``--json``'s ``board``. The linker's figures of the bundle as built are
``lmc build``'s to record (plan.json ``"linker"``, report.md "Plan vs linker": ``lmc.targets.cbundle.linker``);
this check measures the same image again and runs it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from lmc.core.errors import LmcError
from lmc.core.metadata import build_metadata, decode_input_values
from lmc.compiler.cbundle_check import C_TOLERANCE, ONNX_SUFFIX, compare_c, is_c_bundle
from lmc.compiler.verify import (DEFAULT_TOLERANCE, VERIFY_HINT, OutputError, VerifyReport, compare_models,
                                 load_inputs, random_inputs)
from lmc.targets.cbundle.board import GCC, QEMU, BoardImage, BoardRun, board_for
from lmc.targets.cbundle.generation import is_generation_c
from lmc.targets.target import load_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoardFigures:
    """What the image of a bundle takes on its board, and what the plan and target say it may."""

    board: str
    machine: str
    cpu: str
    target: str                    # the target whose board this is (its ram_bytes is the budget)
    plan_arena: int | None         # plan.json arena_bytes
    header_arena: int | None       # model.h LMC_ARENA_BYTES
    linker_arena: int              # section .bss.lmc_arena in the map
    ram_bytes: int                 # .data + .bss + heap + stack reserved
    target_ram_bytes: int
    flash_bytes: int
    sections: dict[str, int]
    stack_bytes: int               # reserved
    stack_used: int                # high-water mark over the runs
    heap_bytes: int
    heap_used: int
    instructions: int | None       # per inference (lmc_run), the largest over the runs

    def failures(self) -> tuple[str, ...]:
        """Why the image breaks the plan's promise ((): it keeps it)."""
        out = []
        # an empty plan: C has no zero-length arrays, so the emitter declares a 1-byte arena
        linker = 0 if self.plan_arena == 0 and self.linker_arena <= 1 else self.linker_arena
        arenas = {"plan.json": self.plan_arena, "model.h": self.header_arena, "the linker map": self.linker_arena}
        if len({self.plan_arena, self.header_arena, linker}) != 1:
            out.append("arena sizes disagree: " + ", ".join(f"{k} {'none' if v is None else f'{v:,} B'}"
                                                            for k, v in arenas.items()))
        if self.ram_bytes > self.target_ram_bytes:
            out.append(f"the image takes {self.ram_bytes:,} B of RAM on {self.board} (arena {self.linker_arena:,}, "
                       f"stack {self.stack_bytes:,}, heap {self.heap_bytes:,} reserved), over target "
                       f"{self.target}'s ram_bytes {self.target_ram_bytes:,}")
        return tuple(out)

    def lines(self) -> tuple[str, ...]:
        s = self.sections
        arena = (f"arena: plan {_bytes(self.plan_arena)}, model.h {_bytes(self.header_arena)}, "
                 f"linker .bss.lmc_arena {_bytes(self.linker_arena)}")
        ram = (f"RAM {self.ram_bytes:,} B of the target's {self.target_ram_bytes:,} "
               f"({self.ram_bytes / self.target_ram_bytes:.1%}): .data {s.get('.data', 0):,} + .bss "
               f"{s.get('.bss', 0):,} + heap {self.heap_bytes:,} ({self.heap_used:,} used) + stack "
               f"{self.stack_bytes:,} ({self.stack_used:,} used)")
        flash = (f"flash {self.flash_bytes:,} B: .text {s.get('.text', 0):,} + .rodata {s.get('.rodata', 0):,} "
                 f"+ .data {s.get('.data', 0):,}")
        insn = (f"{self.instructions:,} instructions per inference" if self.instructions is not None
                else "instructions not counted (lmc_run was not called)")
        return (f"ran on {self.board} (qemu-system-arm -M {self.machine} -cpu {self.cpu}): {insn}", arena, ram,
                flash)


def _bytes(v: int | None) -> str:
    return "none" if v is None else f"{v:,} B"


@dataclass(frozen=True)
class BoardReport(VerifyReport):
    """A ``VerifyReport`` whose C outputs ran on a board, with the image's ``BoardFigures``; it passes when
    the outputs do and the figures keep the plan's promise."""

    board: BoardFigures | None = None

    @property
    def passed(self) -> bool:
        return super().passed and not (self.board and self.board.failures())

    def explain(self) -> str:
        parts = [] if super().passed else [super().explain()]
        parts += list(self.board.failures()) if self.board else []
        return "; ".join(parts) if parts else f"all {len(self.outputs)} output(s) within tolerance"

    @property
    def details(self) -> tuple[str, ...]:
        lines = (f"C bundle compiled with {GCC}, run under {QEMU} on {self.samples} input(s); each C output is "
                 f"held to {C_TOLERANCE:g} relative (quantized outputs: one quantum) against model.onnx",)
        return lines + (self.board.lines() if self.board else ())

    def to_dict(self) -> dict:
        return {**super().to_dict(), "passed": self.passed, "board": asdict(self.board) if self.board else None,
                "board_failures": list(self.board.failures()) if self.board else []}


class _BoardOutputs:
    """The board in the place of the host build for ``compare_c``: ``outputs`` and ``run(feed)``; every
    run's ``BoardRun`` is kept."""

    def __init__(self, image: BoardImage):
        self.image = image
        self.outputs = image.outputs
        self.runs: list[BoardRun] = []

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.image.run(feed)
        if result.exit_code != 0:
            raise LmcError(f"{self.image.bundle}: the runner exited with status {result.exit_code} on "
                           f"{self.image.board.name}")
        self.runs.append(result)
        return list(result.outputs)


def _feeds(model_path: Path, inputs, samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    model = onnx.load(str(model_path), load_external_data=False)
    if inputs is not None:
        return load_inputs(inputs, {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input})
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return random_inputs(model_path, shapes, samples=samples, seed=seed)


def verify_on_board(bundle: str | Path, against: str | Path, on: str, inputs: str | Path | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, samples: int = 1, seed: int = 0) -> BoardReport:
    """Run the C bundle at ``bundle`` on the board target ``on`` runs on and check it (module docstring)."""
    folder = Path(bundle)
    folder = folder.parent if folder.is_file() else folder
    if not is_c_bundle(folder):
        raise LmcError(f"{bundle}: --on {on} runs a C bundle (model.h, model.c…; `lmc build --target {on}` writes "
                       "one, or --emit c) and this folder has none")
    if is_generation_c(folder):
        raise LmcError(f"{bundle}: a generation bundle's C is a greedy runner; run it on the board with "
                       f"`lmc generate {bundle} --prompt-tokens FILE --on {on}`")
    model_path = folder / "model.onnx"
    if not model_path.is_file():
        raise LmcError(f"{folder}: a C bundle must hold the model.onnx it was generated from")
    if not Path(against).is_file():
        raise LmcError(f"{against}: no such file")
    target = load_target(on)
    board = board_for(target)
    plan_path = folder / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if plan.get("target") and plan["target"] != target.name:
        log.warning("%s was built for %s; running it on %s (%s)", folder, plan["target"], board.name, target.name)
    feeds = _feeds(model_path, inputs, samples, seed)
    with BoardImage(folder, board) as image:
        runner = _BoardOutputs(image)
        c_errors = compare_c(folder, feeds, runner)
        header_arena = image.header_arena
    fixed = decode_input_values(build_metadata(onnx.load(str(model_path), load_external_data=False))
                                .get("input_values", ""))
    onnx_report = compare_models(against, model_path, feeds, tolerance, spread=True, hint=VERIFY_HINT,
                                 reference_values=fixed)
    onnx_errors = [OutputError(o.name + ONNX_SUFFIX, o.max_abs, o.max_rel, o.cosine, o.tolerance, o.spread,
                               o.allowed) for o in onnx_report.outputs]
    figures = _figures(runner.runs, board, target, plan.get("arena_bytes"), header_arena)
    return BoardReport(tuple(c_errors + onnx_errors), len(feeds), tolerance, board=figures)


def _figures(runs: Sequence[BoardRun], board, target, plan_arena, header_arena) -> BoardFigures:
    first = runs[0]
    counted = [r.instructions for r in runs if r.instructions is not None]
    return BoardFigures(board=board.name, machine=board.machine, cpu=board.cpu, target=target.name,
                        plan_arena=plan_arena, header_arena=header_arena, linker_arena=first.arena_bytes,
                        ram_bytes=first.ram_bytes, target_ram_bytes=target.memory.ram_bytes,
                        flash_bytes=first.flash_bytes, sections=dict(first.sizes.sections),
                        stack_bytes=board.stack_bytes, stack_used=max(r.stack_used for r in runs),
                        heap_bytes=board.heap_bytes, heap_used=max(r.heap_used for r in runs),
                        instructions=max(counted) if counted else None)
