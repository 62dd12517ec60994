"""``lmc verify`` of a C bundle: compile it with the host C compiler, run it, and compare.

Two comparisons on the same inputs (given, or random with a fixed seed as ``lmc.compiler.verify`` draws
them):
1. the C bundle against onnxruntime on the bundle's own ``model.onnx`` (the graph the C was generated
   from), run node by node with onnxruntime's graph optimisations off — the ONNX semantics of each node, as
   the C runs them (optimised, onnxruntime would e.g. run DequantizeLinear + MatMul as MatMulNBits with
   its activations rounded to int8, which is not what the graph says): float outputs within ``C_TOLERANCE`` relative (max |r − c| / max |r|); outputs that are
   quantized — integer outputs, or float outputs of a DequantizeLinear — within one quantum (1, or the
   DequantizeLinear's scale), expressed in the same relative units;
2. ``model.onnx`` against the original model, as every bundle is checked (``compare_models``, within
   ``--tolerance`` or the original's own spread).
3. the C against plan.json, statically (``plan_conformance``): model.h's ``LMC_ARENA_BYTES`` is the plan's
   ``arena_bytes``, ``lmc_arena`` is declared with the plan's alignment, and every ``lmc_arena + offset``
   model.c addresses is an offset the plan gives a tensor.
The bundle passes when all three do; ``lmc verify`` exits 3 otherwise.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from lmc.core.errors import LmcError
from lmc.core.metadata import build_metadata, decode_input_values
from lmc.compiler.verify import (VERIFY_HINT, OutputError, VerifyReport, _run_all, compare, compare_models,
                                 load_inputs, random_inputs)
from lmc.targets.cbundle.emit import HEADER_FILE
from lmc.targets.cbundle.host import HostBuild

log = logging.getLogger(__name__)

C_TOLERANCE = 1e-5
C_SUFFIX = " [C vs model.onnx]"
ONNX_SUFFIX = " [model.onnx vs original]"


def is_c_bundle(folder: str | Path) -> bool:
    return (Path(folder) / HEADER_FILE).is_file()


def output_quanta(model: onnx.ModelProto) -> dict[str, float]:
    """Output name -> its quantum when quantized: 1 for integer outputs, the largest scale of the
    DequantizeLinear producing a float output."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    quanta = {}
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        if np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).kind in "iu":
            quanta[out.name] = 1.0
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            quanta[out.name] = float(np.max(np.abs(scale)))
    return quanta


@dataclass(frozen=True)
class CBundleReport(VerifyReport):
    """A ``VerifyReport`` whose outputs are the C bundle against ``model.onnx`` (suffix ``C_SUFFIX``) and
    ``model.onnx`` against the original (``ONNX_SUFFIX``); ``compiler``: the C compiler used."""

    compiler: str = ""
    plan_problems: tuple[str, ...] = ()     # where model.h / model.c depart from plan.json (empty: they obey it)

    @property
    def passed(self) -> bool:
        return super().passed and not self.plan_problems

    def explain(self) -> str:
        parts = [f"the C does not obey plan.json: {'; '.join(self.plan_problems)}"] if self.plan_problems else []
        if not super().passed or not parts:
            parts.append(super().explain())
        return "; ".join(parts)

    @property
    def details(self) -> tuple[str, ...]:
        plan = ("model.h and model.c obey plan.json (arena size, alignment, offsets)" if not self.plan_problems
                else "model.h / model.c depart from plan.json: " + "; ".join(self.plan_problems))
        return (f"C bundle compiled with {self.compiler} and run on {self.samples} input(s); each C output is held "
                f"to {C_TOLERANCE:g} relative (quantized outputs: one quantum) against model.onnx", plan)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "compiler": self.compiler, "plan_problems": list(self.plan_problems)}


def plan_conformance(bundle: Path) -> list[str]:
    """Where the bundle's C departs from its plan.json (see the module docstring); empty when it obeys it."""
    plan_path = bundle / "plan.json"
    if not plan_path.is_file():
        return ["no plan.json beside the C"]
    plan = json.loads(plan_path.read_text())
    problems = []
    header = (bundle / "model.h").read_text()
    m = re.search(r"^#define LMC_ARENA_BYTES (\d+)u?$", header, re.MULTILINE)
    if m is None or int(m[1]) != plan["arena_bytes"]:
        problems.append(f"model.h LMC_ARENA_BYTES {m[1] if m else 'missing'} != plan arena_bytes {plan['arena_bytes']}")
    model_c = (bundle / "model.c").read_text()
    decl = re.search(r"static _Alignas\((\d+)\) uint8_t lmc_arena\[LMC_ARENA_BYTES", model_c)
    if decl is None or int(decl[1]) != plan["alignment"]:
        problems.append(f"lmc_arena is not declared as the plan's {plan['alignment']}-byte aligned arena")
    planned = {t["offset"] for t in plan["tensors"]} | {t["offset"] for t in plan.get("scratch", [])}
    used = sorted({int(v) for v in re.findall(r"lmc_arena \+ (\d+)\)", model_c)})
    stray = [v for v in used if v not in planned]
    if stray:
        problems.append(f"model.c addresses lmc_arena + {', '.join(map(str, stray[:5]))}, where plan.json places no "
                        "tensor")
    return problems


def compare_c(bundle: Path, feeds: Sequence[dict[str, np.ndarray]], build: HostBuild) -> list[OutputError]:
    """The C bundle's outputs against onnxruntime on its ``model.onnx``, worst over ``feeds``."""
    model_path = bundle / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    quanta = output_quanta(model)
    names, ref_out = _run_all(model_path, feeds, ours=True, optimize=False, hint=VERIFY_HINT)
    worst: dict[str, tuple[OutputError, float]] = {}
    for feed, ref in zip(feeds, ref_out):
        got = dict(zip([s.name for s in build.outputs], build.run(feed)))
        for name, r in zip(names, ref):
            err = compare(r, got[name], name + C_SUFFIX)
            scale = float(np.abs(np.asarray(r, np.float64)).max()) if np.size(r) else 0.0
            allowed = C_TOLERANCE if name not in quanta else (quanta[name] * 1.0001 / scale if scale > 0
                                                               else quanta[name] * 1.0001)
            if name not in worst or err.max_rel - allowed > worst[name][0].max_rel - worst[name][1]:
                worst[name] = (err, allowed)
    return [OutputError(e.name, e.max_abs, e.max_rel, e.cosine, allowed, None, allowed)
            for e, allowed in (worst[n] for n in names)]


def verify_cbundle(bundle: str | Path, against: str | Path, inputs: str | Path | None = None,
                   tolerance: float = 1e-4, samples: int = 1, seed: int = 0) -> CBundleReport:
    """Compile the C bundle at ``bundle`` with the host compiler and compare it (see the module docstring)."""
    bundle = Path(bundle)
    model_path = bundle / "model.onnx"
    if not model_path.is_file():
        raise LmcError(f"{bundle}: a C bundle must hold the model.onnx it was generated from")
    model = onnx.load(str(model_path), load_external_data=False)
    if inputs is not None:
        feeds = load_inputs(inputs, {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input})
    else:
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        feeds = random_inputs(model_path, shapes, samples=samples, seed=seed)
    with HostBuild(bundle) as build:
        c_errors = compare_c(bundle, feeds, build)
        compiler = Path(build.cc).name
    fixed = decode_input_values(build_metadata(model).get("input_values", ""))
    onnx_report = compare_models(against, model_path, feeds, tolerance, spread=True, hint=VERIFY_HINT,
                                 reference_values=fixed)
    onnx_errors = [OutputError(o.name + ONNX_SUFFIX, o.max_abs, o.max_rel, o.cosine, o.tolerance, o.spread,
                               o.allowed) for o in onnx_report.outputs]
    for e in c_errors:
        log.info("%s: max rel %.3g (allowed %.3g)", e.name, e.max_rel, e.allowed)
    return CBundleReport(tuple(c_errors + onnx_errors), len(feeds), tolerance, compiler=compiler,
                         plan_problems=tuple(plan_conformance(bundle)))
