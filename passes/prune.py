"""Structured pruning (approximate): whole MLP channels, query heads and key/value groups leave the graph,
chosen by a measured saliency on calibration data and compensated by a least-squares refit of the weight
that reads them (the math: ``lmc.passes.prune_fit``; where it can cut: ``lmc.passes.prune_sites``).

Units: an MLP channel (in groups of ``CHANNEL_GRANULE``, so a layer keeps a multiple of the int4 block);
a query head — query head h belongs to key/value group h // (H / H_kv) and every kept group keeps the same
number of query heads (the attention ops' grouping), so ``heads=F`` removes that share of each group's
query heads; a key/value group (``kv=F``) with its keys, values, query heads and cache.

Saliency of a unit with input features F of a site whose output is added to the residual stream r:
    s = E‖x_F W_F‖² / E‖r‖²
(activation statistics × weight norms, relative to the stream the error lands in — the next norm divides
by it; without the residual Add, E‖r‖² = 1). ``choose=magnitude`` ranks by weight norms instead (a
comparison baseline). The least salient go — globally across layers by default (one ranking of every
layer's steps; a layer gives at most ``MAX_SHARE`` of its channels and keeps at least one query head per
group and one group), or the same share from each layer (``per_layer``). Compensation (unless
``refit=off``): W_down / W_o's kept rows are refit by least squares to the calibration activations of the
unpruned model. Each site's relative output error, with and without the refit, goes to the report.
Preconditions: the pruned dims are static; calibration feeds for the graph's inputs.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.passes.prune_fit import (Step, choose_global, magnitude_saliency, measured_saliency, refit,
                                  unit_rows)
from lmc.passes.prune_sites import Site, find_sites, kept_indices, kept_size
from lmc.passes.quantize.calibration import Calibrator

log = logging.getLogger(__name__)

MAX_SHARE = 0.75        # global choice: a layer gives at most this share of its MLP channels
CHANNEL_GRANULE = 32    # MLP channels go in groups of 32 (the int4 block), when the layer's count allows


class Saliency(enum.Enum):
    MEASURED = "measured"        # activation statistics × weight norms (the default)
    MAGNITUDE = "magnitude"      # weight norms only (a comparison baseline)


def _fraction(key: str, text: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise LmcError(f"--prune {key}={text}: not a number (a fraction such as 0.2 or 1/3)") from None
    if not 0.0 <= value < 1.0:
        raise LmcError(f"--prune {key}={text}: the fraction removed must be at least 0 and below 1")
    return value


@dataclass(frozen=True)
class PruneSpec:
    """``--prune mlp=F[,heads=F][,kv=F]``: fractions of MLP channels, of each kv group's query heads, and of
    whole kv groups. ``choose=magnitude`` and ``refit=off`` select the comparison baselines."""

    mlp: float = 0.0
    heads: float = 0.0
    kv: float = 0.0
    saliency: Saliency = Saliency.MEASURED
    compensate: bool = True
    per_layer: bool = False

    @classmethod
    def parse(cls, text: str, per_layer: bool = False) -> PruneSpec:
        values: dict = {"per_layer": per_layer}
        for part in (p for p in str(text).split(",") if p.strip()):
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq:
                raise LmcError(f"--prune: expected KEY=VALUE, got {part!r} (e.g. mlp=0.2,heads=1/3)")
            if key in ("mlp", "heads", "kv"):
                values[key] = _fraction(key, value)
            elif key == "choose":
                try:
                    values["saliency"] = Saliency(value.strip().lower())
                except ValueError:
                    raise LmcError(f"--prune choose= must be measured or magnitude, got {value!r}") from None
            elif key == "refit":
                if value.strip().lower() not in ("on", "off"):
                    raise LmcError(f"--prune refit= must be on or off, got {value!r}")
                values["compensate"] = value.strip().lower() == "on"
            else:
                raise LmcError(f"--prune: unknown key {key!r} (mlp, heads, kv; choose, refit)")
        spec = cls(**values)
        if not (spec.mlp or spec.heads or spec.kv):
            raise LmcError(f"--prune {text!r} removes nothing: give mlp=F, heads=F or kv=F with F > 0")
        return spec

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k):.3g}" for k in ("mlp", "heads", "kv") if getattr(self, k)]
        if self.saliency is not Saliency.MEASURED:
            parts.append(f"choose={self.saliency.value}")
        if not self.compensate:
            parts.append("refit=off")
        return ",".join(parts) + (" per layer" if self.per_layer else "")


# --------------------------------------------------------------------------------------------- the pass
@dataclass
class SiteReport:
    name: str
    kind: str                  # "mlp" | "attention"
    removed: str               # what went, in words
    kept_units: int
    units: int
    rel_error: float           # output error of the site's reader on the calibration data, as built
    rel_error_plain: float     # the same without the refit


@dataclass
class PruneConfig:
    spec: PruneSpec
    calib_feeds: list[dict] = field(default_factory=list)


def _granule(channels: int) -> int:
    """MLP channels go in groups of this many (the layer's count stays a multiple of the int4 block and of
    the kernels' vector width)."""
    return next((g for g in (CHANNEL_GRANULE, 8) if channels % g == 0 and channels >= 4 * g), 1)


def _budget(fraction: float, total: int) -> int:
    return int(math.floor(fraction * total + 0.5))


class Prune:
    """The pruning pass (see the module docstring). ``reports`` holds the last run's per-site results."""

    name = "prune"
    kind = PassKind.APPROXIMATE
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})    # the pruned dims are checked static
    in_place = True
    preserves_shapes = True      # every pruned axis is set to its new size (``_apply``)

    def __init__(self, config: PruneConfig):
        self.config = config
        self.reports: list[SiteReport] = []

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        spec = self.config.spec
        if not self.config.calib_feeds:
            raise LmcError("--prune needs --calib calib.npz: the saliency and the compensation are measured on it")
        mlps, atts = find_sites(graph, bool(spec.mlp), bool(spec.heads or spec.kv))
        readers = [s.reader.inputs[0].name for s in [*mlps, *atts]]
        streams = {s.name: _residual(s.reader) for s in [*mlps, *atts]}
        tensors = list(dict.fromkeys(readers + [t for t in streams.values() if t]))
        with Calibrator(graph, tensors, self.config.calib_feeds) as calibrator:
            stats = calibrator.run(gram=set(readers),
                                   progress=lambda i, n: ctx.report("pruning: calibrating", i, n))
        grams = {}
        for name in readers:
            st = stats[name]
            rows = float(np.trace(st.gram)) / max(float(st.second_moment.sum()), 1e-30)
            grams[name] = st.gram / max(rows, 1.0)
        # a removal's error is judged against the residual stream it lands in (the next norm divides by it)
        self._stream = {site: float(stats[t].second_moment.sum()) if t else 1.0 for site, t in streams.items()}
        self.reports = []
        self.resized: dict[str, tuple[int, int]] = {}     # tensor -> (axis, new size), for shape templates
        namer = ir.Namer(graph)
        if mlps:
            self._prune_mlps(mlps, grams, namer)
        if atts:
            self._prune_heads(atts, grams, namer)
        notes = [f"{r.name} ({r.kind}): {r.removed}; output error {100 * r.rel_error:.2f}%"
                 + (f" (without the refit {100 * r.rel_error_plain:.2f}%)" if spec.compensate else "")
                 for r in self.reports]
        stats_out: dict[str, int | float] = {
            "mlp_channels_removed": sum(r.units - r.kept_units for r in self.reports if r.kind == "mlp"),
            "query_heads_removed": sum(r.units - r.kept_units for r in self.reports if r.kind == "attention"),
            "max_rel_error": max((r.rel_error for r in self.reports), default=0.0)}
        modified = any(r.kept_units < r.units for r in self.reports)
        return PassResult(graph, modified, stats_out, notes, approximation=f"prune {spec}" if modified else None)

    # ----------------------------------------------------------------------------------------- MLP
    def _scores(self, site: Site, grams, unit_size: int) -> np.ndarray:
        weight = ir.const_value(site.reader.inputs[1])
        if self.config.spec.saliency is Saliency.MAGNITUDE:
            return magnitude_saliency(weight, _producer_columns(site), unit_size)
        return measured_saliency(grams[site.reader.inputs[0].name], weight, unit_size) / max(self._stream[site.name], 1e-30)

    def _prune_mlps(self, sites: list[Site], grams, namer) -> None:
        spec = self.config.spec
        steps: dict[int, list[Step]] = {}
        for i, site in enumerate(sites):
            scores = self._scores(site, grams, 1)
            order = np.argsort(scores, kind="stable")
            g = _granule(site.channels)
            steps[i] = [Step(i, g, float(scores[order[k:k + g]].sum()), tuple(int(j) for j in order[k:k + g]))
                        for k in range(0, site.channels, g)]
        chosen: dict[int, list[int]] = {i: [] for i in range(len(sites))}
        if spec.per_layer:
            for i, site in enumerate(sites):
                g = _granule(site.channels)
                n = _budget(spec.mlp * site.channels / g, 1)
                if n * g >= site.channels:
                    raise LmcError(f"--prune mlp={spec.mlp:.3g} leaves {site.name} without channels")
                chosen[i] = [j for step in steps[i][:n] for j in step.units]
        else:
            total = sum(s.channels for s in sites)
            caps = {i: int(MAX_SHARE * s.channels) // _granule(s.channels) for i, s in enumerate(sites)}
            budget = _budget(spec.mlp, total)
            if budget > sum(caps[i] * _granule(s.channels) for i, s in enumerate(sites)):
                raise LmcError(f"--prune mlp={spec.mlp:.3g} would leave layers with under "
                               f"{100 * (1 - MAX_SHARE):.0f}% of their channels")
            for step in choose_global(steps, budget + max(_granule(s.channels) for s in sites) // 2, caps):
                chosen[step.site] += step.units
        for i, site in enumerate(sites):
            drop = set(chosen[i])
            keep = np.array([j for j in range(site.channels) if j not in drop], dtype=np.int64)
            fit = self._refit(site.reader, grams, keep)
            if drop:
                self.resized.update(_apply(site, {"mlp": keep}, fit.weight, namer))
            self.reports.append(SiteReport(site.name, "mlp", f"{len(drop)} of {site.channels} channels",
                                           len(keep), site.channels, fit.rel_error, fit.rel_error_plain))

    def _refit(self, reader: gs.Node, grams, keep_rows: np.ndarray):
        weight = ir.const_value(reader.inputs[1])
        return refit(grams[reader.inputs[0].name], weight, keep_rows, self.config.spec.compensate)

    # ----------------------------------------------------------------------------------------- heads
    def _prune_heads(self, sites: list[Site], grams, namer) -> None:
        spec = self.config.spec
        head_scores = [self._scores(s, grams, s.head_dim) for s in sites]
        groups = [list(range(s.kv_heads)) for s in sites]           # kept kv groups per site
        if spec.kv:
            steps = {}
            for i, s in enumerate(sites):
                g = head_scores[i].reshape(s.kv_heads, s.group).sum(axis=1)
                steps[i] = [Step(i, 1, float(g[j]), (int(j),)) for j in np.argsort(g, kind="stable")]
            gone = self._choose(sites, steps, spec.kv, [s.kv_heads for s in sites], "kv",
                                lambda s: f"all {s.kv_heads} key/value groups")
            groups = [[j for j in range(s.kv_heads) if j not in gone[i]] for i, s in enumerate(sites)]
        heads = [[j * s.group + h for j in groups[i] for h in range(s.group)] for i, s in enumerate(sites)]
        if spec.heads:
            steps = {}
            for i, s in enumerate(sites):
                ranked = [sorted(range(s.group), key=lambda h: head_scores[i][j * s.group + h]) for j in groups[i]]
                steps[i] = [Step(i, len(groups[i]),
                                 float(sum(head_scores[i][j * s.group + r[level]] for j, r in zip(groups[i], ranked))),
                                 tuple(j * s.group + r[level] for j, r in zip(groups[i], ranked)))
                            for level in range(s.group)]
            gone = self._choose(sites, steps, spec.heads, [s.group for s in sites], "heads",
                                lambda s: f"every query head of a key/value group of {s.group} (use kv= to remove "
                                          "whole groups)", per_group=True, groups=groups)
            heads = [[h for h in heads[i] if h not in gone[i]] for i in range(len(sites))]
        for i, site in enumerate(sites):
            self._apply_heads(site, groups[i], heads[i], grams, namer)

    def _choose(self, sites, steps, fraction, levels, key, empty, per_group=False, groups=None) -> list[set[int]]:
        """Units removed per site: ``fraction`` of each site's (per-layer) or of all (global) steps' costs."""
        gone: list[set[int]] = [set() for _ in sites]
        if self.config.spec.per_layer:
            for i, s in enumerate(sites):
                n = _budget(fraction, levels[i])
                if n >= levels[i]:
                    raise LmcError(f"--prune {key}={fraction:.3g} removes {empty(s)} of {s.name}")
                for step in steps[i][:n]:
                    gone[i].update(step.units)
            return gone
        total = sum(step.cost for i in steps for step in steps[i])
        budget = _budget(fraction, total)
        caps = {i: levels[i] - 1 for i in range(len(sites))}
        taken = choose_global(steps, budget, caps)
        spent = sum(step.cost for step in taken)
        most = max(step.cost for i in steps for step in steps[i])
        if budget - spent >= most:
            raise LmcError(f"--prune {key}={fraction:.3g} cannot be met without removing {empty(sites[0])} "
                           "in some layer")
        for step in taken:
            gone[step.site].update(step.units)
        return gone

    def _apply_heads(self, site: Site, groups: list[int], heads: list[int], grams, namer) -> None:
        fit = self._refit(site.reader, grams, unit_rows(heads, site.head_dim))
        removed_q = site.heads - len(heads)
        removed_kv = site.kv_heads - len(groups)
        if removed_q:
            self.resized.update(_apply(site, {"q": np.asarray(heads, np.int64), "kv": np.asarray(groups, np.int64)},
                                       fit.weight, namer))
        gone = sorted(set(range(site.heads)) - set(heads))
        words = f"{removed_q} of {site.heads} query heads" + (f" ({', '.join(map(str, gone))})" if gone else "")
        if removed_kv:
            words += f", {removed_kv} of {site.kv_heads} key/value groups (their cache)"
        self.reports.append(SiteReport(site.name, "attention", words, len(heads), site.heads, fit.rel_error,
                                       fit.rel_error_plain))


def _apply(site: Site, keep: dict[str, np.ndarray], reader_weight: np.ndarray, namer) -> dict[str, tuple[int, int]]:
    """Every edit of ``site`` for the kept units ``keep`` (role -> unit indices), the reader's weight last;
    returns the resized tensors: name -> (axis, new size)."""
    for cut in site.cuts:
        old = cut.node.inputs[cut.slot]
        value = np.take(ir.const_value(old), kept_indices(cut.layout, keep), axis=cut.axis)
        cut.node.inputs[cut.slot] = gs.Constant(namer.fresh(old.name + "_pruned"), np.ascontiguousarray(value))
    for fix in site.fixes:
        old = fix.node.inputs[fix.slot]
        value = ir.const_value(old).copy()
        for i in fix.indices:
            if int(value[i]) != -1:
                value[i] = kept_size(fix.layout, keep)
        fix.node.inputs[fix.slot] = gs.Constant(namer.fresh(old.name + "_pruned"), value)
    for node, attr, role in site.attrs:
        if attr in node.attrs:
            node.attrs[attr] = len(keep[role])
    resized = {}
    for dim in site.dims:      # shapes stay exact: contrib ops on the way have no onnx shape inference
        shape = list(dim.tensor.shape)
        axis = dim.axis % len(shape)
        if not isinstance(shape[axis], int):
            raise LmcError(f"--prune: {dim.tensor.name}'s pruned axis {axis} is not static ({shape[axis]})")
        shape[axis] = kept_size(dim.layout, keep)
        dim.tensor.shape = shape
        resized[dim.tensor.name] = (axis, shape[axis])
    old = site.reader.inputs[1]
    site.reader.inputs[1] = gs.Constant(namer.fresh(old.name + "_pruned"), np.ascontiguousarray(reader_weight))
    return resized


def _producer_columns(site: Site) -> list[np.ndarray]:
    """For the magnitude baseline: each producer weight's columns of the site's units, [D, units·per unit]."""
    role = site.rows[0][0]
    found = []
    for cut in site.cuts:
        if cut.slot != 1 or cut.axis != 1:
            continue
        w, offset = ir.const_value(cut.node.inputs[1]), 0
        for r, per_unit, units in cut.layout:
            if r == role:
                found.append(w[:, offset:offset + per_unit * units])
            offset += per_unit * units
    return found


def _residual(reader: gs.Node) -> str | None:
    """The residual stream a site's output is added to: ``Add(stream, reader output)``'s output, if so."""
    out = reader.outputs[0]
    if len(out.outputs) == 1 and ir.is_op(out.outputs[0], "Add") and \
            not any(isinstance(i, gs.Constant) for i in out.outputs[0].inputs):
        return out.outputs[0].outputs[0].name
    return None
