"""A generation bundle's positions from an ``attention_mask`` input: the interface onnxruntime-genai drives.

onnxruntime-genai feeds a decoder ``input_ids`` [B, S] and ``attention_mask`` [B, T] (T = every token so far,
the S new ones last), and ``position_ids`` only when the model declares that input. Its mask is 1 for every
token up to a row's last real one and 0 for a batch row's trailing pads (it right-pads: a prompt's pads sit
after its tokens, and ``pad_token_id`` tokens before a real token count as tokens); each decode step appends
a 1 to every row. Its own position ids would be the index in the row for the prompt's tokens, 0 for the
trailing pads, then each row's last real position + 1, + 2, … — a row's count of real tokens.

The bundle (``StaticKVCache``: slot = position for full layers, a ring slot of the position for windowed
ones) needs positions that are consecutive within a step. So, with R[b] = Σ mask[b, :T − S] (the real
tokens before this step):
    position_ids[b, i] = R[b] + i                     i = 0 … S − 1
computed in the graph from ``attention_mask`` (``Σ mask[b, :]`` − ``Σ mask[b, T − S:]``), replacing the
``position_ids`` input (genai then passes none). For a full mask (batch 1, or rows that advance together, as
lmc's own driver feeds it) that is P … P + S − 1, the positions the bundle had as inputs. For genai's
right-padded prompt, a row of n real tokens and S − n pads gets 0 … S − 1: its real tokens at their own
positions (causal: none of them sees a pad), the pads after them; each decode step is then at position
n + k, written over the pad in slot n + k before any query can see that slot — so every row generates what
it would alone. (A windowed ring: a pad at position n + d lies in the slot of n + d − r, outside every
window the row's queries use until it is overwritten, as long as S ≤ the prefill chunk.)

Precondition: the generalised generation graph (symbolic ``sequence_length``) with ``position_ids`` [B, S]
an input. The mask's length dim is named ``total_sequence_length``; plans count it at [B, context].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.metadata import GenerationInfo

ATTENTION_MASK = "attention_mask"
TOTAL_DIM = "total_sequence_length"


def add_attention_mask(graph: gs.Graph, info: GenerationInfo, templates: dict | None = None) -> GenerationInfo:
    """Replace the ``position_ids`` input of a generalised generation graph by positions computed from a new
    ``attention_mask`` input [B, total] (module docstring); ``templates`` (shape templates of the generation
    build) get the mask at [B, context] and the new tensors' dims. Returns ``info`` naming the mask."""
    inputs = {t.name: t for t in graph.inputs}
    if info.position_ids not in inputs or info.input_ids not in inputs:
        raise LmcError(f"--context: the compiled model has no '{info.position_ids}' input to derive from "
                       f"{ATTENTION_MASK}")
    if ATTENTION_MASK in graph.tensors():
        raise LmcError(f"--context: the compiled model already has a tensor named '{ATTENTION_MASK}'")
    positions, ids = inputs[info.position_ids], inputs[info.input_ids]
    batch, seq = ids.shape[0], ids.shape[1]
    i64 = np.int64
    names = ir.Namer(graph)
    mask = gs.Variable(ATTENTION_MASK, dtype=i64, shape=[batch, TOTAL_DIM])
    nodes: list[gs.Node] = []

    def add(op, ins, name, shape, dtype=i64, **attrs):
        out = gs.Variable(names.fresh(name), dtype=dtype, shape=shape)
        nodes.append(gs.Node(op, name=out.name, attrs=attrs, inputs=ins, outputs=[out]))
        return out

    def c(name, value):
        return gs.Constant(names.fresh(name), np.asarray(value, dtype=i64))

    length = add("Shape", [ids], "lmc_mask_new_length", [1], start=1, end=2)
    start = add("Neg", [length], "lmc_mask_new_start", [1])
    new = add("Slice", [mask, start, c("lmc_mask_end", [np.iinfo(i64).max]), c("lmc_mask_axis", [1])],
              "lmc_mask_new", [batch, seq])
    every = add("ReduceSum", [mask, c("lmc_mask_axes", [1])], "lmc_mask_tokens", [batch, 1], keepdims=1)
    fresh = add("ReduceSum", [new, c("lmc_mask_axes_new", [1])], "lmc_mask_new_tokens", [batch, 1], keepdims=1)
    before = add("Sub", [every, fresh], "lmc_mask_past_tokens", [batch, 1])
    count = add("Squeeze", [length, c("lmc_mask_squeeze", [0])], "lmc_mask_count", [])
    steps = add("Range", [c("lmc_mask_zero", 0), count, c("lmc_mask_one", 1)], "lmc_mask_steps", [seq])
    nodes.append(gs.Node("Add", name=names.fresh("lmc_mask_positions"), inputs=[before, steps], outputs=[positions]))
    graph.inputs.remove(positions)
    graph.inputs.insert(graph.inputs.index(ids) + 1, mask)
    graph.nodes.extend(nodes)
    ir.topological_sort(graph)
    if templates is not None:
        templates[mask.name] = [(0, int(batch)), (0, int(info.context))]
        for node in nodes:
            out = node.outputs[0]
            templates[out.name] = [(1, 0) if d == seq else (0, int(d)) for d in out.shape]
    return dataclasses.replace(info, attention_mask=ATTENTION_MASK)
