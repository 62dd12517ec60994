"""W8A8: int8 weights and int8 activations in QDQ form, with a measured outlier remedy (approximate).

For every group of MatMuls that read the same activation x with constant weights W_j (e.g. q/k/v after a
norm, gate/up, down, o):

1. Smoothing (SmoothQuant): x' = x / s, W_j' = diag(s) W_j with s_k = max|x_k|^α / max_j max|W_j[k, :]|^(1−α);
   the division is folded into x's producer — a norm's scale (and bias), or the up-projection columns of
   a SwiGLU product — so no op is added. Groups whose producer cannot absorb it use α = 0.
2. Activation scale, per tensor, symmetric int8: s_x = c · max|x'| / 127 with clip ratio c — searched
   (``CalibMethod.MSE``, the default) or fixed by MinMax / percentile / entropy statistics of x'.
3. (α, c) are chosen per group *by measurement*: on calibration rows X the group's output error
   Σ_j ‖X W_j − Q(X/s)·Q(diag(s) W_j)‖² / ‖X W_j‖² is evaluated for every candidate and the smallest kept.
4. A group whose best error is still above ``max_error`` keeps float activations (weights int8): the few
   tensors that break int8 are left in higher precision, and the report names them.
5. The target's ISA decides the weights' range (``Int8Products``): where onnxruntime's integer GEMM adds
   u8 × s8 pairs in int16 (x86 AVX2 without VNNI) the GEMMs' weights take 7 bits (|q| ≤ 63), so no sum
   saturates and the bundle computes what was verified; elsewhere the full [-127, 127].

Rewrite: x → QuantizeLinear(x, s_x, 0) → DequantizeLinear → MatMul(·, DequantizeLinear(W_q, s_w, axis=1)),
which onnxruntime runs as QuantizeLinear + MatMulIntegerToFloat (integer GEMM). Everything else
(weights of other ops, the tied table) is quantized as in weight-only int8.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.runtime import Int8Products
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.quantize.calibration import collect
from lmc.passes.quantize.scales import quantize_channels
from lmc.passes.quantize.weight_only import QuantizeConfig, QuantizeWeights, WeightBits
from lmc.passes.weight_columns import find_columns

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 0.65, 0.8)
CLIPS = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)
NORMS = ("RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization")


@dataclass
class GroupChoice:
    activation: str
    alpha: float
    clip: float
    error: float
    quantized: bool


def _fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -127, 127) * scale


class CalibMethod(enum.Enum):
    """How the activation clip is chosen: ``MSE`` searches clip ratios by measured output error (default);
    the others fix the clip from a statistic of the (smoothed) activation: ``MINMAX`` its absolute maximum,
    ``PERCENTILE`` the 99.99th percentile of |x|, ``ENTROPY`` the threshold minimising the KL divergence
    between the |x| histogram and its 128-level quantization (TensorRT-style)."""

    MSE = "mse"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


def entropy_threshold(x: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """|x| threshold minimising KL(P || Q) where P is the clipped histogram and Q its ``levels``-bin
    requantization (the calibration onnxruntime and TensorRT call entropy)."""
    a = np.abs(x).ravel()
    top = float(a.max()) if a.size else 0.0
    if top == 0.0:
        return 0.0
    hist, edges = np.histogram(a, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    best_kl, best_t = np.inf, top
    for i in range(levels, bins + 1, max(1, (bins - levels) // 64)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()                     # outliers clipped into the last bin
        if p.sum() == 0:
            continue
        chunks = np.array_split(hist[:i], levels)
        q = np.concatenate([np.where(c > 0, c.sum() / max((c > 0).sum(), 1), 0.0) for c in chunks])
        p, q = p / p.sum(), q / max(q.sum(), 1e-30)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_t = kl, float(edges[i])
    return best_t


def _fixed_clip(method: CalibMethod, x: np.ndarray, top: float) -> float:
    """The clip ratio (of ``top`` = max |x|) a fixed calibration method gives."""
    if top <= 0:
        return 1.0
    if method is CalibMethod.PERCENTILE:
        return min(1.0, float(np.percentile(np.abs(x), 99.99)) / top)
    if method is CalibMethod.ENTROPY:
        return min(1.0, entropy_threshold(x) / top)
    return 1.0


def _best_choice(rows: np.ndarray, absmax: np.ndarray, weights: list[np.ndarray], alphas,
                 method: CalibMethod = CalibMethod.MSE) -> tuple[float, float, float]:
    """(error, α, c) minimising the group's mean relative output error on calibration rows, where the error
    of one weight is ‖X W − Q(X/s)·Q(diag(s) W)‖² / ‖X W‖²; c is searched (``MSE``) or fixed by ``method``."""
    refs = [rows @ w for w in weights]
    norms = [max(float(np.sum(y ** 2)), 1e-30) for y in refs]
    best = (np.inf, 0.0, 1.0)
    for alpha in alphas:
        s = _smoothing(absmax, weights, alpha)
        deq = []
        for w in weights:
            q, sw = quantize_channels(w * s[:, None], axis=1, search=False)
            deq.append(q.astype(np.float32) * sw[None, :])
        x = rows / s
        top = float((absmax / s).max())
        clips = CLIPS if method is CalibMethod.MSE else (_fixed_clip(method, x, top),)
        for clip in clips:
            xq = _fake_quant(x, max(clip * top / 127.0, 1e-12))
            err = float(np.mean([np.sum((y - xq @ d) ** 2) / n for y, d, n in zip(refs, deq, norms)]))
            if err < best[0]:
                best = (err, alpha, clip)
    return best


def _smoothing(absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones_like(absmax, dtype=np.float32)
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.power(np.maximum(absmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _absorber(graph: gs.Graph, x: gs.Tensor, readers: list[gs.Node], names: ir.Namer):
    """A function folding x ← x / s into x's producer, or None when x's producer cannot absorb it. The
    producer's constants are replaced by new ones, each named afresh: a constant shared with other nodes (norm
    scales deduplicated across layers) keeps its values for them."""
    node = ir.producer(x)
    if node is None or any(r not in readers for r in x.outputs) or x.name in ir.graph_outputs(graph):
        return None
    if ir.is_op(node, NORMS) and isinstance(node.inputs[1], gs.Constant):
        def fold_norm(s: np.ndarray) -> None:
            for i in range(1, len(node.inputs)):
                t = node.inputs[i]
                if isinstance(t, gs.Constant):
                    node.inputs[i] = gs.Constant(names.fresh(t.name + "_smoothed"),
                                                 (ir.const_value(t) / s).astype(np.float32))
        return fold_norm
    if ir.is_op(node, "Mul"):   # x = a · up with up = x' W_up: divide W_up's columns (a SwiGLU product)
        for i in (0, 1):
            src = find_columns(graph, node.inputs[i])
            if src is not None and not src.permuted:
                return lambda s, src=src: src.scale(1.0 / s, names, suffix="_smoothed")
    return None


def _bias_after_reshape(graph: gs.Graph) -> None:
    """MatMul → Add(bias) → Reshape (last axis kept) becomes MatMul → Reshape → Add(bias): onnxruntime would
    otherwise fuse MatMul + Add into a float Gemm before its QDQ rewrite, losing the integer kernel."""
    for add in list(graph.nodes):
        if not ir.is_op(add, "Add") or not add.outputs:
            continue
        bias = next((t for t in add.inputs if isinstance(t, gs.Constant)), None)
        mm_out = next((t for t in add.inputs if t is not bias), None)
        if bias is None or mm_out is None or ir.producer(mm_out) is None or not ir.is_op(ir.producer(mm_out), "MatMul"):
            continue
        out = add.outputs[0]
        if len(mm_out.outputs) != 1 or len(out.outputs) != 1 or out.name in ir.graph_outputs(graph):
            continue
        reshape = out.outputs[0]
        after = reshape.outputs[0] if ir.is_op(reshape, "Reshape") else None
        if after is None or (after.shape or [None])[-1] != (mm_out.shape or [None])[-1] or after.name in ir.graph_outputs(graph):
            continue
        moved = gs.Variable(after.name + "_nobias", dtype=after.dtype, shape=after.shape)
        reshape.inputs[0] = mm_out
        reshape.outputs[0] = moved
        add.inputs.clear()
        add.inputs.extend([moved, bias])
        add.outputs[0] = after


def _refuse_non_float32(graph: gs.Graph) -> None:
    """W8A8 smooths and calibrates in float32 and emits float32 activation scales (MatMulIntegerToFloat):
    a model whose MatMul/Gemm weights are another float dtype (float16, bfloat16) is refused, not left as is."""
    found: dict[str, list[str]] = {}
    for node in graph.nodes:
        if not ir.is_op(node, ("MatMul", "Gemm")) or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        dtype = ir.onnx_dtype(w.dtype)
        if isinstance(w, gs.Constant) and dtype != onnx.TensorProto.FLOAT:
            name = onnx.helper.tensor_dtype_to_string(dtype).replace("TensorProto.", "").lower()
            found.setdefault(name, []).append(w.name)
    if found:
        kinds = "/".join(sorted(found))
        names = [n for ns in found.values() for n in ns]
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise LmcError(f"--quantize w8a8 needs float32 weights; {len(names)} MatMul/Gemm weights are {kinds} "
                       f"({shown}) — use --quantize int8 or int4 (float16 weights are supported there), or convert "
                       "the model to float32")


class QuantizeW8A8:
    name = "quantize-w8a8"
    kind = PassKind.APPROXIMATE
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def __init__(self, calib_feeds: list[dict] | None, max_error: float = 0.02, rows: int = 1024,
                 method: CalibMethod = CalibMethod.MSE):
        self.calib_feeds = calib_feeds
        self.method = method
        self.max_error = max_error
        self.rows = rows
        self.choices: list[GroupChoice] = []

    @staticmethod
    def _integer_with_bias(graph, m: gs.Node, q, sc, zp, names) -> bool:
        """MatMul → Add(bias) would become a float Gemm in onnxruntime before its QDQ rewrite; emit the
        integer kernel it would have chosen, ``com.microsoft.MatMulIntegerToFloat`` with the bias, directly."""
        out = m.outputs[0]
        if len(out.outputs) != 1 or out.name in ir.graph_outputs(graph):
            return False
        add = out.outputs[0]
        bias = next((t for t in add.inputs if isinstance(t, gs.Constant)), None) if ir.is_op(add, "Add") else None
        n = (out.shape or [None])[-1]
        if bias is None or ir.const_value(bias).shape != (n,):
            return False
        dq = ir.producer(m.inputs[1])
        if dq is None or not ir.is_op(dq, "DequantizeLinear") or len(m.inputs[1].outputs) != 1:
            return False
        wq, ws = dq.inputs[0], dq.inputs[1]
        wz = gs.Constant(names.fresh(wq.name + "_zero"), np.zeros(ws.shape, dtype=np.int8))
        result = add.outputs[0]
        for node in (m, add):
            node.inputs.clear()
            node.outputs.clear()
        graph.nodes.append(gs.Node("MatMulIntegerToFloat", name=names.fresh(m.name + "_int8"), domain=ir.MS_DOMAIN,
                                   inputs=[q, wq, sc, ws, zp, wz, bias], outputs=[result]))
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not self.calib_feeds:
            raise LmcError("--quantize w8a8 needs calibration data: give --calib FILE.npz")
        _refuse_non_float32(graph)
        names = ir.Namer(graph)
        for const in ir.constants(graph):   # Gemm(x, W) + C → MatMul + Add: the QDQ MatMul form runs as integer GEMM
            gemms = [n for n in const.outputs if ir.is_op(n, "Gemm") and n.inputs[1] is const]
            if (gemms and len(gemms) == len(const.outputs) and len(const.shape) == 2
                    and all(QuantizeWeights._plain_gemm(g) for g in gemms)):
                QuantizeWeights._gemms_to_matmuls(graph, const, gemms, names)
        _bias_after_reshape(graph)
        groups: dict[str, list[gs.Node]] = {}
        for node in graph.nodes:
            if (ir.is_op(node, "MatMul") and isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].shape) == 2
                    and not isinstance(node.inputs[0], gs.Constant) and len(node.inputs[1].outputs) == 1):
                groups.setdefault(node.inputs[0].name, []).append(node)
        stats = collect(graph, sorted(groups), self.calib_feeds, keep_rows=self.rows,
                        progress=lambda i, n: ctx.report("calibrating", i, n))
        act_scales: dict[str, float] = {}
        for done, (act, matmuls) in enumerate(groups.items()):
            ctx.report("choosing smoothing and clips", done, len(groups))
            st = stats[act]
            x = matmuls[0].inputs[0]
            weights = [ir.const_value(m.inputs[1]).astype(np.float32) for m in matmuls]
            absorb = _absorber(graph, x, matmuls, names)
            alphas = ALPHAS if absorb is not None else (0.0,)
            rows = st.rows.astype(np.float32)
            err, alpha, clip = _best_choice(rows, st.absmax, weights, alphas, self.method)
            quantize_act = err <= self.max_error
            self.choices.append(GroupChoice(act, alpha, clip, err, quantize_act))
            if alpha and quantize_act:
                s = _smoothing(st.absmax, weights, alpha)
                absorb(s)
                for m, w in zip(matmuls, weights):
                    m.inputs[1] = gs.Constant(names.fresh(m.inputs[1].name + "_smoothed"),
                                              (w * s[:, None]).astype(np.float32))
                absmax = float((st.absmax / s).max())
            else:
                absmax = float(st.absmax.max())
            if quantize_act:
                act_scales[act] = clip * absmax / 127.0
        # weights: int8 per channel everywhere (incl. the smoothed ones and the tied table); those of integer
        # GEMMs in 7 bits where the target's kernel saturates pair sums (its ISA decides, see Int8Products)
        narrow = frozenset()
        if ctx.target is not None and ctx.target.isa.int8_products is Int8Products.SATURATING_PAIRS:
            narrow = frozenset(m.inputs[1].name for act in act_scales for m in groups[act])
        weights_pass = QuantizeWeights(QuantizeConfig(bits=WeightBits.INT8, narrow_int8=narrow))
        weights_result = weights_pass.run(graph, ctx)
        for act, scale in act_scales.items():
            x = groups[act][0].inputs[0]
            sc = gs.Constant(names.fresh(act + "_act_scale"), np.array(scale, dtype=np.float32))
            zp = gs.Constant(names.fresh(act + "_act_zero"), np.array(0, dtype=np.int8))
            q = gs.Variable(names.fresh(act + "_q8"), dtype=np.int8, shape=x.shape)
            graph.nodes.append(gs.Node("QuantizeLinear", name=names.fresh(act + "_QuantizeLinear"),
                                       inputs=[x, sc, zp], outputs=[q]))
            explicit = ctx.target is None or ctx.target.tuning.can_emit("MatMulIntegerToFloat", ir.MS_DOMAIN)
            for m in groups[act]:
                if explicit and self._integer_with_bias(graph, m, q, sc, zp, names):
                    continue
                # onnxruntime runs DQ → MatMul as MatMulIntegerToFloat only when the activation feeds one
                # MatMul (the pipeline merges parallel MatMuls first); a DQ per reader otherwise
                dq = gs.Variable(names.fresh(act + "_dq8"), dtype=np.float32, shape=x.shape)
                graph.nodes.append(gs.Node("DequantizeLinear", name=names.fresh(act + "_DequantizeLinear"),
                                           inputs=[q, sc, zp], outputs=[dq]))
                m.inputs[0] = dq
        kept = [c for c in self.choices if not c.quantized]
        notes = ([f"{len(narrow)} integer-GEMM weights in 7 bits: {ctx.target.name}'s int8 kernel saturates "
                  "8-bit pair sums"] if narrow else [])
        notes += [f"{c.activation}: kept in float (best int8 error {c.error:.4f} > {self.max_error})" for c in kept]
        smoothed = [c for c in self.choices if c.quantized and c.alpha]
        notes += [f"{c.activation}: α={c.alpha}, clip={c.clip}, error {c.error:.4f}" for c in
                  sorted(self.choices, key=lambda c: -c.error)[:5]]
        stats_out = dict(weights_result.stats)
        stats_out.update({"activation_groups": len(self.choices), "activations_int8": len(act_scales),
                          "weights_7bit": len(narrow),
                          "activations_kept_float": len(kept), "smoothed_groups": len(smoothed),
                          "mean_group_error": float(np.mean([c.error for c in self.choices])) if self.choices else 0.0})
        return PassResult(graph, modified=True, stats=stats_out, notes=notes + weights_result.notes)
