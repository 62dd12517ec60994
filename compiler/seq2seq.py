"""Encoder–decoder generation builds (``lmc build FOLDER --context N``): an optimum encoder–decoder export
(``seq2seq_export``) becomes one bundle that encodes once per input and decodes with all of its attention
state held in place.

    encoder.onnx   the encoder joined to the decoder's cross-attention projections (``cross_attention``),
                   compiled one-shot by lmc's normal pipeline at the bound input shape (Whisper's
                   ``input_features`` [1, mel, frames]; T5's ``input_ids``/``attention_mask`` [1, L],
                   L = ``--encoder-length``): its outputs are the cross keys/values, [1, H, L', D] per layer
    model.onnx     the decoder with past, compiled as a generation bundle (``generation.compile_generation``):
                   self-attention cache as in-place state (``StaticKVCache``), cross keys/values read as
                   inputs of the encoder's output names — state written once per input, never recomputed;
                   a relative position bias (T5) carried into the state's attention (``position_bias``)

``plan.json`` has the profiles ``encoder``, ``decode`` and ``prefill``; its ``state`` holds the self-attention
buffers and the cross keys/values (input = output: written by the encoder, read in place by the decoder), all
counted in every profile's ``peak_ram_bytes`` (the driver allocates them once, before encoding); ``weights_bytes``
are both models'; ``encoder`` is the encoder's own plan. The build checks the bundle against the export's own
loop (``seq2seq_verify``): greedy tokens equal and logits within the tolerance, else ``VerificationFailed``.
Not supported (one-line errors): ``--batch`` > 1, ``--quantize``, ``--attention`` other than dense,
``--kv-cache int8``, ``--input-shape``/``--input-value``, ``--ort``, a context beyond the decoder's positions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes, weights
from lmc.core.errors import LmcError
from lmc.core.metadata import GENERATION_KEY
from lmc.core.model_io import load_model
from lmc.core.pass_manager import PassContext
from lmc.passes.cross_attention import CrossState, bind_cross_state, cross_projection_graph, cross_state
from lmc.passes.drop_zero_addends import DropZeroAddends
from lmc.passes.eliminate_noops import EliminateNoops
from lmc.passes.fold_constants import FoldConstants
from lmc.passes.position_bias import RestorePositionBias, measure_bias, split_bias
from lmc.targets import emit
from lmc.targets.plan import Profile, check_plan
from lmc.targets.target import load_target
from lmc.compiler.backend import plan_memory
from lmc.compiler.build import BuildResult, _check_budget, _stage, build, lower_for_runtime
from lmc.compiler.compilation import BuildOptions, Compilation, QuantizeMode
from lmc.compiler.generation import bind_sequence, compile_generation
from lmc.compiler.pipeline import default_pipeline
from lmc.compiler.report import render_report
from lmc.compiler.report_html import HTML_FILE, render_report_html
from lmc.compiler.seq2seq_export import Seq2SeqExport, find_export, is_export_path
from lmc.compiler.seq2seq_generate import ENCODER_MODEL, ENCODER_WEIGHTS, SEQ2SEQ_KEY, Seq2SeqInfo
from lmc.compiler.seq2seq_verify import compare_seq2seq
from lmc.compiler.verify import VerificationFailed

log = logging.getLogger(__name__)

DEFAULT_ENCODER_LENGTH = 128
MASK_SOURCE = "attention_mask"


def _refuse_options(options) -> None:
    """What encoder–decoder bundles do not support yet, as one-line errors."""
    what = None
    if options.batch != 1:
        what = f"--batch {options.batch} (one sequence at a time)"
    elif options.quantize is not QuantizeMode.NONE:
        what = f"--quantize {options.quantize.value}"
    elif str(options.attention_spec) != "dense":
        what = f"--attention {options.attention}"
    elif options.kv_cache != "float":
        what = f"--kv-cache {options.kv_cache}"
    elif options.prune_spec is not None:
        what = f"--prune {options.prune}"
    elif options.input_shapes or options.input_values:
        what = "--input-shape/--input-value (the encoder's shape comes from --encoder-length)"
    elif options.ort_format:
        what = "--ort"
    elif options.tokenizer:
        what = "--tokenizer (onnxruntime-genai's config is written for decoder-only bundles)"
    if what:
        raise LmcError(f"encoder–decoder bundles do not support {what}")
    if options.prefill_chunk < 1:
        raise LmcError(f"--prefill-chunk must be at least 1, got {options.prefill_chunk}")


def encoder_shapes(graph: gs.Graph, length: int | None) -> dict[str, list[int]]:
    """The encoder's input dims: batch 1, every other free dim ``length`` (default ``DEFAULT_ENCODER_LENGTH``);
    ``--encoder-length`` on an encoder whose inputs are all fixed (Whisper's frames) is refused."""
    bound: dict[str, list[int]] = {}
    free = False
    for t in graph.inputs:
        if t.shape is None:
            raise LmcError(f"the encoder's input '{t.name}' has no shape")
        dims = []
        for k, d in enumerate(t.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif k == 0:
                dims.append(1)
            else:
                free = True
                dims.append(length or DEFAULT_ENCODER_LENGTH)
        bound[t.name] = dims
    if length is not None and not free:
        fixed = ", ".join(f"{k} {v}" for k, v in bound.items())
        raise LmcError(f"--encoder-length: the encoder's inputs have fixed shapes ({fixed}); drop it")
    return bound


SINGLE_FILE_BYTES = 1 << 30


def _save(graph: gs.Graph, path: Path) -> Path:
    """Write a graph as a model for the next stage: one file, or its weights in one file beside it when large."""
    ir.topological_sort(graph)
    model = ir.to_model(graph)
    if model.ByteSize() < SINGLE_FILE_BYTES:
        path.write_bytes(model.SerializeToString())
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    return path


def prepare_decoder(export: Seq2SeqExport, length: int, context: int, chunk: int, work: Path):
    """The decoder with past as the generation compile takes it: its fixed inputs bound ([1, H, L, D]), no-op
    casts removed, a relative position bias measured and split off (``position_bias``). Returns (path of the
    prepared model, the cross state, the bias tables)."""
    graph = export.with_past_graph()
    cross = cross_state(graph)
    bind_cross_state(graph, cross, 1, length)
    for t in graph.inputs:
        if t.shape and t.name not in cross.tensors and t.name != cross.mask:
            t.shape = [1] + list(t.shape[1:])
    shapes.infer_shapes(graph)
    for _ in range(6):          # Constant nodes become constants (the matchers read scalars), casts to self go
        changed = FoldConstants().run(graph, PassContext()).modified
        changed |= EliminateNoops().run(graph, PassContext()).modified
        ir.remove_dead_nodes(graph)
        shapes.infer_shapes(graph)
        if not changed:
            break
    tables = measure_bias(graph, context, chunk)
    split_bias(graph, tables)
    return _save(graph, work / "decoder.onnx"), cross, tables


def _encoder_bundle(export: Seq2SeqExport, cross: CrossState, options, work: Path, on_pass, progress):
    """The encoder joined to the cross projections, built one-shot (lmc's pipeline, verified) in ``work``."""
    encoder = ir.to_graph(load_model(export.encoder))
    bound = encoder_shapes(encoder, options.encoder_length)
    joined = cross_projection_graph(encoder, export.without_past_graph(), cross, bound)
    source = _save(joined, work / "encoder.onnx")
    del joined, encoder
    weights.release_freed()
    enc_options = BuildOptions(target=options.target, input_shapes=bound, inplace=options.inplace,
                               disabled_passes=options.disabled_passes, verify=options.verify,
                               tolerance=options.tolerance, seed=options.seed)
    result = build(source, enc_options, work / "encoder-bundle", on_pass=on_pass, progress=progress)
    built = onnx.load(str(work / "encoder-bundle" / "model.onnx"), load_external_data=False)
    lengths = set()
    for out in built.graph.output:
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        want = cross.tensors[out.name]
        if len(dims) != 4 or dims[0] != 1 or [dims[1], dims[3]] != [want[1], want[3]]:
            raise LmcError(f"--context: the encoder computes '{out.name}' as {dims}; the decoder reads "
                           f"[1, {want[1]}, L, {want[3]}]")
        lengths.add(dims[2])
    if len(lengths) != 1:
        raise LmcError(f"--context: the cross-attention keys/values have different lengths {sorted(lengths)}")
    return result, bound, lengths.pop()


def _copy_encoder(bundle: Path, staged: Path) -> None:
    """encoder.onnx (+ encoder.weights) into the staged bundle, its external data renamed to match."""
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = ENCODER_WEIGHTS
    (staged / ENCODER_MODEL).write_bytes(model.SerializeToString(deterministic=True))
    if (bundle / "model.weights").is_file():
        shutil.copyfile(bundle / "model.weights", staged / ENCODER_WEIGHTS)


def _decoder_pipeline(options, target, graph: gs.Graph, tables) -> list:
    pipeline = default_pipeline(options, target, [t.name for t in graph.inputs])
    at = next(i for i, p in enumerate(pipeline) if getattr(p, "name", "") == "static-kv-cache")
    if tables:
        pipeline.insert(at + 1, RestorePositionBias(tables))
    pipeline.insert(at, DropZeroAddends())      # T5's zero cross-attention bias, folded at each length
    return pipeline


def _combined_plan(enc_plan, plans, cross_names: tuple[str, ...], length: int):
    """One plan for the bundle: profiles encoder, decode, prefill; state = self-attention + cross buffers
    (in every profile); weights of both models; the top level from the profile with the highest peak."""
    weights_bytes = {k: enc_plan.weights_bytes.get(k, 0) + plans[0][2].weights_bytes.get(k, 0)
                     for k in set(enc_plan.weights_bytes) | set(plans[0][2].weights_bytes)}
    state = plans[0][2].state
    cross = sum(b.size for b in state if b.input in cross_names)
    self_state = sum(b.size for b in state if b.input not in cross_names)
    encoder = dataclasses.replace(enc_plan, io_bytes=enc_plan.io_bytes - cross, state=state,
                                  weights_bytes=weights_bytes)
    runtime = dict(enc_plan.runtime or {})
    predicted = int(runtime.get("predicted_peak_bytes", 0)) + self_state
    profiles = [Profile("encoder", length, encoder.arena_bytes,
                        encoder.lower_bound_bytes, encoder.io_bytes, encoder.peak_ram_bytes, predicted)]
    candidates = [encoder]
    for name, length, plan in plans:
        plan = dataclasses.replace(plan, weights_bytes=weights_bytes)
        candidates.append(plan)
        profiles.append(Profile(name, length, plan.arena_bytes, plan.lower_bound_bytes, plan.io_bytes,
                                plan.peak_ram_bytes, plan.runtime["predicted_peak_bytes"]))
    top = max(candidates, key=lambda p: p.peak_ram_bytes)
    return dataclasses.replace(top, profiles=tuple(profiles), state=state)


def build_seq2seq(model_path, options, out_dir, on_pass=None, progress=None):
    """``lmc build FOLDER --context N`` for an encoder–decoder export: see the module docstring."""
    start = time.perf_counter()
    if not is_export_path(model_path):
        raise LmcError(f"--encoder-length applies only to an encoder–decoder export (a folder holding "
                       f"encoder_model.onnx and its decoders), not {model_path}")
    export = find_export(model_path)
    if options.context is None:
        raise LmcError(f"{model_path}: an encoder–decoder export builds as a generation bundle: add --context N")
    _refuse_options(options)
    target = load_target(options.target)
    out_dir = Path(out_dir)
    if out_dir.resolve() == export.folder.resolve():
        raise LmcError(f"{out_dir}: output folder is the export's own folder; choose another -o")
    if export.max_positions is not None and options.context > export.max_positions:
        raise LmcError(f"--context {options.context} exceeds the decoder's {export.max_positions} learned positions "
                       f"(max_target_positions in {export.folder / 'config.json'})")
    chunk = min(options.prefill_chunk, options.context)
    with tempfile.TemporaryDirectory(prefix="lmc-seq2seq-") as tmp:
        work = Path(tmp)
        cross = cross_state(export.with_past_graph())
        enc_result, enc_shapes, length = _encoder_bundle(export, cross, options, work, on_pass, progress)
        decoder_path, cross, tables = prepare_decoder(export, length, options.context, chunk, work)
        before: list[tuple[int, int]] = []

        def run_passes(graph: gs.Graph, masks=None):
            before.append((len(graph.nodes), ir.weight_bytes(graph)))
            return Compilation(options, target, progress=progress, on_pass=on_pass).run(
                graph, _decoder_pipeline(options, target, graph, tables), masks=masks, report=len(before) > 1)

        graph, records, info, templates = compile_generation(decoder_path, options.context, 1, run_passes)
        missing = [name for name in cross.names if name not in {t.name for t in graph.inputs}]
        if missing:
            raise LmcError(f"--context: the compiled decoder no longer reads '{missing[0]}'")
        info = dataclasses.replace(info, prefill_chunk=chunk)
        config = export.config
        s2s = Seq2SeqInfo(ENCODER_MODEL, enc_shapes, cross.names, cross.mask,
                          MASK_SOURCE if cross.mask is not None and MASK_SOURCE in enc_shapes else None, length,
                          export.decoder_start_token_id, export.token("eos_token_id"),
                          int(config.get("pad_token_id") or 0))
        if cross.mask is not None and s2s.mask_source is None:
            raise LmcError(f"--context: the decoder reads '{cross.mask}' but the encoder has no '{MASK_SOURCE}' "
                           "input to fill it from")
        nodes_after, weights_after = len(graph.nodes), ir.weight_bytes(graph)
        by_dtype = ir.bytes_by_dtype(graph)
        runtime = lower_for_runtime(graph, options, target, None)
        state = list(info.state) + [(name, name) for name in cross.names]
        staged = _stage(graph, options, target, out_dir, runtime,
                        {GENERATION_KEY: info.to_json(), SEQ2SEQ_KEY: s2s.to_json()})
        try:
            plans = []
            for name, seq in (("decode", 1), ("prefill", chunk)):
                bind_sequence(graph, seq, templates)
                plan = plan_memory(graph, target, inplace=options.inplace, state=state, runtime=runtime)
                problems = check_plan(plan)
                if problems:
                    raise RuntimeError(f"arena plan ({name}) is unsound: {problems[0]}")
                plans.append((name, seq, plan))
            del graph
            weights.release_freed()
            _copy_encoder(work / "encoder-bundle", staged)
            plan = _combined_plan(enc_result.plan, plans, cross.names, length)
            _check_budget(plan, options, target)
            verification = None
            if options.verify:
                verification = compare_seq2seq(export, staged / emit.MODEL_FILE, tolerance=options.tolerance,
                                               seed=options.seed)
                if not verification.passed:
                    raise VerificationFailed(f"the compiled model differs from the original loop: "
                                             f"{verification.explain()}", verification)
            result = BuildResult(out_dir=out_dir, target=target, plan=plan, records=tuple(records),
                                 verification=verification,
                                 nodes_before=before[-1][0] + enc_result.nodes_before,
                                 nodes_after=nodes_after + enc_result.nodes_after,
                                 weight_bytes_before=before[-1][1] + enc_result.weight_bytes_before,
                                 weight_bytes_after=weights_after + enc_result.weight_bytes_after,
                                 seconds=time.perf_counter() - start, weights_by_dtype=by_dtype)
            name = export.folder.name
            encoder_report = (work / "encoder-bundle" / emit.REPORT_FILE).read_text()
            emit.commit_bundle(staged, out_dir, {
                emit.PLAN_FILE: json.dumps({**plan.to_dict(), "encoder": enc_result.plan.to_dict()}, indent=1) + "\n",
                emit.REPORT_FILE: render_report(result, f"{name} (decoder)") + "\n\n"
                + encoder_report.replace("# lmc build report:", "# encoder:", 1),
                HTML_FILE: render_report_html(result, f"{name} (decoder)"),
            })
        except BaseException:
            emit.discard(staged)
            raise
    return result
