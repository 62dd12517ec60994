"""Greedy head (exact): the argmax of a float lm head without the whole product, on the decode step.

A decode step of a small float model spends a fifth of its time in the lm head — every row of a [V, K] table
read to find one argmax. This pass puts, beside the head, a path that finds the same argmax from an 8-bit
copy of the table and the exact float rows of the few tokens that can still win:

    ids, use = If(lmc_greedy, then: screen → (candidates, C ≤ cap), else: ([], false))
    logits   = If(use, then: the candidates' exact logits over −inf, else: the original head)

``lmc_greedy`` is a boolean graph input whose default (an initializer) is false: every caller that does not
set it (onnxruntime-genai, perplexity, sampling, the prefill) gets the full logits as before. A driver sets
it on a greedy decode step (batch 1, one token) and reads only the argmax of what comes back.

The screen, for the head's input row x (K floats) and table rows w_r (r < V):

1. A_r = x̂·ŵ_r: ``MatMulNBits`` (8 bits, blocks of 32, int8 activations) over ŵ_r, the table's rows in
   symmetric 8-bit blocks; x̂ is the runtime's int8 rounding of x.
2. β_r bounds |L_r − A_r|, where L_r is the head's float32 logit:
       |x·w_r − x̂·ŵ_r| ≤ ‖x‖₂ E_r + ‖x − x̂‖₂ ‖ŵ_r‖₂ ≤ ‖x‖₂ E_r + (√K / 254) ‖x‖∞ ‖ŵ_r‖₂
   (Cauchy–Schwarz twice; E_r = ‖w_r − ŵ_r‖₂ is known at build time, and any int8 rounding of x whose
   scale is at most 2‖x‖∞/255 — per block or per row, symmetric or not — errs by at most ‖x‖∞/254 per
   element). Float evaluation adds at most 4Ku·‖x‖₂‖w_r‖₂ to L_r and 4Ku·‖x‖∞ Σ_i(|ŵ_ri| + 255 s_r) to A_r
   (u = 2⁻²⁴; the integer block products are exact). So β = [‖x‖₂, ‖x‖∞] · [[E + 4Ku‖w‖], [(√K/254)‖ŵ‖ +
   4Ku Σ(|ŵ| + 255 s)]], both rows raised by 2⁻¹⁰ for the bound's own rounding.
3. Candidates R = {r : A_r + β_r ≥ max_s (A_s − β_s)}. The argmax r* of L is in R: L_r* ≥ L_s for every s,
   so A_r* + β_r* ≥ L_r* ≥ max_s L_s ≥ max_s (A_s − β_s).

Then, when |R| ≤ cap (``candidate_cap``: V/8 in whole groups; else the original head runs):

4. L_r for r ∈ R, from the float rows: the candidates padded to a multiple of 64 and multiplied in groups
   of 64 columns, two copies of x as rows. That is the shape under which onnxruntime's float GEMM (MLAS)
   packs the rows in K-slices of 256 as its pre-packed head does (``GROUP``). From K = 512 a group's product
   would be split across threads, whose slices differ; there the product runs in K-slices of 256, each on one
   thread, added in order as the head adds its slices. So each L_r comes out bit for bit the full head's at
   any thread count (tested on two threads at K = 384, 1024 and 1056); the build's check compares them
   (``verify.greedy_head_error``).
5. Out: −inf everywhere but R, L_r there. Its argmax (first index among equal maxima, as the full head's)
   is the full head's; nothing else about it is meaningful.

Applies to the node writing the generation graph's logits when it is a tied head, ``FusedMatMul(x, T[V, K],
transB=1)`` over the table the embedding gathers from — its float rows are resident anyway — with T float32
of at least the target's ``greedy_head_min_bytes`` bytes, K a multiple of 32, batch 1, and the target running ``MatMulNBits`` at int8
activations. An untied ``MatMul(x, W[K, V])`` is left alone: onnxruntime keeps a packed weight's original
only while another kernel reads it, so gathering W's rows would keep a second float copy of the head
resident. Costs V·K bytes of 8-bit table, V·K/8 of scales and 12·V of bound and floor constants; a step
holds at most cap rows of the table beside them (planned: the data-dependent tensors carry their largest
shapes, ``ir.set_upper_shape``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

log = logging.getLogger(__name__)

GREEDY_INPUT = "lmc_greedy"
BLOCK = 32
# MLAS (onnxruntime's float GEMM) multiplies a pre-packed weight in K-slices of 256; an operand it packs per
# call (the gathered rows) is sliced by 128, widened to 256 when the product has 33–64 columns (and beyond
# for fewer). Groups of exactly 64 columns, two rows of x (one row takes a separate vector kernel), give the
# pre-packed head's summation order.
GROUP = 64
SLICE = 256                        # the K-slice of MLAS's pre-packed float GEMM
ONE_THREAD = 64 * 1024             # multiply-adds below which MLAS runs a float product on one thread
ROUNDING = 4 * 2.0 ** -24          # per element of K: float evaluation of a dot product (twice over)
INT8_LEVEL = 4                     # MatMulNBits accuracy level: int8 activations


def quantize_table(table: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``table`` [V, K] (K a multiple of ``BLOCK``) in symmetric 8-bit blocks, and the bound's
    coefficients. Returns (codes uint8 [V, K/B, B] with zero point 128, scales float32 [V, K/B] — 0 for an
    all-zero block, which is then exact —, bound float32 [2, V]); see the module docstring for the bound.
    Computed ``rows`` rows at a time (float64 copies of a slice, not of the table)."""
    v, k = table.shape
    codes = np.empty((v, k // BLOCK, BLOCK), np.uint8)
    scales = np.empty((v, k // BLOCK), np.float32)
    bound = np.empty((2, v), np.float32)
    rounding = ROUNDING * k
    for a in range(0, v, rows):
        w = np.asarray(table[a:a + rows], dtype=np.float64)
        blocks = w.reshape(len(w), k // BLOCK, BLOCK)
        scale = (np.abs(blocks).max(axis=-1) / 127).astype(np.float32).astype(np.float64)
        q = np.clip(np.rint(blocks / np.where(scale > 0, scale, 1.0)[..., None]), -127, 127)
        dequant = (q * scale[..., None]).reshape(len(w), k)
        error = np.linalg.norm(w - dequant, axis=1)
        norm_row = error + rounding * np.linalg.norm(w, axis=1)
        max_row = (np.sqrt(k) / 254 * np.linalg.norm(dequant, axis=1)
                   + rounding * (np.abs(dequant).sum(axis=1) + 255 * BLOCK * scale.sum(axis=1)))
        bound[:, a:a + rows] = np.stack([norm_row, max_row]) * (1 + 2.0 ** -10)
        codes[a:a + rows] = (q + 128).astype(np.uint8)
        scales[a:a + rows] = scale
    return codes, scales, bound


def _head(graph: gs.Graph, logits: str) -> tuple[gs.Node | None, gs.Constant | None, str]:
    """(node, table, "") for the node writing ``logits`` when it is a tied float lm head this pass takes,
    else (None, None, why not)."""
    out = next((t for t in graph.outputs if t.name == logits), None)
    node = ir.producer(out) if out is not None else None
    weight = node.inputs[1] if node is not None and len(node.inputs) == 2 else None
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 2 or ir.onnx_dtype(weight.dtype) != 1:
        return None, None, "the logits are not a float32 product with a constant table"
    if ir.is_op(node, "MatMul"):
        # its rows gathered would keep the float weight resident beside the packed copy the full head reads
        # (onnxruntime releases a packed weight's original only when no other kernel reads it): on the
        # 1.1B-shaped export +262 MiB mapped after load, for no speed on flat logits
        return None, None, "an untied head (its float rows would stay resident beside the packed copy)"
    attrs = node.attrs
    if not (ir.is_op(node, "FusedMatMul", ir.MS_DOMAIN) and attrs.get("transB", 0) == 1
            and not attrs.get("transA", 0) and float(attrs.get("alpha", 1.0)) == 1.0
            and not attrs.get("transBatchA", 0) and not attrs.get("transBatchB", 0)):
        return None, None, "the logits are not a plain product with a constant table"
    if not any(ir.is_op(r, "Gather") for r in weight.outputs):
        return None, None, "the head's table is not the embedding's (its float rows would stay resident twice)"
    return node, weight, ""


class GreedyHead:
    """Add the screened greedy path beside a generation graph's float lm head (module docstring)."""

    name = "greedy-head"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def __init__(self, logits: str, batch: int):
        self.logits, self.batch = logits, batch

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        tuning = ctx.target.tuning if ctx.target is not None else None
        min_bytes = tuning.greedy_head_min_bytes if tuning is not None else 0
        why = ""
        if min_bytes <= 0:
            why = "the target asks for none (greedy_head_min_bytes)"
        elif tuning is None or not tuning.can_emit("MatMulNBits", ir.MS_DOMAIN) \
                or tuning.nbits_accuracy_level != INT8_LEVEL:
            why = "the target runs no MatMulNBits at int8 activations"
        elif self.batch != 1:
            why = f"batch {self.batch} (the greedy head serves batch 1)"
        if not why:
            node, weight, why = _head(graph, self.logits)
        if not why:
            v, k = weight.shape
            if v * k * 4 < min_bytes:
                why = f"a head of {v * k * 4} bytes (the target's threshold: {min_bytes})"
            elif k % BLOCK:
                why = f"K = {k} is not a multiple of {BLOCK}"
        if why:
            return PassResult(graph, False, notes=[f"no greedy head: {why}"])
        codes, scales, bound = quantize_table(ir.const_value(weight))
        self._rewrite(graph, node, weight, int(v), int(k), codes, scales, bound)
        log.info("greedy head beside '%s': [%d → %d], 8-bit screen of %d bytes, at most %d rows rescored", node.name,
                 k, v, codes.nbytes + scales.nbytes, candidate_cap(int(v)))
        return PassResult(graph, True, stats={"vocab": int(v), "table_bytes": int(codes.nbytes + scales.nbytes)})

    def _rewrite(self, graph: gs.Graph, head: gs.Node, weight: gs.Constant, v: int, k: int,
                 codes: np.ndarray, scales: np.ndarray, bound: np.ndarray) -> None:
        names = ir.Namer(graph)
        x, logits = head.inputs[0], head.outputs[0]
        f32, i64 = np.float32, np.int64
        cap = candidate_cap(v)

        def const(base: str, value) -> gs.Constant:
            return gs.Constant(names.fresh(f"lmc_greedy_{base}"), np.asarray(value))

        def op(nodes: list, kind: str, inputs: list, dtype, shape=None, upper=None, domain: str | None = None,
               **attrs) -> gs.Variable:
            out = gs.Variable(names.fresh(f"lmc_greedy_{kind.lower()}"), dtype=dtype, shape=shape)
            if upper is not None:
                ir.set_upper_shape(out, upper)
            nodes.append(gs.Node(kind, names.fresh(f"lmc_greedy_{kind}"), attrs=attrs, inputs=inputs,
                                 outputs=[out], domain=domain))
            return out

        # 1. screening (flag set): the candidates' ids and whether they fit the cap
        s: list[gs.Node] = []
        last = const("last", np.array([-1], i64))
        approx = op(s, "MatMulNBits", [x, const("codes", codes), const("scales", scales)], f32, [1, 1, v],
                    domain=ir.MS_DOMAIN, K=k, N=v, bits=8, block_size=BLOCK, accuracy_level=INT8_LEVEL)
        norm = op(s, "ReduceL2", [x, last], f32, [1, 1, 1], keepdims=1)
        peak = op(s, "ReduceMax", [op(s, "Abs", [x], f32, [1, 1, k]), last], f32, [1, 1, 1], keepdims=1)
        terms = op(s, "Concat", [norm, peak], f32, [1, 1, 2], axis=-1)
        beta = op(s, "MatMul", [terms, const("bound", bound)], f32, [1, 1, v])
        upper = op(s, "Add", [approx, beta], f32, [1, 1, v])
        floor = op(s, "ReduceMax", [op(s, "Sub", [approx, beta], f32, [1, 1, v]), last], f32, [1, 1, 1],
                   keepdims=1)
        keep = op(s, "Reshape", [op(s, "GreaterOrEqual", [upper, floor], np.bool_, [1, 1, v]), last], np.bool_, [v])
        ids = op(s, "Reshape", [op(s, "NonZero", [keep], i64, [1, "lmc_candidates"], upper=[1, v]), last], i64,
                 ["lmc_candidates"], upper=[v])
        count = op(s, "Reshape", [op(s, "Shape", [ids], i64, [1]), const("scalar", np.zeros(0, i64))], i64, [])
        fits = op(s, "LessOrEqual", [count, const("cap", np.array(cap, i64))], np.bool_, [])
        screen = gs.Graph(nodes=s, inputs=[], outputs=[ids, fits], name="lmc_greedy_screen")
        n: list[gs.Node] = []
        none = op(n, "Identity", [const("none", np.zeros(0, i64))], i64, [0])
        no = op(n, "Identity", [const("no", np.array(False))], np.bool_, [])
        skip = gs.Graph(nodes=n, inputs=[], outputs=[none, no], name="lmc_greedy_skip")
        chosen_ids = gs.Variable(names.fresh("lmc_greedy_ids"), dtype=i64, shape=["lmc_candidates"])
        ir.set_upper_shape(chosen_ids, [v])
        use = gs.Variable(names.fresh("lmc_greedy_use"), dtype=np.bool_, shape=[])
        flag = gs.Variable(GREEDY_INPUT, dtype=np.bool_, shape=[])

        # 2. the candidates' exact logits over −inf (they fit), else the full head
        r: list[gs.Node] = []
        # padded to whole groups: ids + GROUP − 1 zeros, cut at ⌊(C + GROUP − 1) / GROUP⌋ · GROUP
        padded = op(r, "Concat", [chosen_ids, const("pad", np.zeros(GROUP - 1, i64))], i64, ["lmc_padded"],
                    upper=[cap + GROUP - 1], axis=0)
        group = const("group", np.array([GROUP], i64))
        length = op(r, "Mul", [op(r, "Div", [op(r, "Shape", [padded], i64, [1]), group], i64, [1]), group], i64, [1])
        chosen = op(r, "Slice", [padded, const("zero", np.array([0], i64)), length], i64, ["lmc_rows"], upper=[cap])
        row = op(r, "Reshape", [x, const("row", np.array([1, k], i64))], f32, [1, k])
        pair = op(r, "Concat", [row, row], f32, [2, k], axis=0)
        # the rows of T [V, K] as [G, 64, K] (gathered by ids [G, 64]), multiplied transposed; from 2·64·K of 64 Ki
        # multiply-adds (K ≥ 512) in K-slices of 256 summed in order: a product that size runs on one thread
        # and sums as the pre-packed head's slice does, and the head adds its slices in that order
        grouped = op(r, "Reshape", [chosen, const("groups", np.array([-1, GROUP], i64))], i64, ["lmc_groups", GROUP],
                     upper=[cap // GROUP, GROUP])
        rows = op(r, "Gather", [weight, grouped], f32, ["lmc_groups", GROUP, k], upper=[cap // GROUP, GROUP, k], axis=0)
        groups_out = (["lmc_groups", 2, GROUP], [cap // GROUP, 2, GROUP])
        slices = [(0, k)] if 2 * GROUP * k < ONE_THREAD else [(a, min(k, a + SLICE)) for a in range(0, k, SLICE)]
        exact = None
        for a, b in slices:
            if len(slices) == 1:
                left, right = pair, rows
            else:
                ends = [const("from", np.array([a], i64)), const("to", np.array([b], i64))]
                left = op(r, "Slice", [pair, *ends, const("columns", np.array([1], i64))], f32, [2, b - a])
                right = op(r, "Slice", [rows, *ends, const("depth", np.array([2], i64))], f32,
                           ["lmc_groups", GROUP, b - a], upper=[cap // GROUP, GROUP, b - a])
            part = op(r, "FusedMatMul", [left, right], f32, groups_out[0], upper=groups_out[1], domain=ir.MS_DOMAIN,
                      transB=1)
            exact = part if exact is None else op(r, "Add", [exact, part], f32, groups_out[0], upper=groups_out[1])
        first = op(r, "Reshape", [op(r, "Gather", [exact, const("first", np.array(0, i64))], f32,
                                     ["lmc_groups", GROUP], upper=[cap // GROUP, GROUP], axis=1), last],
                   f32, ["lmc_rows"], upper=[cap])
        masked = op(r, "ScatterElements", [const("floor", np.full(v, -np.inf, f32)), chosen, first], f32, [v], axis=0)
        out = op(r, "Reshape", [masked, const("shape", np.array([1, 1, v], i64))], f32, [1, 1, v])
        rescore = gs.Graph(nodes=r, inputs=[], outputs=[out], name="lmc_greedy_rescore")
        full_out = gs.Variable(names.fresh("lmc_greedy_full"), dtype=logits.dtype, shape=logits.shape)
        full = gs.Graph(nodes=[gs.Node(head.op, names.fresh(head.name), attrs=dict(head.attrs), inputs=[x, weight],
                                       outputs=[full_out], domain=head.domain)],
                        inputs=[], outputs=[full_out], name="lmc_greedy_full")

        graph.inputs.append(flag)
        ir.set_input_default(graph, GREEDY_INPUT, np.array(False))
        at = graph.nodes.index(head)
        graph.nodes.remove(head)
        head.inputs.clear()
        head.outputs.clear()
        graph.nodes[at:at] = [
            gs.Node("If", names.fresh("lmc_greedy_screen"), inputs=[flag], outputs=[chosen_ids, use],
                    attrs={"then_branch": screen, "else_branch": skip}),
            gs.Node("If", names.fresh("lmc_greedy_head"), inputs=[use], outputs=[logits],
                    attrs={"then_branch": rescore, "else_branch": full})]


def candidate_cap(vocab: int) -> int:
    """Most candidates rescored from the float rows (a multiple of ``GROUP``): V/8, at least one group. More
    (a bound too loose to screen) take the full head: what a step holds stays within V/8 rows."""
    return max(GROUP, vocab // 8 // GROUP * GROUP)
