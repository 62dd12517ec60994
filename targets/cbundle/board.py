"""Run a C bundle on an emulated microcontroller board: arm-none-eabi-gcc, then qemu-system-arm.

A board is data, ``boards/<name>.toml``: the qemu machine and CPU, the CPU clock, the compiler's CPU flags,
the memory regions the image uses (FLASH: vector table and code; CONST, where the board's flash is apart from
its code memory, else FLASH too: constants — the bundle's weights — and the initial values of .data; RAM:
.data, .bss — the arena and the runner's I/O buffers —, the heap newlib's stdio allocates from, the main
stack) and the heap and stack reserved. A target runs on the board whose ``targets`` names it
(``board_for``). The linker script is written from those facts (``MEMORY`` and the two sizes) and includes
``boards/sections.ld``; ``boards/startup.c`` is the vector table and reset handler.

``BoardImage(bundle, board)`` compiles every ``.c`` of the bundle and the startup (the board's CPU flags and
``COMMON_CFLAGS``: the contract's ``-std=c99 -O2 -Wall -Wextra -Werror -fdata-sections -ffunction-sections``)
and links them (``LINK_FLAGS``: ``--gc-sections``, newlib-nano, semihosting through librdimon, ``-lm``, a map
and ld's region usage). ``run(inputs)`` runs the image as

    qemu-system-arm -M <machine> -cpu <cpu> -nographic -semihosting-config enable=on,target=native
                    -icount shift=0 -kernel img.elf

in a fresh folder holding ``lmc_in_<k>.bin`` and returns a ``BoardRun``: the outputs read back from
``lmc_out_<k>.bin`` (as the bundle's ``model.onnx`` types them), the exit status (the runner's: main's return
reaches qemu's exit status through semihosting), and what the startup measured (its ``lmc_board.txt``).

Figures (``ImageSizes``):
- flash = ld's FLASH (+ CONST) region usage = .text + .rodata + .ARM.exidx + the .data initial values;
- RAM = ld's RAM region usage = .data + .bss + heap reserved + stack reserved (with alignment padding);
- arena = the size of input section ``.bss.lmc_arena`` in the map (the bundle's ``lmc_arena``);
- stack used: the startup paints the stack below its own frame at reset and, after main returns, finds the
  deepest word no longer painted — a high-water mark of the whole run (fopen/fread included); on Armv8-M
  the stack limit register (MSPLIM) also faults on overflow, on Armv7-M a stack used to its last word is
  reported as an overflow;
- heap used: the top of the heap ``_sbrk`` handed out;
- instructions: the startup wraps ``lmc_run`` (``-Wl,--wrap=lmc_run``) with SysTick on the CPU clock;
  under ``-icount shift=0`` qemu's virtual clock advances one nanosecond per executed instruction, so the
  instructions in ``lmc_run`` are ticks × 1e9 / cpu_hz, exact to one tick (1e9 / cpu_hz instructions: 31 on
  the AN547, 40 on the AN500). Debian's qemu ships no TCG plugin that counts instructions; this needs none.

``profile_bundle`` adds where those instructions go: an image whose SysTick interrupts every P ticks inside
``lmc_run`` records the interrupted pc (startup.c, ``-DLMC_PROFILE_PERIOD=P``, P chosen for about 4096
samples); each pc is attributed to the function whose code holds it (``function_table``: the map's
``.text.<function>`` input sections, and the global symbols of plain ``.text`` sections), each sample P ticks
of instructions — a sampling profile, deterministic under icount, its handler adding ~20 instructions a sample.
The same image counts each step of ``lmc_run`` exactly: it compiles a copy of ``model.c`` that calls
``lmc_board_step(i)`` at each ``/* step i: Op 'node' */`` line the emitter writes (``BoardRun.steps``).

Errors are ``BoardError`` (an ``LmcError``): the toolchain missing (run ``scripts/setup-mcu.sh``), a
compile error, an image larger than the board's memory (with the numbers), a timeout, a fault (the startup's
fault handler reports the exception and the faulting pc), a stack overflow.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lmc.core.errors import LmcError
from lmc.targets.cbundle.host import IoSpec, bundle_io
from lmc.targets.target import Target

log = logging.getLogger(__name__)

SETUP = "scripts/setup-mcu.sh"
GCC = "arm-none-eabi-gcc"
QEMU = "qemu-system-arm"
COMMON_CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fdata-sections", "-ffunction-sections")
LINK_FLAGS = ("-nostartfiles", "--specs=nano.specs", "--specs=rdimon.specs", "-Wl,--gc-sections",
              "-Wl,--wrap=lmc_run", "-Wl,--print-memory-usage")
LIBS = ("-lrdimon", "-lm")
STARTUP = "startup.c"
SECTIONS = "sections.ld"
ARENA_SECTION = ".bss.lmc_arena"
IMAGE_SECTIONS = (".text", ".rodata", ".ARM.extab", ".ARM.exidx", ".data", ".bss", ".heap", ".stack")
BOARD_REPORT = "lmc_board.txt"
PROFILE_FILE = "lmc_profile.bin"
MODEL_C = "model.c"
OUTSIDE_STEPS = "(lmc_run outside its steps)"
_STEP = re.compile(r"^(\s*)/\* step (\d+): (.*?) \*/\s*$")
PROFILE_SAMPLES = 4096             # what profile_bundle aims at (startup.c keeps up to 16384)
COMPILE_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300
FAULT_NAMES = {2: "NMI", 3: "HardFault", 4: "MemManage", 5: "BusFault", 6: "UsageFault", 7: "SecureFault",
               11: "SVCall", 12: "DebugMonitor", 14: "PendSV"}
CFSR_BITS = {0: "IACCVIOL", 1: "DACCVIOL", 3: "MUNSTKERR", 4: "MSTKERR", 8: "IBUSERR", 9: "PRECISERR",
             10: "IMPRECISERR", 11: "UNSTKERR", 12: "STKERR", 16: "UNDEFINSTR", 17: "INVSTATE", 18: "INVPC",
             19: "NOCP", 20: "STKOF: the stack limit", 24: "UNALIGNED", 25: "DIVBYZERO"}


class BoardError(LmcError):
    """A C bundle could not be built for, or run on, an emulated board."""


@dataclass(frozen=True)
class MemoryRegion:
    name: str        # the board's name for it (ITCM, ISRAM, SSRAM1…)
    origin: int
    length: int

    def describe(self) -> str:
        return f"{self.name} ({self.length:,} B at 0x{self.origin:08x})"


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    targets: tuple[str, ...]
    machine: str                 # qemu -M
    cpu: str                     # qemu -cpu
    cpu_hz: int                  # SysTick's CPU clock: instructions = ticks * 1e9 / cpu_hz under -icount shift=0
    cflags: tuple[str, ...]      # the CPU and floating-point flags of arm-none-eabi-gcc
    flash: MemoryRegion          # vector table and code (and constants, unless const is given)
    ram: MemoryRegion
    heap_bytes: int
    stack_bytes: int
    source: str
    const: MemoryRegion | None = None   # constants (weights) and .data initial values, when apart from the code

    def linker_script(self) -> str:
        """The image's linker script: this board's regions and reservations, then ``sections.ld``."""
        def region(name: str, attributes: str, r: MemoryRegion) -> str:
            return f"    {name:<5} ({attributes}) : ORIGIN = 0x{r.origin:08x}, LENGTH = 0x{r.length:08x}   /* {r.name} */\n"

        regions = [region("FLASH", "rx", self.flash)]
        regions += [region("CONST", "r", self.const)] if self.const else []
        regions += [region("RAM", "rwx", self.ram)]
        return (f"/* {self.name}: {self.description} (from {self.source}) */\n"
                "MEMORY\n{\n" + "".join(regions) + "}\n"
                + ("" if self.const else 'REGION_ALIAS("CONST", FLASH);\n')
                + f"__lmc_heap_bytes = {self.heap_bytes};\n"
                f"__lmc_stack_bytes = {self.stack_bytes};\n"
                f"INCLUDE {SECTIONS}\n")

    def describe(self) -> str:
        """One line: the emulator and where the image goes."""
        const = f", constants {self.const.name} {_kib(self.const.length)}" if self.const else ""
        code = "code" if self.const else "code and constants"
        return (f"{self.name} (qemu-system-arm -M {self.machine} -cpu {self.cpu}): {code} {self.flash.name} "
                f"{_kib(self.flash.length)}{const}, data {self.ram.name} {_kib(self.ram.length)} (stack "
                f"{_kib(self.stack_bytes)}, heap {_kib(self.heap_bytes)} reserved)")

    def as_dict(self) -> dict:
        regions = {"flash": self.flash, "ram": self.ram, **({"const": self.const} if self.const else {})}
        return {"name": self.name, "machine": self.machine, "cpu": self.cpu, "cpu_hz": self.cpu_hz,
                "cflags": list(self.cflags), "stack_bytes": self.stack_bytes, "heap_bytes": self.heap_bytes,
                **{k: dataclasses.asdict(r) for k, r in regions.items()}}

    def qemu_command(self, elf: Path) -> list[str]:
        return [QEMU, "-M", self.machine, "-cpu", self.cpu, "-nographic", "-monitor", "none",
                "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", str(elf)]


def _kib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n >> 10} KiB" if n % 1024 == 0 else f"{n:,} B"


def _boards_dir():
    return resources.files("lmc.targets.cbundle") / "boards"


def _region(table: dict, source: str) -> MemoryRegion:
    region = MemoryRegion(str(table["name"]), int(table["origin"]), int(table["length"]))
    if region.length <= 0 or region.origin < 0:
        raise BoardError(f"{source}: memory region {region.name} has origin {region.origin}, length {region.length}")
    return region


def load_board(path: str | Path) -> Board:
    """A board from its TOML file."""
    source = Path(path).name
    try:
        data = tomllib.loads(Path(path).read_text())
        qemu, memory = data["qemu"], data["memory"]
        return Board(name=str(data["name"]), description=str(data.get("description", "")),
                     targets=tuple(str(t) for t in data["targets"]), machine=str(qemu["machine"]),
                     cpu=str(qemu["cpu"]), cpu_hz=int(qemu["cpu_hz"]),
                     cflags=tuple(str(f) for f in data["compiler"]["cflags"]),
                     flash=_region(memory["flash"], source), ram=_region(memory["ram"], source),
                     heap_bytes=int(memory["heap_bytes"]), stack_bytes=int(memory["stack_bytes"]), source=source,
                     const=_region(memory["const"], source) if "const" in memory else None)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BoardError(f"{source}: cannot read the board description ({exc})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise BoardError(f"{source}: missing or malformed key {exc}") from exc


def boards() -> list[Board]:
    """Every board shipped with lmc, by name."""
    return sorted((load_board(Path(str(p))) for p in _boards_dir().iterdir() if p.name.endswith(".toml")),
                  key=lambda b: b.name)


def board_for(target: Target | str) -> Board:
    """The board a target runs on (the board whose ``targets`` names it)."""
    name = target if isinstance(target, str) else target.name
    known = boards()
    for board in known:
        if name in board.targets:
            return board
    runs = ", ".join(f"{t} ({b.name})" for b in known for t in b.targets)
    raise BoardError(f"no emulated board runs target {name}; boards run: {runs}")


def board_targets() -> tuple[str, ...]:
    """The targets some board runs."""
    return tuple(sorted(t for b in boards() for t in b.targets))


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BoardError(f"{name} not found: run {SETUP} (as root; it installs gcc-arm-none-eabi, "
                         "libnewlib-arm-none-eabi and qemu-system-arm)")
    return path


@dataclass(frozen=True)
class ImageSizes:
    """What the linker placed (bytes): ld's region usage and the map's sections."""

    flash_bytes: int             # FLASH (+ CONST) regions used: code, constants, .data initial values
    ram_bytes: int               # RAM region used: .data + .bss + heap + stack reserved
    sections: dict[str, int]     # output section -> size (.text, .rodata, .data, .bss, .heap, .stack…)
    arena_bytes: int             # input section .bss.lmc_arena (0 when the bundle has none)

    def describe(self) -> str:
        s = self.sections
        return (f"flash {self.flash_bytes:,} B (.text {s.get('.text', 0):,}, .rodata {s.get('.rodata', 0):,}, "
                f".data {s.get('.data', 0):,}); RAM {self.ram_bytes:,} B (.data {s.get('.data', 0):,}, .bss "
                f"{s.get('.bss', 0):,} of which the arena {self.arena_bytes:,}, heap {s.get('.heap', 0):,}, "
                f"stack {s.get('.stack', 0):,})")


_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_USAGE = re.compile(r"^\s*(FLASH|CONST|RAM):\s+(\d+)\s*(B|KB|MB|GB)\s+(\d+)\s*(B|KB|MB|GB)", re.MULTILINE)


def parse_memory_usage(ld_output: str) -> dict[str, int]:
    """ld's ``--print-memory-usage`` table: region -> bytes used."""
    return {m[1]: int(m[2]) * _UNITS[m[3]] for m in _USAGE.finditer(ld_output)}


def parse_map(text: str) -> tuple[dict[str, int], int]:
    """(output section -> size, size of input section ``.bss.lmc_arena``) from a GNU ld map file: in its
    memory map, an output section's line starts with its name, an input section's with a space; the address
    and size follow on the same line, or on the next when the name is long."""
    start = text.find("Linker script and memory map")
    lines = (text[start:] if start >= 0 else text).splitlines()
    sections: dict[str, int] = {}
    arena = 0
    for i, line in enumerate(lines):
        fields = line.split()
        output = line.startswith(".")
        if not fields or not (output or (line.startswith(" ") and fields[0] == ARENA_SECTION)):
            continue
        rest = fields[1:3] if len(fields) >= 3 else (lines[i + 1].split()[:2] if i + 1 < len(lines) else [])
        if len(rest) < 2 or not all(f.startswith("0x") for f in rest):
            continue                       # an empty output section: no address, no size
        size = int(rest[1], 16)
        if output:
            sections[fields[0]] = sections.get(fields[0], 0) + size
        else:
            arena += size
    return sections, arena


def function_table(text: str) -> tuple[np.ndarray, list[str]]:
    """(sorted start addresses, names) of the code in a GNU ld map: each input section ``.text.<function>``
    (-ffunction-sections) is that function; a plain ``.text`` input section is named by its object file, and
    each global symbol the map lists inside it starts a function of that name."""
    start = text.find("Linker script and memory map")
    lines = (text[start:] if start >= 0 else text).splitlines()
    entries: list[tuple[int, int, str]] = []      # (address, 0 for a section / 1 for a symbol, name)
    in_plain_text = False
    for i, line in enumerate(lines):
        fields = line.split()
        if line.startswith(" .") and fields:
            in_plain_text = False
            name = fields[0]
            if not (name == ".text" or name.startswith(".text.")):
                continue
            rest = fields[1:4] if len(fields) >= 3 else (lines[i + 1].split()[:3] if i + 1 < len(lines) else [])
            if len(rest) < 3 or not rest[0].startswith("0x") or int(rest[1], 16) == 0:
                continue
            obj = rest[2].rsplit("/", 1)[-1]
            entries.append((int(rest[0], 16), 0, name[len(".text."):] if name != ".text" else obj))
            in_plain_text = name == ".text"
        elif in_plain_text and len(fields) == 2 and fields[0].startswith("0x") and fields[1].isidentifier():
            entries.append((int(fields[0], 16) & ~1, 1, fields[1]))
        elif line.startswith("."):
            in_plain_text = False
    entries.sort()                                  # a symbol after the section it starts: it names the code
    return np.array([a for a, _, _ in entries], dtype=np.int64), [n for _, _, n in entries]


@dataclass(frozen=True)
class BoardRun:
    """One run of a bundle's image on its board."""

    board: str
    exit_code: int
    outputs: tuple[np.ndarray, ...]      # in the graph's output order (empty unless exit_code == 0)
    sizes: ImageSizes
    stack_used: int                      # bytes of the main stack the run reached (high-water mark)
    heap_used: int                       # bytes of heap newlib's stdio took
    instructions: int | None             # executed in lmc_run (None: lmc_run was not called)
    lmc_run_calls: int
    mvfr0: int                           # the core's Media and VFP Feature Register 0 (what its FPU has)
    profile: tuple[tuple[str, int], ...] = ()   # profiled image: (function, instructions sampled in it), most first
    steps: tuple[tuple[str, int], ...] = ()     # profiled image: (model.c step, its instructions), in run order

    @property
    def flash_bytes(self) -> int:
        return self.sizes.flash_bytes

    @property
    def ram_bytes(self) -> int:
        return self.sizes.ram_bytes

    @property
    def arena_bytes(self) -> int:
        return self.sizes.arena_bytes

    def to_dict(self) -> dict:
        return {"board": self.board, "exit_code": self.exit_code, "flash_bytes": self.flash_bytes,
                "ram_bytes": self.ram_bytes, "arena_bytes": self.arena_bytes, "sections": self.sizes.sections,
                "stack_used": self.stack_used, "heap_used": self.heap_used, "instructions": self.instructions,
                "lmc_run_calls": self.lmc_run_calls, "mvfr0": f"0x{self.mvfr0:08x}",
                "profile": [{"function": f, "instructions": n} for f, n in self.profile],
                "steps": [{"step": f, "instructions": n} for f, n in self.steps]}


def _header_define(header: str, name: str) -> int | None:
    m = re.search(rf"^\s*#\s*define\s+{name}\s+\(?\s*(\d+)", header, re.MULTILINE)
    return int(m[1]) if m else None


class BoardImage:
    """A C bundle compiled and linked for a board; ``close()`` (or the context manager) removes the build
    folder unless ``keep`` is a folder to build in. ``profile_period``: build the startup's sampling profiler
    (a sample every that many SysTick ticks inside ``lmc_run``; ``BoardRun.profile``). ``link_only``: the
    image is built for its figures (``sizes``) and never run, so qemu-system-arm is not needed."""

    def __init__(self, bundle: str | Path, board: Board, keep: str | Path | None = None,
                 profile_period: int | None = None, link_only: bool = False):
        self.bundle = Path(bundle)
        self.board = board
        self.profile_period = profile_period
        self.steps: tuple[str, ...] = ()       # a profiled model.c's step labels
        if not (self.bundle / "model.h").is_file():
            raise BoardError(f"{bundle}: not a C bundle (no model.h)")
        gcc = find_tool(GCC)
        if not link_only:
            find_tool(QEMU)
        header = (self.bundle / "model.h").read_text()
        self.header_arena = _header_define(header, "LMC_ARENA_BYTES")
        self.inputs, self.outputs = bundle_io(self.bundle)
        self._owned = keep is None
        self.work = Path(tempfile.mkdtemp(prefix="lmc-board-")) if keep is None else Path(keep)
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.elf, self.map, self.sizes = self._build(gcc)
        except BaseException:
            self.close()
            raise

    def _build(self, gcc: str) -> tuple[Path, Path, ImageSizes]:
        boards = Path(str(_boards_dir()))
        script = self.work / f"{self.board.name}.ld"
        script.write_text(self.board.linker_script())
        sources = [*sorted(self.bundle.glob("*.c")), boards / STARTUP]
        profile: list[str] = []
        if self.profile_period:
            profile = [f"-DLMC_PROFILE_PERIOD={self.profile_period}"]
            steps = self._mark_steps(self.bundle / MODEL_C)
            if steps:
                profile.append(f"-DLMC_PROFILE_STEPS={len(steps)}")
                sources[sources.index(self.bundle / MODEL_C)] = self.work / MODEL_C
        objects = []
        for src in sources:
            obj = self.work / (src.stem + ".o")
            self._tool([gcc, *self.board.cflags, *COMMON_CFLAGS, *(profile if src.name == STARTUP else []), "-I",
                        str(self.bundle), "-c", str(src), "-o", str(obj)], f"compiling {src.name} for {self.board.name}")
            objects.append(str(obj))
        elf, map_file = self.work / "img.elf", self.work / "img.map"
        done = subprocess.run([gcc, *self.board.cflags, *LINK_FLAGS, "-L", str(boards), "-T", str(script),
                               f"-Wl,-Map={map_file}", *objects, *LIBS, "-o", str(elf)],
                              capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        usage = parse_memory_usage(done.stdout)
        sections, arena = parse_map(map_file.read_text()) if map_file.is_file() else ({}, 0)
        sizes = ImageSizes(usage.get("FLASH", 0) + usage.get("CONST", 0), usage.get("RAM", 0),
                           {k: v for k, v in sections.items() if k in IMAGE_SECTIONS}, arena)
        if done.returncode != 0:
            raise self._link_error(done.stderr, sizes)
        log.info("%s image of %s: %s", self.board.name, self.bundle, sizes.describe())
        return elf, map_file, sizes

    def _mark_steps(self, model_c: Path) -> list[str]:
        """Write a copy of ``model.c`` into the build folder that calls ``lmc_board_step(i)`` where each of its
        steps begins (the emitter's ``/* step i: Op 'node' */`` lines); the steps' labels, in order ([]: the
        file has none, and no copy is written)."""
        if not model_c.is_file():
            return []
        lines, steps = [], []
        for line in model_c.read_text().splitlines():
            lines.append(line)
            m = _STEP.match(line)
            if m and int(m[2]) == len(steps):
                steps.append(m[3])
                lines.append(f"{m[1]}lmc_board_step({m[2]}u);")
        if steps:
            (self.work / MODEL_C).write_text("void lmc_board_step(unsigned step);\n" + "\n".join(lines) + "\n")
        self.steps = tuple(steps)
        return steps

    def _tool(self, cmd: list[str], what: str) -> None:
        log.debug("%s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise BoardError(f"{self.bundle}: {what} took over {COMPILE_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines()
            raise BoardError(f"{self.bundle}: {what} failed: {lines[0].strip() if lines else 'no message'}")

    def _link_error(self, stderr: str, sizes: ImageSizes) -> BoardError:
        over = {m[1]: int(m[2]) for m in re.finditer(r"region `(\w+)' overflowed by (\d+) bytes", stderr)}
        if over:
            parts = []
            for name, region in (("FLASH", self.board.flash), ("CONST", self.board.const), ("RAM", self.board.ram)):
                if name in over and region is not None:
                    parts.append(f"{name} needs {region.length + over[name]:,} B, its {region.describe()} "
                                 f"has {region.length:,} B")
            return BoardError(f"{self.bundle}: the image does not fit board {self.board.name}: "
                              f"{'; '.join(parts)} — {sizes.describe()}")
        lines = [ln.split(": ", 1)[-1] for ln in stderr.splitlines() if ln.strip() and "collect2" not in ln]
        return BoardError(f"{self.bundle}: linking for {self.board.name} failed: "
                          f"{lines[0].strip() if lines else 'no message'}")

    def __enter__(self) -> "BoardImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.work, ignore_errors=True)

    def run(self, inputs: Sequence[np.ndarray] | dict[str, np.ndarray], timeout: float = RUN_TIMEOUT_S) -> BoardRun:
        """Run the image on ``inputs`` (graph order, or by name)."""
        if isinstance(inputs, dict):
            inputs = [inputs[s.name] for s in self.inputs]
        if len(inputs) > len(self.inputs):
            raise BoardError(f"the C bundle takes {len(self.inputs)} inputs, got {len(inputs)}")
        with tempfile.TemporaryDirectory(prefix="run-", dir=self.work) as tmp:
            run_dir = Path(tmp)
            for k, (spec, value) in enumerate(zip(self.inputs, inputs)):
                (run_dir / f"lmc_in_{k}.bin").write_bytes(_raw(spec, value))
            cmd = self.board.qemu_command(self.elf)
            log.debug("%s (in %s)", " ".join(cmd), run_dir)
            try:
                done = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, timeout=timeout,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise BoardError(f"{self.bundle}: the image did not finish on {self.board.name} within {timeout:g} s "
                                 "(qemu stopped)") from exc
            report = _read_report(run_dir / BOARD_REPORT)
            if "exit" not in report:
                lines = done.stderr.strip().splitlines()
                why = next((ln for ln in lines if "fatal" in ln), lines[-1] if lines else "no message")
                raise BoardError(f"{self.bundle}: the image stopped on {self.board.name} before main returned "
                                 f"(qemu exit {done.returncode}: {why.strip()})")
            if "fault" in report:
                number, cfsr = report["fault"], report.get("cfsr", 0)
                causes = ", ".join(name for bit, name in CFSR_BITS.items() if cfsr >> bit & 1) or "no fault status"
                raise BoardError(f"{self.bundle}: the image faulted on {self.board.name}: "
                                 f"{FAULT_NAMES.get(number, f'exception {number}')} ({causes}) at pc "
                                 f"0x{report.get('pc', 0):08x} (CFSR 0x{cfsr:08x}, HFSR 0x{report.get('hfsr', 0):08x}; "
                                 f"stack used {report.get('stack_used', 0):,} of {self.board.stack_bytes:,} B)")
            if report["stack_used"] >= self.board.stack_bytes:
                raise BoardError(f"{self.bundle}: the main stack overflowed on {self.board.name} (all "
                                 f"{self.board.stack_bytes:,} B reserved were used; raise stack_bytes in "
                                 f"{self.board.source})")
            if done.returncode != report["exit"]:
                raise BoardError(f"{self.bundle}: main returned {report['exit']} but qemu exited "
                                 f"{done.returncode} on {self.board.name}")
            outputs: list[np.ndarray] = []
            if done.returncode == 0:
                for k, spec in enumerate(self.outputs):
                    path = run_dir / f"lmc_out_{k}.bin"
                    raw = path.read_bytes() if path.is_file() else b""
                    want = int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize
                    if len(raw) != want:
                        raise BoardError(f"{self.bundle}: output {k} ({spec.name}) on {self.board.name} has "
                                         f"{len(raw)} bytes, expected {want}")
                    outputs.append(np.frombuffer(raw, dtype=spec.dtype.newbyteorder("<"))
                                   .astype(spec.dtype).reshape(spec.shape))
            ticks = (report.get("ticks_hi", 0) << 32) | report.get("ticks_lo", 0)
            calls = report.get("calls", 0)
            profile = self._profile(run_dir / PROFILE_FILE, report) if self.profile_period else ()
            steps = tuple((label, self._instructions(report.get(f"step{i}", 0)))
                          for i, label in enumerate((OUTSIDE_STEPS, *self.steps))) if self.steps else ()
            return BoardRun(board=self.board.name, exit_code=done.returncode, outputs=tuple(outputs),
                            sizes=self.sizes, stack_used=report["stack_used"], heap_used=report.get("heap_used", 0),
                            instructions=self._instructions(ticks) if calls else None,
                            lmc_run_calls=calls, mvfr0=report.get("mvfr0", 0), profile=profile, steps=steps)

    def _instructions(self, ticks: int) -> int:
        """SysTick ticks on the CPU clock -> instructions (qemu -icount shift=0: 1 ns each)."""
        return round(ticks * 1e9 / self.board.cpu_hz)

    def _profile(self, path: Path, report: dict[str, int]) -> tuple[tuple[str, int], ...]:
        """The sampled pcs, attributed to the functions of the map; each sample is a period of ticks."""
        if not path.is_file():
            return ()
        pcs = np.frombuffer(path.read_bytes(), dtype="<u4")
        if report.get("profile_taken", 0) > len(pcs):
            log.warning("profile of %s: %d samples taken, the first %d kept", self.bundle, report["profile_taken"],
                        len(pcs))
        starts, names = function_table(self.map.read_text())
        where = np.searchsorted(starts, pcs & ~np.uint32(1), side="right") - 1
        counts: dict[str, int] = {}
        for i in where.tolist():
            name = names[i] if i >= 0 else "?"
            counts[name] = counts.get(name, 0) + 1
        per_sample = report.get("profile_period", self.profile_period or 0)
        return tuple(sorted(((n, self._instructions(c * per_sample)) for n, c in counts.items()),
                            key=lambda item: -item[1]))


def _raw(spec: IoSpec, value: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(np.asarray(value, dtype=spec.dtype).reshape(spec.shape))
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _read_report(path: Path) -> dict[str, int]:
    """The startup's ``key value`` lines (values decimal or 0x hex)."""
    if not path.is_file():
        return {}
    report = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        try:
            report[key] = int(value, 0)
        except ValueError:
            continue
    return report


def run_bundle(bundle: str | Path, target: Target | str, inputs: Sequence[np.ndarray] | dict[str, np.ndarray],
               timeout: float = RUN_TIMEOUT_S) -> BoardRun:
    """Compile ``bundle`` for the board ``target`` runs on, run it once on ``inputs``, clean up."""
    with BoardImage(bundle, board_for(target)) as image:
        return image.run(inputs, timeout)


def profile_bundle(bundle: str | Path, target: Target | str, inputs: Sequence[np.ndarray] | dict[str, np.ndarray],
                   samples: int = PROFILE_SAMPLES, timeout: float = RUN_TIMEOUT_S) -> BoardRun:
    """The bundle's ``BoardRun`` on the target's board (its image, figures and instruction count as
    ``run_bundle`` gives them) with ``profile`` and ``steps`` from a second image that samples the pc about
    ``samples`` times and counts the steps: those include the sampling handler's instructions, ~20 a sample
    (their sum is within ~1% of ``instructions``)."""
    board = board_for(target)
    with BoardImage(bundle, board) as image:
        first = image.run(inputs, timeout)
    if first.instructions is None:
        raise BoardError(f"{bundle}: lmc_run was not called on {board.name}: nothing to profile")
    ticks = first.instructions * board.cpu_hz / 1e9
    period = max(64, int(np.ceil(ticks / samples)))
    with BoardImage(bundle, board, profile_period=period) as image:
        profiled = image.run(inputs, timeout)
    return dataclasses.replace(first, profile=profiled.profile, steps=profiled.steps)
