"""Greedy generation in C: the runner of a generation bundle's C code (``lmc build … --context N`` for a
target that emits C) and the drivers that run it on the host or an emulated board.

The C model is the bundle's *decode step*: ``input_ids`` [B, 1], ``attention_mask`` [B, N] (N = context) and
the cache state; ``lmc_run`` computes one token. The state pairs (``past_key_values.*`` input and
``present.*`` output) are one static buffer each in ``runner.c``, passed as both, so ``TensorScatter``
writes the new row in place and the cache persists across ``lmc_run`` calls (its bytes are the plan's
``state`` section, outside the arena). The mask is the tokens so far, left-padded with zeros to N: the graph
reads position t = (ones in the mask) − (ones among the new tokens), so step t (0-based) has its last t + 1
entries set.

``runner.c`` protocol (files in the working directory; semihosting on a board):
- ``lmc_in_0.bin``: the prompt, P little-endian int64 token ids (1 ≤ P);
- ``lmc_in_1.bin``: one little-endian int32, M ≥ 0 the tokens to generate; P + M − 1 ≤ N;
- ``lmc_out_0.bin``: the M generated ids (int64): each the argmax of the logits (the first on ties), fed
  back as the next step's input.
Exit 0 on success, 2 on a missing, short or out-of-bounds input, else ``lmc_run``'s code (3: an id outside
the vocabulary).
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core.errors import LmcError
from lmc.core.metadata import GenerationInfo
from lmc.targets.plan import MemoryPlan
from lmc.targets.target import Target
from lmc.targets.cbundle import board as boards
from lmc.targets.cbundle.emit import CBundle, emit_c
from lmc.targets.cbundle.registry import UnsupportedOp
from lmc.targets.cbundle.host import CFLAGS, HostRunError, find_cc

log = logging.getLogger(__name__)

RUNNER_C = "runner.c"
PROMPT_FILE = "lmc_in_0.bin"
COUNT_FILE = "lmc_in_1.bin"
TOKENS_FILE = "lmc_out_0.bin"
RUN_TIMEOUT_S = 600
MARKER = "greedy generation with the decode step"       # in the generation runner's first line


class GenerationRunError(LmcError):
    """The C generation runner refused its inputs or failed."""


class UnsupportedGeneration(UnsupportedOp):
    """A generation bundle the C runner cannot drive (batch > 1, positions not from attention_mask, …): like an
    op without a kernel, the build then writes no C unless ``--emit c`` asked for it."""


@dataclass(frozen=True)
class StepIo:
    """The decode step's interface as the runner binds it: graph inputs/outputs in order, with their roles."""

    inputs: tuple[tuple[str, str, int], ...]      # (name, role, bytes): role input_ids | attention_mask | state k
    outputs: tuple[tuple[str, str, int], ...]     # (name, role, bytes): role logits | state k
    state_bytes: tuple[int, ...]
    context: int
    vocab: int


def _nbytes(t: gs.Tensor) -> int:
    return math.prod(int(d) for d in t.shape) * np.dtype(t.dtype).itemsize


def step_io(graph: gs.Graph, info: GenerationInfo) -> StepIo:
    """The roles of the decode-step graph's inputs and outputs (shapes bound: input_ids [1, 1])."""
    if info.batch != 1:
        raise UnsupportedGeneration("the C generation runner serves batch 1 only (--batch 1)")
    if not info.attention_mask:
        raise UnsupportedGeneration("the C generation runner needs a bundle whose positions come from attention_mask")
    state_of = {}
    for k, (past, present) in enumerate(info.state):
        state_of[past] = state_of[present] = k
    inputs, outputs = [], []
    sizes = [0] * len(info.state)
    for t in graph.inputs:
        if t.name == info.input_ids:
            role = "input_ids"
            if list(t.shape) != [1, 1] or np.dtype(t.dtype) != np.int64:
                raise UnsupportedGeneration(f"the decode step's {t.name} must be int64 [1, 1], got {t.dtype} "
                                            f"{t.shape}")
        elif t.name == info.attention_mask:
            role = "attention_mask"
            if list(t.shape) != [1, info.context] or np.dtype(t.dtype) != np.int64:
                raise UnsupportedGeneration(f"the decode step's {t.name} must be int64 [1, {info.context}], got "
                                            f"{t.dtype} {t.shape}")
        elif t.name in state_of:
            role = f"state {state_of[t.name]}"
            sizes[state_of[t.name]] = _nbytes(t)
        else:
            raise UnsupportedGeneration(f"the decode step has an input the C runner cannot feed: {t.name}")
        inputs.append((t.name, role, _nbytes(t)))
    vocab = 0
    for t in graph.outputs:
        if t.name == info.logits:
            role = "logits"
            if np.dtype(t.dtype) != np.float32:
                raise UnsupportedGeneration(f"logits must be float32, got {t.dtype}")
            vocab = int(t.shape[-1])
        elif t.name in state_of:
            role = f"state {state_of[t.name]}"
            if _nbytes(t) != sizes[state_of[t.name]]:
                raise UnsupportedGeneration(f"state {t.name} differs in size from its input")
        else:
            raise UnsupportedGeneration(f"the decode step has an output the C runner does not keep: {t.name}")
        outputs.append((t.name, role, _nbytes(t)))
    return StepIo(tuple(inputs), tuple(outputs), tuple(sizes), info.context, vocab)


def runner_c(io: StepIo, alignment: int) -> str:
    """The text of the generation runner."""
    def buffer(role: str) -> str:
        return {"input_ids": "lmc_ids", "attention_mask": "lmc_mask", "logits": "lmc_logits"}.get(
            role, f"lmc_state_{role.split()[-1]}")
    states = "\n".join(f"static _Alignas({alignment}) unsigned char lmc_state_{k}[{n}];  /* "
                       f"{io.inputs[[r for _, r, _ in io.inputs].index(f'state {k}')][0]} */"
                       for k, n in enumerate(io.state_bytes))
    ins = ", ".join(buffer(role) for _, role, _ in io.inputs)
    outs = ", ".join(buffer(role) for _, role, _ in io.outputs)
    return f"""/* Generated by lmc: {MARKER} (see lmc.targets.cbundle.generation).
 * lmc_in_0.bin: the prompt (int64 ids); lmc_in_1.bin: tokens to generate (one int32);
 * lmc_out_0.bin: the generated ids (int64). Exit 0 ok, 2 bad input, else lmc_run's code.
 * The cache is static state here, passed as both past and present: it persists across lmc_run calls. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "model.h"

#define LMC_CONTEXT {io.context}
#define LMC_VOCAB {io.vocab}

static _Alignas({alignment}) int64_t lmc_ids[1];
static _Alignas({alignment}) int64_t lmc_mask[LMC_CONTEXT];
static _Alignas({alignment}) float lmc_logits[LMC_VOCAB];
{states}
static int64_t lmc_prompt[LMC_CONTEXT + 1];
static int64_t lmc_tokens[LMC_CONTEXT];

/* Reads at most cap bytes of path into buf; returns the count, or -1 when the file is missing or longer. */
static long read_file(const char *path, void *buf, size_t cap)
{{
    FILE *f = fopen(path, "rb");
    size_t got;
    if (f == NULL) return -1;
    got = fread(buf, 1, cap, f);
    fclose(f);
    return got == cap ? -1 : (long)got;
}}

static int argmax(const float *x, int n)
{{
    int i, best = 0;
    for (i = 1; i < n; ++i)
        if (x[i] > x[best]) best = i;
    return best;
}}

int main(void)
{{
    const void *inputs[LMC_NUM_INPUTS] = {{{ins}}};
    void *outputs[LMC_NUM_OUTPUTS] = {{{outs}}};
    int32_t count = 0;
    long got, n_prompt, steps, t, made = 0;
    FILE *f;
    got = read_file("{PROMPT_FILE}", lmc_prompt, sizeof lmc_prompt);
    if (got <= 0 || got % 8 != 0) return 2;
    n_prompt = got / 8;
    if (read_file("{COUNT_FILE}", &count, sizeof count + 1) != (long)sizeof count || count < 0) return 2;
    steps = count > 0 ? n_prompt + count - 1 : 0;
    if (steps > LMC_CONTEXT) return 2;
    for (t = 0; t < steps; ++t) {{
        int rc;
        lmc_ids[0] = t < n_prompt ? lmc_prompt[t] : lmc_tokens[made - 1];
        lmc_mask[LMC_CONTEXT - 1 - t] = 1;
        rc = lmc_run(inputs, outputs);
        if (rc != 0) return rc;
        if (t >= n_prompt - 1 && made < count) lmc_tokens[made++] = argmax(lmc_logits, LMC_VOCAB);
    }}
    f = fopen("{TOKENS_FILE}", "wb");
    if (f == NULL) return 3;
    if (made > 0 && fwrite(lmc_tokens, 8, (size_t)made, f) != (size_t)made) {{
        fclose(f);
        return 3;
    }}
    return fclose(f) == 0 ? 0 : 3;
}}
"""


def emit_generation_c(graph: gs.Graph, plan: MemoryPlan, target: Target, folder: str | Path,
                      info: GenerationInfo) -> CBundle:
    """Write the C bundle of a generation bundle's decode step (``graph`` bound to sequence 1 and planned as
    ``plan``, the decode profile: ``LMC_ARENA_BYTES`` is its arena) into ``folder``, with the generation
    runner as ``runner.c``."""
    io = step_io(graph, info)          # refuse what the runner cannot drive before writing anything
    written = emit_c(graph, plan, target, folder)
    (Path(folder) / RUNNER_C).write_text(runner_c(io, plan.alignment))
    return written


def is_generation_c(folder: str | Path) -> bool:
    """True when ``folder`` holds a C bundle whose runner is the generation runner."""
    runner = Path(folder) / RUNNER_C
    return (Path(folder) / "model.h").is_file() and runner.is_file() and MARKER in runner.read_text()


def require_generation_runner(bundle: Path) -> None:
    """Refuse a folder whose C is not a generation bundle's (no model.h, or the one-call runner)."""
    if not is_generation_c(bundle):
        raise LmcError(f"{bundle}: not a C generation bundle (build one with lmc build MODEL --context N "
                       "--target cortex-m55|cortex-m7)")


def _write_inputs(folder: Path, prompt: Sequence[int], count: int) -> None:
    ids = np.asarray(list(prompt), dtype="<i8")
    if ids.size == 0:
        raise LmcError("the prompt is empty")
    (folder / PROMPT_FILE).write_bytes(ids.tobytes())
    (folder / COUNT_FILE).write_bytes(np.asarray([count], dtype="<i4").tobytes())


def _read_tokens(folder: Path, status: int, bundle: Path) -> list[int]:
    if status == 2:
        raise GenerationRunError(f"{bundle}: the C runner refused the prompt (empty, or prompt + new tokens over "
                                 "the context)")
    if status == 3:
        raise GenerationRunError(f"{bundle}: a token id is outside the vocabulary (lmc_run code 3)")
    if status != 0:
        raise GenerationRunError(f"{bundle}: the C runner exited with status {status}")
    return [int(v) for v in np.frombuffer((folder / TOKENS_FILE).read_bytes(), dtype="<i8")]


class HostGenerator:
    """The bundle's C compiled once with the host compiler; ``generate`` runs the runner in a fresh folder.
    ``close()`` (or the context manager) removes the build."""

    def __init__(self, bundle: str | Path, cc: str | None = None):
        self.bundle = Path(bundle)
        require_generation_runner(self.bundle)
        cc = cc or find_cc()
        if cc is None:
            raise LmcError("no host C compiler (cc, gcc or clang on PATH, or $CC) to build the C bundle")
        self.work = Path(tempfile.mkdtemp(prefix="lmc-cgen-"))
        self.exe = self.work / "lmc_generate"
        sources = sorted(str(p) for p in self.bundle.glob("*.c"))
        done = subprocess.run([cc, *CFLAGS, "-I", str(self.bundle), *sources, "-o", str(self.exe), "-lm"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.close()
            first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
            raise HostRunError(f"{bundle}: the C bundle does not compile with {Path(cc).name}: {first}")

    def generate(self, prompt: Sequence[int], count: int) -> list[int]:
        """``count`` greedy tokens after ``prompt``."""
        with tempfile.TemporaryDirectory(prefix="run-", dir=self.work) as tmp:
            run_dir = Path(tmp)
            _write_inputs(run_dir, prompt, count)
            done = subprocess.run([str(self.exe)], cwd=run_dir, capture_output=True, timeout=RUN_TIMEOUT_S)
            return _read_tokens(run_dir, done.returncode, self.bundle)

    def __enter__(self) -> "HostGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def generate_host(bundle: str | Path, prompt: Sequence[int], count: int, cc: str | None = None) -> list[int]:
    """Compile the bundle's C with the host compiler and generate ``count`` greedy tokens after ``prompt``."""
    with HostGenerator(bundle, cc) as generator:
        return generator.generate(prompt, count)


@dataclass(frozen=True)
class BoardGeneration:
    """Greedy tokens made on an emulated board, with the image's linker figures."""

    tokens: list[int]
    board: str
    flash_bytes: int
    ram_bytes: int
    arena_bytes: int
    stack_used: int
    instructions: int | None      # in all lmc_run calls together
    lmc_run_calls: int


def generate_board(bundle: str | Path, target, prompt: Sequence[int], count: int,
                   timeout: float = RUN_TIMEOUT_S) -> BoardGeneration:
    """Build the bundle for ``target``'s board, run the generation runner under qemu, return the tokens."""
    bundle = Path(bundle)
    require_generation_runner(bundle)
    with boards.BoardImage(bundle, boards.board_for(target)) as image:
        with tempfile.TemporaryDirectory(prefix="run-", dir=image.work) as tmp:
            work = Path(tmp)
            _write_inputs(work, prompt, count)
            try:
                done = subprocess.run(image.board.qemu_command(image.elf), cwd=work, capture_output=True,
                                      text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise GenerationRunError(f"{bundle}: generation did not finish on {image.board.name} within "
                                         f"{timeout:g} s") from exc
            report = {}
            path = work / boards.BOARD_REPORT
            for line in (path.read_text().splitlines() if path.is_file() else []):
                key, _, value = line.partition(" ")
                try:
                    report[key] = int(value, 0)
                except ValueError:
                    pass
            if "exit" not in report or "fault" in report:
                raise GenerationRunError(f"{bundle}: the image stopped on {image.board.name} before main returned "
                                         f"(qemu exit {done.returncode})")
            tokens = _read_tokens(work, done.returncode, bundle)
            ticks = (report.get("ticks_hi", 0) << 32) | report.get("ticks_lo", 0)
            calls = report.get("calls", 0)
            sizes = image.sizes
            return BoardGeneration(tokens, image.board.name, sizes.flash_bytes, sizes.ram_bytes, sizes.arena_bytes,
                                   report.get("stack_used", 0),
                                   round(ticks * 1e9 / image.board.cpu_hz) if calls else None, calls)


__all__ = ["BoardGeneration", "GenerationRunError", "UnsupportedGeneration", "HostGenerator", "is_generation_c",
           "StepIo", "generate_board", "generate_host", "runner_c",
           "step_io", "emit_generation_c"]
