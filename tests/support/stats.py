"""A one-sided two-sample Kolmogorov-Smirnov test, as used by Gu et al. 2025 to audit prompt caching."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def ks_less(sample: Sequence[float], reference: Sequence[float]) -> tuple[float, float]:
    """Test H1: `sample` is stochastically smaller than `reference` (e.g. cache hits are faster).

    Returns (D+, p) with D+ = max_x (F_sample(x) - F_reference(x)) and the asymptotic p-value
    exp(-2 n m / (n + m) D+^2) (Smirnov's one-sided limit).
    """
    a, b = sorted(sample), sorted(reference)
    n, m = len(a), len(b)
    d = 0.0
    for x in a + b:
        fa = bisect.bisect_right(a, x) / n
        fb = bisect.bisect_right(b, x) / m
        d = max(d, fa - fb)
    p = math.exp(-2.0 * n * m / (n + m) * d * d)
    return d, min(1.0, p)
