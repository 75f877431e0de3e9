"""The latency-driven limit (engines without vLLM's metrics): it must follow the server's latency when the
limit is what holds requests back, and never drift down on noise while the callers, not the limit, set the
load (a limit that shrank then would end up queueing a server that was never saturated)."""

from __future__ import annotations

import random

from gateway.admission.capacity import gradient2


def test_noise_while_the_limit_is_not_in_use_leaves_it_alone() -> None:
    rng = random.Random(7)
    limit, long_s = 4096.0, 0.010
    for _ in range(2000):  # 500 s of ticks at 0.25 s with 64 requests in flight and +-40% noise
        short_s = long_s * rng.uniform(0.6, 1.4)
        limit = gradient2(limit, short_s, long_s, held=64, binding=False)
    assert limit == 4096.0


def test_noise_within_tolerance_does_not_shrink_a_limit_in_use() -> None:
    rng = random.Random(7)
    limit, long_s = 64.0, 0.010
    for _ in range(2000):
        short_s = long_s * rng.uniform(0.8, 1.4)
        limit = gradient2(limit, short_s, long_s, held=64, binding=False)
    assert limit == 64.0


def test_a_server_slowing_down_under_its_limit_gets_less() -> None:
    limit = 64.0
    for _ in range(20):
        limit = gradient2(limit, 0.040, 0.010, held=int(limit), binding=True)
    assert limit < 64.0 * 0.6


def test_a_limit_that_binds_at_steady_latency_grows() -> None:
    limit = 16.0
    for _ in range(20):
        limit = gradient2(limit, 0.010, 0.010, held=int(limit), binding=True)
    assert limit > 24.0
