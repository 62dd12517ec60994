"""How byte counts read: ``mib(n)`` is n / 2^20 with two decimals and the unit ("—" for unknown)."""

from __future__ import annotations


def mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB"
