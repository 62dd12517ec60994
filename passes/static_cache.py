"""Static KV cache: a decoder exported with past/present key-values becomes one whose cache is a fixed-size
state updated in place.

Precondition (as optimum / transformers / torch.onnx export decoders): for every layer a *cache pair* — a
graph input ``past`` [B, Hkv, P, D] and a graph output ``present = Concat(past, new, axis=2)`` — feeding
one scaled-dot-product attention, written in any of the exporters' forms:
    K' = repeat_kv(present_k)            Unsqueeze(2)→Expand→Reshape, Gather(axis 1, repeat(arange)), or none
    s  = MatMul(Q·c_q, Transpose(K')·c_k) · c_s      (the scalars c may sit on either side, as Mul or Div)
    s  = s + M  |  Where(C, s, f)        M or (C, f) a causal mask built at run time from ``attention_mask``
    p  = Softmax(s, axis=-1) [→ Where(IsNaN(p), 0, p)] [Cast]
    y  = MatMul(p, repeat_kv(present_v))
The mask's construction is not matched op by op: its cone is evaluated under onnxruntime for several
(batch, past, sequence) probes with a full ``attention_mask`` and must equal the causal mask
(key j visible from query i iff j ≤ P + i); any exporter's way of building it (Trilu, Range and
comparisons, Where, Expand, −inf or finfo.min) passes.

Rewrite, with N = context (cache slots) and ``position_ids`` [B, S] the absolute positions of the new
tokens (slot = position):
    present_k = TensorScatter(past_k [B, Hkv, N, D], k_new, write_indices = position_ids[:, 0])
    y = Attention(Q, present_k, present_v, attn_mask = (j ≤ position_ids[b, i]),
                  nonpad_kv_seqlen = position_ids[:, -1] + 1, scale = c_q·c_k·c_s)        (opset 24)
Bound to one buffer for ``past`` and ``present``, onnxruntime writes the new rows in place: no step
copies the cache and memory does not grow with the number of tokens. Exact: for a full attention_mask
the original and the rewritten graph compute the same scores over the same keys. The ``attention_mask``
input is dropped (a reader left elsewhere, e.g. positions from its cumulative sum, gets an all-ones mask
of length position_ids[:, -1] + 1); ``Shape`` readers of ``past``/``present`` get the shapes the
original would have seen ([B, Hkv, P, D] / [B, Hkv, P + S, D]).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.cache_masks import MaskPattern, check_masks, position_ranges
from lmc.passes.cache_sites import Roles, find_cache_pairs, find_roles, find_sites
from lmc.passes.upgrade_opset import UpgradeOpset

log = logging.getLogger(__name__)

STATE_OPSET = 24


@dataclass(frozen=True)
class Layout:
    """How one attention's cache is held and masked. Key position j is visible from query position q iff
    j ≤ q and (``window`` is None or q − j < ``window`` or (j < ``sinks`` and (``limit`` is None or
    q − j < ``limit``))). ``slots`` rows of state: a ring (slots < context) when a window bounds it, else
    slot = position. ``exact``: the original attention keeps exactly these keys."""

    window: int | None
    sinks: int
    limit: int | None
    slots: int
    exact: bool

    def describe(self, context: int) -> str:
        if self.window is None:
            return f"full ({self.slots} slots)"
        what = f"window {self.window}" + (f" + {self.sinks} sinks" if self.sinks else "")
        how = f"ring of {self.slots} slots" if self.slots < context else f"{self.slots} slots"
        return f"{what}{'' if self.exact else ' (approximate)'}, {how}"


def layout_for(pattern: MaskPattern, context: int, window: int, sinks: int, chunk: int) -> Layout:
    """A layer's layout from its mask's pattern and the user's ``--attention sliding:window,sinks`` (window
    0: none): the narrower window wins; a user window narrower than the model's keeps its sinks only while
    the model's window still sees them. A window needs sinks + W + (chunk − 1) ring slots — a prefill chunk
    never overwrites a key an earlier query of the same chunk still sees — when that is below ``context``."""
    model = pattern.window
    if window and (model is None or window < model):
        w, s, limit, exact = window, sinks, model, False
    else:
        w, s, limit, exact = model, 0, None, True
    if w is None:
        return Layout(None, 0, None, context, exact)
    ring = s + w + max(1, chunk) - 1
    return Layout(w, s, limit, ring if ring < context else context, exact)


class StaticKVCache:
    """Rewrite past/present cache pairs into fixed-size, in-place state: ``context`` slots for full
    attention, a ring for a windowed one (the model's own window, per layer, or the user's)."""

    name = "static-kv-cache"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = False

    def __init__(self, context: int, batch: int = 1, window: int = 0, sinks: int = 0, chunk: int = 1,
                 kv_int8: bool = False):
        self.context = int(context)
        self.kv_int8 = bool(kv_int8)
        self.batch = int(batch)
        self.window, self.sinks, self.chunk = int(window), int(sinks), max(1, int(chunk))

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        pairs = find_cache_pairs(graph)
        if not pairs:
            raise LmcError("--context: the model has no past/present key-value inputs and outputs "
                           "(a decoder exported with past, e.g. optimum's text-generation-with-past)")
        roles = find_roles(graph)
        sites = find_sites(graph, pairs)
        patterns = check_masks(graph, roles, pairs, sites, self.context, getattr(ctx, "masks", None))
        layouts = {id(site): layout_for(patterns[site.key.present.name], self.context, self.window, self.sinks,
                                        self.chunk) for site in sites}
        ranges = position_ranges(graph, roles, pairs)
        self._require_opset(graph, ctx)
        names = ir.Namer(graph)
        positions = self._positions(graph, roles, names)
        i64 = np.int64
        def c(name, v):    # an int64 constant (booleans stay boolean)
            v = np.asarray(v)
            return gs.Constant(names.fresh(name), v if v.dtype == np.bool_ else v.astype(i64))
        nodes: list[gs.Node] = []

        def var(name, dtype, shape=None):
            return gs.Variable(names.fresh(name), dtype=dtype, shape=shape)

        def add(op, inputs, out, **attrs):
            nodes.append(gs.Node(op, name=names.fresh(out.name), attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        b = self.batch
        write_at = add("Gather", [positions, c("lmc_first", 0)], var("lmc_write_index", i64, [b]), axis=1)
        last = add("Gather", [positions, c("lmc_last", -1)], var("lmc_last_position", i64, [b]), axis=1)
        total = add("Add", [last, c("lmc_one", 1)], var("lmc_kv_length", i64, [b]))
        qpos = add("Unsqueeze", [positions, c("lmc_axes13", [1, 3])], var("lmc_query_position", i64))
        masks: dict[Layout, tuple] = {}

        def masking(layout: Layout):
            """(mask, nonpad lengths, ring write indices by heads or None), made once per layout."""
            if layout not in masks:
                if layout.slots < self.context:   # a ring: the slots are not in position order, the mask says all
                    mask, indices = self._ring(layout, positions, last, qpos, add, c, var)
                    masks[layout] = (mask, gs.Variable.empty(), indices)
                else:
                    slots = c("lmc_slots", np.arange(self.context))
                    mask = add("LessOrEqual", [slots, qpos], var("lmc_attn_mask", np.bool_))
                    if layout.window is not None:
                        mask = add("And", [mask, self._recent(layout, slots, qpos, add, c, var)],
                                   var("lmc_window_mask", np.bool_))
                    masks[layout] = (mask, total, None)
            return masks[layout]

        # Shape readers of past/present see the shapes of the original: [B, Hkv, P, D], [B, Hkv, P+S, D]
        # (row 0's lengths: Shape readers describe one tensor for all rows)
        past_len = add("Slice", [write_at, c("lmc_row0", [0]), c("lmc_row1", [1])], var("lmc_past_length", i64, [1]))
        total_len = add("Slice", [total, c("lmc_row0b", [0]), c("lmc_row1b", [1])], var("lmc_total_length", i64, [1]))
        layout_of_pair: dict[int, Layout] = {}
        for site in sites:
            layout = layouts[id(site)]
            mask, nonpad, _ = masking(layout)
            for pair in (site.key, site.value):
                if layout_of_pair.setdefault(id(pair), layout) != layout:
                    raise LmcError(f"--context: cache '{pair.present.name}' is read by attentions with different "
                                   f"masks; lmc cannot hold it as one state")
            for n in site.nodes:
                n.inputs.clear()
                n.outputs.clear()
            nodes.append(gs.Node("Attention", name=names.fresh(site.out.name + "_attention"),
                                 attrs={"scale": float(site.scale)},
                                 inputs=[site.q, site.key.present, site.value.present, mask, gs.Variable.empty(),
                                         gs.Variable.empty(), nonpad],
                                 outputs=[site.out]))
        for pair in pairs:
            layout = layout_of_pair[id(pair)]
            _, _, indices = masking(layout)
            d = pair.past.shape
            heads, depth = int(d[1]), int(d[3])
            pair.past.shape = [b, heads, layout.slots, depth]
            pair.concat.inputs.clear()
            pair.concat.outputs.clear()
            for length, tensor in ((past_len, pair.past), (total_len, pair.present)):
                self._redirect_shapes(tensor, length, b, heads, depth, add, c, var)
            def write(past, update, present, indices=indices, heads=heads):
                if indices is not None:
                    return add("ScatterND", [past, indices(heads), update], present)
                return add("TensorScatter", [past, update, write_at], present, axis=2, mode="linear")
            if self.kv_int8:
                readable = self._int8_state(graph, pair, heads, depth, write, add, c, var)
                for n in nodes:
                    for i, t in enumerate(n.inputs):
                        if ir.is_op(n, "Attention") and t is pair.present:
                            n.inputs[i] = readable
            else:
                write(pair.past, pair.new, pair.present)
            pair.present.shape = list(pair.past.shape)
        row_positions = []
        for t in ranges:          # positions P … P+S−1 computed from the cache length: row 0 of the positions
            row = add("Gather", [positions, c("lmc_row_zero", 0)], var(t.name + "_positions", i64, [positions.shape[1]]),
                      axis=0)
            ir.replace_tensor(graph, t, row)
            row_positions.append(row)
        graph.nodes.extend(nodes)
        if roles.attention_mask is not None:
            self._replace_attention_mask(graph, roles, total, names, c, var)
        ir.topological_sort(graph)
        ir.remove_dead_nodes(graph)
        shared = sum(bool(r.outputs) for r in row_positions)    # still read (e.g. by rotary), not only by masks
        per_layer = [f"{site.key.present.name}: {layouts[id(site)].describe(self.context)}" for site in sites]
        narrowed = sum(not layouts[id(s)].exact for s in sites)
        approximation = ", ".join(filter(None, [
            f"sliding:{self.window}" + (f",sinks={self.sinks}" if self.sinks else "") + f" on {narrowed} of "
            f"{len(sites)} attentions" if narrowed else "", "kv-cache int8" if self.kv_int8 else ""])) or None
        return PassResult(graph, modified=True, approximation=approximation,
                          stats={"cache_pairs": len(pairs), "attention_sites": len(sites), "row0_positions": shared,
                                 "windowed_sites": sum(layouts[id(s)].window is not None for s in sites)},
                          notes=[f"{len(pairs)} cache pairs → fixed state, {len(sites)} attentions → Attention-24",
                                 "layers: " + "; ".join(per_layer)])

    @staticmethod
    def _recent(layout: Layout, slot_position, qpos, add, c, var) -> gs.Tensor:
        """q − p < window, or p a sink the model's window (``limit``) still sees: [B, 1, S, slots]."""
        age = add("Sub", [qpos, slot_position], var("lmc_key_age", np.int64))
        keep = add("Less", [age, c("lmc_window", layout.window)], var("lmc_recent", np.bool_))
        if not layout.sinks:
            return keep
        sink = add("Less", [slot_position, c("lmc_sinks_n", layout.sinks)], var("lmc_is_sink_key", np.bool_))
        if layout.limit is not None:
            sink = add("And", [sink, add("Less", [age, c("lmc_limit", layout.limit)], var("lmc_in_limit", np.bool_))],
                       var("lmc_sink_seen", np.bool_))
        return add("Or", [keep, sink], var("lmc_keep", np.bool_))

    def _ring(self, layout: Layout, positions, last, qpos, add, c, var):
        """Ring-buffer masking and write indices (StreamingLLM: ``sinks`` first tokens kept, the rest in a
        ring). Position p lives in slot(p) = p if p < sinks else sinks + (p − sinks) mod r, r = slots − sinks.
        After writing up to position L (= p[:, −1]), ring slot j = sinks + k holds
        p_j = sinks + k + r·⌊(L − sinks − k) / r⌋ (written iff L − sinks − k ≥ 0); sink slot j holds j
        (iff j ≤ L). Query q sees slot j iff written, p_j ≤ q, and the layout keeps p_j (``_recent``)."""
        i64, b, r, sinks = np.int64, self.batch, layout.slots - layout.sinks, layout.sinks
        j = np.arange(layout.slots)
        last2 = add("Unsqueeze", [last, c("lmc_ax1", [1])], var("lmc_last_2d", i64, [b, 1]))
        num = add("Sub", [last2, c("lmc_ring_offset", sinks + np.maximum(j - sinks, 0))], var("lmc_ring_num", i64))
        written_ring = add("GreaterOrEqual", [num, c("lmc_zero", 0)], var("lmc_ring_written", np.bool_))
        laps = add("Div", [add("Max", [num, c("lmc_zero_b", 0)], var("lmc_ring_num0", i64)), c("lmc_r", r)],
                   var("lmc_ring_laps", i64))
        p_ring = add("Add", [add("Mul", [laps, c("lmc_r_b", r)], var("lmc_ring_base", i64)),
                             c("lmc_ring_first", sinks + np.maximum(j - sinks, 0))], var("lmc_ring_pos", i64))
        is_sink = c("lmc_is_sink", j < sinks)
        written_sink = add("LessOrEqual", [c("lmc_sink_pos", j), last2], var("lmc_sink_written", np.bool_))
        p_slot = add("Where", [is_sink, c("lmc_sink_pos_b", j), p_ring], var("lmc_slot_position", i64))   # [B, R]
        written = add("Or", [add("And", [written_sink, is_sink], var("lmc_sink_seen", np.bool_)),
                             add("And", [written_ring, c("lmc_is_ring", j >= sinks)], var("lmc_ring_seen0", np.bool_))],
                      var("lmc_slot_written", np.bool_))        # onnxruntime has no boolean Where
        p4 = add("Unsqueeze", [p_slot, c("lmc_ax12", [1, 2])], var("lmc_slot_position_4d", i64))   # [B,1,1,R]
        w4 = add("Unsqueeze", [written, c("lmc_ax12b", [1, 2])], var("lmc_slot_written_4d", np.bool_))
        causal = add("LessOrEqual", [p4, qpos], var("lmc_ring_causal", np.bool_))                  # [B,1,S,R]
        keep = self._recent(layout, p4, qpos, add, c, var)
        mask = add("And", [add("And", [w4, causal], var("lmc_ring_seen", np.bool_)), keep],
                   var("lmc_attn_mask", np.bool_))
        # write slots of the new tokens, as ScatterND indices (b, head, slot) per row
        rel = add("Sub", [positions, c("lmc_sinks", sinks)], var("lmc_rel", i64))
        wrapped = add("Add", [add("Mod", [rel, c("lmc_r_c", r)], var("lmc_rel_mod", i64)), c("lmc_sinks_b", sinks)],
                      var("lmc_wrapped", i64))
        slot = add("Where", [add("Less", [positions, c("lmc_sinks_c", sinks)], var("lmc_in_sink", np.bool_)),
                             positions, wrapped], var("lmc_write_slot", i64))                    # [B, S]
        made: dict[int, gs.Tensor] = {}

        def indices(heads: int) -> gs.Tensor:
            """[B, H, S, 3] (b, h, slot) by broadcasting arithmetic alone: no shape depends on S."""
            if heads not in made:
                s4 = add("Unsqueeze", [slot, c("lmc_ax13b", [1, 3])], var("lmc_slot_4d", i64))          # [B,1,S,1]
                full = add("Add", [s4, c(f"lmc_zero_h{heads}", np.zeros((1, heads, 1, 1), np.int64))],
                           var(f"lmc_slot_{heads}h", i64))                                            # [B,H,S,1]
                zero = add("Mul", [full, c("lmc_zero_c", 0)], var(f"lmc_zeros_{heads}h", i64))
                grid = [add("Add", [zero, c(f"lmc_grid_{k}_{heads}", g)], var(f"lmc_grid_{k}_{heads}h", i64))
                        for k, g in enumerate((np.arange(b).reshape(b, 1, 1, 1), np.arange(heads).reshape(1, heads, 1, 1)))]
                made[heads] = add("Concat", grid + [full], var(f"lmc_scatter_index_{heads}h", i64), axis=3)
            return made[heads]
        return mask, indices

    @staticmethod
    def _int8_state(graph, pair, heads, depth, write, add, c, var) -> gs.Tensor:
        """``--kv-cache int8``: the state holds int8 rows q = round(x / s) with one scale per (token, head),
        s = max|x| / 127, in a second state buffer; attention reads q · s. Returns that float tensor."""
        f32, shape = np.float32, [pair.past.shape[0], heads, pair.past.shape[2]]
        pair.past.dtype, pair.present.dtype = np.int8, np.int8
        past_s = gs.Variable(pair.past.name + "_scale", dtype=f32, shape=shape + [1])
        present_s = gs.Variable(pair.present.name + "_scale", dtype=f32, shape=shape + [1])
        graph.inputs.insert(graph.inputs.index(pair.past) + 1, past_s)
        graph.outputs.insert(graph.outputs.index(pair.present) + 1, present_s)
        x = pair.new
        amax = add("ReduceMax", [add("Abs", [x], var(x.name + "_abs", f32)), c("lmc_last_axis", [-1])],
                   var(x.name + "_amax", f32), keepdims=1)
        scale = add("Max", [add("Div", [amax, gs.Constant(x.name + "_127", np.array(127.0, f32))],
                                var(x.name + "_scale0", f32)), gs.Constant(x.name + "_tiny", np.array(1e-12, f32))],
                    var(x.name + "_scale", f32))
        q = add("Cast", [add("Round", [add("Div", [x, scale], var(x.name + "_scaled", f32))], var(x.name + "_round", f32))],
                var(x.name + "_int8", np.int8), to=onnx.TensorProto.INT8)
        write(pair.past, q, pair.present)
        write(past_s, scale, present_s)
        wide = add("Cast", [pair.present], var(pair.present.name + "_float", f32), to=onnx.TensorProto.FLOAT)
        return add("Mul", [wide, present_s], var(pair.present.name + "_dequantized", f32))

    @staticmethod
    def _require_opset(graph: gs.Graph, ctx: PassContext | None) -> None:
        """TensorScatter and Attention with ``nonpad_kv_seqlen`` are opset 24: upgrade, or say why not."""
        target = getattr(ctx, "target", None)
        if target is not None and "TensorScatter" not in target.tuning.fused_ops:
            raise LmcError(f"--context: target {target.name} has no in-place cache kernel (TensorScatter-24); "
                           f"generation bundles need an onnxruntime target")
        result = UpgradeOpset(STATE_OPSET).run(graph, ctx or PassContext())
        if int(graph.opset) < STATE_OPSET:
            raise LmcError(f"--context: the model cannot move to opset {STATE_OPSET}: "
                           f"{'; '.join(result.notes) or 'unknown reason'}")

    def _positions(self, graph, roles: Roles, names: ir.Namer) -> gs.Tensor:
        inputs = {t.name: t for t in graph.inputs}
        if roles.position_ids is not None:
            return inputs[roles.position_ids]
        ids = inputs[roles.input_ids]
        pos = gs.Variable(names.fresh("position_ids"), dtype=np.int64, shape=list(ids.shape))
        graph.inputs.append(pos)
        return pos

    @staticmethod
    def _redirect_shapes(tensor, length, b, heads, d, add, c, var):
        """Shape readers of a resized cache tensor get the shape the original graph gave them."""
        readers = [n for n in tensor.outputs if ir.is_op(n, "Shape")]
        others = [n for n in tensor.outputs if not ir.is_op(n, ("Shape", "Attention"))]
        if others:
            raise LmcError(f"--context: cache tensor '{tensor.name}' is read by {others[0].op} "
                           f"'{others[0].name}' outside its attention")
        if not readers:
            return
        shape = add("Concat", [c("lmc_bh", [b, heads]), length, c("lmc_d", [d])],
                    var(tensor.name + "_orig_shape", np.int64, [4]), axis=0)
        for r in readers:
            start, end = int(r.attrs.get("start", 0)), r.attrs.get("end")
            out = r.outputs[0]
            r.inputs.clear()
            r.outputs.clear()
            if start == 0 and end is None:
                add("Identity", [shape], out)
            else:
                add("Slice", [shape, c("lmc_s0", [start]), c("lmc_s1", [end if end is not None else 4])], out)

    @staticmethod
    def _replace_attention_mask(graph, roles: Roles, total, names, c, var) -> None:
        mask = next(t for t in graph.inputs if t.name == roles.attention_mask)
        graph.inputs.remove(mask)
        if not mask.outputs:
            return
        b_len = gs.Variable(names.fresh("lmc_mask_shape"), dtype=np.int64, shape=[2])
        ones = gs.Variable(names.fresh("attention_mask_full"), dtype=mask.dtype, shape=None)
        first = gs.Variable(names.fresh("lmc_kv_length0"), dtype=np.int64, shape=[1])
        graph.nodes += [
            gs.Node("Slice", name=names.fresh("lmc_kv_length0"), inputs=[total, c("z", [0]), c("o", [1])],
                    outputs=[first]),
            gs.Node("Concat", name=names.fresh("lmc_mask_shape"), attrs={"axis": 0},
                    inputs=[c("lmc_batch", [int(mask.shape[0]) if isinstance(mask.shape[0], int) else 1]), first],
                    outputs=[b_len]),
            gs.Node("ConstantOfShape", name=names.fresh("attention_mask_full"),
                    attrs={"value": onnx.numpy_helper.from_array(np.ones(1, dtype=np.dtype(mask.dtype)))},
                    inputs=[b_len], outputs=[ones])]
        for reader in list(mask.outputs):
            for i, t in enumerate(reader.inputs):
                if t is mask:
                    reader.inputs[i] = ones
