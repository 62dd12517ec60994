"""Weight-only quantization (approximate): int8 per channel, or int4 block-wise; activations stay float.

Rewrites, for constant weights of at least ``min_elements`` elements (scales: ``lmc.passes.quantize.scales``,
weighted by calibration second moments of the input features when calibration data is given):

- ``MatMul(x, W[K, N])`` → ``MatMul(x, DequantizeLinear(Q, s))`` with
  int8: Q int8 [K, N], s [N], axis 1 (per output channel);
  int4: Q int4 [K, N], s [K/B, N], axis 0, ``block_size`` B (opset 21) — the form onnxruntime fuses into
  ``MatMulNBits`` (both), so the float weight is never materialised.
- ``Gemm`` (B constant) likewise, ``Conv`` weights int8 per output channel (axis 0).
- A table read by ``Gather`` (an embedding), alone or tied to an lm head (``FusedMatMul(x, T, transB=1)``
  or ``Gemm(x, T, transB=1)``): stored once as unsigned ``bits``-bit blocks along its rows
  [V, D/B, B·bits/8] with scales [V, D/B]; the head becomes ``com.microsoft.MatMulNBits`` and the gather
  ``com.microsoft.GatherBlockQuantized`` over the same bytes — the table is quantized once and stays
  shared, and no float copy of it exists at run time. Without those kernels on the target, the gather
  falls back to DequantizeLinear + Gather (whose float table the memory plan counts).

Weights may be float32 or float16: a float16 weight's scales are float16, so its DequantizeLinear yields
float16 as its readers expect (a float16 table takes the int8 DequantizeLinear + Gather form; a tied float16
table stays float). bfloat16 (or double) weights are refused with an ``LmcError``: onnxruntime has no CPU
DequantizeLinear producing them.

Each quantized weight's relative error ‖W − Ŵ‖_h / ‖W‖_h (h-weighted) is recorded in the pass stats, and
the notes name every float weight left unquantized, with the reason.

GPTQ (int4 with calibration) needs the Gram matrix XᵀX of each weight's input — K×K float32, 3.7 GiB for all
of a 1.1B Llama's. They are collected in groups of at most ``gram_budget()`` bytes (``plan_gram_groups``),
one calibration pass of the same onnxruntime session per group, in the order the weights are quantized, and
each is freed once the last weight reading it is done (weights sharing an input share its Gram). The
result is byte-identical to collecting them all at once; the pass stats give ``calibration_passes`` and
``gram_peak_bytes``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.core.perplexity import log_softmax
from lmc.core.runtime import session
from lmc.passes.quantize.calibration import Calibrator, ChannelStats, collect
from lmc.passes.quantize.gram import GRAM_DTYPE
from lmc.passes.quantize.scales import (GptqFactor, gptq_blocks, gptq_prepare, pack_int4, pack_uint4,
                                       pack_uint4_flat, quantize_blocks, quantize_blocks_asymmetric,
                                       quantize_channels)

log = logging.getLogger(__name__)

NARROW_INT8_MAX = 63     # 7-bit weights: u8 × s8 pair sums stay within int16 (2 · 255 · 63 ≤ 32767)


# Weight dtypes quantized (DequantizeLinear yields the scale's dtype: float32 or float16 on onnxruntime's CPU).
QUANTIZABLE_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
FLOAT_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def _np_dtype(const: gs.Constant):
    """The numpy dtype of a float32/float16 constant (what its scales and dequantized values use)."""
    return np.float16 if ir.onnx_dtype(const.dtype) == onnx.TensorProto.FLOAT16 else np.float32


SPILL_EVERY = 8      # weights quantized between moves of the new ones to the build's spill file


class WeightBits(enum.IntEnum):
    INT8 = 8
    INT4 = 4


@dataclass
class WeightReport:
    name: str
    shape: tuple[int, ...]
    bits: int
    rel_error: float


@dataclass
class QuantizeConfig:
    bits: WeightBits
    block_size: int = 32
    table_bits: int | None = None            # bits for Gather tables (embedding / tied head); None: int8 mode 8;
                                             # int4 mode 4 with calibration (GPTQ), else 8
    min_elements: int = 4096
    search: bool = True
    asymmetric: bool = True                  # int4 MatMul weights: uint4 with a zero point per block
    gptq: bool = True                        # int4 with calibration: GPTQ error compensation
    stats: dict[str, ChannelStats] = field(default_factory=dict)   # activation name -> stats
    calib_feeds: list[dict] | None = None     # when given, ``stats`` are collected from these feeds first
    narrow_int8: frozenset[str] = frozenset()  # int8 weights quantized in [-63, 63] (see scales.quantize_channels)


def _int4_constant(name: str, q: np.ndarray, unsigned: bool = False) -> gs.Constant:
    dtype = onnx.TensorProto.UINT4 if unsigned else onnx.TensorProto.INT4
    data = pack_uint4_flat(q) if unsigned else pack_int4(q)
    proto = onnx.helper.make_tensor(name, dtype, list(q.shape), data, raw=True)
    return gs.Constant(name, LazyValues(proto))


def _rel_error(w: np.ndarray, w_hat_rows, h: np.ndarray | None, feature_axis: int) -> float:
    """‖W − Ŵ‖_h / ‖W‖_h, in row chunks: ``w_hat_rows(r0, r1)`` gives Ŵ[r0:r1] (float32), so no full-size
    temporary (dequantized copy, float64 squares) of a large weight ever exists. Squares are summed in
    float32 along one axis of a chunk and in float64 across."""
    rows = w.shape[0]
    per_row = max(1, int(np.prod(w.shape[1:])))
    step = max(1, (1 << 20) // per_row)
    by_column = h is not None and feature_axis != 0        # h per column of a 2-D weight
    hv = None if h is None else np.asarray(h, np.float64).reshape(-1)
    num = den = 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wr = np.asarray(w[r0:r1], dtype=np.float32).reshape(r1 - r0, -1)
        d = wr - np.asarray(w_hat_rows(r0, r1), dtype=np.float32).reshape(r1 - r0, -1)
        spec = "ij,ij->j" if by_column else "ij,ij->i"
        dn = np.einsum(spec, d, d).astype(np.float64)
        rn = np.einsum(spec, wr, wr).astype(np.float64)
        if hv is not None:
            hr = hv if by_column else hv[r0:r1]
            dn, rn = dn * hr, rn * hr
        num += float(dn.sum())
        den += float(rn.sum())
    return float(np.sqrt(num / max(den, 1e-30)))


# A tied table goes to 4 bits only if that moves the model's output distribution by at most this KL
# divergence (nats per token) on the calibration data — roughly the log-perplexity it would cost (0.04 ≈ 4%),
# leaving room for the other int4 weights within a ~6% perplexity budget.
TABLE_KL_BUDGET = 0.04
KL_SAMPLES = 8


def _gptq_batch(k: int, block: int) -> int:
    """The lazy-update batch: a multiple of the block dividing K, near 128."""
    batch = block * max(1, 128 // block)
    while k % batch:
        batch -= block
    return batch


def _pow2_block(d: int, preferred: int) -> int | None:
    """The largest power of two ≤ ``preferred`` (and ≥ 16) dividing d."""
    b = preferred
    while b >= 16:
        if d % b == 0:
            return b
        b //= 2
    return None


# GPTQ's Gram matrices (K×K, ``gram.GRAM_DTYPE``: 121 MiB for K = 5632) are collected and used in
# groups, one calibration pass per group (a Gram larger than the budget is a group of its own); each is freed
# after the last weight reading its input is quantized. A pass is a forward of the float model over every
# calibration sample (100 s for a 1.1B Llama over 32 × 256 tokens on two cores; its 169 MiB of Grams per
# layer take 22 passes at 256 MiB, one at 4 GiB), so the budget is a quarter of the memory available, within
# GRAM_MIN_BYTES … GRAM_BUDGET_BYTES (``gram_budget``); the bytes written never depend on it.
GRAM_BUDGET_BYTES = 4 << 30
GRAM_MIN_BYTES = 256 << 20


def gram_budget() -> int:
    """Bytes of Gram matrices to hold at once: MemAvailable / 4 (``/proc/meminfo``; GRAM_MIN_BYTES where it
    cannot be read), within GRAM_MIN_BYTES … GRAM_BUDGET_BYTES — never above GRAM_BUDGET_BYTES."""
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return min(GRAM_BUDGET_BYTES, max(GRAM_MIN_BYTES, available // 4))


@dataclass
class GramGroup:
    start: int                 # index (into the needs) of the first weight that reads the group's Grams
    names: list[str]           # the activations whose Grams one calibration pass collects
    peak_bytes: int            # Grams held while the group's first weight is quantized (earlier ones included)


def plan_gram_groups(needs: list[str], sizes: dict[str, int], budget: int = GRAM_BUDGET_BYTES,
                     start: int = 0, live: dict[str, int] | None = None) -> list[GramGroup]:
    """Cut the Gram matrices that the weights ``needs`` (one activation name per weight, in the order the
    weights are quantized) read into groups: a group starts where a weight needs a Gram not held, and takes
    that Gram and the next new ones while everything held stays within ``budget`` bytes. A Gram is held
    from its group's pass until its last reader; ``live`` (name → index of its last reader) are held already."""
    last = {name: i for i, name in enumerate(needs)}
    held = dict(live or {})
    groups: list[GramGroup] = []
    for i in range(start, len(needs)):
        name = needs[i]
        held = {n: end for n, end in held.items() if end >= i}
        if name in held:
            continue
        names, total = [], sum(sizes[n] for n in held)
        for j in range(i, len(needs)):
            cand = needs[j]
            if cand in held or cand in names:
                continue
            if names and total + sizes[cand] > budget:
                break
            names.append(cand)
            total += sizes[cand]
        for n in names:
            held[n] = last[n]
        groups.append(GramGroup(i, names, total))
    return groups


class _GramStore:
    """Gram matrices handed out in the order the weights are quantized (``needs``), collected group by group
    (``plan_gram_groups``) from one calibration session, factored for GPTQ once (``gptq_prepare``: the
    weights sharing an input share the factor) and freed after their last predicted reader. A Gram asked
    for out of turn is collected again (one more pass): the results never depend on the grouping."""

    def __init__(self, calibrator, needs: list[str], sizes: dict[str, int], budget: int, report=None):
        self.calibrator, self.needs, self.sizes, self.budget = calibrator, needs, sizes, budget
        self.report = report
        self.held: dict[str, np.ndarray] = {}
        self.uses = {name: needs.count(name) for name in set(needs)}
        self.position = 0              # index into needs of the next weight expected
        self.peak_bytes = 0
        self.groups = 0

    def first_pass(self, tensors: list[str]):
        """The first calibration pass: statistics of every tensor, and the first group's Grams."""
        names = self._next_group(0)
        stats = self.calibrator.run(tensors, gram=names, progress=self._progress())
        self._hold(names, stats)
        return stats

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.calibrator.tensors:
            return None
        if name not in self.held:
            i = self.needs.index(name, self.position) if name in self.needs[self.position:] else None
            names = self._next_group(i) if i is not None else [name]
            if name not in names:
                names = [name]
            self._hold(names, self.calibrator.run(names, gram=names, progress=self._progress()))
        gram = self.held[name]
        if not isinstance(gram, GptqFactor):       # its first reader: factor it once for all of them
            handed = [self.held.pop(name)]         # handed over: damped in place, freed once inverted
            del gram
            gram = self.held[name] = gptq_prepare(handed)
        self.uses[name] = self.uses.get(name, 1) - 1
        if name in self.needs[self.position:]:
            self.position = self.needs.index(name, self.position) + 1
        if self.uses[name] <= 0:
            del self.held[name]
        return gram

    def _next_group(self, i: int) -> list[str]:
        if i >= len(self.needs):
            return []
        live = {n: max((j for j, m in enumerate(self.needs) if m == n), default=-1) for n in self.held}
        groups = plan_gram_groups(self.needs, self.sizes, self.budget, start=i, live=live)
        return groups[0].names if groups else []

    def _hold(self, names, stats) -> None:
        for n in names:
            self.held[n] = stats[n].gram
            stats[n].gram = None
        self.groups += 1
        self.peak_bytes = max(self.peak_bytes, sum(g.nbytes for g in self.held.values()))

    def _progress(self):
        if self.report is None:
            return None
        label = f"calibrating (pass {self.groups + 1})" if self.groups else "calibrating"
        return lambda i, n: self.report(label, i, n)

    def close(self) -> None:
        self.held.clear()
        self.calibrator.close()


class QuantizeWeights:
    kind = PassKind.APPROXIMATE
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def __init__(self, config: QuantizeConfig):
        self.given = config                    # never changed: each run starts from a copy of it
        self.config = replace(config)
        self.name = f"quantize-weights-int{int(config.bits)}"
        self.reports: list[WeightReport] = []
        self.gram_budget = gram_budget()
        self._grams: _GramStore | None = None

    # -------------------------------------------------------------------------------------------
    def _importance(self, activation: gs.Tensor) -> np.ndarray | None:
        st = self.config.stats.get(activation.name)
        if st is None:
            return None
        return np.maximum(st.second_moment, 1e-12 * max(float(st.second_moment.max()), 1e-30))

    def _gram(self, activation: str) -> np.ndarray | GptqFactor | None:
        st = self.config.stats.get(activation)
        if st is not None and st.gram is not None:
            return st.gram
        return self._grams.get(activation) if self._grams is not None else None

    def _calibrate(self, graph: gs.Graph) -> None:
        """Second moments of every activation that multiplies a quantizable weight; for GPTQ, a session kept
        for collecting their Gram matrices group by group (``GRAM_BUDGET_BYTES``) as the weights need them."""
        wanted = set()
        for const in ir.constants(graph):
            for node in const.outputs:
                if ir.is_op(node, ("MatMul", "Gemm")) and node.inputs[1] is const:
                    wanted.add(node.inputs[0].name)
                elif ir.is_op(node, "FusedMatMul", ir.MS_DOMAIN) and node.inputs[1] is const:
                    wanted.add(node.inputs[0].name)
        wanted = sorted(n for n in wanted if n)
        if not wanted:
            return
        log.info("calibrating %d activations on %d samples", len(wanted), len(self.config.calib_feeds))
        gptq = self.config.bits == WeightBits.INT4 and self.config.gptq
        if self.config.table_bits is None and self.config.bits == WeightBits.INT4:
            self.config.table_bits = 4     # GPTQ keeps a 4-bit tied table accurate
        if not gptq:
            self.config.stats = collect(graph, wanted, self.config.calib_feeds,
                                        progress=lambda i, n: self._ctx.report("calibrating", i, n))
            return
        needs = [(name, k) for name, k in self._gram_needs(graph) if name in wanted]
        sizes = {name: k * k * np.dtype(GRAM_DTYPE).itemsize for name, k in needs}
        calibrator = Calibrator(graph, wanted, self.config.calib_feeds, low_memory=True)
        self._grams = _GramStore(calibrator, [name for name, _ in needs], sizes, self.gram_budget,
                                 self._ctx.report)
        try:
            self.config.stats = self._grams.first_pass(wanted)
        except BaseException:
            self._grams.close()
            self._grams = None
            raise

    def _gram_needs(self, graph: gs.Graph) -> list[tuple[str, int]]:
        """(input activation, K) of every weight GPTQ will quantize, in the order ``run`` quantizes them (the
        prediction that plans the Gram groups; a wrong one costs a pass, never a different result)."""
        needs, tables = [], []
        bits = int(self.config.table_bits or 8)
        for const in ir.constants(graph):
            shape = list(const.shape or [])
            if ir.onnx_dtype(const.dtype) not in QUANTIZABLE_DTYPES or len(shape) != 2 \
                    or int(np.prod(shape)) < self.config.min_elements:
                continue
            readers = list(const.outputs)
            gathers = [n for n in readers if ir.is_op(n, "Gather") and n.inputs[0] is const
                       and int(n.attrs.get("axis", 0)) == 0]
            heads = [n for n in readers if n not in gathers and self._is_transposed_head(n, const)]
            if gathers and len(gathers) + len(heads) == len(readers):
                if heads and bits == 4 and _pow2_block(shape[1], self.config.block_size) \
                        and self._table_kernels(self._ctx, heads) and ir.onnx_dtype(const.dtype) == onnx.TensorProto.FLOAT:
                    tables.append((heads[0].inputs[0].name, shape[1]))
                continue
            matmuls = [n for n in readers if ir.is_op(n, "MatMul") and n.inputs[1] is const]
            gemms = [n for n in readers if ir.is_op(n, "Gemm") and n.inputs[1] is const]
            if matmuls and len(matmuls) == len(readers):
                k = shape[0]
            elif gemms and len(gemms) == len(readers) and all(self._plain_gemm(n) for n in gemms):
                k = shape[1] if int(gemms[0].attrs.get("transB", 0)) else shape[0]
            else:
                continue
            if _pow2_block(k, self.config.block_size):
                needs.append((readers[0].inputs[0].name, k))
        return needs + tables

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Quantize ``graph``'s weights. Every run starts afresh from the configuration it was made with
        (calibration statistics, the table's bits and the per-weight reports of one run never reach the next)."""
        self._ctx = ctx
        self.config = replace(self.given, stats=dict(self.given.stats))
        self.reports = []
        try:
            if self.config.calib_feeds and not self.config.stats:
                self._calibrate(graph)
            result = self._quantize(graph, ctx)
        finally:
            grams, self._grams = self._grams, None
            if grams is not None:
                grams.close()
        if grams is not None:
            result.stats.update({"calibration_passes": grams.calibrator.passes, "gram_peak_bytes": grams.peak_bytes})
        return result

    def _quantize(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = ir.Namer(graph)
        counts = {"matmul": 0, "gemm": 0, "conv": 0, "table": 0, "tied_table": 0}
        notes: list[str] = []
        consts = ir.constants(graph)
        self._check_dtypes(consts)
        tables = []
        small: list[str] = []
        for done, const in enumerate(consts):
            ctx.report("quantizing weights", done, len(consts))
            if ctx.spill is not None and done % SPILL_EVERY == 0:
                ir.spill_constants(graph, ctx.spill)     # what is quantized so far leaves the process
            size = int(np.prod(const.shape)) if const.shape else 1
            if ir.onnx_dtype(const.dtype) not in QUANTIZABLE_DTYPES:
                continue                        # integer constants (shapes, ids) are not weights
            if size < self.config.min_elements:
                small.append(const.name)
                continue
            readers = list(const.outputs)
            gathers = [n for n in readers if ir.is_op(n, "Gather") and n.inputs[0] is const
                       and int(n.attrs.get("axis", 0)) == 0]
            heads = [n for n in readers if n not in gathers and self._is_transposed_head(n, const)]
            if gathers and len(gathers) + len(heads) == len(readers) and len(const.shape) == 2:
                tables.append((const, gathers, heads))    # last: its precision is measured on the rest
                continue
            matmuls = [n for n in readers if ir.is_op(n, "MatMul") and n.inputs[1] is const and n.inputs[0] is not const]
            if matmuls and len(matmuls) == len(readers) and len(const.shape) == 2:
                self._quantize_matmul_weight(graph, const, matmuls, names)
                counts["matmul"] += 1
                continue
            gemms = [n for n in readers if ir.is_op(n, "Gemm") and n.inputs[1] is const and n.inputs[0] is not const]
            if gemms and len(gemms) == len(readers) and len({int(n.attrs.get("transB", 0)) for n in gemms}) == 1:
                if self.config.bits == WeightBits.INT4 and all(self._plain_gemm(n) for n in gemms):
                    matmul_weight = self._gemms_to_matmuls(graph, const, gemms, names)
                    self._quantize_matmul_weight(graph, matmul_weight, list(matmul_weight.outputs), names)
                else:
                    self._quantize_gemm_weight(graph, const, gemms, names)
                counts["gemm"] += 1
                continue
            convs = [n for n in readers if ir.is_op(n, "Conv") and n.inputs[1] is const]
            if convs and len(convs) == len(readers):
                self._dequantized(graph, const, convs, 1, *self._int8(const, axis=0), axis=0, names=names)
                counts["conv"] += 1
                continue
            notes.append(f"{const.name} {list(const.shape)} {_dtype_name(ir.onnx_dtype(const.dtype))}: left "
                         f"unquantized — read by {self._describe_readers(const)}, not only as the weight of "
                         "MatMul, Gemm, Conv or an embedding Gather")
        if small:
            notes.append(f"{len(small)} weights under {self.config.min_elements} elements left unquantized "
                         f"(too small to pay for their scales): {', '.join(small)}")
        if ctx.spill is not None:
            ir.spill_constants(graph, ctx.spill)
        for const, gathers, heads in tables:
            kind = self._quantize_table(graph, const, gathers, heads, ctx, names, notes)
            if kind:
                counts[kind] += 1
        q_bytes = sum(ir.tensor_nbytes(c) or 0 for c in ir.constants(graph))
        stats: dict[str, int | float] = {f"{k}_weights": v for k, v in counts.items() if v}
        if self.reports:
            errs = [r.rel_error for r in self.reports]
            stats.update({"weights_quantized": len(self.reports), "mean_rel_error": float(np.mean(errs)),
                          "max_rel_error": float(np.max(errs)), "weight_bytes_after": q_bytes})
            notes += [f"{r.name} {list(r.shape)} int{r.bits}: weighted relative error {r.rel_error:.4f}"
                      for r in self.reports]
        return PassResult(graph, modified=bool(self.reports), stats=stats, notes=notes)

    # ------------------------------------------------------------------------------------ pieces
    def _check_dtypes(self, consts: list[gs.Constant]) -> None:
        """Refuse float weights of a dtype no onnxruntime CPU DequantizeLinear yields (bfloat16, double)."""
        refused = [c for c in consts if ir.onnx_dtype(c.dtype) in FLOAT_DTYPES
                   and ir.onnx_dtype(c.dtype) not in QUANTIZABLE_DTYPES
                   and (int(np.prod(c.shape)) if c.shape else 1) >= self.config.min_elements]
        if refused:
            kinds = sorted({_dtype_name(ir.onnx_dtype(c.dtype)) for c in refused})
            shown = ", ".join(c.name for c in refused[:5]) + (f" (+{len(refused) - 5} more)" if len(refused) > 5 else "")
            raise LmcError(f"--quantize int{int(self.config.bits)}: {len(refused)} weights are {'/'.join(kinds)} "
                           f"({shown}); onnxruntime has no CPU DequantizeLinear producing {'/'.join(kinds)}, so "
                           "they cannot be quantized — convert the model to float32 or float16 first")

    @staticmethod
    def _describe_readers(const: gs.Constant) -> str:
        ops = sorted({n.op for n in const.outputs})
        return ", ".join(ops) if ops else "no node"

    def _token_distribution_shift(self, graph: gs.Graph, const: gs.Constant, w_hat: np.ndarray,
                                  heads: list[gs.Node]) -> float | None:
        """Mean KL(p_table ‖ p_table′) per output row on calibration samples, where p is the softmax of the
        output the tied head feeds (the next-token distribution) with the table in float vs dequantized.
        None when there is no calibration data or the output is not the head's vocabulary axis."""
        feeds = (self.config.calib_feeds or [])[:KL_SAMPLES]
        out = graph.outputs[0] if graph.outputs else None
        if not feeds or out is None or (out.shape or [None])[-1] != const.shape[0]:
            return None

        def logits() -> list[np.ndarray]:
            sess = session(ir.to_model(graph))
            inputs = {i.name for i in sess.get_inputs()}
            return [sess.run([out.name], {k: v for k, v in f.items() if k in inputs})[0] for f in feeds]

        reference = logits()
        # in-memory values for this one export (a file-backed table's data_location would mark them external)
        original, location = const._values, getattr(const, "data_location", None)
        const._values, const.data_location = w_hat.astype(np.float32), None
        try:
            candidate = logits()
        finally:
            const._values, const.data_location = original, location
        total, rows = 0.0, 0
        for r, c in zip(reference, candidate):
            lp, lq = log_softmax(r.reshape(-1, r.shape[-1])), log_softmax(c.reshape(-1, c.shape[-1]))
            total += float((np.exp(lp) * (lp - lq)).sum())
            rows += lp.shape[0]
        return total / max(rows, 1)

    @staticmethod
    def _is_transposed_head(node: gs.Node, const: gs.Constant) -> bool:
        if ir.is_op(node, "FusedMatMul", ir.MS_DOMAIN):
            return (node.inputs[1] is const and int(node.attrs.get("transB", 0)) == 1
                    and int(node.attrs.get("transA", 0)) == 0 and float(node.attrs.get("alpha", 1.0)) == 1.0)
        if ir.is_op(node, "Gemm"):
            return (node.inputs[1] is const and int(node.attrs.get("transB", 0)) == 1 and len(node.inputs) == 2
                    and int(node.attrs.get("transA", 0)) == 0 and float(node.attrs.get("alpha", 1.0)) == 1.0)
        return False

    def _int8(self, const: gs.Constant, axis: int, importance=None):
        w = ir.const_value(const)
        qmax = NARROW_INT8_MAX if const.name in self.config.narrow_int8 else 127
        q, s = quantize_channels(w, axis, importance, self.config.search, qmax)
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.astype(_np_dtype(const))      # float16 weights: float16 scales (the dequantized dtype)
        s32 = s.astype(np.float32)

        def w_hat(r0, r1):
            return q[r0:r1].astype(np.float32) * (s32[r0:r1].reshape([-1] + [1] * (w.ndim - 1)) if axis == 0
                                                  else s32.reshape(shape))
        feat = 1 - axis if w.ndim == 2 else axis
        self.reports.append(WeightReport(const.name, tuple(w.shape), 8, _rel_error(w, w_hat, importance, feat)))
        return gs.Constant(const.name + "_q", q), gs.Constant(const.name + "_scale", s)

    def _dequantized(self, graph, const, consumers, slot, q, scale, axis, names, block_size=None, zero=None):
        out = gs.Variable(names.fresh(const.name + "_dq"), dtype=_np_dtype(const), shape=list(const.shape))
        q.name, scale.name = names.fresh(q.name), names.fresh(scale.name)
        attrs = {"axis": axis}
        if block_size:
            attrs["block_size"] = block_size
        graph.nodes.append(gs.Node("DequantizeLinear", name=names.fresh(const.name + "_DequantizeLinear"),
                                   attrs=attrs, inputs=[q, scale] + ([zero] if zero is not None else []),
                                   outputs=[out]))
        for node in consumers:
            node.inputs[slot] = out

    def _quantize_matmul_weight(self, graph, const, matmuls, names) -> None:
        w = ir.const_value(const)
        k, n = w.shape
        h = self._importance(matmuls[0].inputs[0])
        block = _pow2_block(k, self.config.block_size) if self.config.bits == WeightBits.INT4 else None
        if self.config.bits == WeightBits.INT4 and block:
            # Q [K, N], scales (and zero points) [K/B, N]: blocks along K, the layout DequantizeLinear takes
            zero = z = None
            stats = self.config.stats.get(matmuls[0].inputs[0].name)
            gram = self._gram(matmuls[0].inputs[0].name) if self.config.gptq and stats is not None else None
            if gram is not None:
                qt, st, zt = gptq_blocks(w.T, gram, block, 4, batch=_gptq_batch(k, block),
                                         symmetric=not self.config.asymmetric)
                del gram
                q, s = np.ascontiguousarray(qt.T), np.ascontiguousarray(st.T)
                z = None if zt is None else np.ascontiguousarray(zt.T)
                del qt, st, zt
            elif self.config.asymmetric:
                q, s, z = quantize_blocks_asymmetric(w, block, 4, h, self.config.search, axis=0)
            else:
                q, s = quantize_blocks(w, block, 4, h, self.config.search, axis=0)
            if z is not None:
                zero = _int4_constant(names.fresh(const.name + "_zp4"), z, unsigned=True)
            s = s.astype(_np_dtype(const))      # float16 weights: float16 scales
            s32 = s.astype(np.float32)

            def w_hat(r0, r1):
                rows = np.arange(r0, r1) // block
                out = q[r0:r1].astype(np.float32)
                if z is not None:
                    out -= z[rows]
                out *= s32[rows]
                return out
            self.reports.append(WeightReport(const.name, (k, n), 4, _rel_error(w, w_hat, h, 0)))
            qc = _int4_constant(names.fresh(const.name + "_q4"), q, unsigned=z is not None)
            scale = gs.Constant(const.name + "_scale", s)
            self._dequantized(graph, const, matmuls, 1, qc, scale, axis=0, names=names, block_size=block, zero=zero)
            return
        q, scale = self._int8(const, axis=1, importance=h)
        self._dequantized(graph, const, matmuls, 1, q, scale, axis=1, names=names)

    @staticmethod
    def _plain_gemm(node: gs.Node) -> bool:
        """Gemm = x·B (+ C) with alpha = beta = 1 and x not transposed."""
        return (int(node.attrs.get("transA", 0)) == 0 and float(node.attrs.get("alpha", 1.0)) == 1.0
                and float(node.attrs.get("beta", 1.0)) == 1.0)

    @staticmethod
    def _gemms_to_matmuls(graph, const, gemms, names) -> gs.Constant:
        """Rewrite Gemm(x, B[, C]) as MatMul(x, W) (+ Add C) with W = B or Bᵀ as [K, N], so the weight takes
        the DequantizeLinear → MatMul form onnxruntime runs as MatMulNBits."""
        w = ir.const_value(const)
        if int(gemms[0].attrs.get("transB", 0)):
            w = np.ascontiguousarray(w.T)
        weight = gs.Constant(names.fresh(const.name + "_kn"), w)
        for g in gemms:
            x, out = g.inputs[0], g.outputs[0]
            bias = g.inputs[2] if len(g.inputs) > 2 and g.inputs[2].name else None
            g.op, g.attrs = "MatMul", {}
            g.inputs.clear()
            g.inputs.extend([x, weight])
            if bias is not None:
                mid = gs.Variable(names.fresh(out.name + "_nobias"), dtype=out.dtype, shape=out.shape)
                g.outputs[0] = mid
                graph.nodes.append(gs.Node("Add", name=names.fresh(g.name + "_bias"), inputs=[mid, bias],
                                           outputs=[out]))
        return weight

    def _quantize_gemm_weight(self, graph, const, gemms, names) -> None:
        trans_b = int(gemms[0].attrs.get("transB", 0))
        h = self._importance(gemms[0].inputs[0])
        q, scale = self._int8(const, axis=0 if trans_b else 1, importance=h)
        self._dequantized(graph, const, gemms, 1, q, scale, axis=0 if trans_b else 1, names=names)

    @staticmethod
    def _table_kernels(ctx: PassContext, heads) -> bool:
        """Whether the target runs a block-quantized table (and a head reading it)."""
        return ctx.target is not None and ctx.target.tuning.can_emit("GatherBlockQuantized", ir.MS_DOMAIN) and \
            (not heads or ctx.target.tuning.can_emit("MatMulNBits", ir.MS_DOMAIN))

    def _quantize_table(self, graph, const, gathers, heads, ctx, names, notes) -> str | None:
        bits = int(self.config.table_bits or 8)
        v, d = const.shape
        block = _pow2_block(d, self.config.block_size if bits == 4 else 256)
        can = self._table_kernels(ctx, heads)
        half = ir.onnx_dtype(const.dtype) == onnx.TensorProto.FLOAT16
        if not can or block is None or half:
            if heads:
                why = ("its block-quantized kernels are emitted for float32 tables only" if half
                       else "no block-quantized kernels or block")
                notes.append(f"{const.name} {list(const.shape)} {_dtype_name(ir.onnx_dtype(const.dtype))}: tied "
                             f"table left unquantized ({why})")
                return None
            q, scale = self._int8(const, axis=0)
            self._dequantized(graph, const, gathers, 0, q, scale, axis=0, names=names)
            return "table"
        w = ir.const_value(const)
        h = self._importance(heads[0].inputs[0]) if heads else None
        zeros = None
        if bits == 4:
            # blocks as the config's scheme; with calibration, GPTQ against the head's inputs (the lm head is
            # what the table's error hurts most: plain rounding of a tied 4-bit table costs far more perplexity).
            # Symmetric codes are stored offset by 8, both kernels' default zero point when none is given.
            gram = self._gram(heads[0].inputs[0].name) if heads and self.config.gptq else None
            symmetric = not self.config.asymmetric
            if gram is not None:
                unsigned, s, zeros = gptq_blocks(w, gram, block, 4, batch=_gptq_batch(d, block), symmetric=symmetric)
                del gram
            elif symmetric:
                unsigned, s = quantize_blocks(w, block, 4, h, self.config.search)
            else:
                unsigned, s, zeros = quantize_blocks_asymmetric(w, block, 4, h, self.config.search)
            if symmetric:
                unsigned = (unsigned.astype(np.int16) + 8).astype(np.uint8)
            unsigned = unsigned.reshape(v, d // block, block)
            s4, z4 = s, (np.full(s.shape, 8, np.uint8) if zeros is None else zeros)

            def w_hat(r0, r1):
                return ((unsigned[r0:r1].astype(np.float32) - z4[r0:r1, :, None]) * s4[r0:r1, :, None]).reshape(-1, d)
            shift = self._token_distribution_shift(graph, const, w_hat(0, v), heads) if heads else None
            if shift is not None and shift > TABLE_KL_BUDGET:
                notes.append(f"{const.name}: kept at 8 bits — at 4 bits the model's next-token distribution "
                             f"moves by {shift:.4f} nats/token on calibration data (budget {TABLE_KL_BUDGET})")
                bits, zeros = 8, None
                block = _pow2_block(d, 256)
            elif shift is not None:
                notes.append(f"{const.name}: 4 bits moves the next-token distribution by {shift:.4f} nats/token "
                             f"on calibration data (budget {TABLE_KL_BUDGET})")
        if bits == 8:
            q, s = quantize_blocks(w, block, bits, h, self.config.search)          # [V, D], [V, D/B]
            s8 = s

            def w_hat(r0, r1):
                return (q[r0:r1].astype(np.float32).reshape(-1, d // block, block) * s8[r0:r1, :, None]).reshape(-1, d)
            unsigned = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(v, d // block, block)
        self.reports.append(WeightReport(const.name, (v, d), bits, _rel_error(w, w_hat, h, 1)))
        packed = pack_uint4(unsigned) if bits == 4 else unsigned
        data = gs.Constant(names.fresh(const.name + f"_u{bits}"), np.ascontiguousarray(packed))
        scales = gs.Constant(names.fresh(const.name + "_block_scales"), s.astype(np.float32))
        head_zeros = gather_zeros = None
        if zeros is not None:
            nb = d // block
            padded = np.zeros((v, nb + nb % 2), dtype=np.uint8)
            padded[:, :nb] = zeros
            # MatMulNBits: 4-bit zero points packed two per byte along the blocks of each row, flattened;
            # GatherBlockQuantized (3-D data, scales [V, nb, 1]): one zero point per byte, low nibble
            head_zeros = gs.Constant(names.fresh(const.name + "_zero_points"), pack_uint4(padded).reshape(-1))
            gather_zeros = gs.Constant(names.fresh(const.name + "_zero_points_3d"), zeros.reshape(v, nb, 1))
        for head in heads:
            x = head.inputs[0]
            head.op, head.domain = "MatMulNBits", ir.MS_DOMAIN
            head.attrs = {"K": d, "N": v, "bits": bits, "block_size": block}
            level = ctx.target.tuning.nbits_accuracy_level      # ctx.target is set: checked above
            if level:
                head.attrs["accuracy_level"] = int(level)
            head.inputs.clear()
            head.inputs.extend([x, data, scales] + ([head_zeros] if head_zeros is not None else []))
        scales3 = gs.Variable(names.fresh(const.name + "_block_scales_3d"), dtype=np.float32,
                              shape=[v, d // block, 1])
        graph.nodes.append(gs.Node("Reshape", name=names.fresh(const.name + "_scales_3d"), inputs=[
            scales, gs.Constant(names.fresh(const.name + "_scales_shape"), np.array([v, d // block, 1], np.int64))],
            outputs=[scales3]))
        for gather in gathers:
            ids, out = gather.inputs[1], gather.outputs[0]
            blocks = gs.Variable(names.fresh(out.name + "_blocks"), dtype=np.float32,
                                 shape=list(ids.shape or []) + [d // block, block])
            gather.op, gather.domain = "GatherBlockQuantized", ir.MS_DOMAIN
            gather.attrs = {"gather_axis": 0, "quantize_axis": 2, "block_size": block, "bits": bits}
            gather.inputs.clear()
            gather.inputs.extend([data, ids, scales3] + ([gather_zeros] if gather_zeros is not None else []))
            gather.outputs[0] = blocks
            # [*ids, blocks, block] → [*ids, d]: 0 copies each index dim, so any (run-time) ids shape works
            rows = np.array([0] * (len(out.shape) - 1) + [d], np.int64)
            graph.nodes.append(gs.Node("Reshape", name=names.fresh(gather.name + "_rows"), inputs=[
                blocks, gs.Constant(names.fresh(out.name + "_shape"), rows)], outputs=[out]))
        return "tied_table" if heads else "table"
