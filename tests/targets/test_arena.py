"""The arena planner alone: placements never overlap live buffers, stay aligned, and reach the bound on
easy cases; the scheduler reduces the live set on branchy graphs."""

from __future__ import annotations

import random

import pytest

from lmc.targets.arena import ArenaPlanner
from lmc.targets.dataflow import Dataflow, Step
from lmc.targets.liveness import compute_liveness, lower_bound
from lmc.targets.schedule import choose_schedule, graph_order, memory_aware_order


def _check(planner: ArenaPlanner, buffers, plan):
    for i, (s, f, l) in enumerate(buffers):
        assert plan.offsets[i] % planner.alignment == 0
        assert plan.offsets[i] + plan.sizes[i] <= plan.arena_bytes
        for j in range(i):
            s2, f2, l2 = buffers[j]
            if f <= l2 and f2 <= l:
                a, b = plan.offsets[i], plan.offsets[j]
                assert a + plan.sizes[i] <= b or b + plan.sizes[j] <= a


@pytest.mark.parametrize("seed", range(5))
def test_random_buffers_never_overlap(seed):
    rng = random.Random(seed)
    planner = ArenaPlanner(alignment=16)
    buffers = []
    for _ in range(120):
        f = rng.randrange(60)
        buffers.append((rng.randrange(1, 5000), f, f + rng.randrange(10)))
        planner.add_buffer(*buffers[-1])
    plan = planner.plan()
    _check(planner, buffers, plan)
    assert plan.arena_bytes >= plan.lower_bound_bytes


def test_chain_reaches_lower_bound():
    planner = ArenaPlanner(alignment=64)
    for i in range(10):
        planner.add_buffer(1000 * (i % 3 + 1), i, i + 1)
    plan = planner.plan()
    assert plan.arena_bytes == plan.lower_bound_bytes


def test_alignment_must_be_power_of_two():
    with pytest.raises(ValueError):
        ArenaPlanner(alignment=48)


def test_memory_aware_schedule_beats_breadth_first_order():
    # two independent branches, each a -> big -> small; graph order opens both big tensors at once
    steps = (Step("a1", ("x",), ("a_big",)), Step("b1", ("x",), ("b_big",)),
             Step("a2", ("a_big",), ("a_small",)), Step("b2", ("b_big",), ("b_small",)),
             Step("join", ("a_small", "b_small"), ("y",)))
    flow = Dataflow(steps, {"a_big": 1000, "b_big": 1000, "a_small": 10, "b_small": 10})
    lb_graph = lower_bound(compute_liveness(flow, graph_order(flow)).intervals, 1)
    lb_mem = lower_bound(compute_liveness(flow, memory_aware_order(flow)).intervals, 1)
    assert lb_mem < lb_graph
    order, name = choose_schedule(flow, 1)
    assert name == "memory-aware"
