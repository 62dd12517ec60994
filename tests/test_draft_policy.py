"""The prompt-lookup draft policy: drafts verified as long as they pay for themselves (compiler.draft_policy)."""

from __future__ import annotations

import numpy as np

from lmc.compiler import draft_policy
from lmc.compiler.draft_policy import EXPLORE, PRIOR, DraftPolicy

DRAFTS = [11, 12, 13, 14]


def _timed(policy: DraftPolicy, cost, widths=range(1, 6), times: int = 4) -> None:
    for _ in range(times):
        for w in widths:
            policy.timed(w, cost(w))


def _kept(policy: DraftPolicy, n: int, p: float, proposals: int = 400, seed: int = 0) -> None:
    """Proposals of 4 drafts after n-token matches, each draft kept with probability p."""
    rng = np.random.default_rng(seed)
    for _ in range(proposals):
        kept = 0
        while kept < 4 and rng.random() < p:
            kept += 1
        policy.verified(n, 4, kept)


def _choose(policy: DraftPolicy, n: int) -> list[int]:
    policy.proposals = 0          # away from an exploring proposal
    return policy.choose(DRAFTS, n)


def test_drafts_that_cost_nothing_are_all_verified():
    policy = DraftPolicy(4)
    assert _choose(policy, 1) == DRAFTS                      # nothing measured: every width alike
    _timed(policy, lambda w: 1e-3)                            # a float bundle: a forward's time whatever w
    _kept(policy, 1, 0.2)
    assert _choose(policy, 1) == DRAFTS


def test_costly_drafts_are_verified_only_after_long_matches():
    """int8-activation kernels: each more token of a forward costs 0.5 of a one-token forward. Drafts kept
    at 20% do not pay (1.2 tokens for 1.5× the time); at 95% all four do (4.5 tokens for 3×)."""
    policy = DraftPolicy(4)
    _timed(policy, lambda w: 1e-3 * (1 + 0.5 * (w - 1)))
    _kept(policy, 1, 0.2)
    _kept(policy, 3, 0.95, seed=1)
    assert _choose(policy, 1) == []
    assert _choose(policy, 3) == DRAFTS
    assert _choose(policy, 2) == DRAFTS                       # no measure of 2-token matches: the prior's
    assert abs(policy._time(3) - 2e-3) < 1e-9


def test_each_position_counts_only_the_proposals_that_reached_it():
    """A verify of 2 drafts, both kept, tells nothing of positions 3 and 4: the policy that verified only
    2 must not learn that later drafts are refused (which would shrink what it verifies for good)."""
    policy = DraftPolicy(4)
    for _ in range(50):
        policy.verified(3, 2, 2)
    assert policy.reached[3] == [PRIOR + 50, PRIOR + 50, PRIOR, PRIOR]
    assert policy.kept[3] == policy.reached[3]
    policy.verified(3, 4, 1)                                  # kept the first, refused the second
    assert policy.reached[3] == [PRIOR + 51, PRIOR + 51, PRIOR, PRIOR]
    assert policy.kept[3] == [PRIOR + 51, PRIOR + 50, PRIOR, PRIOR]


def test_first_forward_of_a_width_is_not_timed_and_every_explore_th_proposal_is_whole(monkeypatch):
    policy = DraftPolicy(4)
    policy.timed(2, 5.0)                                      # a width's first forward allocates: left out
    assert policy.line == [0.0] * 5
    _timed(policy, lambda w: 1e-3 * w)                        # drafts cost in full
    _kept(policy, 1, 0.1)
    picks = [policy.choose(DRAFTS, 1) for _ in range(2 * EXPLORE)]
    assert [i for i, p in enumerate(picks) if p] == [EXPLORE - 1, 2 * EXPLORE - 1]
    assert all(p == DRAFTS for p in picks if p)
    monkeypatch.setattr(draft_policy, "EXPLORE", 10 ** 9)
    assert not any(policy.choose(DRAFTS, 1) for _ in range(2 * EXPLORE))
