"""A fixed-seed sample of bench/fuzz.py: broken models and command lines end in a verified bundle or a clean
user error (exit 2, one line), never a crash, a wrong bundle or a hang."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fuzz  # noqa: E402


def test_fuzz_sample_has_no_crashes():
    results = fuzz.run(60, seed=0, jobs=1, timeout=30)
    bad = [(r.index, r.mutation, r.outcome, r.detail) for r in results if r.outcome in fuzz.BAD]
    assert not bad, bad
    outcomes = {r.outcome for r in results}
    assert {"ok", "user-error"} <= outcomes          # the sample exercises both
