"""Structural weight sharing: a 2-D constant that equals the transpose of another is stored once.

Exact. For constants K [m, n] and D [n, m] of one dtype with D == Kᵀ (bit-exact; cheap row/column probes
first), the consumers of D are rewritten to read K — with no run-time copy of the weight:

- ``Gemm(x, D, transB=t)``            → ``Gemm(x, K, transB=1-t)`` (likewise for ``transA``);
- ``MatMul(x, D)``                    → ``com.microsoft.FusedMatMul(x, K, transB=1)`` when the target runs it,
                                        else ``Gemm(x, K, transB=1)`` when x is 2-D;
- ``Gather(D, idx, axis=0)``          → ``Transpose(Gather(K, idx, axis=1), perm=[1..r, 0])`` — the gathered
                                        rows are small activations, not a weight copy.

Which copy is kept: the orientation whose dropped copy's consumers can all be rewritten, preferring to
keep the [rows = vocabulary] layout a Gather reads (it is also the layout a block-quantized MatMulNBits
and GatherBlockQuantized share, so a later quantization quantizes the one copy once). A pair whose
transpose is not exact, or whose consumers cannot be rewritten, is left alone and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement

log = logging.getLogger(__name__)

Rewrite = Callable[[], None]


def _bits(a: np.ndarray) -> np.ndarray:
    """A view that compares bit patterns (so -0.0 != 0.0 and NaNs compare by payload)."""
    a = np.asarray(a)
    if a.dtype.kind in "fc" and a.dtype.itemsize in (2, 4, 8):
        return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
    return a


def is_transpose(k: np.ndarray, d: np.ndarray) -> bool:
    """True when d equals kᵀ bit for bit (probing a row and a column before the full compare)."""
    if k.ndim != 2 or d.ndim != 2 or k.shape != d.shape[::-1] or k.dtype != d.dtype:
        return False
    kb, db = _bits(k), _bits(d)
    if not (np.array_equal(kb[:, 0], db[0, :]) and np.array_equal(kb[0, :], db[:, 0])):
        return False
    return bool(np.array_equal(kb.T, db))


def _consumer_rewrite(graph: gs.Graph, node: gs.Node, dropped: gs.Constant, kept: gs.Constant,
                      fused_matmul: bool) -> tuple[Rewrite | None, str]:
    """How to make ``node`` read ``kept`` instead of ``dropped`` (= keptᵀ); (None, reason) if it can't."""
    slots = [i for i, t in enumerate(node.inputs) if t is dropped]
    if ir.is_op(node, "Gemm") and all(i in (0, 1) for i in slots):
        def gemm() -> None:
            for i in slots:
                attr = "transA" if i == 0 else "transB"
                node.attrs[attr] = 1 - int(node.attrs.get(attr, 0))
                node.inputs[i] = kept
        return gemm, ""
    if ir.is_op(node, "MatMul") and slots == [1]:
        x = node.inputs[0]
        if fused_matmul:
            def fused() -> None:
                node.op, node.domain = "FusedMatMul", ir.MS_DOMAIN
                node.attrs.update({"transA": 0, "transB": 1, "alpha": 1.0})
                node.inputs[1] = kept
            return fused, ""
        if x.shape is not None and len(x.shape) == 2:
            def gemm2d() -> None:
                node.op = "Gemm"
                node.attrs.update({"transB": 1})
                node.inputs[1] = kept
            return gemm2d, ""
        return None, f"MatMul '{node.name}' has a {len(x.shape or [])}-D input and FusedMatMul is not allowed"
    if ir.is_op(node, "Gather") and slots == [0] and int(node.attrs.get("axis", 0)) in (0, -2):
        idx, out = node.inputs[1], node.outputs[0]
        rank = len(idx.shape) if idx.shape is not None else None
        if rank is None:
            return None, f"Gather '{node.name}' has indices of unknown rank"

        def gather() -> None:
            kept_rows = kept.shape[0]
            mid_shape = [kept_rows] + list(idx.shape) if idx.shape is not None else None
            mid = gs.Variable(ir.new_name(graph, out.name + "_cols"), dtype=out.dtype, shape=mid_shape)
            gathered = gs.Node("Gather", name=ir.new_name(graph, node.name + "_shared"),
                               attrs={"axis": 1}, inputs=[kept, idx], outputs=[mid])
            node.op, node.attrs = "Transpose", {"perm": list(range(1, rank + 1)) + [0]}
            node.inputs.clear()
            node.inputs.append(mid)
            graph.nodes.append(gathered)
        return gather, ""
    return None, f"{node.op} '{node.name}' reads it in a way that has no copy-free transposed form"


def _plan(graph: gs.Graph, dropped: gs.Constant, kept: gs.Constant,
          fused_matmul: bool) -> tuple[list[Rewrite] | None, str]:
    rewrites = []
    for node in list(dropped.outputs):
        rewrite, reason = _consumer_rewrite(graph, node, dropped, kept, fused_matmul)
        if rewrite is None:
            return None, reason
        rewrites.append(rewrite)
    return rewrites, ""


class ShareTransposedWeights:
    name = "share-transposed"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def __init__(self, min_bytes: int = 1024):
        self.min_bytes = min_bytes

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused = bool(ctx.target and ctx.target.tuning.can_emit("FusedMatMul", ir.MS_DOMAIN))
        outputs = ir.graph_outputs(graph)
        consts = [c for c in ir.constants(graph) if len(c.shape) == 2 and (ir.tensor_nbytes(c) or 0) >= self.min_bytes
                  and c.name not in outputs]
        by_key: dict[tuple, list[gs.Constant]] = {}
        for c in consts:
            by_key.setdefault((ir.onnx_dtype(c.dtype), tuple(sorted(c.shape))), []).append(c)
        shared, saved, notes = 0, 0, []
        used: set[int] = set()
        # Probes: each candidate's first row and column (decoded one constant at a time, then dropped);
        # only pairs whose probes match are decoded in full, two at a time — no copy of the weights is kept.
        probes: dict[int, tuple[bytes, bytes]] = {}
        for c in consts:
            if any(tuple(c.shape) == tuple(o.shape)[::-1] for o in by_key[(ir.onnx_dtype(c.dtype),
                                                                            tuple(sorted(c.shape)))] if o is not c):
                v = _bits(ir.const_value(c))
                probes[id(c)] = (v[0, :].tobytes(), v[:, 0].tobytes())
                del v

        for members in by_key.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if id(a) in used or id(b) in used or tuple(a.shape) != tuple(b.shape)[::-1]:
                        continue
                    (a_row, a_col), (b_row, b_col) = probes[id(a)], probes[id(b)]
                    if a_col != b_row or a_row != b_col or not is_transpose(ir.const_value(a), ir.const_value(b)):
                        continue
                    # Prefer keeping the copy a Gather reads (the [rows, features] table layout).
                    a_gathered = any(ir.is_op(n, "Gather") for n in a.outputs)
                    orientations = [(b, a), (a, b)] if a_gathered else [(a, b), (b, a)]
                    done = False
                    reasons = []
                    for dropped, kept in orientations:
                        rewrites, reason = _plan(graph, dropped, kept, fused)
                        if rewrites is None:
                            reasons.append(reason)
                            continue
                        for rewrite in rewrites:
                            rewrite()
                        used.update({id(a), id(b)})
                        shared += 1
                        saved += ir.tensor_nbytes(dropped) or 0
                        notes.append(f"'{dropped.name}' {list(dropped.shape)} is the transpose of "
                                     f"'{kept.name}' {list(kept.shape)}: stored once")
                        done = True
                        break
                    if not done:
                        notes.append(f"'{a.name}' and '{b.name}' are transposes but not shared: {'; '.join(reasons)}")
        return PassResult(graph, modified=bool(shared), stats={"transposed_pairs_shared": shared,
                                                               "bytes_saved": saved}, notes=notes)
