"""Static int8 for convolutional graphs: int8 activations and weights from the first convolution on, as
integer operators (QOperator form), so every activation between them is an int8 tensor (approximate).

Calibration: the float graph runs on the calibration feeds; every tensor's range [lo, hi] (widened to hold
0) gives an asymmetric per-tensor int8 code: s = (hi − lo) / 255, z = round(−128 − lo / s), x ≈ s (q − z).
Weights: symmetric per output channel, s_w[c] = max|W[c]| / 127, z_w = 0; a bias b becomes int32
round(b / (s_x s_w[c])).

Region: a QuantizeLinear is placed on the float input of each Conv; from there every node whose data inputs
are all quantized becomes its integer form, else its inputs are dequantized (DequantizeLinear) and it stays
float. Integer forms (onnxruntime runs each; the C bundle has a kernel for each):
- Conv → QLinearConv; a Conv read only by Relu (or Clip(0, c)) writes the activation's output directly with
  its range (z = −128: the saturation at −128 *is* the Relu);
- Add → com.microsoft.QLinearAdd (Relu after it folded the same way);
- GlobalAveragePool, and AveragePool whose window is the whole map without pads →
  com.microsoft.QLinearGlobalAveragePool;
- MaxPool, Flatten, Reshape, Squeeze, Unsqueeze, Identity, and Concat → the same op on int8 (a Concat's
  inputs and output share one code: their ranges are merged before any is quantized); Relu on a tensor whose
  code has z = −128 is the identity and disappears;
- Gemm with constant B (transA = 0) → com.microsoft.QGemm: float output (y = s_a s_b (Σ + b_q)) when its output
  is a graph output or read by a float op, int8 otherwise.
Graph outputs stay float (a DequantizeLinear where an int8 tensor is one).

Requantization, as onnxruntime computes it: y = saturate(round_half_even(acc · (s_x s_w / s_y)) + z_y) with
the scale product in float32. Nothing happens to graphs without Conv (language models: w8a8's QDQ products,
made integer with int8 activations between them by ``integer_matmul`` after it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.core.runtime import session

log = logging.getLogger(__name__)

VIEWS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")
MIN_RANGE = 1e-6


@dataclass(frozen=True)
class Code:
    """An affine int8 code: x ≈ scale · (q − zero)."""

    scale: float
    zero: int

    @staticmethod
    def of_range(lo: float, hi: float) -> "Code":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi - lo < MIN_RANGE:
            hi = lo + MIN_RANGE
        scale = float(np.float32((hi - lo) / 255.0))
        zero = int(np.clip(np.rint(-128.0 - lo / scale), -128, 127))
        return Code(scale, zero)


def _ranges(graph: gs.Graph, feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """min and max of every float tensor (graph inputs and node outputs) over ``feeds``."""
    model = ir.to_model(graph)
    names = [t.name for t in graph.inputs] + [t.name for n in graph.nodes for t in n.outputs
                                            if t.name and t.dtype == np.float32]
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    by_name = {t.name: t for n in graph.nodes for t in n.outputs if t.name}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, ir.static_shape(by_name[name])))
    sess = session(model.SerializeToString(), optimize=False)
    out_names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in feeds:
        values = dict(zip(out_names, sess.run(out_names, {k: v for k, v in feed.items() if k in inputs})))
        values.update({k: v for k, v in feed.items() if k in inputs})
        for name in names:
            v = values.get(name)
            if v is None or np.asarray(v).dtype != np.float32 or np.size(v) == 0:
                continue
            lo[name] = min(lo.get(name, np.inf), float(np.min(v)))
            hi[name] = max(hi.get(name, -np.inf), float(np.max(v)))
    return {n: (lo[n], hi[n]) for n in lo}


def _merge_concat_ranges(graph: gs.Graph, ranges: dict[str, tuple[float, float]]) -> None:
    """A Concat's inputs and output share one code: each gets the union of their ranges."""
    for node in graph.nodes:
        if ir.is_op(node, "Concat") and all(isinstance(t, gs.Variable) for t in node.inputs):
            names = [t.name for t in node.inputs] + [node.outputs[0].name]
            if all(n in ranges for n in names):
                union = (min(ranges[n][0] for n in names), max(ranges[n][1] for n in names))
                for n in names:
                    ranges[n] = union


def _activation_after(node: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The Relu (or Clip with lower bound 0) that alone reads ``node``'s output, when it can be folded into
    its requantization."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.name in ir.graph_outputs(graph):
        return None
    act = out.outputs[0]
    if ir.is_op(act, "Relu"):
        return act
    if ir.is_op(act, "Clip") and len(act.inputs) > 1 and act.inputs[1].name and ir.scalar_value(act.inputs[1]) == 0.0:
        return act
    return None


class QuantizeStaticInt8:
    name = "quantize-static-int8"
    kind = PassKind.APPROXIMATE
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})     # static shapes too, once there is a Conv (run)
    in_place = True
    preserves_shapes = True

    def __init__(self, calib_feeds: list[dict] | None):
        self.calib_feeds = calib_feeds

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not any(ir.is_op(n, "Conv") for n in graph.nodes):
            return PassResult(graph, False, notes=["no convolution: nothing quantized statically"])
        shapes.require_static_shapes(graph, where=f"needed by pass '{self.name}'")
        if not self.calib_feeds:
            raise LmcError("--quantize w8a8 of a convolutional model needs --calib calib.npz (its activation "
                           "ranges are measured on it)")
        ranges = _ranges(graph, self.calib_feeds)
        _merge_concat_ranges(graph, ranges)
        rewrite = _Rewrite(graph, ranges)
        counts = rewrite.run()
        graph.cleanup(remove_unused_graph_inputs=False)
        ir.topological_sort(graph)
        done = sum(counts.values())
        notes = [f"int8 operators: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}"]
        if rewrite.float_nodes:
            notes.append("left in float: " + ", ".join(sorted(rewrite.float_nodes)))
        return PassResult(graph, done > 0, stats={"int8_ops": done, "float_ops": len(rewrite.float_nodes)},
                          notes=notes, approximation="static int8 activations and weights" if done else None)


class _Rewrite:
    """The region-growing rewrite (see the module docstring): ``quant`` maps a float tensor's name to its
    int8 twin and code."""

    def __init__(self, graph: gs.Graph, ranges: dict[str, tuple[float, float]]):
        self.graph = graph
        self.ranges = ranges
        self.names = ir.Namer(graph)
        self.quant: dict[str, tuple[gs.Variable, Code]] = {}
        self.new_nodes: list[gs.Node] = []
        self.counts: dict[str, int] = {}
        self.float_nodes: set[str] = set()
        self.dropped: set[str] = set()        # float tensors no node computes any more (their int8 twin does)
        self.outputs = ir.graph_outputs(graph)

    # ---------------------------------------------------------------------------------------- helpers
    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(base), np.array(value, order="C"))     # (0-d stays 0-d)

    def _code_consts(self, base: str, code: Code) -> tuple[gs.Constant, gs.Constant]:
        return (self._const(base + "_scale", np.array(code.scale, np.float32)),
                self._const(base + "_zero", np.array(code.zero, np.int8)))

    def _int8_var(self, like: gs.Tensor, base: str) -> gs.Variable:
        return gs.Variable(self.names.fresh(base + "_q"), dtype=np.int8, shape=like.shape)

    def code(self, name: str) -> Code:
        lo, hi = self.ranges.get(name, (0.0, 1.0))
        return Code.of_range(lo, hi)

    def _count(self, op: str) -> None:
        self.counts[op] = self.counts.get(op, 0) + 1

    def quantized(self, t: gs.Tensor) -> tuple[gs.Variable, Code] | None:
        return self.quant.get(t.name)

    def quantize_input(self, t: gs.Variable) -> tuple[gs.Variable, Code]:
        """The int8 twin of float ``t`` (a QuantizeLinear placed after its producer)."""
        if t.name in self.quant:
            return self.quant[t.name]
        code = self.code(t.name)
        q = self._int8_var(t, t.name)
        scale, zero = self._code_consts(t.name, code)
        self.new_nodes.append(gs.Node("QuantizeLinear", name=self.names.fresh(t.name + "_quantize"),
                                      inputs=[t, scale, zero], outputs=[q]))
        self.quant[t.name] = (q, code)
        return q, code

    def dequantize(self, t: gs.Tensor, out: gs.Variable | None = None) -> gs.Variable:
        q, code = self.quant[t.name]
        out = out if out is not None else gs.Variable(self.names.fresh(t.name + "_dq"), dtype=np.float32,
                                                      shape=t.shape)
        scale, zero = self._code_consts(t.name + "_dq", code)
        self.new_nodes.append(gs.Node("DequantizeLinear", name=self.names.fresh(t.name + "_dequantize"),
                                      inputs=[q, scale, zero], outputs=[out]))
        return out

    def _emit(self, node: gs.Node) -> None:
        self.new_nodes.append(node)

    def _result(self, float_out: gs.Variable, code: Code, base: str) -> gs.Variable:
        """The int8 twin to produce for ``float_out`` (recorded now)."""
        q = self._int8_var(float_out, base)
        self.quant[float_out.name] = (q, code)
        return q

    # ---------------------------------------------------------------------------------------- rules
    def run(self) -> dict[str, int]:
        nodes = list(self.graph.nodes)
        removed: set[int] = set()
        for node in nodes:
            if id(node) in removed:
                continue
            handled = self.convert(node, removed)
            if handled:
                self.dropped.update(t.name for t in node.outputs if t.name)
                node.inputs.clear()
                node.outputs.clear()
                continue
            # a float node: dequantize what only exists in int8 now
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Variable) and t.name in self.dropped:
                    self.float_nodes.add(node.op)
                    node.inputs[i] = self.dequantize(t)
            self.new_nodes.append(node)
        # graph outputs that ended as int8 twins: dequantize into the float name
        for k, out in enumerate(self.graph.outputs):
            if out.name in self.dropped:
                fresh = gs.Variable(out.name, dtype=np.float32, shape=out.shape)
                self.dequantize(out, fresh)
                self.graph.outputs[k] = fresh
        self.graph.nodes = self.new_nodes
        return self.counts

    def _float_input_of_region(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Variable) and t.dtype == np.float32 and t.name in self.ranges

    def convert(self, node: gs.Node, removed: set[int]) -> bool:
        """Emit ``node``'s integer form when it has one here; True when done (the node is then dropped)."""
        if ir.is_op(node, "Conv"):
            return self._conv(node, removed)
        data = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if not data or not all(t.name in self.quant for t in data):
            return False
        if ir.is_op(node, "Relu"):
            q, code = self.quant[node.inputs[0].name]
            if code.zero == -128:          # already clamped at 0 by the saturation
                self.quant[node.outputs[0].name] = (q, code)
                self._count("Relu (folded)")
                return True
            return False
        if ir.is_op(node, VIEWS + ("MaxPool",)):
            if ir.is_op(node, "MaxPool") and len(node.outputs) > 1:
                return False
            q, code = self.quant[node.inputs[0].name]
            out = self._result(node.outputs[0], code, node.outputs[0].name)
            self._emit(gs.Node(node.op, name=self.names.fresh(node.name + "_int8"), attrs=dict(node.attrs),
                               inputs=[q] + list(node.inputs[1:]), outputs=[out]))
            self._count(node.op)
            return True
        if ir.is_op(node, "Concat"):
            codes = {self.quant[t.name][1] for t in node.inputs}
            if len(codes) != 1:
                return False
            code = codes.pop()
            out = self._result(node.outputs[0], code, node.outputs[0].name)
            self._emit(gs.Node("Concat", name=self.names.fresh(node.name + "_int8"), attrs=dict(node.attrs),
                               inputs=[self.quant[t.name][0] for t in node.inputs], outputs=[out]))
            self._count("Concat")
            return True
        if ir.is_op(node, ("GlobalAveragePool", "AveragePool")):
            return self._global_pool(node)
        if ir.is_op(node, "Add") and len(data) == 2:
            return self._add(node, removed)
        if ir.is_op(node, "Gemm"):
            return self._gemm(node)
        return False

    def _folded_output(self, node: gs.Node, removed: set[int]) -> gs.Variable:
        """The float tensor whose code ``node``'s integer form writes: a following Relu/Clip(0, c)'s output
        (that node then disappears) or the node's own."""
        act = _activation_after(node, self.graph)
        if act is None:
            return node.outputs[0]
        removed.add(id(act))
        out = act.outputs[0]
        self.dropped.add(out.name)
        if ir.is_op(act, "Clip") and len(act.inputs) > 2 and act.inputs[2].name:
            top = ir.scalar_value(act.inputs[2])
            lo, hi = self.ranges.get(out.name, (0.0, top))
            self.ranges[out.name] = (0.0, min(hi, top))
        self._count(f"{act.op} (folded)")
        act.inputs.clear()
        act.outputs.clear()
        return out

    def _conv(self, node: gs.Node, removed: set[int]) -> bool:
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if not isinstance(w, gs.Constant) or (b is not None and not isinstance(b, gs.Constant)):
            return False
        if self.quantized(x) is None:
            if not self._float_input_of_region(x):
                return False
            self.quantize_input(x)
        xq, xc = self.quant[x.name]
        wv = ir.const_value(w).astype(np.float32)
        c_out = wv.shape[0]
        wmax = np.abs(wv.reshape(c_out, -1)).max(axis=1)
        ws = (np.where(wmax > 0, wmax, 1.0) / 127.0).astype(np.float32)
        wq = np.clip(np.rint(wv / ws.reshape(-1, *([1] * (wv.ndim - 1)))), -127, 127).astype(np.int8)
        out_float = self._folded_output(node, removed)
        yc = self.code(out_float.name)
        yq = self._result(out_float, yc, out_float.name)
        xs, xz = self._code_consts(x.name + "_x", xc)
        ys, yz = self._code_consts(out_float.name + "_y", yc)
        inputs = [xq, xs, xz, self._const(w.name + "_q", wq), self._const(w.name + "_wscale", ws),
                  self._const(w.name + "_wzero", np.zeros(c_out, np.int8)), ys, yz]
        if b is not None:
            bias_scale = (np.float32(xc.scale) * ws).astype(np.float32)
            bq = np.clip(np.rint(ir.const_value(b).astype(np.float64) / bias_scale), -2**31, 2**31 - 1).astype(np.int32)
            inputs.append(self._const(b.name + "_q", bq))
        attrs = {k: v for k, v in node.attrs.items()}
        self._emit(gs.Node("QLinearConv", name=self.names.fresh(node.name + "_int8"), attrs=attrs, inputs=inputs,
                           outputs=[yq]))
        self._count("QLinearConv")
        return True

    def _global_pool(self, node: gs.Node) -> bool:
        x = node.inputs[0]
        shape = ir.static_shape(x)
        if shape is None or len(shape) != 4:
            return False
        if ir.is_op(node, "AveragePool"):
            k = list(node.attrs.get("kernel_shape", []))
            pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
            if k != list(shape[2:]) or any(pads) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID"):
                return False
        xq, xc = self.quant[x.name]
        out = node.outputs[0]
        yc = self.code(out.name)
        yq = self._result(out, yc, out.name)
        xs, xz = self._code_consts(x.name + "_x", xc)
        ys, yz = self._code_consts(out.name + "_y", yc)
        self._emit(gs.Node("QLinearGlobalAveragePool", name=self.names.fresh(node.name + "_int8"), domain=ir.MS_DOMAIN,
                           attrs={"channels_last": 0}, inputs=[xq, xs, xz, ys, yz], outputs=[yq]))
        self._count("QLinearGlobalAveragePool")
        return True

    def _add(self, node: gs.Node, removed: set[int]) -> bool:
        a, b = node.inputs
        if ir.static_shape(a) != ir.static_shape(b):
            return False
        (aq, ac), (bq, bc) = self.quant[a.name], self.quant[b.name]
        out = self._folded_output(node, removed)
        yc = self.code(out.name)
        yq = self._result(out, yc, out.name)
        sa, za = self._code_consts(a.name + "_a", ac)
        sb, zb = self._code_consts(b.name + "_b", bc)
        sy, zy = self._code_consts(out.name + "_y", yc)
        self._emit(gs.Node("QLinearAdd", name=self.names.fresh(node.name + "_int8"), domain=ir.MS_DOMAIN,
                           inputs=[aq, sa, za, bq, sb, zb, sy, zy], outputs=[yq]))
        self._count("QLinearAdd")
        return True

    def _gemm(self, node: gs.Node) -> bool:
        a, bw = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if not isinstance(bw, gs.Constant) or int(node.attrs.get("transA", 0)) or (c is not None and not isinstance(c, gs.Constant)):
            return False
        if float(node.attrs.get("beta", 1.0)) != 1.0:
            return False
        trans_b = int(node.attrs.get("transB", 0))
        bv = ir.const_value(bw).astype(np.float32)
        n = bv.shape[0] if trans_b else bv.shape[1]
        if c is not None and ir.const_value(c).size not in (1, n):
            return False
        aq, ac = self.quant[a.name]
        cols = bv if trans_b else bv.T                          # [n, k]
        wmax = np.abs(cols).max(axis=1)
        ws = (np.where(wmax > 0, wmax, 1.0) / 127.0).astype(np.float32)
        colq = np.clip(np.rint(cols / ws[:, None]), -127, 127).astype(np.int8)
        bq = colq if trans_b else np.ascontiguousarray(colq.T)
        alpha = float(node.attrs.get("alpha", 1.0))
        out = node.outputs[0]
        sa, za = self._code_consts(a.name + "_a", ac)
        inputs = [aq, sa, za, self._const(bw.name + "_q", bq), self._const(bw.name + "_wscale", ws),
                  self._const(bw.name + "_wzero", np.zeros(n, np.int8))]
        bias_scale = (np.float32(ac.scale) * ws * np.float32(alpha)).astype(np.float32)
        if c is not None:
            cv = np.broadcast_to(ir.const_value(c).astype(np.float64).reshape(-1), (n,))
            inputs.append(self._const(c.name + "_q", np.clip(np.rint(cv / bias_scale), -2**31, 2**31 - 1).astype(np.int32)))
        else:
            inputs.append(gs.Variable.empty())
        float_out = out.name in self.outputs or any(
            not ir.is_op(r, VIEWS + ("Relu", "MaxPool", "Concat", "Add", "Gemm", "GlobalAveragePool", "AveragePool"))
            for r in out.outputs)
        attrs = {"transA": 0, "transB": trans_b, "alpha": alpha}
        if float_out:
            self._emit(gs.Node("QGemm", name=self.names.fresh(node.name + "_int8"), domain=ir.MS_DOMAIN, attrs=attrs,
                               inputs=inputs, outputs=[out]))
            node.outputs.clear()
        else:
            yc = self.code(out.name)
            yq = self._result(out, yc, out.name)
            sy, zy = self._code_consts(out.name + "_y", yc)
            self._emit(gs.Node("QGemm", name=self.names.fresh(node.name + "_int8"), domain=ir.MS_DOMAIN, attrs=attrs,
                               inputs=inputs + [sy, zy], outputs=[yq]))
        self._count("QGemm")
        return True
