"""Write a C bundle from a compiled graph and its memory plan: the plan, obeyed byte for byte.

Inputs: the graph (nodes in ``plan.schedule`` order, static shapes), its ``MemoryPlan`` and the ``Target``.
Preconditions: every node has a registered emitter (``registry``), every intermediate that is not a graph
output is in ``plan.tensors`` (or, for a weight its consumer decodes, in ``plan.decoded_weights``).

Files (the contract is ``cbundle-protocol``; see the package docstring):
- ``model.h``: ``LMC_ARENA_BYTES`` (= ``plan.arena_bytes``), input/output counts, byte sizes, names and
  element types, ``lmc_run``;
- ``model.c``: ``static _Alignas(a) uint8_t lmc_arena[LMC_ARENA_BYTES]`` and ``lmc_run``: one kernel call
  per scheduled node, in schedule order, every intermediate at ``lmc_arena + offset``;
- ``weights.c``: every initializer a kernel reads at run time as a ``const`` array aligned to the target's
  alignment (``lmc_w_<sanitised name>``; deterministic: same graph, same text);
- ``runner.c`` (file I/O driver), ``CMakeLists.txt``, ``lmc_kernels.h`` and the kernel families used.

Float constants are written with 9 significant digits (a float32 round-trips exactly through them).
"""

from __future__ import annotations

import enum
import logging
import math
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.targets.cbundle.registry import KernelCall, OpContext, Placement, TensorRef, load_op_modules
from lmc.targets.plan import MemoryPlan
from lmc.targets.target import Target, WeightsPlacement

log = logging.getLogger(__name__)

HEADER_FILE = "model.h"
MODEL_C = "model.c"
WEIGHTS_C = "weights.c"
RUNNER_C = "runner.c"
CMAKE_FILE = "CMakeLists.txt"
KERNELS_H = "lmc_kernels.h"
COMMON_FAMILY = "common"
ARENA = "lmc_arena"


class EmitFormat(enum.Enum):
    ONNX = "onnx"     # model.onnx only, for onnxruntime
    C = "c"           # model.onnx plus the C bundle (model.h, model.c, weights.c, kernels, runner)


def default_emit(target: Target) -> EmitFormat:
    """C where the weights live in flash (a microcontroller: no onnxruntime there), ONNX otherwise."""
    return EmitFormat.C if target.memory.weights_placement is WeightsPlacement.FLASH else EmitFormat.ONNX


@dataclass(frozen=True)
class CBundle:
    """What ``emit_c`` wrote: the files, the kernel families, multiply–accumulates per inference, the bytes
    of the weight arrays (flash) and of the arena."""

    files: tuple[str, ...]
    families: tuple[str, ...]
    macs: int
    weight_bytes: int
    arena_bytes: int


def _c_ident(name: str) -> str:
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return ident


def _weight_symbols(names: list[str]) -> dict[str, str]:
    """Initializer name -> a unique C identifier (``lmc_w_`` + sanitised name; ``_<n>`` on collisions, given
    in sorted-name order so the result does not depend on graph order)."""
    symbols: dict[str, str] = {}
    taken: set[str] = set()
    for name in sorted(names):
        base = "lmc_w_" + _c_ident(name)
        sym, n = base, 1
        while sym in taken:
            sym, n = f"{base}_{n}", n + 1
        taken.add(sym)
        symbols[name] = sym
    return symbols


def _float_literal(v: float) -> str:
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    text = f"{v:.9g}"
    if not any(c in text for c in ".en"):
        text += ".0"
    return text + "f"


def _int_literal(v: int, bits: int) -> str:
    if bits == 64:
        return f"(-INT64_C({-(v + 1)}) - 1)" if v < 0 else f"INT64_C({v})"
    return str(v)


def c_array(values: np.ndarray) -> str:
    """The values of an array as a C initializer list body (16 per line)."""
    flat = values.reshape(-1)
    if flat.dtype == np.float32:
        items = [_float_literal(float(v)) for v in flat.tolist()]
    elif flat.dtype == np.bool_:
        items = [str(int(v)) for v in flat.tolist()]
    else:
        bits = flat.dtype.itemsize * 8
        items = [_int_literal(int(v), bits) for v in flat.tolist()]
    lines = [", ".join(items[i:i + 16]) for i in range(0, len(items), 16)]
    return ",\n    ".join(lines)


def _dtype_name(dtype: np.dtype) -> str:
    return "float32" if dtype == np.float32 else str(dtype)


class _Tensors:
    """Where every tensor of the graph is, as ``TensorRef``s."""

    def __init__(self, graph: gs.Graph, plan: MemoryPlan):
        self.offsets = {t.name: t.offset for t in plan.tensors}
        self.decoded = set(plan.decoded_weights)
        self.inputs = {t.name: k for k, t in enumerate(graph.inputs)}
        self.outputs = {t.name: k for k, t in enumerate(graph.outputs)}
        consts = {c.name: c for c in ir.constants(graph, nested=False)}
        self.constants = consts
        self.symbols = _weight_symbols(list(consts))
        self._cache: dict[str, TensorRef] = {}

    def ref(self, tensor: gs.Tensor) -> TensorRef:
        name = tensor.name
        if name in self._cache:
            return self._cache[name]
        shape = ir.static_shape(tensor)
        if isinstance(tensor, gs.Constant):
            value = ir.const_value(tensor)
            ref = TensorRef(name, value.dtype, tuple(value.shape), Placement.WEIGHT, self.symbols[name], value,
                            self.symbols[name])
        else:
            if shape is None or tensor.dtype is None:
                raise LmcError(f"tensor '{name}' has no static shape or dtype; the C bundle needs both")
            dtype = np.dtype(tensor.dtype)
            if name in self.inputs:          # (an input that is also an output is read from inputs[k])
                ref = TensorRef(name, dtype, shape, Placement.INPUT, f"inputs[{self.inputs[name]}]")
            elif name in self.outputs:
                ref = TensorRef(name, dtype, shape, Placement.OUTPUT, f"outputs[{self.outputs[name]}]")
            elif name in self.offsets:
                ref = TensorRef(name, dtype, shape, Placement.ARENA, f"({ARENA} + {self.offsets[name]})")
            elif name in self.decoded:
                ref = TensorRef(name, dtype, shape, Placement.DECODED, "0")
            else:
                raise LmcError(f"tensor '{name}' is neither planned nor a graph input/output; the C bundle "
                               f"needs the plan of this very graph")
        self._cache[name] = ref
        return ref


def _kernel_dir():
    return resources.files("lmc.targets.cbundle") / "kernels"


def _family_files(family: str) -> tuple[str, str]:
    return f"lmc_kernels_{family}.h", f"lmc_kernels_{family}.c"


def _model_h(graph: gs.Graph, plan: MemoryPlan, refs: _Tensors, target: Target) -> str:
    ins = [refs.ref(t) for t in graph.inputs]
    outs = [refs.ref(t) for t in graph.outputs]
    describe = "\n".join(
        [f" * input {k}: \"{r.name}\" {_dtype_name(r.dtype)} {list(r.shape)} ({r.nbytes} bytes)" for k, r in enumerate(ins)]
        + [f" * output {k}: \"{r.name}\" {_dtype_name(r.dtype)} {list(r.shape)} ({r.nbytes} bytes)"
           for k, r in enumerate(outs)])
    return f"""/* Generated by lmc for target {target.name}: do not edit.
 *
 * lmc_run(inputs, outputs): inputs and outputs in the ONNX graph's order, raw little-endian, dense
 * row-major; returns 0 on success. Every intermediate lives in one static arena of LMC_ARENA_BYTES
 * (plan.json arena_bytes); weights are const (flash).
{describe}
 */
#ifndef LMC_MODEL_H
#define LMC_MODEL_H

#include <stddef.h>

#define LMC_ARENA_BYTES {plan.arena_bytes}u
#define LMC_ALIGNMENT {plan.alignment}
#define LMC_NUM_INPUTS {len(ins)}
#define LMC_NUM_OUTPUTS {len(outs)}

extern const size_t lmc_input_bytes[LMC_NUM_INPUTS];
extern const size_t lmc_output_bytes[LMC_NUM_OUTPUTS];
extern const char *const lmc_input_names[LMC_NUM_INPUTS];
extern const char *const lmc_output_names[LMC_NUM_OUTPUTS];
extern const char *const lmc_input_types[LMC_NUM_INPUTS];    /* ONNX element types: "float32", "int8", ... */
extern const char *const lmc_output_types[LMC_NUM_OUTPUTS];

int lmc_run(const void *const *inputs, void *const *outputs);

#endif /* LMC_MODEL_H */
"""


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _model_c(graph: gs.Graph, plan: MemoryPlan, refs: _Tensors, target: Target, calls: list[tuple[gs.Node, KernelCall]],
             families: list[str], used: list[str]) -> str:
    ins = [refs.ref(t) for t in graph.inputs]
    outs = [refs.ref(t) for t in graph.outputs]
    externs = "\n".join(f"extern const {refs.ref(refs.constants[n]).ctype} {refs.symbols[n]}"
                        f"[{max(refs.ref(refs.constants[n]).numel, 1)}];" for n in used)
    includes = "\n".join(f'#include "{_family_files(f)[0]}"' for f in families if f != COMMON_FAMILY)
    params = "\n".join(c.params.rstrip() for _, c in calls if c.params)
    body = []
    for step, (node, call) in enumerate(calls):
        body.append(f"    /* step {step}: {node.op} '{node.name}' */")
        body.extend("    " + line if line else "" for line in call.code.rstrip().splitlines())
    return f"""/* Generated by lmc for target {target.name}: the schedule of plan.json, one kernel call per node.
 * Every intermediate is lmc_arena + <its plan.json offset>; do not edit. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "model.h"
#include "lmc_kernels.h"
{includes}

static _Alignas({plan.alignment}) uint8_t {ARENA}[LMC_ARENA_BYTES > 0 ? LMC_ARENA_BYTES : 1];

{externs}

const size_t lmc_input_bytes[LMC_NUM_INPUTS] = {{{", ".join(f"{r.nbytes}u" for r in ins)}}};
const size_t lmc_output_bytes[LMC_NUM_OUTPUTS] = {{{", ".join(f"{r.nbytes}u" for r in outs)}}};
const char *const lmc_input_names[LMC_NUM_INPUTS] = {{{", ".join(_c_string(r.name) for r in ins)}}};
const char *const lmc_output_names[LMC_NUM_OUTPUTS] = {{{", ".join(_c_string(r.name) for r in outs)}}};
const char *const lmc_input_types[LMC_NUM_INPUTS] = {{{", ".join(_c_string(_dtype_name(r.dtype)) for r in ins)}}};
const char *const lmc_output_types[LMC_NUM_OUTPUTS] = {{{", ".join(_c_string(_dtype_name(r.dtype)) for r in outs)}}};

{params}

int lmc_run(const void *const *inputs, void *const *outputs)
{{
    (void)inputs;
    (void)outputs;
    (void){ARENA};
{chr(10).join(body)}
    return 0;
}}
"""


def _weights_c(refs: _Tensors, used: list[str], alignment: int, target: Target) -> tuple[str, int]:
    parts = [f"/* Generated by lmc for target {target.name}: the initializers the kernels read, const (flash). */",
             "#include <math.h>", "#include <stdint.h>", ""]
    total = 0
    for name in used:
        ref = refs.ref(refs.constants[name])
        values = ref.value if ref.numel else np.zeros(1, ref.dtype)
        total += ref.nbytes
        parts.append(f"/* {name}: {_dtype_name(ref.dtype)} {list(ref.shape)} */")
        parts.append(f"extern const {ref.ctype} {ref.symbol}[{max(ref.numel, 1)}];")
        parts.append(f"_Alignas({alignment}) const {ref.ctype} {ref.symbol}[{max(ref.numel, 1)}] = {{\n"
                     f"    {c_array(np.ascontiguousarray(values))}\n}};")
        parts.append("")
    return "\n".join(parts), total


def _runner_c(graph: gs.Graph, refs: _Tensors, alignment: int) -> str:
    ins = [refs.ref(t) for t in graph.inputs]
    outs = [refs.ref(t) for t in graph.outputs]
    bufs = "\n".join([f"static _Alignas({alignment}) unsigned char lmc_in_{k}[{max(r.nbytes, 1)}];" for k, r in enumerate(ins)]
                     + [f"static _Alignas({alignment}) unsigned char lmc_out_{k}[{max(r.nbytes, 1)}];"
                        for k, r in enumerate(outs)])
    reads = "\n".join(f'    if (!read_exact("lmc_in_{k}.bin", lmc_in_{k}, lmc_input_bytes[{k}])) return 2;'
                      for k in range(len(ins)))
    writes = "\n".join(f'    if (!write_all("lmc_out_{k}.bin", lmc_out_{k}, lmc_output_bytes[{k}])) return 3;'
                       for k in range(len(outs)))
    return f"""/* Generated by lmc: reads lmc_in_<k>.bin, runs the model, writes lmc_out_<k>.bin.
 * Exit status: 0 ok, 2 an input file missing or not exactly its size, 3 an output not written,
 * otherwise lmc_run's code. Only fopen/fread/fwrite/fclose (semihosting on a board). */
#include <stdio.h>

#include "model.h"

{bufs}

static int read_exact(const char *path, unsigned char *buf, size_t n)
{{
    FILE *f = fopen(path, "rb");
    size_t got;
    unsigned char extra;
    if (f == NULL) return 0;
    got = fread(buf, 1, n, f);
    if (got == n && fread(&extra, 1, 1, f) != 0) got = n + 1;
    fclose(f);
    return got == n;
}}

static int write_all(const char *path, const unsigned char *buf, size_t n)
{{
    FILE *f = fopen(path, "wb");
    size_t put;
    if (f == NULL) return 0;
    put = fwrite(buf, 1, n, f);
    return (fclose(f) == 0) && put == n;
}}

int main(void)
{{
    const void *inputs[LMC_NUM_INPUTS] = {{{", ".join(f"lmc_in_{k}" for k in range(len(ins)))}}};
    void *outputs[LMC_NUM_OUTPUTS] = {{{", ".join(f"lmc_out_{k}" for k in range(len(outs)))}}};
    int rc;
{reads}
    rc = lmc_run(inputs, outputs);
    if (rc != 0) return rc;
{writes}
    return 0;
}}
"""


def _cmake(families: list[str]) -> str:
    sources = " ".join(["model.c", "weights.c"] + [_family_files(f)[1] for f in families])
    return f"""# Generated by lmc: the model as a static library and a file-driven runner.
cmake_minimum_required(VERSION 3.13)
project(lmc_model C)
set(CMAKE_C_STANDARD 99)
set(CMAKE_C_STANDARD_REQUIRED ON)
add_library(lmc_model STATIC {sources})
target_include_directories(lmc_model PUBLIC ${{CMAKE_CURRENT_SOURCE_DIR}})
find_library(LMC_LIBM m)
if(LMC_LIBM)
  target_link_libraries(lmc_model PUBLIC ${{LMC_LIBM}})
endif()
add_executable(lmc_runner runner.c)
target_link_libraries(lmc_runner PRIVATE lmc_model)
"""


def emit_c(graph: gs.Graph, plan: MemoryPlan, target: Target, out_dir: str | Path) -> CBundle:
    """Write the C bundle of ``graph`` under ``plan`` into ``out_dir`` (an existing folder, e.g. a staged
    bundle). Raises ``UnsupportedOp`` (an LmcError naming the node) for an op without a kernel."""
    registry = load_op_modules()
    out_dir = Path(out_dir)
    if not graph.inputs or not graph.outputs:
        raise LmcError("the C bundle needs a graph with at least one input and one output")
    by_name = {n.name: n for n in graph.nodes}
    if sorted(by_name) != sorted(plan.schedule) or len(by_name) != len(graph.nodes):
        raise LmcError("the memory plan's schedule does not name this graph's nodes; plan the graph as emitted")
    refs = _Tensors(graph, plan)
    opset = int(graph.opset or 21)
    calls: list[tuple[gs.Node, KernelCall]] = []
    used: set[str] = set()
    for index, name in enumerate(plan.schedule):
        node = by_name[name]
        if ir.has_subgraph(node):
            raise OpContext(node, [], [], index, plan.alignment).unsupported("control flow has no C kernel")
        ctx = OpContext(node, [refs.ref(t) if t.name else None for t in node.inputs],
                        [refs.ref(t) for t in node.outputs if t.name], index, plan.alignment, opset,
                        resolve=refs.ref)
        call = registry.emit(ctx)
        used |= ctx.weights_used
        calls.append((node, call))
    produced = {t.name for n in graph.nodes for t in n.outputs}
    for k, out in enumerate(graph.outputs):          # an output no node computes: a graph input or a constant
        if out.name in produced:
            continue
        source = refs.ref(out) if isinstance(out, gs.Constant) else None
        if source is None and out.name not in refs.inputs:
            raise LmcError(f"graph output '{out.name}' is computed by no node")
        address = source.address if source is not None else f"inputs[{refs.inputs[out.name]}]"
        if source is not None:
            used.add(out.name)
        nbytes = source.nbytes if source is not None else refs.ref(out).nbytes
        calls.append((gs.Node("Identity", name=f"output {k}"), KernelCall(f"lmc_copy(outputs[{k}], {address}, {nbytes}u);")))
    families = sorted({COMMON_FAMILY} | {f for _, c in calls for f in c.families})
    used_names = sorted(used)
    files: dict[str, str] = {
        HEADER_FILE: _model_h(graph, plan, refs, target),
        MODEL_C: _model_c(graph, plan, refs, target, calls, families, used_names),
        RUNNER_C: _runner_c(graph, refs, plan.alignment),
        CMAKE_FILE: _cmake(families),
    }
    files[WEIGHTS_C], weight_bytes = _weights_c(refs, used_names, plan.alignment, target)
    for name, text in files.items():
        (out_dir / name).write_text(text)
    kernels = _kernel_dir()
    copied = [KERNELS_H]
    shutil.copyfile(str(kernels / KERNELS_H), out_dir / KERNELS_H)
    for family in families:
        for file in _family_files(family):
            source = kernels / file
            if not source.is_file():
                raise RuntimeError(f"kernel file {file} of family '{family}' is missing from the package")
            shutil.copyfile(str(source), out_dir / file)
            copied.append(file)
    macs = sum(c.macs for _, c in calls)
    log.info("C bundle: %d calls, %d kernel families, %d MACs, %d weight bytes", len(calls), len(families), macs,
             weight_bytes)
    return CBundle(tuple(sorted([*files, *copied])), tuple(families), macs, weight_bytes, plan.arena_bytes)
