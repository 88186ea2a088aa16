"""Meter lines for tests, built from the same timestamp helpers the parser is checked against."""

from __future__ import annotations

from shared.parsing import format_us, to_us

T0 = to_us(2024, 4, 27, 12, 0, 0, 0)
SECOND = 1_000_000
V_METER = "10.0.0.1"
A_METERS = {"10.0.0.2": (0.0, 0.5), "10.0.0.3": (0.2, 1.0), "10.0.0.4": (1.0, 5.0),
            "10.0.0.5": (3.0, 10.0)}
RANGES = {V_METER: (0.0, 110.0), **A_METERS}


def line(meter: str, ts_us: int, value: float | str) -> bytes:
    return f"{meter}\t{format_us(ts_us)}\t{value}\n".encode()


def in_range(meter: str, k: int) -> float:
    """A value inside the meter's range, different for each k, exact in decimal."""
    lo, hi = RANGES[meter]
    return round(lo + (hi - lo) * ((k * 37) % 101) / 100, 6)
