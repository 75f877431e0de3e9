"""Budget periods: the UTC day, ISO week or month containing an instant, and when it ends.

lua/common.lua computes the same ids inside Redis from server time; the tests hold the two together.
"""

from __future__ import annotations

import datetime as dt

from gateway.admission.limits._types import Period

__all__ = ["period_window"]

_EPOCH = dt.date(1970, 1, 1)


def period_window(kind: Period, at: float) -> tuple[str, float]:
    """`('2026-11-23' | '2026-W48' | '2026-11', epoch second at which the period ends)`."""
    days = int(at // 86400)
    day = _EPOCH + dt.timedelta(days=days)
    if kind == "day":
        return day.isoformat(), (days + 1) * 86400.0
    if kind == "week":
        year, week, weekday = day.isocalendar()
        return f"{year:04d}-W{week:02d}", (days - weekday + 8) * 86400.0
    first_next = dt.date(day.year + 1, 1, 1) if day.month == 12 else dt.date(day.year, day.month + 1, 1)
    return f"{day.year:04d}-{day.month:02d}", (first_next - _EPOCH).days * 86400.0
