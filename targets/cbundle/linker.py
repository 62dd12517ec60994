"""Plan vs linker: what a C bundle's image really takes on its board, against what its plan promised.

``link_figures(bundle, target, plan_arena)`` compiles every ``.c`` of the bundle with the board's startup
and links it (``board.BoardImage(link_only=True)``: arm-none-eabi-gcc only, nothing is run), then reads
ld's region usage and map (``board.ImageSizes``):

- arena: the size of input section ``.bss.lmc_arena`` (the bundle's ``lmc_arena[LMC_ARENA_BYTES]``);
- RAM: ld's RAM region = .data + .bss (arena, the runner's I/O buffers, a generation bundle's KV state)
  + the heap and the main stack *reserved* by the board's linker script — the stack's bound is its
  reservation (``stack_bytes``; the run's high-water mark is ``lmc verify --on``'s to measure);
- flash: ld's FLASH (+ CONST) regions = code, constants (the weights), .data's initial values.

The promise (``LinkerFigures.failures``): plan arena = model.h's ``LMC_ARENA_BYTES`` = the map's arena
(an empty plan: the emitter's 1-byte arena counts as 0), RAM ≤ the target's ``ram_bytes``, flash ≤ the
board's code + constant memory. ``lmc build`` records the figures in ``plan.json["linker"]`` and report.md's
"Plan vs linker" and fails (exit 3) when the promise is broken.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from lmc.targets.cbundle.board import (GCC, SETUP, BoardError, BoardImage, ImageSizes, _header_define, board_for,
                                       board_targets)
from lmc.targets.cbundle.emit import HEADER_FILE
from lmc.targets.target import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkerFigures:
    """The linked image of a C bundle (bytes) beside the plan's and the target's figures."""

    board: str
    toolchain: str                 # "arm-none-eabi-gcc 12.2.1"
    plan_arena_bytes: int          # the plan the C was emitted from
    header_arena_bytes: int | None  # model.h LMC_ARENA_BYTES
    arena_bytes: int               # the map's .bss.lmc_arena
    ram_bytes: int                 # ld's RAM region: .data + .bss + heap + stack reserved
    data_bytes: int
    bss_bytes: int
    heap_bytes: int                # reserved
    stack_bytes: int               # reserved: the stack's bound
    flash_bytes: int               # ld's FLASH (+ CONST): code, constants, .data initial values
    target: str
    target_ram_bytes: int
    flash_capacity_bytes: int      # the board's code + constant memory

    def failures(self) -> tuple[str, ...]:
        """Why the image breaks the plan's promise (empty: it keeps it)."""
        out = []
        linker = 0 if self.plan_arena_bytes == 0 and self.arena_bytes <= 1 else self.arena_bytes
        if len({self.plan_arena_bytes, self.header_arena_bytes, linker}) != 1:
            out.append(f"arena sizes disagree: plan {self.plan_arena_bytes:,} B, model.h LMC_ARENA_BYTES "
                       f"{'none' if self.header_arena_bytes is None else f'{self.header_arena_bytes:,} B'}, "
                       f"linker map .bss.lmc_arena {self.arena_bytes:,} B")
        if self.ram_bytes > self.target_ram_bytes:
            out.append(f"the image takes {self.ram_bytes:,} B of RAM on {self.board} (.data {self.data_bytes:,} + "
                       f".bss {self.bss_bytes:,} + heap {self.heap_bytes:,} + stack {self.stack_bytes:,} reserved), "
                       f"over target {self.target}'s ram_bytes {self.target_ram_bytes:,}")
        if self.flash_bytes > self.flash_capacity_bytes:
            out.append(f"the image takes {self.flash_bytes:,} B of flash, over {self.board}'s "
                       f"{self.flash_capacity_bytes:,}")
        return tuple(out)

    def to_dict(self) -> dict:
        return {**asdict(self), "stack_bound": f"{self.stack_bytes} B reserved by the linker script (the board's "
                                               "stack_bytes); the RAM figure counts it whole",
                "failures": list(self.failures())}

    def report_lines(self) -> list[str]:
        """report.md's "Plan vs linker" table."""
        ok = lambda good: "✓" if good else "✗"  # noqa: E731
        linker = 0 if self.plan_arena_bytes == 0 and self.arena_bytes <= 1 else self.arena_bytes
        return [
            f"The image linked for board {self.board} by {self.toolchain} (every .c of the bundle and the board's "
            "startup; not run — `lmc verify <bundle> --against <model> --on <target>` runs it):", "",
            "| figure | plan / budget | linker | |", "|---|---:|---:|---|",
            f"| arena (`.bss.lmc_arena`) | {self.plan_arena_bytes:,} | {self.arena_bytes:,} | "
            f"{ok(linker == self.plan_arena_bytes == self.header_arena_bytes)} |",
            f"| RAM: .data {self.data_bytes:,} + .bss {self.bss_bytes:,} + heap {self.heap_bytes:,} + stack "
            f"{self.stack_bytes:,} (reserved: the stack's bound) | {self.target_ram_bytes:,} (target {self.target}) | "
            f"{self.ram_bytes:,} | {ok(self.ram_bytes <= self.target_ram_bytes)} |",
            f"| flash: code, weights, .data initial values | {self.flash_capacity_bytes:,} (board {self.board}) | "
            f"{self.flash_bytes:,} | {ok(self.flash_bytes <= self.flash_capacity_bytes)} |",
        ]


def toolchain_version(gcc: str) -> str:
    try:
        done = subprocess.run([gcc, "-dumpversion"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return GCC
    return f"{GCC} {done.stdout.strip()}" if done.returncode == 0 and done.stdout.strip() else GCC


def unavailable(target: Target | str) -> str:
    """Why no image can be linked for ``target`` here ('' when it can)."""
    name = target if isinstance(target, str) else target.name
    if name not in board_targets():
        return f"no emulated board runs target {name}"
    if shutil.which(GCC) is None:
        return f"{GCC} not found (run {SETUP})"
    return ""


def link_figures(bundle: str | Path, target: Target, plan_arena: int) -> LinkerFigures:
    """Link ``bundle`` for the board ``target`` runs on and return the figures (``BoardError``: no
    toolchain, a compile error, an image larger than the board's memory)."""
    board = board_for(target)
    with BoardImage(bundle, board, link_only=True) as image:
        sizes: ImageSizes = image.sizes
    header = _header_define((Path(bundle) / HEADER_FILE).read_text(), "LMC_ARENA_BYTES")
    capacity = board.flash.length + (board.const.length if board.const else 0)
    s = sizes.sections
    figures = LinkerFigures(board=board.name, toolchain=toolchain_version(shutil.which(GCC) or GCC),
                            plan_arena_bytes=plan_arena, header_arena_bytes=header, arena_bytes=sizes.arena_bytes,
                            ram_bytes=sizes.ram_bytes, data_bytes=s.get(".data", 0), bss_bytes=s.get(".bss", 0),
                            heap_bytes=s.get(".heap", 0), stack_bytes=s.get(".stack", 0),
                            flash_bytes=sizes.flash_bytes, target=target.name,
                            target_ram_bytes=target.memory.ram_bytes, flash_capacity_bytes=capacity)
    log.info("%s linked for %s: arena %d (plan %d), RAM %d, flash %d", bundle, board.name, figures.arena_bytes,
             plan_arena, figures.ram_bytes, figures.flash_bytes)
    return figures


__all__ = ["LinkerFigures", "link_figures", "toolchain_version", "unavailable", "BoardError"]
