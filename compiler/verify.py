"""Verification: run the original model and the bundle in onnxruntime on the same inputs and compare.

For every output o with reference r and candidate c (flattened, float64):
- ``max_abs`` = max |r − c|
- ``max_rel`` = max |r − c| / max |r|   (relative to the output's scale; robust to values near zero)
- ``cosine``  = <r, c> / (‖r‖ ‖c‖)
The bundle passes when every output's ``max_rel`` ≤ ``max(tolerance, SPREAD_FACTOR × spread)``, where
``spread`` is the original model's own numerical spread: its ``max_rel`` between onnxruntime with every
graph optimisation off and with every one on, on the same feeds. onnxruntime's optimisation levels disagree
with each other on real exports (fused kernels reassociate sums: 2.5e-3 relative on an OCR detector), so a
bundle can not be held to more than the original agrees with itself; the factor 2 leaves room for the
bundle's own reassociation on top of onnxruntime's. ``verify()`` always measures the spread; the build's
check (``compare_models``) measures it only when an output is over the plain tolerance.

Inputs: given (``.npz`` with one array per input name, sample i = arr[i] when it has one more dim than
the input) or random with a fixed seed: floats ~ N(0, 1); integer inputs that index a Gather table are
uniform in [0, rows), other integers in [0, 2). A bundle built with ``--input-value NAME=V`` no longer has the
input NAME: the original's feeds get V for it (``compare_models(reference_values=…)``; ``lmc verify`` reads
the values from the bundle's metadata).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from lmc.core import weights
from lmc.core.errors import LmcError, VerificationFailed  # noqa: F401 — raised here, part of this module's API
from lmc.core.metadata import build_metadata, decode_input_values
from lmc.core.model_io import external_tensors
from lmc.core.perplexity import load_tokens, perplexity, streaming_perplexity
from lmc.core.runtime import CONFIG_ENTRIES, bundle_session_options, session
from lmc.targets.cbundle.generation import is_generation_c
from lmc.compiler.drivers import LOW_MEMORY, StateDecoder, generation_info, past_logits, past_perplexity
from lmc.compiler.seq2seq_generate import seq2seq_info

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
SPREAD_FACTOR = 2.0     # a bundle may differ from the original by up to this × the original's own spread


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    tolerance: float | None = None     # this output's tolerance when it differs from the report's (fp16)
    spread: float | None = None        # the original's own max_rel, optimisations off vs on (None: not measured)
    allowed: float | None = None       # the error accepted: max(tolerance, SPREAD_FACTOR × spread)

    def limit(self, tolerance: float) -> float:
        """The max_rel this output may reach, given the report's tolerance."""
        if self.allowed is not None:
            return self.allowed
        return self.tolerance or tolerance


@dataclass(frozen=True)
class VerifyReport:
    outputs: tuple[OutputError, ...]
    samples: int
    tolerance: float
    perplexity: dict[str, float] = field(default_factory=dict)
    spread_factor: float = SPREAD_FACTOR

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def spread(self) -> float | None:
        """The original's largest own spread over the outputs (None when it was not measured)."""
        measured = [o.spread for o in self.outputs if o.spread is not None]
        return max(measured) if measured else None

    @property
    def perplexity_passed(self) -> bool:
        """The perplexity gap within what it may reach (``allowed``, when it was judged)."""
        allowed = self.perplexity.get("allowed")
        return allowed is None or abs(self.perplexity["relative_change"]) <= allowed

    @property
    def passed(self) -> bool:
        return all(o.max_rel <= o.limit(self.tolerance) for o in self.outputs) and self.perplexity_passed

    @property
    def failures(self) -> tuple[OutputError, ...]:
        return tuple(o for o in self.outputs if not o.max_rel <= o.limit(self.tolerance))

    def explain(self) -> str:
        """One line: which outputs are over what they may reach, and why that much."""
        if self.passed:
            return f"all {len(self.outputs)} output(s) within tolerance"
        parts = []
        if not self.perplexity_passed:
            p = self.perplexity
            parts.append(f"perplexity {p['bundle']:.6g} vs the original's {p['original']:.6g}: relative gap "
                         f"{p['relative_change']:+.3g} beyond {p['allowed']:.3g} (tolerance {self.tolerance:g}, the "
                         f"original's own spread, full window vs token by token, {p['spread']:.3g} × "
                         f"{self.spread_factor:g})")
        for o in self.failures:
            tol = o.tolerance or self.tolerance
            why = f"tolerance {tol:g}"
            if o.spread is not None:
                why += (f", the original's own spread (onnxruntime optimisations off vs on) {o.spread:.3g} × "
                        f"{self.spread_factor:g}")
            parts.append(f"output '{o.name}' max relative error {o.max_rel:.3g} > {o.limit(self.tolerance):.3g} "
                         f"({why})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "samples": self.samples, "tolerance": self.tolerance,
                "spread": self.spread, "spread_factor": self.spread_factor,
                "outputs": [{**o.__dict__, "limit": o.limit(self.tolerance)} for o in self.outputs],
                "perplexity": self.perplexity}


def _load_session(path: str | Path, low_memory: bool = False, optimize: bool = True):
    """A session on ``path`` under the config entries of its ``session_options.json`` when it is a bundle
    (they choose kernels, e.g. MatMulNBits' accuracy level, and so the numbers checked)."""
    entries = {k: v for k, v in bundle_session_options(path).get(CONFIG_ENTRIES, {}).items()
               if not (low_memory and k == "session.disable_prepacking")}
    try:
        return session(path, low_memory=low_memory, optimize=optimize, config_entries=entries)
    except Exception as exc:  # onnxruntime raises several exception types for unloadable models
        raise LmcError(f"{path}: onnxruntime cannot load it ({str(exc).strip().splitlines()[0][:300]})") from exc


def _gather_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Input name -> rows of the constant table it indexes through Gather, or through a quantized table's
    com.microsoft GatherBlockQuantized (``gather_axis``; its packed data keeps one row per id)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    rows: dict[str, int] = {}
    inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        quantized = node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft"
        if (node.op_type == "Gather" and len(node.input) == 2 or quantized) and node.input[1] in inputs:
            axis = next((a.i for a in node.attribute if a.name == ("gather_axis" if quantized else "axis")), 0)
            table = shapes.get(node.input[0])
            if table:
                rows[node.input[1]] = min(rows.get(node.input[1], table[axis]), table[axis])
    return rows


def random_inputs(model_path: str | Path, shapes: Mapping[str, Sequence[int]], samples: int = 1,
                  seed: int = 0, values: Mapping[str, np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
    """``samples`` random feeds for the model at ``model_path`` with inputs bound to ``shapes``; inputs named
    in ``values`` (fixed with --input-value) are left out — ``with_values`` adds them."""
    model = onnx.load(str(model_path), load_external_data=False)
    rows = _gather_rows(model)
    rng = np.random.default_rng(seed)
    feeds = []
    initializers = {t.name for t in model.graph.initializer}
    for _ in range(samples):
        feed = {}
        for inp in model.graph.input:
            if inp.name in initializers or (values and inp.name in values):
                continue
            if inp.name in shapes:
                shape = [int(d) for d in shapes[inp.name]]
            else:
                dims = inp.type.tensor_type.shape.dim
                if any(not d.HasField("dim_value") for d in dims):
                    raise LmcError(f"input '{inp.name}' has dynamic dims: bind them (lmc build --input-shape) or "
                                   "give inputs (lmc verify --inputs)")
                shape = [d.dim_value for d in dims]
            elem = inp.type.tensor_type.elem_type
            if elem == onnx.TensorProto.STRING:
                words = np.array(["lmc", "onnx", "arena", "", "ß", "token"], dtype=object)
                feed[inp.name] = words[rng.integers(0, len(words), size=shape)]
                continue
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            except (KeyError, TypeError, ValueError):
                raise LmcError(f"input '{inp.name}' has element type {elem}, for which no test values can be "
                               "made; give inputs (lmc verify --inputs)") from None
            if np.issubdtype(dtype, np.integer):
                feed[inp.name] = rng.integers(0, rows.get(inp.name, 2), size=shape).astype(dtype)
            elif dtype == np.bool_:
                feed[inp.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def load_inputs(path: str | Path, ranks: Mapping[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds from an ``.npz``: one array per input. When every array has one more axis than its input
    (``ranks``), the leading axis is the sample axis: sample i is arr[i]."""
    try:
        data = dict(np.load(str(path), allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise LmcError(f"{path}: cannot read inputs ({exc})") from exc
    if not data:
        raise LmcError(f"{path}: holds no arrays")
    if ranks and all(name in ranks and arr.ndim == ranks[name] + 1 for name, arr in data.items()):
        n = min(len(arr) for arr in data.values())
        return [{name: arr[i] for name, arr in data.items()} for i in range(n)]
    return [data]


def _input_dtypes(model_path: str | Path) -> dict[str, np.dtype | None]:
    """Graph input name -> numpy dtype (None when the element type is unknown or not a numpy type)."""
    model = onnx.load(str(model_path), load_external_data=False)
    dtypes: dict[str, np.dtype | None] = {}
    for inp in model.graph.input:
        try:
            dtypes[inp.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            dtypes[inp.name] = None
    return dtypes


def with_values(model_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
                values: Mapping[str, np.ndarray] | None) -> list[dict[str, np.ndarray]]:
    """``feeds`` with the fixed input ``values`` added, each converted to the model's dtype for that input
    (the original of a bundle built with --input-value still has those inputs)."""
    if not values:
        return [dict(f) for f in feeds]
    dtypes = _input_dtypes(model_path)
    fixed = {}
    for name, value in values.items():
        value = np.asarray(value)
        dtype = dtypes.get(name)
        fixed[name] = value.astype(dtype) if dtype is not None else value
    return [{**f, **fixed} for f in feeds]


def compare(reference: np.ndarray, candidate: np.ndarray, name: str) -> OutputError:
    """Errors of ``candidate`` against ``reference``. Non-finite values must match exactly (NaN where NaN,
    ±inf where ±inf — a mismatch is an infinite error); the statistics cover the finite positions.
    Non-numeric outputs (strings) compare by equality."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise LmcError(f"output '{name}': shapes differ ({reference.shape} vs {candidate.shape})")
    if reference.dtype.kind in "OSU" or candidate.dtype.kind in "OSU":
        same = bool(np.array_equal(reference, candidate))
        return OutputError(name, 0.0 if same else np.inf, 0.0 if same else np.inf, 1.0 if same else 0.0)
    r = reference.astype(np.float64).ravel()
    c = candidate.astype(np.float64).ravel()
    finite_r, finite_c = np.isfinite(r), np.isfinite(c)

    def codes(x: np.ndarray) -> np.ndarray:      # NaN → 2, +inf → 1, −inf → −1
        return np.where(np.isnan(x), 2.0, np.sign(x))

    if not (np.array_equal(finite_r, finite_c) and np.array_equal(codes(r[~finite_r]), codes(c[~finite_c]))):
        return OutputError(name, np.inf, np.inf, 0.0)
    r, c = r[finite_r], c[finite_c]
    diff = np.abs(r - c)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    denom = float(np.linalg.norm(r) * np.linalg.norm(c))
    cosine = float(np.dot(r, c) / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return OutputError(name, max_abs, max_rel, cosine)


# Reassociation error grows with the element type's epsilon: the tolerance is at least this per dtype.
DTYPE_TOLERANCE = {np.dtype(np.float16): 4e-3}


def output_tolerance(tolerance: float, dtype: np.dtype) -> float:
    if str(dtype) == "bfloat16":
        return max(tolerance, 3e-2)
    return max(tolerance, DTYPE_TOLERANCE.get(np.dtype(dtype), 0.0)) if np.dtype(dtype).kind == "f" else tolerance


BUILD_HINT = "skip the check with --no-verify and run `lmc verify` on the bundle with representative inputs"
VERIFY_HINT = "give representative inputs with --inputs"


def _run_all(path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], names: list[str] | None = None,
             ours: bool = False, optimize: bool = True, hint: str = BUILD_HINT):
    """(output names, outputs per feed) of one model; the session is dropped before returning, so two
    large models are never resident at once. ``ours``: the model was produced by lmc, so onnxruntime
    refusing it is an internal error, not the user's. ``optimize``: onnxruntime's graph optimisations all on
    (its default) or all off. ``hint``: what the user can do when the model cannot run on ``feeds``."""
    try:
        sess = _load_session(path, low_memory=True, optimize=optimize)
    except LmcError as exc:
        if ours:
            raise RuntimeError(f"onnxruntime rejects the compiled model: {exc}") from exc
        raise
    try:
        return _run_session(sess, path, feeds, names, ours, hint)
    finally:
        del sess
        weights.release_freed()


def _run_session(sess, path, feeds, names, ours, hint):
    names = names or [o.name for o in sess.get_outputs()]
    available = {o.name for o in sess.get_outputs()}
    missing = [n for n in names if n not in available]
    if missing:
        raise LmcError(f"{path}: outputs missing: {', '.join(missing)}")
    inputs = {i.name for i in sess.get_inputs()}
    results = []
    for feed in feeds:
        absent = sorted(inputs - set(feed))
        if absent:
            raise LmcError(f"inputs missing a value: {', '.join(absent)}")
        try:
            results.append(sess.run(names, {k: v for k, v in feed.items() if k in inputs}))
        except Exception as exc:  # wrong dtype/shape/values in the inputs
            if ours:
                raise RuntimeError(f"onnxruntime cannot run the compiled model on inputs the original runs on "
                                   f"({str(exc).strip().splitlines()[0][:200]})") from exc
            raise LmcError(f"onnxruntime could not run {path} on the verification inputs "
                           f"({str(exc).strip().splitlines()[0][:200]}); {hint}") from exc
    return names, results


def _worst(names: list[str], ref_out, cand_out) -> dict[str, OutputError]:
    worst: dict[str, OutputError] = {}
    for r_out, c_out in zip(ref_out, cand_out):
        for name, r, c in zip(names, r_out, c_out):
            err = compare(r, c, name)
            old = worst.get(name)
            if old is None or err.max_rel > old.max_rel:
                worst[name] = err
    return worst


def measure_spread(model: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], names: list[str] | None = None,
                   optimized=None, hint: str = BUILD_HINT) -> dict[str, float]:
    """The model's own numerical spread per output: max_rel between onnxruntime with every graph optimisation
    off and with every one on, on ``feeds`` (``optimized``: the outputs with them on, when already run)."""
    if optimized is None:
        names, optimized = _run_all(model, feeds, names, hint=hint)
    names, plain = _run_all(model, feeds, names, optimize=False, hint=hint)
    return {n: e.max_rel for n, e in _worst(names, optimized, plain).items()}


def compare_models(reference: str | Path, candidate: str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
                   tolerance: float = DEFAULT_TOLERANCE, candidate_is_ours: bool = False,
                   spread: bool | None = None, spread_factor: float = SPREAD_FACTOR,
                   hint: str = BUILD_HINT, reference_values: Mapping[str, np.ndarray] | None = None) -> VerifyReport:
    """Run both models on ``feeds`` (one after the other) and compare every output by name (worst over
    samples). Each output may reach max(tolerance, ``spread_factor`` × the reference's own spread):
    ``spread`` True measures that spread always, None only when an output is over the plain tolerance,
    False never. ``feeds`` are the candidate's inputs; ``reference_values`` (inputs the candidate was built
    with fixed, ``--input-value``) are added to the reference's."""
    ref_feeds = with_values(reference, feeds, reference_values) if reference_values else feeds
    names, ref_out = _run_all(reference, ref_feeds, hint=hint)
    _, cand_out = _run_all(candidate, feeds, names, ours=candidate_is_ours, hint=hint)
    worst = _worst(names, ref_out, cand_out)
    tols = {}
    for name, r in zip(names, ref_out[0] if ref_out else []):
        tols[name] = output_tolerance(tolerance, np.asarray(r).dtype)
    over = any(not worst[n].max_rel <= tols.get(n, tolerance) for n in names)
    spreads: dict[str, float] = {}
    if spread or (spread is None and over):
        try:
            spreads = measure_spread(reference, ref_feeds, names, optimized=ref_out, hint=hint)
        except LmcError as exc:   # the original does not run unoptimised: judge by the tolerance alone
            log.warning("could not measure the original's numerical spread: %s", exc)
    outputs = []
    for name in names:
        err, tol = worst[name], tols.get(name, tolerance)
        s = spreads.get(name)
        allowed = max(tol, spread_factor * s) if s is not None and np.isfinite(s) else None
        outputs.append(OutputError(err.name, err.max_abs, err.max_rel, err.cosine,
                                   tol if tol != tolerance else None, s, allowed))
    return VerifyReport(tuple(outputs), len(feeds), tolerance, spread_factor=spread_factor)


def bundle_model_path(bundle: str | Path) -> Path:
    p = Path(bundle)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise LmcError(f"{bundle}: no bundle here (expected model.onnx)")
    return p


def verify(bundle: str | Path, against: str | Path, inputs: str | Path | None = None,
           tolerance: float = DEFAULT_TOLERANCE, samples: int = 1, seed: int = 0,
           tokens: str | Path | None = None, seq_len: int = 256, windows: int = 64) -> VerifyReport:
    """Compare a bundle (folder or model path) with the original model under onnxruntime; with ``tokens``
    also report both models' perplexity over the first ``windows`` windows of ``seq_len`` tokens."""
    model_path = bundle_model_path(bundle)
    from lmc.compiler.cbundle_check import is_c_bundle, verify_cbundle    # it imports this module

    # a C bundle: compiled with the host cc and run too (a generation bundle's C is a greedy runner: its tokens
    # are checked by lmc generate --on c; the bundle's model.onnx is verified below as every generation bundle's)
    if is_c_bundle(model_path.parent) and not is_generation_c(model_path.parent):
        if tokens is not None:
            raise LmcError("--tokens applies to language models; a C bundle is checked on inputs")
        if not os.path.isfile(against):
            raise LmcError(f"{against}: no such file")
        return verify_cbundle(model_path.parent, against, inputs, tolerance, samples, seed)

    if seq2seq_info(model_path) is not None:       # an encoder–decoder bundle against its export folder
        # deferred: seq2seq_verify builds on this module's compare and VerifyReport (an import cycle)
        from lmc.compiler.seq2seq_verify import verify_seq2seq

        return verify_seq2seq(model_path, against, inputs, tolerance, seed)
    if not os.path.isfile(against):
        raise LmcError(f"{against}: no such file")

    info = generation_info(model_path)
    if info is not None:
        return verify_generation(model_path, against, info, tolerance, seed, tokens, seq_len, windows)
    if inputs is not None:
        bundle_model = onnx.load(str(model_path), load_external_data=False)
        ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in bundle_model.graph.input}
        feeds = load_inputs(inputs, ranks)
    else:
        bundle_model = onnx.load(str(model_path), load_external_data=False)
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in bundle_model.graph.input}
        feeds = random_inputs(model_path, shapes, samples=samples, seed=seed)

    try:
        fixed = decode_input_values(build_metadata(bundle_model).get("input_values", ""))
    except ValueError as exc:
        raise LmcError(f"{model_path}: unreadable lmc.input_values metadata ({exc})") from exc
    report = compare_models(against, model_path, feeds, tolerance, spread=True, hint=VERIFY_HINT,
                            reference_values=fixed)
    if tokens is not None:
        windows_arr = load_tokens(tokens, seq_len, windows)
        ppl = {"original": perplexity(_load_session(against), windows_arr).perplexity,
               "bundle": perplexity(_load_session(model_path), windows_arr).perplexity}
        ppl["relative_change"] = ppl["bundle"] / ppl["original"] - 1.0
        report = VerifyReport(report.outputs, report.samples, report.tolerance, ppl, report.spread_factor)
    return report


HORIZON_FULL = 1024     # contexts up to this many tokens are checked to their last position
DECODE_STEPS = 16       # single-token steps at the end of a check of a model without windows


def check_spans(info) -> list[tuple[int, int]]:
    """The forward calls (start, end) of a generation check, over the whole horizon: token positions
    0 … L−1 with L = context (up to ``HORIZON_FULL``; beyond it max(HORIZON_FULL, 2·widest window + 2·chunk)),
    prefilled in the bundle's chunks, then the last D positions one token at a time, D = 2·widest window + 1
    (so decoding alone wraps every ring and crosses every window edge) or ``DECODE_STEPS`` without windows.
    Every position is compared, so a mask that differs anywhere up to L shows."""
    widest = max(info.windows, default=0)
    chunk = info.prefill_chunk or 64
    context = info.context
    length = context if context <= HORIZON_FULL else min(context, max(HORIZON_FULL, 2 * widest + 2 * chunk))
    decode = min(length - 1, 2 * widest + 1 if widest else DECODE_STEPS)
    prefill_end = length - decode
    return [(a, min(a + chunk, prefill_end)) for a in range(0, prefill_end, chunk)] + \
        [(i, i + 1) for i in range(prefill_end, length)]


def _model_bytes(path: str | Path) -> int:
    """Bytes of an ONNX model on disk: its file and the external data files it names."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = {external_data_helper.ExternalDataInfo(t).location for t in external_tensors(model)}
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in names if (path.parent / n).is_file())


PACKED_SHARE = 0.5      # a bundle runs as built in a check when its packed copies are at most this share of
                        # the reference's bytes


def candidate_session_options(reference: str | Path, candidate: str | Path, runtime: dict | None = None) -> dict:
    """How a check runs the bundle: under its own session options when the prepacked copies its plan
    predicts (``runtime``: the plan's runtime section, else its plan.json's) are at most ``PACKED_SHARE`` of
    the reference's bytes — a 4- or 8-bit bundle: unpacked, its MatMulNBits decode step is ~100× slower;
    otherwise (a float bundle, whose packed copies are its weights again) without prepacking
    (``LOW_MEMORY``: the check stays near one copy of the weights)."""
    if runtime is None:
        plan = Path(candidate).parent / "plan.json"
        runtime = json.loads(plan.read_text()).get("runtime") if plan.is_file() else None
    packed = (runtime or {}).get("items", {}).get("prepacked_weights")
    if packed is not None and packed <= PACKED_SHARE * _model_bytes(reference):
        return {}
    return LOW_MEMORY


def compare_generation(reference: str | Path, candidate: str | Path, vocab: int, prompt: int = 8, steps: int = 8,
                       tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
                       tokens: Sequence[int] | None = None, spans: Sequence[tuple[int, int]] | None = None,
                       runtime: dict | None = None) -> VerifyReport:
    """A generation bundle against the original past/present export: the same random tokens through both,
    in ``spans`` (forward calls (start, end); default: a ``prompt``-token prefill, then ``steps`` tokens one at a
    time) — the original driven present → past (``drivers.past_logits``: a segment of its weights held at a
    time), the bundle with its state in place; logits compared at every position, for every batch row of the
    bundle, prefill calls and single-token calls reported apart. The bundle runs under
    ``candidate_session_options`` (``runtime``: its plan's, when not yet written)."""
    batch = generation_info(candidate).batch
    if spans is None:
        spans = [(0, prompt)] + [(i, i + 1) for i in range(prompt, prompt + steps)]
    length = spans[-1][1]
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, vocab, (batch, length))
    tokens = np.asarray(tokens, dtype=np.int64).reshape(batch, -1)

    # one model at a time; the reference without prepacked copies, a segment of its weights at a time
    options = candidate_session_options(reference, candidate, runtime)
    reference_logits = past_logits(reference, tokens, spans)
    weights.release_freed()
    bundle = StateDecoder(candidate, session_options=options, warm_up=False)
    candidate_logits = [bundle.forward(tokens[:, a:b]) for a, b in spans]
    del bundle
    weights.release_freed()
    screened = greedy_head_errors(candidate, tokens, spans)
    worst: dict[str, OutputError] = {}
    for (a, b), r, c in zip(spans, reference_logits, candidate_logits):
        name = "logits (decode)" if b - a == 1 and a > 0 else "logits (prefill)"
        err = compare(r, c, name)
        if name not in worst or err.max_rel > worst[name].max_rel:
            worst[name] = err
    if screened:
        worst[GREEDY_HEAD] = max(screened, key=lambda e: e.max_rel)
    return VerifyReport(tuple(worst[n] for n in ("logits (prefill)", "logits (decode)", GREEDY_HEAD) if n in worst),
                        len(spans), tolerance)


GREEDY_HEAD = "greedy head (decode)"
# the kept logits are the full head's bit for bit under MLAS (lmc.passes.greedy_head, step 4); a runtime that
# sums in another order differs by that order only (≤ 9e-7 of the largest logit when MLAS splits a whole
# 64-column product across two threads, K = 896 and 2048): allowed, a wrong token is not
GREEDY_HEAD_ALLOWED = 1e-5


def greedy_head_errors(candidate: str | Path, tokens: np.ndarray, spans: Sequence[tuple[int, int]]
                       ) -> list[OutputError]:
    """For a bundle with a greedy head: each single-token span run twice on the same state — the full head,
    then (rewound) the greedy head — ``greedy_head_error`` of each pair. Under the bundle's own session
    options: its float head pre-packed, as it is deployed."""
    if not generation_info(candidate).greedy:
        return []
    bundle = StateDecoder(candidate, warm_up=False)
    errors = []
    for a, b in spans:
        full = bundle.forward(tokens[:, a:b])[:, -1]
        if b - a == 1:
            bundle.rewind(a)
            errors.append(greedy_head_error(full, bundle.decode_step(tokens[:, a], greedy=True)))
    return errors


def greedy_head_error(full: np.ndarray, screened: np.ndarray) -> OutputError:
    """A greedy-head step (``lmc.passes.greedy_head``) against the full head's logits on the same step,
    [rows, V] each: every token the step kept (finite) must carry the full head's logit, up to summation
    order, and the token it picks must be the full head's argmax, or tie with it within that rounding. The error is the larger of
    the gap over the kept tokens and the picked token's shortfall from the row's maximum, relative to the
    largest |logit|; the error allowed is ``GREEDY_HEAD_ALLOWED``."""
    full = np.asarray(full, np.float64).reshape(-1, np.shape(full)[-1])
    screened = np.asarray(screened, np.float64).reshape(full.shape)
    rows = np.arange(full.shape[0])
    kept = np.isfinite(screened)
    gap = float(np.abs(full[kept] - screened[kept]).max(initial=0.0))
    shortfall = float((full.max(axis=-1) - full[rows, screened.argmax(axis=-1)]).max(initial=0.0))
    error = max(gap, shortfall)
    scale = float(np.abs(full).max(initial=0.0))
    relative = error / scale if scale > 0 else error
    return OutputError(GREEDY_HEAD, error, relative, 1.0 if relative <= GREEDY_HEAD_ALLOWED else 0.0,
                       allowed=GREEDY_HEAD_ALLOWED)


def verify_generation(model_path: Path, against: str | Path, info, tolerance: float, seed: int,
                      tokens: str | Path | None, seq_len: int, windows: int) -> VerifyReport:
    """A generation bundle against its past/present original over the whole horizon (``check_spans``); with
    ``tokens`` also both perplexities, each streamed (the bundle token by token), judged against the
    original's own spread: its perplexity full-window vs token by token. The gap may reach
    max(tolerance, SPREAD_FACTOR × that spread), relative."""
    model = onnx.load(str(model_path), load_external_data=False)
    vocab = next(o for o in model.graph.output if o.name == info.logits).type.tensor_type.shape.dim[-1].dim_value
    report = compare_generation(against, model_path, vocab, spans=check_spans(info), tolerance=tolerance, seed=seed)
    if tokens is None:
        return report

    length = min(seq_len, info.context) if not info.window else seq_len
    windows_arr = load_tokens(tokens, length, windows)
    ppl = {"original": past_perplexity(against, windows_arr, chunk=length).perplexity,
           "bundle": streaming_perplexity(StateDecoder(model_path), windows_arr, chunk=1).perplexity}
    stepped = past_perplexity(against, windows_arr, chunk=1).perplexity
    ppl["relative_change"] = ppl["bundle"] / ppl["original"] - 1.0
    ppl["spread"] = abs(stepped / ppl["original"] - 1.0)
    ppl["allowed"] = max(tolerance, SPREAD_FACTOR * ppl["spread"])
    return VerifyReport(report.outputs, report.samples, report.tolerance, ppl)
