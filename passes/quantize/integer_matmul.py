"""Integer products for w8a8's QDQ MatMuls, int8 activations between them (approximate; C-bundle targets).

After ``quantize-w8a8`` a matrix product reads ``DequantizeLinear(QuantizeLinear(x, s_x, z_x))`` and
``DequantizeLinear(W_q, s_w[n], axis=1)``: its float sum Σ_k s_x (q_x − z_x) · s_w[n] q_w[k, n] has no
specified order, so two correct runtimes (onnxruntime's MLAS, the C bundle) may round it apart and a
following QuantizeLinear may then land one step apart. This pass states the integer arithmetic instead:

- a product whose output feeds float operators becomes com.microsoft ``MatMulIntegerToFloat``:
  y = float(acc) · float32(s_x · s_w[n]) with acc = Σ_k (q_x − z_x) q_w[k, n] the exact int32 sum (one
  rounding, specified);
- a product whose output feeds operators that have an int8 form becomes ``QLinearMatMul`` with an int8 output
  code: q_y = saturate(round_half_even(float(acc) · float32(float32(s_x s_w[n]) / s_y)) + z_y);
- from there int8 travels: Split, Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity keep the code;
  Sigmoid → com.microsoft ``QLinearSigmoid`` (a 256-entry table of onnxruntime's own sigmoid);
  Mul of two int8 tensors → com.microsoft ``QLinearMul``:
  q_y = saturate(round_half_even(float((q_a − z_a)(q_b − z_b)) · float32(float32(s_a s_b) / s_y)) + z_y);
  a QuantizeLinear of an int8 tensor in the same code disappears;
- everything else stays float (norms, softmax, rotary, residual adds, attention's activation products) and
  reads a DequantizeLinear of the int8 tensor (y = float(q − z) · s: one rounding).

Codes: an int8 output read only by a QuantizeLinear with constant scale and zero point takes that code (so the
requantization is the one w8a8 chose); other outputs get the asymmetric code of their range measured on the
calibration feeds (``static_int8.Code.of_range``). Without static shapes or calibration feeds only the
float-output rewrite is made (exact with respect to the QDQ graph up to the one rounding it specifies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.quantize.static_int8 import Code, _ranges

log = logging.getLogger(__name__)

VIEWS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
INT8_FORMS = VIEWS + ("Split", "Sigmoid", "Mul", "QuantizeLinear")


@dataclass(frozen=True)
class QdqMatMul:
    """A MatMul of QuantizeLinear→DequantizeLinear activations by a DequantizeLinear'd constant int8 weight."""

    node: gs.Node
    xq: gs.Variable          # int8 activations
    x_code: Code
    weight: np.ndarray       # int8 [K, N]
    w_scale: np.ndarray      # float32 [N]


def _const_scalar(t: gs.Tensor | None, dtype) -> float | int | None:
    if t is None or not t.name:
        return 0 if dtype == np.int8 else None
    v = ir.const_value(t)
    if v is None or v.size != 1 or v.dtype != np.dtype(dtype):
        return None
    return v.reshape(()).item()


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 and ir.is_op(t.inputs[0], op) else None


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def match_qdq_matmul(node: gs.Node) -> QdqMatMul | None:
    if not ir.is_op(node, "MatMul") or len(node.inputs) != 2:
        return None
    dqx, dqw = _producer(node.inputs[0], "DequantizeLinear"), _producer(node.inputs[1], "DequantizeLinear")
    if dqx is None or dqw is None:
        return None
    xq = dqx.inputs[0]
    sx, zx = _const_scalar(_input(dqx, 1), np.float32), _const_scalar(_input(dqx, 2), np.int8)
    if not isinstance(xq, gs.Variable) or xq.dtype != np.int8 or sx is None or zx is None:
        return None
    wq = ir.const_value(dqw.inputs[0])
    ws = ir.const_value(dqw.inputs[1]) if _input(dqw, 1) is not None else None
    wz = ir.const_value(dqw.inputs[2]) if _input(dqw, 2) is not None else None
    if wq is None or wq.dtype != np.int8 or wq.ndim != 2 or ws is None or ws.dtype != np.float32:
        return None
    if int(dqw.attrs.get("block_size", 0)) or (wz is not None and np.any(wz)):
        return None
    n = wq.shape[1]
    if ws.size == n and ws.ndim == 1 and int(dqw.attrs.get("axis", 1)) in (1, -1):
        scale = ws.astype(np.float32)
    elif ws.size == 1:
        scale = np.full(n, ws.reshape(()), np.float32)
    else:
        return None
    return QdqMatMul(node, xq, Code(float(sx), int(zx)), wq, scale)


def _static(graph: gs.Graph) -> bool:
    return all(ir.static_shape(t) is not None for n in graph.nodes for t in n.outputs if t.name and t.outputs) and \
        all(ir.static_shape(t) is not None for t in graph.inputs)


class IntegerMatMuls:
    name = "quantize-integer-matmuls"
    kind = PassKind.APPROXIMATE
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True

    def __init__(self, calib_feeds: list[dict] | None):
        self.calib_feeds = calib_feeds

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        matches = [m for m in (match_qdq_matmul(n) for n in graph.nodes) if m is not None]
        if not matches:
            return PassResult(graph, False, notes=["no QDQ matrix product: nothing made integer"])
        int8_flow = bool(self.calib_feeds) and _static(graph)
        ranges = _ranges(graph, self.calib_feeds) if int8_flow else {}
        rewrite = _Rewrite(graph, {id(m.node): m for m in matches}, ranges, int8_flow)
        counts = rewrite.run()
        graph.cleanup(remove_unused_graph_inputs=False)
        ir.topological_sort(graph)
        notes = [f"integer operators: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}"]
        if not int8_flow:
            notes.append("int8 activations between operators need static shapes and --calib: products only")
        return PassResult(graph, True, stats={"integer_matmuls": len(matches),
                                              "int8_ops": sum(counts.values()) - len(matches)},
                          notes=notes, approximation="integer products, int8 activations between operators"
                          if int8_flow else None)


class _Rewrite:
    """Nodes in order; ``quant`` maps a float tensor's name to its int8 twin and code; ``dropped`` holds the
    float tensors no node computes any more (a float reader gets a DequantizeLinear of the twin)."""

    def __init__(self, graph: gs.Graph, matches: dict[int, QdqMatMul], ranges: dict, int8_flow: bool):
        self.graph, self.matches, self.ranges, self.int8_flow = graph, matches, ranges, int8_flow
        self.names = ir.Namer(graph)
        self.quant: dict[str, tuple[gs.Variable, Code]] = {}
        self.dropped: set[str] = set()
        self.dequantized: dict[str, gs.Variable] = {}
        self.absorbed: dict[str, gs.Variable] = {}    # a QuantizeLinear's output -> the int8 twin it was
        self.new_nodes: list[gs.Node] = []
        self.counts: dict[str, int] = {}
        self.outputs = ir.graph_outputs(graph)

    def _const(self, base: str, value) -> gs.Constant:
        return gs.Constant(self.names.fresh(base), np.array(value, order="C"))

    def _code_consts(self, base: str, code: Code) -> list[gs.Constant]:
        return [self._const(base + "_scale", np.array(code.scale, np.float32)),
                self._const(base + "_zero", np.array(code.zero, np.int8))]

    def _count(self, op: str) -> None:
        self.counts[op] = self.counts.get(op, 0) + 1

    def _twin(self, t: gs.Tensor, code: Code) -> gs.Variable:
        q = gs.Variable(self.names.fresh(t.name + "_i8"), dtype=np.int8, shape=t.shape)
        self.quant[t.name] = (q, code)
        self.dropped.add(t.name)
        return q

    def code_for(self, t: gs.Tensor) -> Code | None:
        """The code an int8 form of ``t`` writes: its only reader's QuantizeLinear's, else its calibrated
        range's (None: no range, or ``t`` is a graph output)."""
        if t.name in self.outputs:
            return None
        readers = list(t.outputs)
        if len(readers) == 1 and ir.is_op(readers[0], "QuantizeLinear"):
            q = readers[0]
            s, z = _const_scalar(_input(q, 1), np.float32), _const_scalar(_input(q, 2), np.int8)
            if s is not None and z is not None and q.outputs[0].dtype == np.int8:
                return Code(float(s), int(z))
        if t.name not in self.ranges:
            return None
        return Code.of_range(*self.ranges[t.name])

    def _int8_reader(self, node: gs.Node) -> bool:
        """Would ``node`` take an int8 input in its int8 form?"""
        return ir.is_op(node, INT8_FORMS)

    def run(self) -> dict[str, int]:
        for node in list(self.graph.nodes):
            if self.convert(node):
                node.inputs.clear()
                node.outputs.clear()
                continue
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Variable) and t.name in self.dropped:
                    node.inputs[i] = self.dequantize(t)
            self.new_nodes.append(node)
        for k, out in enumerate(self.graph.outputs):
            if out.name in self.dropped:
                fresh = gs.Variable(out.name, dtype=np.float32, shape=out.shape)
                self._dequantize_into(out, fresh)
                self.graph.outputs[k] = fresh
        self.graph.nodes = self.new_nodes
        return self.counts

    def _dequantize_into(self, t: gs.Tensor, out: gs.Variable) -> None:
        q, code = self.quant[t.name]
        self.new_nodes.append(gs.Node("DequantizeLinear", name=self.names.fresh(t.name + "_dequantize"),
                                      inputs=[q, *self._code_consts(t.name + "_dq", code)], outputs=[out]))

    def dequantize(self, t: gs.Tensor) -> gs.Variable:
        if t.name not in self.dequantized:
            out = gs.Variable(self.names.fresh(t.name + "_dq"), dtype=np.float32, shape=t.shape)
            self._dequantize_into(t, out)
            self.dequantized[t.name] = out
        return self.dequantized[t.name]

    # ---------------------------------------------------------------------------------------- rules
    def convert(self, node: gs.Node) -> bool:
        match = self.matches.get(id(node))
        if match is not None:
            return self._matmul(match)
        if not self.int8_flow:
            return False
        data = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if not data or not all(t.name in self.quant for t in data):
            return False
        if ir.is_op(node, "QuantizeLinear"):
            return self._requantize(node)
        if ir.is_op(node, VIEWS + ("Split",)):
            code = self.quant[node.inputs[0].name][1]
            outs = [self._twin(t, code) for t in node.outputs]
            self.new_nodes.append(gs.Node(node.op, name=self.names.fresh(node.name + "_int8"), attrs=dict(node.attrs),
                                          inputs=[self.quant[node.inputs[0].name][0]] + list(node.inputs[1:]),
                                          outputs=outs))
            self._count(node.op)
            return True
        if ir.is_op(node, "Sigmoid"):
            return self._elementwise(node, "QLinearSigmoid", [node.inputs[0]])
        if ir.is_op(node, "Mul") and len(data) == 2 and ir.static_shape(data[0]) == ir.static_shape(data[1]):
            return self._elementwise(node, "QLinearMul", data)
        return False

    def _requantize(self, node: gs.Node) -> bool:
        """QuantizeLinear of an int8 tensor already in its code: its readers read the twin."""
        q, code = self.quant[node.inputs[0].name]
        s, z = _const_scalar(_input(node, 1), np.float32), _const_scalar(_input(node, 2), np.int8)
        out = node.outputs[0]
        if s is None or z is None or Code(float(s), int(z)) != code or out.dtype != np.int8 or out.name in self.outputs:
            return False
        for reader in list(out.outputs):
            for i, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[i] = q
        self.absorbed[out.name] = q
        self._count("QuantizeLinear (absorbed)")
        return True

    def _elementwise(self, node: gs.Node, op: str, operands: list[gs.Tensor]) -> bool:
        out = node.outputs[0]
        code = self.code_for(out)
        if code is None:
            return False
        inputs = []
        for t in operands:
            q, c = self.quant[t.name]
            inputs += [q, *self._code_consts(t.name + "_in", c)]
        y = self._twin(out, code)
        self.new_nodes.append(gs.Node(op, name=self.names.fresh(node.name + "_int8"), domain=ir.MS_DOMAIN,
                                      inputs=inputs + self._code_consts(out.name + "_y", code), outputs=[y]))
        self._count(op)
        return True

    def _matmul(self, m: QdqMatMul) -> bool:
        node, out = m.node, m.node.outputs[0]
        xq = self.absorbed.get(m.xq.name, m.xq)
        n = m.weight.shape[1]
        base = node.inputs[1].name
        w = self._const(base + "_i8", m.weight)
        code = self.code_for(out) if self.int8_flow and any(self._int8_reader(r) for r in out.outputs) else None
        x_scale = self._const(m.xq.name + "_scale", np.array(m.x_code.scale, np.float32))
        x_zero = self._const(m.xq.name + "_zero", np.array(m.x_code.zero, np.int8))
        if code is None:            # float output: y = float(acc) · float32(s_x s_w[n])
            inputs = [xq, w, x_scale, self._const(base + "_wscale", m.w_scale)]
            if m.x_code.zero:
                inputs.append(x_zero)
            self.new_nodes.append(gs.Node("MatMulIntegerToFloat", name=self.names.fresh(node.name + "_integer"),
                                          domain=ir.MS_DOMAIN, inputs=inputs, outputs=[out]))
            self._count("MatMulIntegerToFloat")
            node.outputs.clear()
            return True
        y = self._twin(out, code)
        w_scale = self._const(base + "_wscale", m.w_scale if len(set(m.w_scale.tolist())) > 1 else m.w_scale[:1].reshape(()))
        w_zero = self._const(base + "_wzero", np.zeros(n, np.int8) if w_scale.values.ndim else np.array(0, np.int8))
        self.new_nodes.append(gs.Node("QLinearMatMul", name=self.names.fresh(node.name + "_int8"),
                                      inputs=[xq, x_scale, x_zero, w, w_scale, w_zero,
                                              *self._code_consts(out.name + "_y", code)], outputs=[y]))
        self._count("QLinearMatMul")
        return True
