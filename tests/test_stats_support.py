"""The KS helper used by the isolation audit must itself detect a shift and not invent one."""

import random

from tests.support.stats import ks_less


def test_detects_a_shift() -> None:
    rng = random.Random(1)
    fast = [rng.gauss(10, 1) for _ in range(30)]
    slow = [rng.gauss(14, 1) for _ in range(30)]
    d, p = ks_less(fast, slow)
    assert d > 0.9
    assert p < 1e-6


def test_same_distribution_is_not_significant() -> None:
    rng = random.Random(2)
    a = [rng.gauss(10, 1) for _ in range(30)]
    b = [rng.gauss(10, 1) for _ in range(30)]
    _, p = ks_less(a, b)
    assert p > 0.01


def test_direction_matters() -> None:
    rng = random.Random(3)
    fast = [rng.gauss(10, 1) for _ in range(30)]
    slow = [rng.gauss(14, 1) for _ in range(30)]
    _, p = ks_less(slow, fast)
    assert p == 1.0
