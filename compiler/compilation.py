"""What one build is: ``BuildOptions`` (validated once, at construction: enums from the CLI's strings,
generation-only flags refused without ``--context``, the attention spec parsed) and a ``Compilation`` — the
options, the resolved target, where new weights spill, how progress is reported — through which every pass
run of a build goes (the one-shot pipeline, both generation compiles, the quantization re-run, inspect,
encoder–decoder parts): one place makes the ``PassContext`` and the ``PassManager``."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs

from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext, PassManager, PassRecord
from lmc.compiler.backend import estimate_peak
from lmc.compiler.genai import tokenizer_sources
from lmc.compiler.verify import DEFAULT_TOLERANCE
from lmc.passes.prune import PruneSpec
from lmc.passes.quantize.w8a8 import CalibMethod
from lmc.passes.sparse_attention import AttentionSpec
from lmc.targets.cbundle.emit import EmitFormat, default_emit
from lmc.targets.target import INT4_BLOCK_SIZES, Int4Scheme, Target


class QuantizeMode(enum.Enum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    W8A8 = "w8a8"


def _choice(flag: str, kind: type[enum.Enum], value: Any) -> enum.Enum:
    """``value`` as a member of ``kind``: the member itself, or its value as the CLI spells it (any case)."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        for member in kind:
            if member.value == value.lower():
                return member
    raise LmcError(f"{flag} must be one of {', '.join(m.value for m in kind)}; got {value!r}")


@dataclass(frozen=True)
class BuildOptions:
    """What to build. ``input_shapes`` binds dynamic input dims (name -> dims); ``input_values`` fixes inputs'
    values (name -> a number or a (nested) list of numbers, JSON-able so the bundle's metadata records them):
    each such input becomes a constant, and control flow on it folds. The generation options (``batch``,
    ``prefill_chunk``, ``kv_cache``) are None unless given, and given only with ``context``, which sets the
    defaults of those left None (``GENERATION_DEFAULTS``); any other combination is an LmcError at
    construction (``__post_init__``). ``quantize`` and ``calib_method`` take their enum or the CLI's
    string for it (``"int8"``); another value is an LmcError listing the choices."""

    target: str = "cortex-a55"
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    input_values: Mapping[str, Any] = field(default_factory=dict)
    quantize: QuantizeMode = QuantizeMode.NONE
    attention: str = "dense"             # dense | chunked[:Q] | sliding:W[,sinks=S]
    max_ram: int | None = None           # bytes; None: the target's RAM budget
    allow_approx: bool = False           # --max-ram may choose quantization to fit
    inplace: bool = False                # plan elementwise/view outputs over their dying inputs
    ort_format: bool = False             # also write ORT Mobile files (model.ort + required_operators.config)
    block_size: int | None = None        # int4 block; None: the target's int4_block_size
    int4_scheme: Int4Scheme | None = None  # int4 codes with or without zero points; None: the target's int4_scheme
    table_bits: int | None = None        # bits of the embedding / tied head table (int4 mode: 8)
    calib: str | None = None
    calib_samples: int = 32
    calib_method: str = "mse"            # w8a8 activation clip: mse | minmax | percentile | entropy
    disabled_passes: tuple[str, ...] = ()
    context: int | None = None           # generation bundle: cache slots (past/present decoders only)
    batch: int | None = None             # generation bundle: batch rows
    prefill_chunk: int | None = None     # generation bundle: prompt tokens per step (bounds prefill memory)
    kv_cache: str | None = None          # generation bundle: cache precision, float | int8 (approximate)
    encoder_length: int | None = None    # encoder–decoder bundle: the encoder's sequence length (lmc.compiler.seq2seq)
    tokenizer: str | None = None         # generation bundle: tokenizer.json or its folder, copied for onnxruntime-genai
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0
    prune: str | None = None             # mlp=F[,heads=F][,kv=F]: structured pruning (approximate, needs calib)
    prune_per_layer: bool = False        # the same share from every layer instead of one global ranking
    emit: EmitFormat | None = None       # onnx | c (a C bundle beside model.onnx); None: the target's default
    attention_spec: AttentionSpec = field(init=False, repr=False, compare=False)    # ``attention``, parsed once
    prune_spec: PruneSpec | None = field(init=False, repr=False, compare=False)     # ``prune``, parsed once

    def emit_format(self, target: Target) -> EmitFormat:
        """What the bundle is for ``target``: ``--emit``, else the target's default (C where weights live in
        flash)."""
        return self.emit or default_emit(target)

    def __post_init__(self):
        object.__setattr__(self, "attention_spec", AttentionSpec.parse(str(self.attention or "dense")))
        object.__setattr__(self, "quantize", _choice("--quantize", QuantizeMode, self.quantize))
        object.__setattr__(self, "prune_spec", PruneSpec.parse(self.prune, self.prune_per_layer) if self.prune else None)
        if self.prune_per_layer and not self.prune:
            raise LmcError("--prune-per-layer applies only with --prune")
        if self.prune and not self.calib:
            raise LmcError("--prune needs --calib calib.npz: which channels and heads go, and the compensation, "
                           "are measured on it")
        object.__setattr__(self, "calib_method", _choice("--calib-method", CalibMethod, self.calib_method).value)
        if self.block_size is not None and self.block_size not in INT4_BLOCK_SIZES:
            raise LmcError(f"--block-size must be a power of two from 16 to 256, got {self.block_size}")
        if self.emit is not None:
            object.__setattr__(self, "emit", _choice("--emit", EmitFormat, self.emit))
        if self.int4_scheme is not None:
            object.__setattr__(self, "int4_scheme", _choice("--int4-scheme", Int4Scheme, self.int4_scheme))
        generation = {name: getattr(self, name) for name in GENERATION_DEFAULTS}
        if self.tokenizer is not None:
            if self.context is None:
                raise LmcError("--tokenizer applies only to a generation bundle: add --context N or drop it")
            tokenizer_sources(self.tokenizer)          # a missing or unreadable tokenizer: one line, now
        if self.context is None:
            given = [name for name, value in generation.items() if value is not None]
            if given:
                flags = ", ".join("--" + name.replace("_", "-") for name in given)
                verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
                raise LmcError(f"{flags} {verb} only to a generation bundle: add --context N or drop {them}")
            return
        if self.context < 2:
            raise LmcError(f"--context must be at least 2 tokens, got {self.context}")
        if self.input_shapes:
            raise LmcError("--context binds the sequence and cache lengths itself; drop --input-shape")
        if self.input_values:
            raise LmcError("--context binds a decoder's inputs itself; drop --input-value")
        for name, value in generation.items():
            if value is None:
                object.__setattr__(self, name, GENERATION_DEFAULTS[name])
        if self.batch < 1:
            raise LmcError(f"--batch must be at least 1, got {self.batch}")
        if self.kv_cache not in ("float", "int8"):
            raise LmcError(f"--kv-cache must be float or int8, got {self.kv_cache!r}")
        if self.prefill_chunk < 1:
            raise LmcError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")

    @property
    def approximations(self) -> list[str]:
        """The options that change the model's numerics (quantization, sliding attention, an int8 cache);
        empty = exact."""
        found = [self.quantize.value] if self.quantize is not QuantizeMode.NONE else []
        spec = self.attention_spec
        kv = ["kv-cache int8"] if self.context is not None and self.kv_cache == "int8" else []
        pruned = [f"prune {self.prune_spec}"] if self.prune_spec else []
        return pruned + found + ([] if spec.exact else [str(spec)]) + kv


GENERATION_DEFAULTS = {"batch": 1, "prefill_chunk": 64, "kv_cache": "float"}    # given only with context


@dataclass
class Compilation:
    """One build's fixed facts and the only way its passes run. ``spill``: a ``weights.SpillFile`` for large
    weights passes create; ``progress(label, done, total)`` for long work; ``on_pass(record)`` after each run
    (reported runs only)."""

    options: BuildOptions
    target: Target
    spill: Any = None
    progress: Callable[[str, int, int], None] | None = None
    on_pass: Callable[[PassRecord], None] | None = None

    def context(self, masks: dict | None = None) -> PassContext:
        return PassContext(target=self.target, options=self.options, progress=self.progress, spill=self.spill,
                           masks=masks)

    def run(self, graph: gs.Graph, pipeline: Sequence, masks: dict | None = None, report: bool = True
            ) -> tuple[gs.Graph, list[PassRecord]]:
        """Run ``pipeline`` on ``graph`` under this build's context; each run's record goes to ``on_pass`` when
        ``report`` (a generation build reports its second compile only)."""
        manager = PassManager(pipeline, self.context(masks),
                              peak_estimator=lambda g: estimate_peak(g, self.target.memory.alignment),
                              on_pass=self.on_pass if report else None)
        return manager.run(graph)
