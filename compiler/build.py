"""``build()``: model file in, verified bundle out. It reads like the life of a build in ARCHITECTURE.md:

load -> bind shapes -> passes -> schedule + liveness + arena plan -> stage bundle -> verify -> commit.

Nothing is written to ``out_dir`` unless every stage succeeded; the input file is only read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from lmc import __version__
from lmc.core import ir, shapes, weights
from lmc.compiler.backend import plan_memory, runtime_for
from lmc.compiler.lower_matmulnbits import accuracy_level, lower_decoded_matmuls
from lmc.core.errors import AttentionSinksFound, LmcError, PositionBiasFound, ShapeError
from lmc.core.metadata import GENERATION_KEY, METADATA_PREFIX, decode_input_values, encode_input_values
from lmc.core.model_io import load_model
from lmc.core.pass_manager import PassContext, PassRecord, approximations
from lmc.compiler.compilation import BuildOptions, Compilation, QuantizeMode
from lmc.compiler.pruning import prune_generation
from lmc.compiler.pipeline import default_pipeline, quantize_passes
from lmc.passes.greedy_head import GREEDY_INPUT, GreedyHead
from lmc.compiler.report import mib, peak_live_set, render_report
from lmc.core.runtime import SESSION_OPTIONS_FILE, session
from lmc.compiler.verify import (VerificationFailed, VerifyReport, check_spans, compare_generation, compare_models,
                                 random_inputs, with_values)
from lmc.targets import emit
from lmc.targets.cbundle.emit import CBundle, EmitFormat, emit_c
from lmc.targets.cbundle.registry import UnsupportedOp
from lmc.targets.cbundle.generation import emit_generation_c
from lmc.targets.cbundle.linker import BoardError, LinkerFigures, link_figures, unavailable
from lmc.targets.plan import MemoryPlan, Profile, check_plan
from lmc.targets.runtime_model import RuntimeModel
from lmc.targets.target import Target, load_target
from lmc.passes.attention_sinks import RestoreSinks, split_decoder_sinks
from lmc.passes.fuse.rule import FuseRules
from lmc.passes.fuse.skip_norm import SkipNormRule
from lmc.passes.position_bias import RestorePositionBias, split_decoder_bias
from lmc.passes.quantize.calibration import load_calibration
from lmc.targets.ort_mobile import write_ort_files
from lmc.compiler.genai import GenaiBundle
from lmc.compiler.generation import bind_sequence, calibration_feeds, compile_generation, extend_templates
from lmc.compiler.report_html import HTML_FILE, render_report_html
from lmc.compiler.seq2seq_export import is_export_build

log = logging.getLogger(__name__)




@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    target: Target
    plan: MemoryPlan
    records: tuple[PassRecord, ...]
    verification: VerifyReport | None
    nodes_before: int
    nodes_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    seconds: float
    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    fitted: str = ""                     # the options --max-ram added to fit (empty: built as asked)
    cbundle: CBundle | None = None       # the C bundle written beside model.onnx (--emit c)
    cbundle_skipped: str = ""            # why the target's default C bundle was not written (an op without a kernel)
    linker: LinkerFigures | None = None  # the C bundle's image as linked for the target's board (plan vs linker)
    linker_skipped: str = ""             # why a board target's C bundle was not linked (no cross toolchain…)

    @property
    def approximations(self) -> tuple[str, ...]:
        """What the passes that ran changed in the numerics (empty: the bundle is exact and was held to the
        exact check)."""
        return approximations(self.records)

    def to_dict(self) -> dict:
        plan = self.plan.to_dict()
        return {
            "out_dir": str(self.out_dir),
            "target": self.target.name,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "weights_by_dtype": self.weights_by_dtype,
            "arena_bytes": plan["arena_bytes"],
            "lower_bound_bytes": plan["lower_bound_bytes"],
            "peak_ram_bytes": plan["peak_ram_bytes"],
            "io_bytes": plan["io_bytes"],
            "seconds": round(self.seconds, 3),
            "fitted": self.fitted,
            "approximations": list(self.approximations),
            "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "nodes": r.nodes,
                        "weight_bytes": r.weight_bytes, "peak_estimate_bytes": r.peak_estimate_bytes,
                        "stats": r.stats} for r in self.records],
            "verification": self.verification.to_dict() if self.verification else None,
            **({"c_bundle": {"macs": self.cbundle.macs, "weight_bytes": self.cbundle.weight_bytes,
                             "kernel_families": list(self.cbundle.families)}} if self.cbundle else {}),
            **({"c_bundle_skipped": self.cbundle_skipped} if self.cbundle_skipped else {}),
            **({"linker": self.linker.to_dict() if self.linker else None, "linker_skipped": self.linker_skipped}
               if self.linker or self.linker_skipped else {}),
        }


def _stamp(model, options: BuildOptions, target: Target) -> None:
    """Record how the bundle was built in the model's metadata (deterministic: no times, no paths)."""
    entries = {"version": __version__, "target": target.name, "quantize": options.quantize.value,
               "attention": str(options.attention_spec),
               "input_shapes": ",".join(f"{k}={'x'.join(str(d) for d in v)}"
                                        for k, v in sorted(options.input_shapes.items()))}
    if options.input_values:
        entries["input_values"] = encode_input_values(options.input_values)
    if options.prune_spec is not None:
        entries["prune"] = str(options.prune_spec)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, str(value)


def build(model_path: str | Path, options: BuildOptions | None = None, out_dir: str | Path = "out",
          on_pass: Callable[[PassRecord], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> BuildResult:
    """Compile ``model_path`` for ``options.target`` into a bundle at ``out_dir``. With ``options.max_ram``
    a build over budget tries ``fitting_candidates`` in order and keeps the first that fits (its
    ``fitted`` says which); if none does, the error names the best attempt and what dominates it."""
    options = options or BuildOptions()

    if is_export_build(model_path, options):       # an encoder–decoder export (lmc.compiler.seq2seq)
        # deferred: seq2seq builds its encoder with this module's build() (an import cycle)
        from lmc.compiler.seq2seq import build_seq2seq

        return build_seq2seq(model_path, options, out_dir, on_pass, progress)
    try:
        return _build_once(model_path, options, out_dir, on_pass, progress)
    except BudgetExceeded as first:
        if options.max_ram is None:
            raise
        attempts = [("as asked", first)]
        for name, candidate in fitting_candidates(options, options.allow_approx, load_target(options.target)):
            log.info("over budget: trying %s", name)
            try:
                result = _build_once(model_path, candidate, out_dir, on_pass, progress)
            except BudgetExceeded as exc:
                attempts.append((name, exc))
                continue
            return dataclasses.replace(result, fitted=name)
        name, best = min(attempts, key=lambda a: a[1].plan.peak_ram_bytes)
        tried = ", ".join(n for n, _ in attempts[1:]) or "nothing else applies"
        more = "" if options.allow_approx else "; --allow-approx would also try quantization"
        raise BudgetExceeded(f"no configuration fits --max-ram {options.max_ram / 2**20:.2f} MiB (tried {tried}{more}); "
                             f"the best, {name}, plans {best.plan.peak_ram_bytes / 2**20:.2f} MiB, made of "
                             f"{dominant_parts(best.plan)}", best.plan) from None


def _build_once(model_path, options: BuildOptions, out_dir, on_pass, progress) -> BuildResult:
    # where passes' new large weights go, for models whose own weights stay in their files (set once known)
    with weights.SpillFile(active=False) as spill:
        return _build_in(model_path, options, out_dir, on_pass, progress, spill)


def _build_in(model_path, options: BuildOptions, out_dir, on_pass, progress, spill) -> BuildResult:
    start = time.perf_counter()
    target = load_target(options.target)
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(model_path).resolve().parent:
        raise LmcError(f"{out_dir}: output folder is the model's own folder; choose another -o")

    values = decode_input_values(encode_input_values(options.input_values))     # checked, as they are stamped
    if options.context:
        spill.active = weights.large_external(model_path)     # each compile loads the model itself
        return _build_generation(model_path, Compilation(options, target, spill, progress, on_pass), out_dir, start)
    model = load_model(model_path)
    spill.active = bool(weights.file_backed(model))
    graph = ir.to_graph(model)
    del model
    shapes.bind_input_shapes(graph, dict(options.input_shapes))
    shapes.bind_input_values(graph, values)
    try:
        shapes.infer_shapes(graph)
        shapes.require_static_inputs(graph)
        nodes_before, weights_before = len(graph.nodes), ir.weight_bytes(graph)
        compilation = Compilation(options, target, spill, progress, on_pass)
        graph, records = compilation.run(graph, default_pipeline(options, target, [t.name for t in graph.inputs]))
        by_dtype = ir.bytes_by_dtype(graph)      # as quantized (the runtime's kernels repack some of them)
        runtime = lower_for_runtime(graph, options, target, spill)
        plan = plan_memory(graph, target, inplace=options.inplace, runtime=runtime)
    except ShapeError as exc:     # a shape left dynamic: say so plainly when the original cannot run either
        _blame_model(model_path, options, values, exc)
        raise
    except LmcError:
        raise
    except Exception as exc:
        _blame_model(model_path, options, values, exc)     # a user error when the model itself cannot run
        raise
    problems = check_plan(plan)
    if problems:
        raise RuntimeError(f"arena plan is unsound: {problems[0]}")
    _check_budget(plan, options, target)

    bound = {t.name: [int(d) for d in t.shape] for t in graph.inputs}
    nodes_after, weights_after = len(graph.nodes), ir.weight_bytes(graph)
    staged = _stage(graph, options, target, out_dir, runtime)
    try:
        cbundle, skipped = c_bundle(options, target, lambda: emit_c(graph, plan, target, staged))
        linker, linker_skipped = link_check(cbundle, target, staged, options.max_ram)
    except BaseException:
        emit.discard(staged)
        raise
    del graph
    weights.release_freed()
    try:
        verification = None
        if options.verify:
            feeds = random_inputs(staged / emit.MODEL_FILE, bound, samples=1, seed=options.seed)
            try:
                verification = compare_models(model_path, staged / emit.MODEL_FILE, feeds, options.tolerance,
                                              candidate_is_ours=True, reference_values=values)
            except LmcError as exc:      # the original does not run on inputs of the bound shapes
                given = _given(options, values)
                if not given:
                    raise
                raise LmcError(f"the model does not accept {given}: {str(exc).strip().splitlines()[0]}") from exc
            if not approximations(records) and not verification.passed:
                raise VerificationFailed(f"the compiled model differs from the original: "
                                         f"{verification.explain()}", verification)
        if options.ort_format:
            ort_path, _ = write_ort_files(staged)
            if options.verify:
                ort_check = compare_models(staged / emit.MODEL_FILE, ort_path, feeds, options.tolerance,
                                           candidate_is_ours=True)
                if not ort_check.passed:
                    raise RuntimeError(f"model.ort differs from model.onnx: max relative error {ort_check.max_rel:.3g}")
        result = BuildResult(out_dir=out_dir, target=target, plan=plan, records=tuple(records),
                             verification=verification, nodes_before=nodes_before, nodes_after=nodes_after,
                             weight_bytes_before=weights_before, weight_bytes_after=weights_after,
                             seconds=time.perf_counter() - start, weights_by_dtype=by_dtype, cbundle=cbundle,
                             cbundle_skipped=skipped, linker=linker, linker_skipped=linker_skipped)
        _commit(staged, result, model_path)
    except BaseException:
        emit.discard(staged)
        raise
    return result


def link_check(cbundle: CBundle | None, target: Target, staged: Path,
               max_ram: int | None = None) -> tuple[LinkerFigures | None, str]:
    """Plan vs linker (``lmc.targets.cbundle.linker``) for a C bundle of a target an emulated board runs:
    (the figures, '') when arm-none-eabi-gcc linked its image, (None, why) when it could not; (None, '') for
    other bundles. An image whose arena is not the plan's fails the build (``VerificationFailed``, exit 3);
    one over the target's RAM or the board's flash does not fit (``LmcError``, exit 2) unless ``max_ram``
    (``--max-ram``) raises the RAM budget above what it takes."""
    why = "" if cbundle is None else unavailable(target)
    if cbundle is None or why.startswith("no emulated board"):
        return None, ""
    if why:
        log.info("C bundle not linked: %s", why)
        return None, why
    try:
        figures = link_figures(staged, target, cbundle.arena_bytes)
    except BoardError as exc:
        log.warning("C bundle not linked: %s", exc)
        return None, str(exc).replace(str(staged), "the bundle")
    arena = [f for f in figures.failures() if f.startswith("arena")]
    if arena:
        raise VerificationFailed("the C bundle's linked image breaks its plan: " + "; ".join(arena))
    too_big = [f for f in figures.failures() if not f.startswith("arena")
               and not (f.startswith("the image takes") and "RAM" in f and max_ram and figures.ram_bytes <= max_ram)]
    if too_big:
        raise LmcError(f"the C bundle does not fit {target.name}: " + "; ".join(too_big)
                       + " (--quantize w8a8 --calib or --attention chunked:N make it smaller; --max-ram sets the budget)")
    return figures, ""


def _plan_json(result: BuildResult) -> str:
    """plan.json: the plan, and for a board target's C bundle the linker's figures (``"linker"``: null when
    the image could not be linked; report.md says why)."""
    if not (result.linker or result.linker_skipped):
        return result.plan.to_json()
    data = result.plan.to_dict()
    data["linker"] = result.linker.to_dict() if result.linker else None
    return json.dumps(data, indent=1) + "\n"


def c_bundle(options: BuildOptions, target: Target, write: Callable[[], CBundle]) -> tuple[CBundle | None, str]:
    """(the C bundle, why none was written). C is written when ``--emit c`` asks for it or the target's default
    is C (``default_emit``: weights in flash). An op without a C kernel is an error (``UnsupportedOp``, exit 2)
    under ``--emit c``; under the target's default the bundle stays ONNX-only and the reason is returned, so
    builds that never asked for C (a language model for cortex-m55 at a sequence no board runs) still succeed."""
    if options.emit_format(target) is not EmitFormat.C:
        return None, ""
    try:
        return write(), ""
    except UnsupportedOp as exc:
        if options.emit is EmitFormat.C:
            raise
        reason = f"{exc} (model.onnx written; --emit c makes this an error)"
        log.warning("no C bundle: %s", reason)
        return None, reason


def _given(options: BuildOptions, values: Mapping[str, np.ndarray]) -> str:
    """The input bindings of a build as its command line gives them ('' when none)."""
    return " ".join([f"--input-shape {k}={'x'.join(str(d) for d in v)}" for k, v in options.input_shapes.items()]
                    + [f"--input-value {k}={','.join(str(x) for x in np.ravel(v).tolist())}" for k, v in values.items()])


def _original_fails(model_path, options: BuildOptions, values: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """Why onnxruntime cannot run the original model at the bound input shapes and values (random inputs):
    ("load" or "run", onnxruntime's message); None when it runs (or cannot be tried: inputs left dynamic)."""
    try:
        feeds = with_values(model_path, random_inputs(model_path, options.input_shapes, samples=1,
                                                      seed=options.seed, values=values), values)
    except LmcError:
        return None
    stage = "load"
    try:
        sess = session(model_path, low_memory=True)
        stage = "run"
        names = {i.name for i in sess.get_inputs()}
        sess.run(None, {k: v for k, v in feeds[0].items() if k in names})
    except Exception as exc:  # noqa: BLE001 — onnxruntime raises several types; any of them is the answer
        text = str(exc).strip().splitlines()
        return stage, (text[0] if text else type(exc).__name__)[:300]
    return None


def _blame_model(model_path, options: BuildOptions, values: Mapping[str, np.ndarray], exc: Exception) -> None:
    """lmc failed on ``exc`` while compiling (an internal error, or a ShapeError: a shape that stayed dynamic or
    did not infer): when onnxruntime cannot load the original, or run it at the same input shapes and values,
    the model (or the shapes given for it) is at fault — a user error saying so, with both reasons.
    Otherwise nothing: the caller re-raises ``exc`` (an internal error stays one)."""
    failed = _original_fails(model_path, options, values)
    if failed is None:
        return
    stage, reason = failed
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    stopped = f"lmc stopped at: {text}" if isinstance(exc, LmcError) else f"lmc stopped at {type(exc).__name__}: {text}"
    given = _given(options, values)
    if stage == "run" and given:
        raise LmcError(f"the model does not accept {given}: onnxruntime cannot run it with them either "
                       f"({reason}); {stopped}") from exc
    raise LmcError(f"the model is inconsistent: onnxruntime cannot {stage} it either ({reason}); {stopped}") from exc


def _commit(staged: Path, result: BuildResult, model_path) -> None:
    """Move the staged bundle into place with its plan and reports (report.md, report.html)."""
    emit.commit_bundle(staged, result.out_dir, {
        emit.PLAN_FILE: _plan_json(result),
        emit.REPORT_FILE: render_report(result, Path(model_path).name),
        HTML_FILE: render_report_html(result, Path(model_path).name),
    })


def lower_for_runtime(graph: gs.Graph, options: BuildOptions, target: Target, spill,
                      skip_norms: bool = False) -> RuntimeModel:
    """The runtime model the target chooses for the graph's decoded MatMuls (``runtime_for``); for an ONNX
    bundle on a target that runs MatMulNBits, the DequantizeLinear → MatMul pairs are then written as the
    MatMulNBits onnxruntime would fuse them into at load, at the chosen accuracy level
    (``lmc.compiler.lower_matmulnbits``: no fusion copies at load). With ``skip_norms`` (generation bundles),
    each residual Add with the RMS norm reading it becomes one SkipSimplifiedLayerNormalization where the
    runtime has it (``lmc.passes.fuse.skip_norm``): 2L − 1 fewer kernels per decode step. One-shot bundles
    keep the two nodes: the Add runs in place and the fused kernel does not, which over long sequences
    raises the arena (a 2048-token Llama's chunked-attention arena by half)."""
    runtime = runtime_for(graph, target)
    if options.emit_format(target) is not EmitFormat.ONNX:
        return runtime
    if target.tuning.can_emit("MatMulNBits", ir.MS_DOMAIN):
        lower_decoded_matmuls(graph, accuracy_level(runtime.session_options), spill)
    if skip_norms:         # applied where the target lists the kernel (FuseRules asks the target)
        result = FuseRules("fuse-runtime", [SkipNormRule()]).run(graph, PassContext(target=target))
        if result.modified:
            graph.cleanup().toposort()
    return runtime


def _stage(graph: gs.Graph, options: BuildOptions, target: Target, out_dir: Path, runtime: RuntimeModel,
           metadata: Mapping[str, str] | None = None) -> Path:
    """Write the graph as a staged bundle model (weights streamed one at a time into the aligned file) with
    the session options of ``runtime``, the runtime model its plan was made under."""
    threshold = target.memory.external_data_threshold
    if ir.weight_bytes(graph) > emit.SMALL_MODEL_BYTES:
        model = ir.export_skeleton(graph, inline_bytes=threshold - 1)
        by_name = {c.name: c for c in ir.constants(graph)}
        source = lambda name: ir.constant_bytes(by_name[name])  # noqa: E731
    else:
        model, source = ir.to_model(graph), None
    _stamp(model, options, target)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    if source is None:
        staged = emit.stage_model(model, out_dir, target.memory.alignment, threshold)
    else:
        staged = emit.stage_model(model, out_dir, target.memory.alignment, threshold, source)
    # the runtime configuration the plan's prediction describes (the target's, with the choice it makes for
    # what this graph holds), for drivers to apply
    (staged / SESSION_OPTIONS_FILE).write_text(json.dumps(runtime.session_options, sort_keys=True) + "\n")
    return staged


class BudgetExceeded(LmcError):
    """The planned peak RAM is over the budget (exit 2); ``plan`` is what the attempt reached."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan


def dominant_parts(plan: MemoryPlan) -> str:
    """What makes a plan's peak RAM, largest first: the arena's busiest tensors, io, state, RAM weights."""
    parts = {"inputs + outputs": plan.io_bytes, "KV state": plan.state_bytes,
             "weights in RAM": plan.weights_bytes.get("ram", 0)}
    _, live = peak_live_set(plan)
    for t in live[:2]:
        parts[f"arena tensor {t.name}"] = t.size
    parts["rest of the arena"] = plan.arena_bytes - sum(t.size for t in live[:2])
    return ", ".join(f"{k} {mib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v > 0)


def _check_budget(plan: MemoryPlan, options: BuildOptions, target: Target) -> None:
    budget = options.max_ram if options.max_ram is not None else target.memory.ram_bytes
    if plan.peak_ram_bytes > budget:
        source = "--max-ram" if options.max_ram is not None else f"target {target.name}"
        raise BudgetExceeded(f"planned peak RAM {plan.peak_ram_bytes} bytes ({plan.peak_ram_bytes / 2**20:.2f} MiB) "
                             f"exceeds the budget of {budget} bytes ({budget / 2**20:.2f} MiB, {source}); "
                             f"it is made of {dominant_parts(plan)}", plan)


def fitting_candidates(options: BuildOptions, allow_approx: bool, target: Target) -> list[tuple[str, BuildOptions]]:
    """What ``--max-ram`` tries when the build as asked is over budget: the exact means first (outputs
    planned over dying inputs, attention in chunks), then — only with ``allow_approx`` — quantization: the
    target's ``preferred_quantization`` first (w8a8 on microcontrollers: int8 activations shrink the arena,
    weight-only int8 does not), then the rest in order of the error measured on language models (int8
    weights, w8a8 with calibration, int4); w8a8 only with ``--calib``; and last, with ``--calib``, pruning
    (``FITTING_PRUNES``) on top of the last of those."""
    exact = [("--in-place", dataclasses.replace(options, inplace=True))]
    spec = options.attention_spec
    if spec.kind.value == "dense":
        exact.append(("--in-place --attention chunked:64",
                      dataclasses.replace(options, inplace=True, attention="chunked:64")))
    found = [(name, o) for name, o in exact if o != options]
    if allow_approx and options.quantize is QuantizeMode.NONE:
        base_name, base = found[-1] if found else ("", options)
        modes = [QuantizeMode.INT8] + ([QuantizeMode.W8A8] if options.calib else []) + [QuantizeMode.INT4]
        preferred = QuantizeMode(target.tuning.preferred_quantization)
        if preferred in modes:
            modes.remove(preferred)
            modes.insert(0, preferred)
        for mode in modes:
            found.append((f"{base_name} --quantize {mode.value}".strip(), dataclasses.replace(base, quantize=mode)))
    if allow_approx and options.calib and options.prune is None:     # then pruning, on the last of those
        base_name, base = found[-1] if found else ("", options)
        for prune in FITTING_PRUNES:
            found.append((f"{base_name} --prune {prune}".strip(), dataclasses.replace(base, prune=prune)))
    return found


FITTING_PRUNES = ("mlp=0.2", "mlp=0.3,heads=1/3")     # what --max-ram --allow-approx tries last (with --calib)


def _quantize_generation(graph: gs.Graph, info, compilation: Compilation):
    options, target = compilation.options, compilation.target
    feeds = None
    if options.calib:
        feeds = calibration_feeds(load_calibration(options.calib, [info.input_ids], options.calib_samples),
                                  info, graph)
    return compilation.run(graph, quantize_passes(options, target, [info.input_ids], feeds))


def _build_generation(model_path, compilation: Compilation, out_dir: Path, start: float) -> BuildResult:
    """``--context N``: the past/present decoder becomes a generation bundle (``lmc.compiler.generation``)."""
    options, target = compilation.options, compilation.target

    before: list[tuple[int, int]] = []

    tables: dict = {}        # a position bias (ALiBi) split off the masks: put back after the state rewrite
    sinks: dict = {}         # attention sinks split off the softmax: put back, decomposed, after it too

    def run_passes(graph: gs.Graph, masks: dict):
        before.append((len(graph.nodes), ir.weight_bytes(graph)))
        pipeline = default_pipeline(options, target, [t.name for t in graph.inputs])
        if tables or sinks:  # bias as the state attention's float mask, sinks decomposed: after the state rewrite
            at = next(i for i, p in enumerate(pipeline) if getattr(p, "name", "") == "static-kv-cache")
            pipeline[at + 1:at + 1] = [RestorePositionBias(tables)] * bool(tables) + [RestoreSinks(sinks)] * bool(sinks)
        return compilation.run(graph, pipeline, masks=masks, report=len(before) > 1)

    try:
        graph, records, info, templates = compile_generation(model_path, options.context, options.batch, run_passes)
    except (PositionBiasFound, AttentionSinksFound) as exc:  # a bias on the scores or sinks: split off, retry
        biased = isinstance(exc, PositionBiasFound)
        with tempfile.TemporaryDirectory(prefix="lmc-split-") as work:
            chunk = min(options.prefill_chunk or options.context, options.context)
            split = split_decoder_bias(model_path, options.context, chunk, work) if biased else \
                split_decoder_sinks(model_path, work)
            if split is None:
                raise
            source, found = split
            (tables if biased else sinks).update(found)
            before.clear()
            graph, records, info, templates = compile_generation(source, options.context, options.batch,
                                                                 run_passes)
    if options.prune_spec is not None:       # pruned once, on the generalised graph, before quantization
        graph, more = prune_generation(graph, info, templates, compilation)
        records = list(records) + more
    if options.quantize is not QuantizeMode.NONE:
        # quantized once, on the generalised graph: calibration runs at its own lengths (prefills)
        graph, more = _quantize_generation(graph, info, compilation)
        records = list(records) + more
        extend_templates(graph, templates)
    # onnxruntime-genai's interface: positions from an attention_mask input; genai_config.json (lmc.compiler.genai)
    # positions computed from the cache length (no position_ids input) serve every row from row 0's
    info = dataclasses.replace(info, rows_apart=not any(r.stats.get("row0_positions") for r in records))
    genai = GenaiBundle.prepare(graph, info, templates, options, model_path)
    info, records = genai.info, list(records) + [genai.record]
    if options.emit_format(target) is EmitFormat.ONNX and GreedyHead.name not in options.disabled_passes:
        graph, more = compilation.run(graph, [GreedyHead(info.logits, info.batch)])
        records = records + more
        if more[-1].modified:
            info = dataclasses.replace(info, greedy=GREEDY_INPUT)
    nodes_after, weights_after = len(graph.nodes), ir.weight_bytes(graph)
    by_dtype = ir.bytes_by_dtype(graph)
    vocab = int(templates[info.logits][-1][1])
    chunk = min(options.prefill_chunk, options.context)
    spec = options.attention_spec
    info = dataclasses.replace(info, prefill_chunk=chunk, window=spec.window, sinks=spec.sinks,
                               windows=tuple(sorted(set(info.windows) | ({spec.window} if spec.window else set()))))
    # one session for every profile: chosen on the unbound graph
    runtime = lower_for_runtime(graph, options, target, compilation.spill, skip_norms=True)
    staged = _stage(graph, options, target, out_dir, runtime, {GENERATION_KEY: info.to_json()})
    try:
        genai.write(staged)
        plans = []
        cbundle, skipped = None, ""
        linker, linker_skipped = None, ""
        for name, length in (("decode", 1), ("prefill", chunk)):
            bind_sequence(graph, length, templates)
            plan = plan_memory(graph, target, inplace=options.inplace, state=info.state, runtime=runtime)
            problems = check_plan(plan)
            if problems:
                raise RuntimeError(f"arena plan ({name}) is unsound: {problems[0]}")
            plans.append((name, length, plan))
            if name == "decode":          # C (for a target that emits it): the decode step + a greedy loop
                cbundle, skipped = c_bundle(options, target,
                                            lambda: emit_generation_c(graph, plan, target, staged, info))
                linker, linker_skipped = link_check(cbundle, target, staged, options.max_ram)
        del graph
        weights.release_freed()   # the graph's node/tensor cycles hold its in-memory weights until collected
        profiles = tuple(Profile(n, s, p.arena_bytes, p.lower_bound_bytes, p.io_bytes, p.peak_ram_bytes,
                                 p.runtime["predicted_peak_bytes"]) for n, s, p in plans)
        plan = dataclasses.replace(max((p for _, _, p in plans), key=lambda p: p.peak_ram_bytes), profiles=profiles)
        _check_budget(plan, options, target)
        verification = None
        if options.verify:
            verification = compare_generation(model_path, staged / emit.MODEL_FILE, vocab,
                                              spans=check_spans(info), tolerance=options.tolerance,
                                              seed=options.seed, runtime=plan.runtime)
            if not approximations(records) and not verification.passed:
                raise VerificationFailed(f"the compiled model differs from the original: "
                                         f"{verification.explain()}", verification)
        result = BuildResult(out_dir=out_dir, target=target, plan=plan, records=tuple(records),
                             verification=verification, nodes_before=before[-1][0], nodes_after=nodes_after,
                             weight_bytes_before=before[-1][1], weight_bytes_after=weights_after,
                             seconds=time.perf_counter() - start, weights_by_dtype=by_dtype, cbundle=cbundle,
                             cbundle_skipped=skipped, linker=linker, linker_skipped=linker_skipped)
        _commit(staged, result, model_path)
    except BaseException:
        emit.discard(staged)
        raise
    return result
