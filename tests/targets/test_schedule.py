"""The scheduler against the exact optimum: a DP over every downset (``optimal_order``) on small graphs —
random DAGs and hand-made branchy patterns (Inception branches, DenseNet concatenations, U-Net skips,
FPN) — plus the schedule-independent floor, and speed on thousands of steps."""

from __future__ import annotations

import random
import time

import pytest

from lmc.targets.dataflow import Dataflow, Step
from lmc.targets.liveness import compute_liveness, lower_bound
from lmc.targets.schedule import (choose_schedule, graph_order, memory_aware_order, optimal_order,
                                  schedule_lower_bound, search_order)

A = 64


def _bound(flow, order):
    return lower_bound(compute_liveness(flow, order).intervals, A)


def _random_flow(rng, n):
    steps, sizes = [], {}
    for i in range(n):
        window = list(range(max(0, i - 6), i))
        ins = tuple(f"t{j}" for j in rng.sample(window, min(len(window), rng.randint(1, 3)))) if i else ("x",)
        steps.append(Step(f"n{i}", ins, (f"t{i}",), rng.choice([0, 0, 0, 64])))
        sizes[f"t{i}"] = rng.choice([1, 2, 3, 5, 8, 13]) * 64
    return Dataflow(tuple(steps), sizes)


def _inception(prefix, x, widths, sizes, steps):
    """Branches read x; each branch is a chain of tensors of the given sizes; a concat joins them. Export
    order is breadth first (all branch heads, then all second layers...), as ONNX exporters often write it."""
    depth = max(len(w) for w in widths)
    tails = []
    for level in range(depth):
        for b, chain in enumerate(widths):
            if level < len(chain):
                src = x if level == 0 else f"{prefix}b{b}_{level - 1}"
                name = f"{prefix}b{b}_{level}"
                sizes[name] = chain[level]
                steps.append(Step(name, (src,), (name,)))
                if level == len(chain) - 1:
                    tails.append(name)
    out = f"{prefix}cat"
    sizes[out] = sum(widths[b][-1] for b in range(len(widths)))
    steps.append(Step(out, tuple(tails), (out,)))
    return out


def _inception_flow(modules=1):
    steps, sizes = [Step("stem", ("x",), ("stem",))], {"stem": 4096}
    x = "stem"
    for m in range(modules):
        x = _inception(f"m{m}", x, [[8192, 1024], [2048, 4096, 1024], [6144, 512], [1024]], sizes, steps)
    return Dataflow(tuple(steps), sizes)


def _densenet_flow(layers=4):
    # x -> (bn, conv1, conv3) -> new; cat = concat(x, new): growing concatenations, export order
    steps, sizes = [Step("stem", ("in",), ("c0",))], {"c0": 2048}
    width = 2048
    for i in range(layers):
        x = f"c{i}"
        sizes[f"bn{i}"], sizes[f"h{i}"], sizes[f"g{i}"] = width, 4096, 512
        steps += [Step(f"bn{i}", (x,), (f"bn{i}",)), Step(f"h{i}", (f"bn{i}",), (f"h{i}",)),
                  Step(f"g{i}", (f"h{i}",), (f"g{i}",))]
        width += 512
        sizes[f"c{i + 1}"] = width
        steps.append(Step(f"c{i + 1}", (x, f"g{i}"), (f"c{i + 1}",)))
    return Dataflow(tuple(steps), sizes)


def _unet_flow(levels=3):
    # encoder halves the size per level, decoder joins the skip; export order computes a big side
    # branch (e.g. an auxiliary head) early and consumes it at the end
    steps, sizes = [], {}
    x, size = "in", 16384
    skips = []
    for i in range(levels):
        sizes[f"e{i}"] = size
        steps.append(Step(f"e{i}", (x,), (f"e{i}",)))
        skips.append(f"e{i}")
        x, size = f"e{i}", size // 2
        sizes[f"p{i}"] = size
        steps.append(Step(f"p{i}", (x,), (f"p{i}",)))
        x = f"p{i}"
    sizes["aux"] = 16384
    steps.append(Step("aux", ("e0",), ("aux",)))
    for i in reversed(range(levels)):
        size *= 2
        sizes[f"d{i}"] = size
        steps.append(Step(f"d{i}", (x, skips[i]), (f"d{i}",)))
        x = f"d{i}"
    sizes["head"] = 64
    steps.append(Step("head", (x, "aux"), ("head",)))
    return Dataflow(tuple(steps), sizes)


def _fpn_flow():
    # backbone c1..c4, lateral 1x1 convs all computed first (export order), top-down merges
    steps, sizes = [], {}
    x = "in"
    for i, s in enumerate((8192, 4096, 2048, 1024)):
        sizes[f"c{i}"] = s
        steps.append(Step(f"c{i}", (x,), (f"c{i}",)))
        x = f"c{i}"
    for i, s in enumerate((8192, 4096, 2048, 1024)):
        sizes[f"l{i}"] = s // 2
        steps.append(Step(f"l{i}", (f"c{i}",), (f"l{i}",)))
    up = "l3"
    for i in (2, 1, 0):
        sizes[f"m{i}"] = sizes[f"l{i}"]
        steps.append(Step(f"m{i}", (up, f"l{i}"), (f"m{i}",)))
        up = f"m{i}"
    return Dataflow(tuple(steps), sizes)


PATTERNS = {"inception": _inception_flow, "densenet": _densenet_flow, "unet": _unet_flow, "fpn": _fpn_flow}


def test_optimal_order_is_exact_on_tiny_graph():
    # two branches a -> big -> small: finishing one before opening the other is the only optimum
    steps = (Step("a1", ("x",), ("a_big",)), Step("b1", ("x",), ("b_big",)),
             Step("a2", ("a_big",), ("a_small",)), Step("b2", ("b_big",), ("b_small",)),
             Step("join", ("a_small", "b_small"), ("y",)))
    flow = Dataflow(steps, {"a_big": 1024, "b_big": 1024, "a_small": 64, "b_small": 64})
    order, peak = optimal_order(flow, A)
    assert peak == _bound(flow, order) == 1024 + 64 + 64
    assert schedule_lower_bound(flow, A) <= peak
    assert _bound(flow, graph_order(flow)) == 2048 + 64


@pytest.mark.parametrize("seed", range(4))
def test_random_dags_against_exhaustive_optimum(seed):
    rng = random.Random(seed)
    beam_ratios, greedy_ratios = [], []
    for _ in range(60):
        flow = _random_flow(rng, rng.randint(6, 14))
        order, best = optimal_order(flow, A)
        assert _bound(flow, order) == best                       # the DP's cost is the liveness bound
        assert schedule_lower_bound(flow, A) <= best             # the floor is a floor
        chosen, _ = choose_schedule(flow, A)
        assert sorted(chosen) == list(range(len(flow.steps)))
        got = _bound(flow, chosen)
        assert best <= got <= _bound(flow, graph_order(flow))    # never worse than export order
        assert got == best                                       # exact on ≤ 14 steps (beam never full)
        narrow = search_order(flow, A, beam=4, max_segment=6)    # a deliberately narrow search
        beam_ratios.append(_bound(flow, narrow) / best)
        greedy_ratios.append(_bound(flow, memory_aware_order(flow)) / best)
    mean = sum(beam_ratios) / len(beam_ratios)
    # the narrow, segmented beam stays close to the optimum and beats the greedy on average
    assert mean <= 1.05 and mean <= sum(greedy_ratios) / len(greedy_ratios)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_branchy_patterns_reach_the_optimum(pattern):
    flow = PATTERNS[pattern]()
    assert len(flow.steps) <= 20
    _, best = optimal_order(flow, A)
    export = _bound(flow, graph_order(flow))
    order, name = choose_schedule(flow, A)
    assert _bound(flow, order) == best
    if pattern == "densenet":
        # a chained concatenation is a chain with skips: export order is already optimal, and is kept
        assert best == export and name == "graph-order"
    else:
        assert best < export, (pattern, best, export)   # export order is beatable
        assert name in ("memory-aware", "search")


def test_segmented_search_on_stacked_modules_is_exact():
    # 40 Inception modules joined by single-tensor cuts: the optimum of the whole is the optimum of
    # one module, and the segmented search must find it even with a narrow beam
    one = _inception_flow(1)
    _, best_one = optimal_order(one, A)
    many = _inception_flow(40)
    order = search_order(many, A, beam=8)
    assert _bound(many, order) == best_one
    assert _bound(many, graph_order(many)) > best_one


def test_large_graph_is_scheduled_within_seconds():
    flow = _inception_flow(340)            # 3 061 steps
    assert len(flow.steps) > 3000
    start = time.monotonic()
    order, name = choose_schedule(flow, A)
    elapsed = time.monotonic() - start
    assert elapsed < 20, elapsed
    assert sorted(order) == list(range(len(flow.steps)))
    _, best_one = optimal_order(_inception_flow(1), A)
    assert _bound(flow, order) == best_one < _bound(flow, graph_order(flow))
    assert name == "search" or _bound(flow, memory_aware_order(flow)) == best_one


def test_choose_schedule_keeps_graph_order_when_it_is_optimal():
    steps = tuple(Step(f"n{i}", (f"t{i - 1}",) if i else ("x",), (f"t{i}",)) for i in range(30))
    flow = Dataflow(steps, {f"t{i}": 64 * (i % 4 + 1) for i in range(30)})
    order, name = choose_schedule(flow, A)
    assert order == list(range(30)) and name == "graph-order"
