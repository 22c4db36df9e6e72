"""How sheepop writes durations and large numbers for people: one style each, everywhere
(plan's estimates, the live view's ETA, `sheepop jobs`, the report). No heavy imports."""
from __future__ import annotations

import math


def duration(seconds: float | None) -> str:
    """'0.5s', '45s', '12m 05s', '3h 07m', '2d 04h': the two largest units, at most 8 characters
    below 1000 days; '-' when unknown (None, NaN)."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return "forever" if seconds > 0 else "-forever"
    sign = "-" if seconds < 0 else ""
    if abs(seconds) < 9.95:  # a tenth matters here: 'after 0.5s', not 'after 0s'
        return f"{sign}{abs(seconds):.1f}".removesuffix(".0") + "s"
    s = int(round(abs(seconds)))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d {s % 86400 // 3600:02d}h"


_COUNT = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))  # parameters, tokens
_SI = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))  # FLOP, FLOP/s


def human(x: float | None, unit: str = "") -> str:
    """Three significant digits and a prefix: a count without a unit ('6.74B', '131K'), a
    quantity with SI prefixes ('312 TFLOP/s', '40.4 GFLOP'); '-' when unknown."""
    if x is None:
        return "-"
    for prefix, factor in (_SI if unit else _COUNT):
        if abs(x) >= factor * (1 - 5e-4):  # 999.7K reads 1M, not 1e+03K
            return f"{x / factor:.3g}{' ' if unit else ''}{prefix}{unit}"
    return f"{x:.3g} {unit}".strip()
