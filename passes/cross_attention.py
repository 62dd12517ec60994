"""Cross-attention state of an encoder–decoder export (optimum's layout, Whisper and T5 alike).

The decoder with past reads every layer's cross-attention keys and values as graph inputs
``past_key_values.{i}.encoder.key|value`` [B, H, L, D] — no Concat and no ``present``: they do not change while
decoding — and, for a text encoder, ``encoder_attention_mask`` [B, L] (0 at padded positions). They are
*fixed inputs*: one value per encoder input, the same for every decoder step. The decoder without past computes
them from ``encoder_hidden_states`` (its outputs ``present.{i}.encoder.key|value``, the cross-attention k/v
projections reshaped to heads); ``cross_projection_graph`` joins those projections to the encoder, so one
one-shot model maps the encoder's inputs straight to the cross state, named as the decoder reads it:
    past_key_values.{i}.encoder.{k|v} = heads(W_{k|v,i} · encoder(x) [+ b])
Precondition: with the decoder's token count bound, those outputs depend on ``encoder_hidden_states`` alone
(exports take the batch size of the reshape from the decoder's own hidden states: a shape, which folds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.passes.fold_constants import fold_to_fixed_point

log = logging.getLogger(__name__)

CROSS_PREFIX = "past_key_values."
CROSS_MARK = ".encoder."
PRESENT_PREFIX = "present."
ENCODER_PREFIX = "encoder_"
HIDDEN_STATES = "encoder_hidden_states"
ENCODER_MASK = "encoder_attention_mask"


def is_cross_input(name: str) -> bool:
    """``past_key_values.{i}.encoder.key|value``: a layer's cross-attention keys or values."""
    return name.startswith(CROSS_PREFIX) and CROSS_MARK in name


def is_fixed_input(name: str) -> bool:
    """An input that holds the same value at every step of a generation: the cross state, or an input of
    the encoder's (``encoder_attention_mask``, ``encoder_hidden_states``)."""
    return is_cross_input(name) or name.startswith(ENCODER_PREFIX)


def present_name(cross: str) -> str:
    """The decoder-without-past output holding a cross input's value: ``present.{i}.encoder.key|value``."""
    return PRESENT_PREFIX + cross[len(CROSS_PREFIX):]


@dataclass(frozen=True)
class CrossState:
    """The fixed inputs of a decoder with past: cross keys/values (name → [B, H, L, D], L symbolic until
    bound) and the encoder's attention mask input (None: the decoder takes none, e.g. Whisper)."""

    tensors: dict[str, tuple]
    mask: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tensors)


def cross_state(graph: gs.Graph) -> CrossState:
    """The cross state a decoder with past reads; LmcError when a cross input is not plain attention state
    (concatenated to, i.e. a growing cache) or when a fixed input is neither cross state nor the mask."""
    tensors: dict[str, tuple] = {}
    mask = None
    for t in graph.inputs:
        if is_cross_input(t.name):
            if t.shape is None or len(t.shape) != 4:
                raise LmcError(f"--context: cross-attention input '{t.name}' is not [batch, heads, length, "
                               f"head_dim] (shape {t.shape})")
            if any(ir.is_op(n, "Concat") for n in t.outputs):
                raise LmcError(f"--context: cross-attention input '{t.name}' is concatenated to (a growing "
                               "cache); encoder–decoder bundles take cross keys/values fixed per input")
            tensors[t.name] = tuple(t.shape)
        elif t.name == ENCODER_MASK:
            mask = t.name
        elif is_fixed_input(t.name):
            raise LmcError(f"--context: the decoder with past reads '{t.name}'; encoder–decoder bundles take "
                           f"the encoder's output only as cross-attention keys/values (past_key_values.*.encoder.*)")
    if not tensors:
        raise LmcError("--context: the decoder with past has no cross-attention inputs "
                       "(past_key_values.{i}.encoder.key|value)")
    return CrossState(tensors, mask)


def bind_cross_state(graph: gs.Graph, cross: CrossState, batch: int, length: int) -> dict[str, list[int]]:
    """Give the decoder's fixed inputs static shapes (batch, encoder length L); returns name → dims."""
    bound: dict[str, list[int]] = {}
    for t in graph.inputs:
        if t.name in cross.tensors:
            _, heads, _, depth = t.shape
            if not all(isinstance(d, int) and d > 0 for d in (heads, depth)):
                raise LmcError(f"--context: cross-attention input '{t.name}' has no static heads and head_dim "
                               f"({t.shape})")
            t.shape = [batch, heads, length, depth]
        elif t.name == cross.mask:
            t.shape = [batch, length]
        else:
            continue
        bound[t.name] = list(t.shape)
    return bound


def _fold(graph: gs.Graph) -> None:
    shapes.infer_shapes(graph)
    fold_to_fixed_point(graph, 6)


def cross_projection_graph(encoder: gs.Graph, without_past: gs.Graph, cross: CrossState,
                           encoder_shapes: dict[str, list[int]]) -> gs.Graph:
    """One graph from the encoder's inputs (bound to ``encoder_shapes``) to the cross state: the encoder
    followed by the cross-attention projections of ``without_past`` (its ``present.{i}.encoder.*`` cone),
    outputs named as the decoder with past reads them. Both graphs are consumed."""
    shapes.bind_input_shapes(encoder, encoder_shapes)
    _fold(encoder)
    if len(encoder.outputs) != 1:
        raise LmcError(f"--context: the encoder has {len(encoder.outputs)} outputs; expected one "
                       "(last_hidden_state)")
    hidden = encoder.outputs[0]
    dims = ir.static_shape(hidden)
    if dims is None or len(dims) != 3:
        raise LmcError(f"--context: the encoder's output '{hidden.name}' has no static [batch, length, d_model] "
                       f"shape at the bound inputs ({hidden.shape})")
    inputs = {t.name: t for t in without_past.inputs}
    if HIDDEN_STATES not in inputs:
        raise LmcError(f"--context: the decoder without past has no '{HIDDEN_STATES}' input; lmc cannot tell "
                       "how it computes the cross-attention keys/values")
    for t in without_past.inputs:          # only shapes of the decoder's own inputs reach the projections
        if t.name == HIDDEN_STATES:
            t.shape = list(dims)
        elif t.name == cross.mask:
            t.shape = [dims[0], dims[1]]
        elif t.shape is not None:
            t.shape = [dims[0]] + [1] * (len(t.shape) - 1)
    _fold(without_past)
    outputs = {t.name: t for t in without_past.outputs}
    missing = [name for name in cross.names if present_name(name) not in outputs]
    if missing:
        raise LmcError(f"--context: the decoder without past does not output '{present_name(missing[0])}', "
                       f"the value of the decoder's input '{missing[0]}'")
    wanted = [outputs[present_name(name)] for name in cross.names]
    nodes, leaves = ir.cone(wanted, without_past)
    if leaves - {HIDDEN_STATES}:
        raise LmcError(f"--context: the cross-attention keys/values depend on {sorted(leaves - {HIDDEN_STATES})} "
                       f"besides the encoder output; lmc cannot compute them once per input")
    names = ir.Namer(encoder)
    renamed: set[int] = set()
    for node in nodes:
        node.name = names.fresh("cross/" + node.name)
        for t in list(node.inputs) + list(node.outputs):
            if id(t) in renamed or t.name == HIDDEN_STATES:
                continue
            renamed.add(id(t))
            t.name = names.fresh("cross/" + t.name)
        for i, t in enumerate(node.inputs):
            if t.name == HIDDEN_STATES:
                node.inputs[i] = hidden
    for name, t in zip(cross.names, wanted):
        t.name = name
        expected = list(cross.tensors[name])
        got = ir.static_shape(t)
        if got is not None and (len(got) != 4 or [got[1], got[3]] != [expected[1], expected[3]]):
            raise LmcError(f"--context: the decoder without past computes '{present_name(name)}' with shape {got}, "
                           f"which the decoder with past cannot read as '{name}' {expected}")
    graph = gs.Graph(nodes=list(encoder.nodes) + nodes, inputs=list(encoder.inputs), outputs=wanted,
                     opset=max(int(encoder.opset), int(without_past.opset)),
                     import_domains=encoder.import_domains, name="encoder_cross_state")
    for node in nodes:              # shapes as the branch or the free dims left them: inferred afresh
        for t in node.outputs:
            t.shape = None
    ir.topological_sort(graph)
    _fold(graph)
    log.info("cross state: %d tensors from the encoder's %s", len(wanted), ", ".join(t.name for t in graph.inputs))
    return graph

