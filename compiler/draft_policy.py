"""How many of a prompt lookup's drafts to verify: as many as pay for themselves on this bundle.

A verify forward of w = 1 + d tokens takes t(w) seconds and yields 1 + a tokens, a ≤ d the drafts kept.
How many are kept depends on n, the length of the history's suffix the lookup found earlier (llama-code,
lookup:4: 22% of the drafts of 1-token matches kept, 27% of 2-token ones, 91% of 3-token ones). Of a
proposal of L drafts from an n-token match the policy verifies the first d, d maximising the expected
tokens per second

    (1 + E[min(a, d) | n]) / t(1 + d),      E[min(a, d) | n] = Σ_{i ≤ d} P(a ≥ i | n),      d = 0 … L.

- P(a ≥ i | n) = Π_{j ≤ i} p_j(n), p_j(n) the share of the drafts at position j that were kept among those
  verified after n-token matches whose drafts before j were all kept (a verify of d drafts tells nothing
  of the positions after d, so each position counts only the proposals that reached it); before any,
  ``PRIOR`` drafts at each position, all kept.
- t(w) = t₀ + t₁·(w − 1), t₁ ≥ 0, fitted by least squares to the forwards timed so far (each width's first
  forward left out: it allocates); every width alike until two widths are timed, so drafts are tried
  before they are measured to cost. One line through every timing, not a mean per width: a few slow
  forwards of one width do not shut it out.
- Every ``EXPLORE``-th proposal is verified whole, so the estimates of the drafts the policy skips keep
  being measured.

Where a forward's time barely grows with w (a float bundle reads its weights once whatever w) every draft
pays; where it grows nearly in proportion (int8-activation kernels on a small model) only the long
matches' do. The choice decides which drafts are verified, never which tokens are kept — under greedy
decoding, where it is used (under sampling the drafts verified decide which random numbers are drawn, and a
seed must repeat a run: every draft is verified there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR = 2.0
EXPLORE = 16


@dataclass
class DraftPolicy:
    """The measured costs and kept drafts behind each choice (module docstring), for drafts of up to ``k``
    tokens."""

    k: int
    line: list[float] = field(default_factory=lambda: [0.0] * 5)   # Σ1, Σx, Σx², Σt, Σxt, x = w − 1
    widths: set[int] = field(default_factory=set)                  # widths whose first forward has passed
    reached: dict[int, list[float]] = field(default_factory=dict)  # n -> [drafts verified at position j]
    kept: dict[int, list[float]] = field(default_factory=dict)     # n -> [of those, kept], j = 1 … k
    proposals: int = 0

    def choose(self, drafts: list[int], n: int) -> list[int]:
        """The first d of ``drafts`` (found after an ``n``-token match) worth verifying."""
        if not drafts:
            return drafts
        self.proposals += 1
        if self.proposals % EXPLORE == 0:
            return drafts
        reached, kept = self._counts(n)
        best, best_rate = 0, 1.0 / self._time(1)
        expected, surviving = 1.0, 1.0
        for d in range(1, min(len(drafts), self.k) + 1):
            surviving *= kept[d - 1] / reached[d - 1]
            expected += surviving
            rate = expected / self._time(1 + d)
            if rate > best_rate:
                best, best_rate = d, rate
        return drafts[:best]

    def timed(self, width: int, seconds: float) -> None:
        """A forward of ``width`` tokens took ``seconds``."""
        if width not in self.widths:
            self.widths.add(width)
            return
        x = width - 1
        for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
            self.line[i] += v

    def verified(self, n: int, drafted: int, kept: int) -> None:
        """``kept`` of ``drafted`` drafts found after an ``n``-token match were kept: positions 1 … kept
        were reached and kept, position kept + 1 (if drafted) reached and refused."""
        reached_n, kept_n = self._counts(n)
        for j in range(min(kept + 1, drafted)):
            reached_n[j] += 1
            kept_n[j] += j < kept

    def _counts(self, n: int) -> tuple[list[float], list[float]]:
        if n not in self.reached:
            self.reached[n], self.kept[n] = [PRIOR] * self.k, [PRIOR] * self.k
        return self.reached[n], self.kept[n]

    def _time(self, width: int) -> float:
        """t(width) of the fitted line; the mean forward (1 before any) while fewer than two widths are timed."""
        n, sx, sxx, st, sxt = self.line
        if n == 0:
            return 1.0
        spread = n * sxx - sx * sx              # 0 while every forward timed had one width
        slope = max(0.0, (n * sxt - sx * st) / spread) if spread > 1e-9 * max(1.0, n * sxx) else 0.0
        return max((st - slope * sx) / n + slope * (width - 1), 1e-9)
