"""The ``lmc`` command line.

Exit codes: 0 ok; 2 user error (one line on stderr; ``--debug`` adds the traceback); 1 internal error;
3 verification over tolerance (``lmc verify``, and ``lmc build`` of an exact model); 130 interrupted, 143
terminated (SIGTERM: the staged bundle and temporary files are removed first). Every command takes
``--json`` for machine-readable output on stdout; under ``--json`` an error is also a JSON object on stdout,
``{"error": …, "exit_code": …}``. ``--debug``, ``-v``/``--verbose`` and ``-q``/``--quiet`` are accepted
anywhere on the line. Progress is shown only on a terminal; ``NO_COLOR`` turns terminal control sequences off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback

import click

from lmc.core.errors import ExitCode, LmcError, VerificationFailed
from lmc.core.units import mib

# lmc verify --on: the microcontroller targets with an emulated board (lmc.targets.cbundle.board.board_targets(),
# not imported here to keep the command line's start light; tests/test_on_board.py keeps the two equal)
ON_BOARDS = ("cortex-m55", "cortex-m7")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | None) -> int | None:
    """``64MiB``, ``512KiB``, ``1GB``, ``1048576`` → bytes (binary units for KiB/MiB/GiB, decimal for KB/MB/GB)."""
    if text is None:
        return None
    m = SIZE_RE.match(text)
    if not m:
        raise LmcError(f"--max-ram '{text}': expected a size such as 64MiB, 512KiB or 1048576")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B") or "B"
    factor = {"B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "KI": 2**10, "MI": 2**20, "GI": 2**30}.get(unit)
    if factor is None:
        raise LmcError(f"--max-ram '{text}': unknown unit")
    return int(value * factor)


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``NAME=DxDx…`` (repeatable) -> {NAME: dims}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        if not sep or not name or not dims:
            raise LmcError(f"--input-shape '{value}': expected NAME=DxDx… (e.g. input_ids=1x256)")
        try:
            parsed = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise LmcError(f"--input-shape '{value}': dims must be integers separated by 'x'") from None
        if any(d < 0 for d in parsed):
            raise LmcError(f"--input-shape '{value}': dims must be ≥ 0 (0 for an empty cache)")
        if name in shapes:
            raise LmcError(f"--input-shape: '{name}' is given twice ({'x'.join(map(str, shapes[name]))} and "
                           f"{dims}); give each input once")
        shapes[name] = parsed
    return shapes


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    value = float(text)          # ValueError for anything else
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


def parse_input_values(values: tuple[str, ...]) -> dict[str, int | float | tuple[int | float, ...]]:
    """``NAME=VALUE`` (repeatable; VALUE an int, a float or a comma-separated list of them) -> {NAME: value}."""
    parsed: dict[str, int | float | tuple[int | float, ...]] = {}
    for value in values:
        name, sep, text = value.rpartition("=")
        if not sep or not name or not text.strip():
            raise LmcError(f"--input-value '{value}': expected NAME=VALUE (e.g. sr=16000 or scale=0.5,0.25)")
        try:
            items = tuple(_number(t.strip()) for t in text.split(","))
        except ValueError:
            raise LmcError(f"--input-value '{value}': VALUE must be an int, a finite float or a comma-separated "
                           "list of them") from None
        if name in parsed:
            raise LmcError(f"--input-value: '{name}' is given twice; give each input once")
        parsed[name] = items if "," in text else items[0]
    return parsed


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def _status(text: str, nl: bool = True) -> None:
    """A progress line on stderr, overwriting the previous one (plain padding under NO_COLOR)."""
    clear = "\r" if _no_color() else "\r\033[K"
    click.echo(f"{clear}{text:<79}" if _no_color() else f"{clear}{text}", err=True, nl=nl, color=not _no_color())


class _State:
    quiet = False
    json_emitted = False     # the command already printed its JSON (lmc verify's failed report)
    help_only = False        # the line asks for help (or the version): no command runs


POSITIVE = click.IntRange(min=1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (accepted anywhere on the line).")
@click.option("-v", "--verbose", count=True, help="Log what the compiler does (-vv for more; accepted anywhere).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary (unless --json; accepted anywhere).")
@click.version_option(package_name="lmc")
def cli(debug: bool, verbose: int, quiet: bool) -> None:
    """lmc — compile ONNX models for low-memory devices.

    \b
    Typical use:
      lmc build model.onnx --target cortex-a55 --input-shape input_ids=1x256 -o out/
      lmc build decoder-with-past.onnx --context 512 -o gen/   (a generation bundle)
      lmc generate gen/ --prompt-tokens prompt.txt --max-new-tokens 200
      lmc verify out/ --against model.onnx
      lmc inspect model.onnx
      lmc targets

    A build runs exact graph rewrites (constant folding, weight dedup/sharing, fusion), plans every
    intermediate tensor into one arena, checks the result against the original under onnxruntime and
    writes a bundle: model.onnx (+ model.weights), plan.json, report.md.
    """
    _State.quiet = quiet
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if quiet and verbose == 0:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not _State.help_only:     # a command will run: onnxruntime is loaded only then
        _quiet_onnxruntime()


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--out", "out_dir", default="out", show_default=True, type=click.Path(file_okay=False),
              help="Bundle folder (written atomically; an existing bundle there is replaced).")
@click.option("-t", "--target", default="cortex-a55", show_default=True,
              help="Target name (see `lmc targets`) or a target .toml file.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD…",
              help="Bind a dynamic input's dims, e.g. input_ids=1x256 (repeatable).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
              help="Fix an input's value (an int, a float or a comma-separated list), e.g. sr=16000: the input "
                   "becomes a constant and control flow on it folds (repeatable).")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4", "w8a8"]), default="none",
              show_default=True,
              help="none keeps the model exact; int8: weights per channel; int4: weights in blocks (with --calib: "
                   "GPTQ, and the embedding/tied head at 4 bits too; without: that table at int8); w8a8: int8 "
                   "weights and activations (needs --calib).")
@click.option("--block-size", default=None, type=click.IntRange(min=1),
              help="int4 block size (power of two, 16..256). Larger blocks: fewer scales, a smaller and faster "
                   "bundle, a little more error (llama-code, symmetric, no --calib: +5.0% perplexity at 32, +5.9% at "
                   "64; a 1.1B decoder's resident peak 919 -> 728 MiB)  [default: the target's int4_block_size, or its "
                   "int4_block_size_gptq with --calib (x86-64: 64, 128 with --calib); see lmc targets]")
@click.option("--int4-scheme", type=click.Choice(["symmetric", "asymmetric"]), default=None,
              help="int4 codes: symmetric (q·s, no zero point) or asymmetric ((q − z)·s, a 4-bit zero point "
                   "per block: less error, ~30% slower 4-bit products; llama-code with --calib: +3.1% perplexity "
                   "instead of +6.1%, decode 0.8x the speed)  [default: the target's int4_scheme, see lmc targets]")
@click.option("--calib", type=click.Path(dir_okay=False),
              help=".npz with one array per input, [N, *input_shape]: weights scale choice by activations.")
@click.option("--prune", metavar="mlp=F[,heads=F][,kv=F]",
              help="Structured pruning (approximate, needs --calib): remove the fraction F of MLP channels, of each "
                   "key/value group's query heads (heads=, e.g. 1/3), and of whole key/value groups with their "
                   "cache (kv=), the least salient on the calibration data, globally across layers; the "
                   "projection reading them is refit by least squares. Runs before --quantize.")
@click.option("--prune-per-layer", is_flag=True, help="--prune the same share from every layer.")
@click.option("--calib-method", type=click.Choice(["mse", "minmax", "percentile", "entropy"]), default="mse",
              show_default=True, help="w8a8 activation ranges: searched by measured error (mse) or a fixed "
                                      "statistic.")
@click.option("--calib-samples", default=32, show_default=True, type=POSITIVE,
              help="Calibration samples used from --calib.")
@click.option("--attention", default="dense", show_default=True, metavar="MODE",
              help="dense; chunked[:Q] (exact: fused attention run in chunks of Q query rows, score memory "
                   "Q·S instead of S·S); sliding:W[,sinks=S] (approximate: each row sees the last W keys and "
                   "the first S).")
@click.option("--context", type=click.IntRange(min=2), metavar="N",
              help="Generation bundle from a decoder exported with past key/values (optimum "
                   "text-generation-with-past, torch.onnx): the cache becomes fixed state of N tokens updated in "
                   "place; one model serves prefill (prompt ≤ N) and decode. Run it with `lmc generate`.")
@click.option("--batch", type=POSITIVE, help="Batch rows of a --context bundle [default: 1].")
@click.option("--prefill-chunk", type=int,
              help="A --context bundle runs prompts in steps of at most this many tokens: the planned (and "
                   "real) memory of a prefill is bounded whatever the prompt length [default: 64].")
@click.option("--kv-cache", type=click.Choice(["float", "int8"]),
              help="Precision of a --context bundle's cache: int8 keeps int8 rows with one scale per token and "
                   "head (about a quarter of the memory; approximate, its error is reported) [default: float].")
@click.option("--tokenizer", type=click.Path(), metavar="FILE_OR_DIR",
              help="A --context bundle: copy this tokenizer.json (or a folder's tokenizer.json, "
                   "tokenizer_config.json, …) beside the model for onnxruntime-genai; genai_config.json takes its "
                   "bos/eos/pad ids.")
@click.option("--encoder-length", type=POSITIVE, metavar="L",
              help="MODEL an encoder–decoder export folder (optimum): the encoder's input length, e.g. T5's "
                   "input_ids [1, L] (shorter inputs are padded) [default: 128; fixed-size inputs such as "
                   "Whisper's input_features keep theirs].")
@click.option("--max-ram", metavar="SIZE",
              help="Fit the planned peak RAM into SIZE, e.g. 64MiB: over it, lmc tries the exact means (--in-place, "
                   "chunked attention) and says what it chose, or exits 2 naming the best attempt and what makes "
                   "it [default: the target's RAM, checked only].")
@click.option("--allow-approx", is_flag=True,
              help="Let --max-ram also choose quantization (int8, then w8a8 with --calib, then int4) to fit.")
@click.option("--ort", "ort_format", is_flag=True,
              help="Also write ORT Mobile files: model.ort and required_operators.config (for onnxruntime "
                   "mobile/minimal builds).")
@click.option("--in-place", "inplace", is_flag=True,
              help="Plan elementwise and reshape outputs over their dying inputs (lower peak; plan.json lists "
                   "the pairs under 'inplace').")
@click.option("--disable-pass", "disabled", multiple=True, metavar="NAME",
              help="Leave a pass out (repeatable), e.g. share-transposed.")
@click.option("--emit", "emit_format", type=click.Choice(["onnx", "c"]), default=None,
              help="Bundle form: onnx, or c (model.h/model.c/weights.c + kernels beside model.onnx, the arena "
                   "as one static buffer). Default: c where the target keeps weights in flash, else onnx.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison with the original.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Max relative output error accepted by the built-in verification (at least twice the "
                   "original's own spread between onnxruntime optimisation levels).")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON on stdout.")
def build(model, out_dir, target, input_shapes, input_values, quantize, block_size, int4_scheme, calib, prune, prune_per_layer, calib_method, calib_samples, attention,
          context, batch, prefill_chunk, kv_cache, tokenizer, encoder_length, max_ram, allow_approx, ort_format, inplace, disabled, emit_format, no_verify, tolerance, as_json):
    """Compile MODEL into a verified bundle with a static memory plan.

    \b
    Examples:
      lmc build llama.onnx --target cortex-a55 --input-shape input_ids=1x256 -o out/
      lmc build vad.onnx --input-shape input=1x512 --input-value sr=16000 -o vad/
      lmc build decoder-with-past.onnx --context 512 -o gen/ && lmc generate gen/ --prompt-tokens p.txt
    """
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.compiler.build import BuildOptions, QuantizeMode, build as run_build

    options = BuildOptions(target=target, input_shapes=parse_input_shapes(input_shapes),
                           input_values=parse_input_values(input_values),
                           quantize=QuantizeMode(quantize), block_size=block_size, int4_scheme=int4_scheme, calib=calib,
                           calib_method=calib_method, calib_samples=calib_samples, prune=prune,
                           prune_per_layer=prune_per_layer,
                           attention=attention, max_ram=parse_size(max_ram), allow_approx=allow_approx, inplace=inplace,
                           ort_format=ort_format, context=context, batch=batch, prefill_chunk=prefill_chunk, kv_cache=kv_cache,
                           encoder_length=encoder_length, tokenizer=tokenizer,
                           disabled_passes=tuple(disabled), verify=not no_verify, tolerance=tolerance,
                           emit=emit_format)
    show = not as_json and not _State.quiet and sys.stderr.isatty()

    def on_pass(record):
        if show:
            _status(f"  {record.name:<28} {record.seconds:6.2f}s  {record.nodes:6d} nodes")

    def progress(label, done, total):
        if show:
            width = 30
            filled = width * done // max(total, 1)
            _status(f"  {label:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", nl=False)

    result = run_build(model, options, out_dir, on_pass=on_pass, progress=progress)
    if as_json:
        _emit_json(result.to_dict())
        return
    if _State.quiet:
        return
    plan = result.plan
    click.echo(f"built {result.out_dir}/ for {result.target.name} in {result.seconds:.1f}s")
    if result.fitted:
        click.echo(f"  fitted   --max-ram chose {result.fitted}")
    click.echo(f"  nodes    {result.nodes_before} -> {result.nodes_after}")
    click.echo(f"  weights  {mib(result.weight_bytes_before)} -> {mib(result.weight_bytes_after)}")
    click.echo(f"  arena    {mib(plan.arena_bytes)} (lower bound {mib(plan.lower_bound_bytes)}), "
               f"peak RAM {mib(plan.peak_ram_bytes)}")
    if plan.state:
        click.echo(f"  state    {mib(plan.state_bytes)} KV cache in place ({len(plan.state)} buffers, "
                   f"{options.context} tokens); " + ", ".join(f"{p.name} ({p.sequence} tokens) peak "
                                                            f"{mib(p.peak_ram_bytes)}" for p in plan.profiles))
    for record in result.records:
        if record.name == "genai-interface":           # what onnxruntime-genai can do with the bundle
            click.echo(f"  genai    {record.notes[-1]}")
    if result.cbundle:
        c = result.cbundle
        click.echo(f"  C        model.c + {', '.join(c.families)} kernels: {c.macs:,} MACs per inference, "
                   f"weights {c.weight_bytes:,} bytes (flash), arena {c.arena_bytes:,} bytes")
    if result.cbundle_skipped:
        click.echo(f"  C        not written: {result.cbundle_skipped}")
    if result.linker:
        k = result.linker
        click.echo(f"  linker   {k.board} ({k.toolchain}): arena {k.arena_bytes:,} B (plan {k.plan_arena_bytes:,}), "
                   f"RAM {k.ram_bytes:,} of {k.target_ram_bytes:,} B (stack {k.stack_bytes:,} reserved), "
                   f"flash {k.flash_bytes:,} B")
    elif result.linker_skipped:
        click.echo(f"  linker   not linked: {result.linker_skipped}")
    if plan.runtime:
        click.echo(f"  runtime  predicted resident peak {mib(plan.runtime['predicted_peak_bytes'])} "
                   f"(weights, prepacked copies, session, arena, io, state)")
    if result.verification:
        v = result.verification
        approx = result.approximations
        if not approx:
            click.echo(f"  verified max rel error {v.max_rel:.2e} (tolerance {v.tolerance:g})")
        else:
            o = v.outputs[0]
            click.echo(f"  approximate ({', '.join(approx)}): {o.name} max abs {o.max_abs:.3g}, "
                       f"cosine {o.cosine:.6f} vs the original (judge with lmc verify --tokens)")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--against", required=True, type=click.Path(),
              help="The original model (an encoder–decoder bundle: the export's folder).")
@click.option("--inputs", type=click.Path(dir_okay=False), help=".npz with one array per input name.")
@click.option("--samples", default=1, show_default=True, type=POSITIVE,
              help="Random samples when --inputs is not given.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Max relative error (raised to twice the original's own spread between onnxruntime "
                   "optimisation levels when that is larger).")
@click.option("--tokens", type=click.Path(dir_okay=False),
              help="uint16 token file: also report perplexity of both models (e.g. code-val.u16).")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2),
              help="Window length for --tokens.")
@click.option("--windows", default=64, show_default=True, type=POSITIVE, help="Windows evaluated for --tokens.")
@click.option("--on", "on", type=click.Choice(["host", "aarch64", *ON_BOARDS]), default="host", show_default=True,
              help="Run both models here, or on the bundle's target instruction set under qemu-user (the CPU model "
                   "its target names; prepare it once with scripts/setup-aarch64.sh); also reports top-1 agreement. "
                   "cortex-m55 / cortex-m7: a C bundle cross-compiled and run on that target's board under "
                   "qemu-system-arm (scripts/setup-mcu.sh), with its RAM, flash, arena and instruction count.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(bundle, against, inputs, samples, tolerance, tokens, seq_len, windows, on, as_json):
    """Compare BUNDLE (a folder or model.onnx) with the original under onnxruntime.

    Prints max abs / relative error and cosine per output, and the original's own spread between onnxruntime
    optimisation levels; an output passes when its max relative error is within max(--tolerance, 2 × that
    spread). Exits 3 when one is over. Quantized bundles are approximate: pass a looser --tolerance and judge
    them by --tokens perplexity.
    """
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.compiler.verify import verify as run_verify

    if on != "host":
        from functools import partial

        # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
        from lmc.compiler.on_target import verify_on

        run_verify = partial(verify_on, on=on)
    report = run_verify(bundle, against, inputs=inputs, tolerance=tolerance, samples=samples, tokens=tokens,
                        seq_len=seq_len, windows=windows)
    note = None
    if not report.passed:
        how = " and ".join(f"--{key} {value}" for key in ("quantize", "prune")
                           if (value := _bundle_quantize(bundle, key)) and value != "none")
        if how:
            note = (f"this bundle was built with {how}, so it is approximate; judge it by --tokens "
                    "perplexity or pass a --tolerance for it")
    if as_json:
        data = report.to_dict()
        if not report.passed:
            data.update(error=f"verification failed: {report.explain()}", exit_code=int(ExitCode.VERIFY_FAILED))
            if note:
                data["note"] = note
        _emit_json(data)
        _State.json_emitted = True
    elif not _State.quiet:
        for o in report.outputs:
            spread = f"  (original's spread {o.spread:.1e})" if o.spread else ""
            click.echo(f"{o.name}: max abs {o.max_abs:.3e}  max rel {o.max_rel:.3e}  cosine {o.cosine:.8f}{spread}")
        for line in getattr(report, "details", ()):
            click.echo(line)
        if report.perplexity:
            p = report.perplexity
            allowed = f", may reach ±{p['allowed'] * 100:.3g}%" if "allowed" in p else ""
            click.echo(f"perplexity: original {p['original']:.4f}  bundle {p['bundle']:.4f}  "
                       f"({p['relative_change'] * 100:+.2f}%{allowed})")
        spread = report.spread
        accepted = (f", accepting up to {report.spread_factor:g} × the original's own spread {spread:.2e}"
                    if spread and report.spread_factor * spread > tolerance else "")
        click.echo(f"{'PASS' if report.passed else 'FAIL'} (tolerance {tolerance:g}{accepted}, "
                   f"{report.samples} sample(s))")
        if note:
            click.echo(f"note: {note}")
    if not report.passed:
        raise VerificationFailed(report.explain(), report)


def _bundle_quantize(bundle: str, key: str = "quantize") -> str | None:
    """The bundle's build metadata ``key`` (``quantize``, ``prune``), or None."""
    # deferred: startup time (this hint is needed only after a failed check)
    import onnx

    from lmc.core.metadata import build_metadata
    from lmc.compiler.verify import bundle_model_path

    try:
        return build_metadata(onnx.load(str(bundle_model_path(bundle)), load_external_data=False)).get(key)
    except Exception:  # a best-effort hint only
        return None


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt-tokens", type=click.Path(dir_okay=False), help="Text file of whitespace-separated token ids.")
@click.option("--prompt", help="Prompt text (needs --tokenizer).")
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="Hugging Face tokenizer.json for --prompt.")
@click.option("--max-new-tokens", default=32, show_default=True, type=POSITIVE, help="Tokens to generate.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="onnxruntime intra-op threads (0: its default).")
@click.option("--encoder-inputs", type=click.Path(dir_okay=False),
              help="An encoder–decoder bundle: .npz with the encoder's inputs by name (T5: input_ids and "
                   "attention_mask; Whisper: input_features); the prompt then defaults to the decoder start token.")
@click.option("--speculate", metavar="off|lookup[:K]|draft[:K]",
              help="Verify up to K drafted tokens per forward, same tokens (lookup: as many as the measured cost "
                   "of a wider forward and the drafts kept so far say pay) [default: lookup:4 when greedy, "
                   "draft:4 with --draft, off when sampling].")
@click.option("--draft", type=click.Path(), metavar="BUNDLE",
              help="A smaller generation bundle with the same vocabulary that drafts the tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Sample at this temperature (0: greedy).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample among the k likeliest (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Sample among the likeliest tokens whose probability reaches p.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Divide the logits of tokens already seen (greedy too; 1: none).")
@click.option("--seed", type=int, help="Seed of the sampler: the same seed, the same tokens.")
@click.option("--stop-token", "stop_tokens", multiple=True, type=click.IntRange(min=0), metavar="ID",
              help="End at this token (repeatable; --tokenizer adds its end-of-sequence token).")
@click.option("--on", "on", type=click.Choice(["onnxruntime", "c", *ON_BOARDS]), default="onnxruntime",
              show_default=True,
              help="Run model.onnx under onnxruntime, or the bundle's C (built with --context for cortex-m55 / "
                   "cortex-m7): c compiled with the host C compiler, cortex-m55 / cortex-m7 on that target's "
                   "emulated board (scripts/setup-mcu.sh). The C runner is greedy.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"tokens": [new tokens], "tokens_per_s": …, "peak_rss_bytes": …, "acceptance_rate": …} '
                   'on stdout.')
def generate(bundle, prompt_tokens, prompt, tokenizer, max_new_tokens, threads, encoder_inputs, speculate, draft,
             temperature, top_k, top_p, repetition_penalty, seed, stop_tokens, on, as_json):
    """Generate with a bundle built by `lmc build --context N`: greedy, or sampled.

    \b
    The cache stays in place between steps (onnxruntime IOBinding): memory does not grow per token.
    Greedy decoding verifies tokens drafted by prompt lookup several per forward (same tokens, faster),
    and its one-token steps use the bundle's greedy head where the build gave it one (same argmax).
    Examples:
      lmc generate gen/ --prompt-tokens prompt.txt --max-new-tokens 200
      lmc generate gen/ --prompt "def main(" --tokenizer tokenizer.json --json
      lmc generate gen/ --prompt "def main(" --tokenizer tokenizer.json --temperature 0.7 --top-p 0.9 --seed 1
      lmc generate mcu/ --prompt-tokens prompt.txt --on cortex-m7     # the C of a cortex-m7 bundle, emulated
    """
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.compiler.drivers import load_tokenizer, read_prompt_tokens
    from lmc.compiler.run_generation import generate as run_generate

    if prompt_tokens is not None and prompt is not None or (prompt_tokens is None and prompt is None
                                                            and encoder_inputs is None):
        raise LmcError("give exactly one of --prompt-tokens FILE or --prompt TEXT (with --tokenizer)")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if prompt is not None:
        if tok is None:
            raise LmcError("--prompt needs --tokenizer tokenizer.json (or pass ids with --prompt-tokens)")
        ids = tok.encode(prompt).ids
    else:
        ids = read_prompt_tokens(prompt_tokens) if prompt_tokens is not None else None
    stops = list(stop_tokens)
    if tok is not None and encoder_inputs is None:
        # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
        from lmc.compiler.sampling import eos_token_ids

        stops += [t for t in eos_token_ids(tokenizer, bundle) if t not in stops]
    if on != "onnxruntime":
        asked = {"--temperature": temperature != 0.0, "--top-k": top_k != 0, "--top-p": top_p != 1.0,
                 "--repetition-penalty": repetition_penalty != 1.0, "--seed": seed is not None,
                 "--speculate": speculate is not None, "--draft": draft is not None,
                 "--encoder-inputs": encoder_inputs is not None, "--threads": threads != 0}
        if any(asked.values()):
            raise LmcError(f"--on {on} runs the C greedy runner: {', '.join(k for k, v in asked.items() if v)} "
                           "apply only under onnxruntime")
        _generate_c(bundle, ids, max_new_tokens, on, stops, tok, as_json)
        return
    stream = _TextStream(tok) if tok is not None and not as_json else None
    result = run_generate(bundle, ids, max_new_tokens, threads=threads, encoder_inputs=encoder_inputs,
                          on_token=stream, speculate=speculate, draft=draft, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop_tokens=stops)
    if as_json:
        _emit_json({**result.to_dict(), **({"text": tok.decode(result.tokens)} if tok is not None else {})})
        return
    if stream is not None:
        stream.finish()
    click.echo(" ".join(str(t) for t in result.tokens))
    if not _State.quiet:
        rate = result.acceptance_rate
        spec = (f" ({result.speculation}: {result.accepted}/{result.drafted} drafts accepted)" if rate is not None
                else f" ({result.speculation})" if result.speculation else "")
        click.echo(f"{len(result.tokens)} tokens, prefill {result.prompt_tokens} in {result.prefill_seconds:.3f}s, "
                   f"decode {result.tokens_per_s:.1f} tokens/s{spec}, peak RSS {mib(result.peak_rss_bytes)}", err=True)


def _generate_c(bundle, ids, count, on, stops, tok, as_json) -> None:
    """``lmc generate --on c|cortex-m55|cortex-m7``: the bundle's C greedy runner; stop tokens cut its tokens
    after the first one (greedy tokens do not depend on when the run stops)."""
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.targets.cbundle.generation import generate_board, generate_host

    start = time.perf_counter()
    run = generate_host(bundle, ids, count) if on == "c" else generate_board(bundle, on, ids, count)
    seconds = time.perf_counter() - start
    tokens = run if on == "c" else run.tokens
    for at, token in enumerate(tokens):
        if token in stops:
            tokens = tokens[:at + 1]
            break
    figures = {} if on == "c" else {"board": run.board, "flash_bytes": run.flash_bytes, "ram_bytes": run.ram_bytes,
                                    "arena_bytes": run.arena_bytes, "stack_used": run.stack_used,
                                    "instructions": run.instructions, "lmc_run_calls": run.lmc_run_calls}
    if as_json:
        _emit_json({"tokens": tokens, "on": on, "seconds": seconds, **figures,
                    **({"text": tok.decode(tokens)} if tok is not None else {})})
        return
    if tok is not None:
        click.echo(tok.decode(tokens))
    click.echo(" ".join(str(t) for t in tokens))
    if not _State.quiet:
        where = "C on the host" if on == "c" else f"C on {run.board} (qemu)"
        extra = "" if on == "c" else (f"; flash {run.flash_bytes:,} B, RAM {run.ram_bytes:,} B, arena "
                                      f"{run.arena_bytes:,} B, {run.instructions:,} instructions in "
                                      f"{run.lmc_run_calls} steps")
        click.echo(f"{len(tokens)} tokens, {where} in {seconds:.2f}s (compile included){extra}", err=True)


class _TextStream:
    """Prints the text of the new tokens as they come (what decoding them all adds to what was printed;
    held back while it ends in an incomplete character)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        click.echo(text[len(self.shown):], nl=False)
        self.shown = text

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        click.echo(text[len(self.shown):] if text.startswith(self.shown) else "")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD…", help="Bind dynamic dims.")
@click.option("-t", "--target", default="cortex-a55", show_default=True, help="Target for the planned peak.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model, input_shapes, target, as_json):
    """Ops, parameters by dtype, dynamic dims and (for static shapes) the planned peak of MODEL (a model
    file or a bundle folder)."""
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.compiler.inspection import inspect_model

    summary = inspect_model(model, parse_input_shapes(input_shapes), target)
    if as_json:
        _emit_json(summary.to_dict())
        return
    click.echo(f"{summary.path}: {summary.nodes} nodes, opsets "
               + ", ".join(f"{d} {v}" for d, v in summary.opsets.items()))
    for t in summary.inputs:
        click.echo(f"  input  {t['name']}: {t['dtype']} {t['shape']}")
    for t in summary.outputs:
        click.echo(f"  output {t['name']}: {t['dtype']} {t['shape']}")
    click.echo("  dynamic dims: " + (", ".join(summary.dynamic_dims) or "none"))
    if summary.built_with:
        click.echo("  built by lmc: " + ", ".join(f"{k}={v}" for k, v in summary.built_with.items()))
    click.echo(f"  parameters: {mib(summary.weight_bytes)}")
    for dtype, e in summary.params_by_dtype.items():
        click.echo(f"    {dtype:<8} {e['tensors']:5d} tensors {e['elements']:12d} elements {mib(e['bytes'])}")
    click.echo("  ops: " + ", ".join(f"{op} {n}" for op, n in sorted(summary.ops.items(), key=lambda x: -x[1])))
    if summary.plan:
        p = summary.plan
        click.echo(f"  planned ({p['target']}, after exact passes): {p['nodes_after_passes']} nodes, arena "
                   f"{mib(p['arena_bytes'])} (lower bound {mib(p['lower_bound_bytes'])}), "
                   f"peak RAM {mib(p['peak_ram_bytes'])}")
    else:
        click.echo("  planned peak: needs static shapes (bind with --input-shape)")


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxD…", help="Bind dynamic dims.")
@click.option("--json", "as_json", is_flag=True, help="Print the diff as JSON.")
def diff(a, b, input_shapes, as_json):
    """Node, initializer and memory differences between models A and B — or, when A and B are bundle
    folders, between their plans (arena, lower bound, peak RAM, predicted runtime peak, state), the tensors
    whose size or lifetime changed most, weights by dtype and nodes by op."""
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.compiler.inspection import diff_bundles, diff_models

    for path, other in ((a, b), (b, a)):
        if not os.path.exists(path):
            kind = "folder" if path.endswith(("/", os.sep)) or os.path.isdir(other) else "file"
            raise LmcError(f"{path}: no such {kind}")
    if os.path.isdir(a) or os.path.isdir(b):
        if not (os.path.isdir(a) and os.path.isdir(b)):
            raise LmcError("lmc diff compares two models or two bundle folders, not one of each")
        if input_shapes:
            raise LmcError("--input-shape applies to models; a bundle's shapes are already bound")
        _diff_bundles(diff_bundles(a, b), as_json)
        return
    d = diff_models(a, b, parse_input_shapes(input_shapes))
    if as_json:
        _emit_json(d.to_dict())
        return
    click.echo(f"nodes   {d.a.nodes} -> {d.b.nodes}")
    click.echo(f"weights {mib(d.a.weight_bytes)} -> {mib(d.b.weight_bytes)}")
    for op, (x, y) in d.ops.items():
        click.echo(f"  {op:<32} {x:5d} -> {y:5d} ({y - x:+d})")
    click.echo(f"initializers: {len(d.initializers_only_a)} only in A, {len(d.initializers_only_b)} only in B, "
               f"{len(d.initializers_changed)} changed")
    if d.a.plan and d.b.plan:
        click.echo(f"arena   {mib(d.a.plan['arena_bytes'])} -> {mib(d.b.plan['arena_bytes'])}")


def _diff_bundles(d, as_json: bool) -> None:
    if as_json:
        _emit_json(d.to_dict())
        return

    def size(n):
        if n is None:
            return "—"
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(n) >= scale:
                return f"{n / scale:.2f} {unit}"
        return f"{n} B"

    def delta(x, y, bytes_=True):
        if x is None or y is None:
            return ""
        dv = y - x
        pct = f" ({100 * dv / x:+.1f}%)" if x else ""
        return (("+" if dv > 0 else "-" if dv < 0 else "±") + size(abs(dv)) if bytes_ else f"{dv:+d}") + pct

    for label, side in (("A", d.a), ("B", d.b)):
        flags = [f"{k}={v}" for k, v in side.built_with.items() if k not in ("version", "generation") and v]
        kind = ", generation bundle" if "generation" in side.built_with else ""
        click.echo(f"{label} {side.path}  ({', '.join(flags)}{kind})")
    click.echo(f"plan{'':<28}{'A':>14}{'B':>14}  delta")
    for key, (x, y) in d.plan.items():
        counted = key in ("schedule_steps", "tensors")
        fx, fy = (str(x), str(y)) if counted else (size(x), size(y))
        click.echo(f"  {key:<30}{fx:>14}{fy:>14}  {delta(x, y, not counted)}")
    for name, rows in d.profiles.items():
        click.echo(f"profile {name}: " + "; ".join(
            f"{k.replace('_bytes', '')} {size(x) if k != 'sequence' else x or '—'} -> "
            f"{size(y) if k != 'sequence' else y or '—'}"
            for k, (x, y) in rows.items()))
    click.echo("weights by dtype:")
    for dtype, (x, y) in d.weights_by_dtype.items():
        click.echo(f"  {dtype:<12}{size(x['bytes']):>12} ({x['tensors']:>4}) -> {size(y['bytes']):>12} "
                   f"({y['tensors']:>4})  {delta(x['bytes'], y['bytes'])}")
    if d.ops:
        click.echo("nodes by op (changed):")
        for op, (x, y) in d.ops.items():
            click.echo(f"  {op:<32} {x:5d} -> {y:5d} ({y - x:+d})")
    click.echo(f"tensors: {d.tensors_only_a} only in A, {d.tensors_only_b} only in B; "
               f"changed most (size, live steps):" if d.tensors_changed else
               f"tensors: {d.tensors_only_a} only in A, {d.tensors_only_b} only in B; none of the shared changed")
    for t in d.tensors_changed:
        (fa, la), (fb, lb) = t["steps"]
        click.echo(f"  {t['name']:<48} {size(t['size'][0]):>10} -> {size(t['size'][1]):>10}  "
                   f"steps {fa}-{la} -> {fb}-{lb}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the target descriptions as JSON.")
def targets(as_json):
    """List the built-in targets: ISA features, tuning and memory mode."""
    # deferred: startup time — a command's modules (onnx, onnxruntime, the passes) load only when it runs
    from lmc.targets.cbundle.board import boards
    from lmc.targets.target import available_targets

    found = available_targets()
    board_of = {name: b for b in boards() for name in b.targets}      # lmc verify --on TARGET runs there
    if as_json:
        _emit_json([{**t.as_dict(), **({"board": board_of[t.name].as_dict()} if t.name in board_of else {})}
                    for t in found])
        return
    for t in found:
        m = t.memory
        click.echo(f"{t.name}: {t.description}")
        click.echo(f"  isa      {t.isa.arch} [{', '.join(sorted(t.isa.features))}], int8 products "
                   f"{t.isa.int8_products.value}")
        click.echo(f"  runtime  {t.tuning.runtime} {t.tuning.runtime_version}, opset <= {t.tuning.max_opset}, "
                   f"fused ops: {', '.join(sorted(t.tuning.fused_ops))}")
        click.echo(f"  memory   RAM {mib(m.ram_bytes)}, weights {m.weights_placement.value}, alignment {m.alignment}")
        click.echo(f"  quantize preferred {t.tuning.preferred_quantization} (first tried by --max-ram --allow-approx), "
                   f"int4 blocks of {t.tuning.int4_block_size} ({t.tuning.int4_block(gptq=True)} with --calib) "
                   f"unless --block-size, {t.tuning.int4_scheme.value} "
                   f"unless --int4-scheme")
        if t.name in board_of:
            click.echo(f"  board    {board_of[t.name].describe()}; lmc verify --on {t.name}")


GLOBAL_FLAGS = {"--debug", "-v", "-vv", "-vvv", "--verbose", "-q", "--quiet"}


def _split_global(args: list[str]) -> tuple[list[str], list[str]]:
    """(global flags, the rest): ``--debug``, ``-v``… and ``--quiet`` are accepted anywhere before ``--``."""
    flags, rest = [], []
    for i, a in enumerate(args):
        if a == "--":
            rest.extend(args[i:])
            break
        (flags if a in GLOBAL_FLAGS else rest).append(a)
    return flags, rest


def _quiet_onnxruntime() -> None:
    """onnxruntime's own (coloured) log lines would precede lmc's one-line messages: fatal ones only (its
    errors reach lmc as exceptions)."""
    try:
        # deferred: inside the try, so a missing or broken onnxruntime is reported where it is used
        import onnxruntime

        from lmc.core.runtime import ORT_LOG_LEVEL

        onnxruntime.set_default_logger_severity(ORT_LOG_LEVEL)
    except Exception as exc:  # noqa: BLE001 — a missing or odd onnxruntime is reported where it is used
        if _interrupted_by(exc) is not None:     # Ctrl-C / SIGTERM inside its C extension's import
            raise


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is: like Ctrl-C it unwinds every ``finally`` and ``with``, so a
    build stopped by a pipeline's timeout removes its staged bundle and temporary files."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def stop_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into ``Terminated`` in the main thread (a no-op elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def _interrupted_by(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or ``Terminated``) that ``exc`` was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors to exit codes (see module docstring)."""
    stop_cleanly_on_sigterm()

    args = list(sys.argv[1:] if argv is None else argv)
    flags, args = _split_global(args)
    if not args:              # a bare ``lmc``: the help, not click's "Missing command" usage error
        args = ["--help"]
    debug = "--debug" in flags
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    _State.quiet = _State.json_emitted = False
    _State.help_only = bool({"-h", "--help", "--version"} & set(args[: args.index("--")] if "--" in args else args))
    front = [f for f in flags if f != "--debug"]

    def fail(code: int, message: str, extra: dict | None = None, kind: str = "error"):
        """One line on stderr (``lmc: KIND: message``); under --json also {"error", "exit_code"} on stdout."""
        click.echo(f"lmc: {kind + ': ' if kind else ''}{message}", err=True)
        if as_json and not _State.json_emitted:
            _emit_json({"error": message, "exit_code": int(code), **(extra or {})})
        sys.exit(code)

    def first_line(exc: BaseException) -> str:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__

    try:
        cli.main(args=front + args, prog_name="lmc", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns a KeyboardInterrupt (Terminated included) raised in a command into Abort
        if isinstance(_interrupted_by(exc), Terminated):
            fail(143, "terminated", kind="")
        fail(130, "interrupted" if _interrupted_by(exc) else "aborted", kind="")
    except click.exceptions.ClickException as exc:
        fail(ExitCode.USER_ERROR, (exc.format_message().strip() or type(exc).__name__).splitlines()[0])
    except Terminated:
        fail(143, "terminated", kind="")
    except KeyboardInterrupt:
        fail(130, "interrupted", kind="")
    except VerificationFailed as exc:
        if debug:
            traceback.print_exc()
        # (lmc verify --json has already printed its report with the error in it)
        extra = {"verification": exc.report.to_dict()} if exc.report is not None else {}
        fail(ExitCode.VERIFY_FAILED, first_line(exc), extra, kind="verification failed")
    except LmcError as exc:
        if debug:
            traceback.print_exc()
        fail(ExitCode.USER_ERROR, first_line(exc))
    except Exception as exc:  # an internal bug: one line unless --debug
        interrupt = _interrupted_by(exc)
        if isinstance(interrupt, Terminated):   # e.g. a C extension's import stopped part-way: an ImportError
            fail(143, "terminated", kind="")
        if interrupt is not None:
            fail(130, "interrupted", kind="")
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(ExitCode.INTERNAL_ERROR, f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)",
             kind="internal error")
    sys.exit(ExitCode.OK)


if __name__ == "__main__":
    main()
