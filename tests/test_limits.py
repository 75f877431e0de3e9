"""Quota state for admission: one suite over both stores (in-process and a real redis-server), time driven
exactly by an injected clock (no sleeps), then what only Redis has: keys, TTLs, scripts, failures."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.admission.limits import (
    Decision,
    FailoverQuotaStore,
    FailureMode,
    LocalQuotaStore,
    Period,
    PipelinedRedis,
    QuotaBackendError,
    QuotaLimits,
    QuotaStore,
    RedisQuotaStore,
    Reservation,
    Scope,
    ScriptClient,
    fast_fail_client,
    period_window,
)
from tests.support.redis_server import RedisServer

START = 1_795_435_200.0  # Monday 2026-11-23 12:00:00 UTC


class FakeClock:
    # A fractional start: float rounding of absolute times must not show in counts or waits.
    def __init__(self, now: float = START + 0.123457) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tenant() -> str:
    # A tenant per test keeps tests apart on the shared session Redis without flushing it.
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = fast_fail_client(redis_server.url, timeout_s=2.0)
    yield client
    await client.aclose()


def script_client(kind: str, url: str, timeout_s: float) -> ScriptClient:
    """The gateway's own pipelined client ("redis"), or redis-py's ("redis-py"): the store takes either."""
    if kind == "redis":
        return PipelinedRedis.from_url(url, timeout_s=timeout_s)
    return fast_fail_client(url, timeout_s=timeout_s)


@pytest.fixture
async def pipelined(redis_server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis.from_url(redis_server.url, timeout_s=2.0)
    yield client
    await client.aclose()


@pytest.fixture(params=["local", "redis", "redis-py"])
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, redis_server: RedisServer
) -> AsyncIterator[QuotaStore]:
    if request.param == "local":
        local = LocalQuotaStore(clock=clock, wall_clock=clock)
        yield local
        await local.close()
        return
    client = script_client(request.param, redis_server.url, 2.0)
    yield RedisQuotaStore(client, clock=clock)
    await client.aclose()  # type: ignore[attr-defined]  # both clients have it


def scope(name: str = "tenant:t", **limits: object) -> list[Scope]:
    return [Scope(name, QuotaLimits(**limits))]  # type: ignore[arg-type]


async def admit(store: QuotaStore, tenant: str, scopes: list[Scope], tokens: int = 0, cost: float = 0.0) -> Decision:
    return await store.admit(tenant, scopes, tokens=tokens, cost=cost)


def held(decision: Decision) -> Reservation:
    assert decision.allowed, decision
    assert decision.reservation is not None
    return decision.reservation


# -- rate buckets -------------------------------------------------------------------------------------


async def test_rpm_admits_exactly_the_limit_then_refills_at_rpm_per_minute(
    store: QuotaStore, tenant: str, clock: FakeClock
) -> None:
    s = scope(rpm=20)
    decisions = [await admit(store, tenant, s) for _ in range(30)]
    assert sum(d.allowed for d in decisions) == 20
    assert all(d.allowed for d in decisions[:20])
    assert {d.limit for d in decisions[20:]} == {"rpm"}

    clock.advance(2.999)  # 20/min is one every 3 s
    assert not (await admit(store, tenant, s)).allowed
    clock.advance(0.001)
    assert (await admit(store, tenant, s)).allowed
    assert not (await admit(store, tenant, s)).allowed

    clock.advance(30)
    assert sum([(await admit(store, tenant, s)).allowed for _ in range(15)]) == 10


@pytest.mark.parametrize(
    ("limits", "tokens"),
    [(QuotaLimits(rpm=7), 0), (QuotaLimits(tpm=1000), 300), (QuotaLimits(rpm=13, tpm=777), 101)],
)
async def test_retry_after_is_truthful(
    store: QuotaStore, tenant: str, clock: FakeClock, limits: QuotaLimits, tokens: int
) -> None:
    s = [Scope("tenant:t", limits)]
    while (await admit(store, tenant, s, tokens)).allowed:
        clock.advance(0.37)  # drain at an awkward cadence so levels are fractional
    refused = await admit(store, tenant, s, tokens)
    assert refused.limit in ("rpm", "tpm") and refused.retry_after_s > 0
    start = clock.now
    clock.now = start + refused.retry_after_s - 0.001
    assert not (await admit(store, tenant, s, tokens)).allowed
    clock.now = start + refused.retry_after_s
    assert (await admit(store, tenant, s, tokens)).allowed


async def test_tpm_reserves_the_estimate_and_settle_refunds_the_unused_part(store: QuotaStore, tenant: str) -> None:
    s = scope(tpm=1000)
    first = held(await admit(store, tenant, s, tokens=600))
    assert first.tokens == 600
    refused = await admit(store, tenant, s, tokens=500)
    assert (refused.allowed, refused.limit, refused.headers.remaining_tokens) == (False, "tpm", 400)
    assert refused.retry_after_s == pytest.approx(6.0)  # 100 tokens at 1000/60 per second

    assert await store.settle(first, actual_tokens=100, actual_cost=0.0)
    assert (await admit(store, tenant, s, tokens=500)).headers.remaining_tokens == 400  # 900 - 500


async def test_refund_never_fills_the_bucket_above_capacity(store: QuotaStore, tenant: str, clock: FakeClock) -> None:
    s = scope(tpm=1000)
    r = held(await admit(store, tenant, s, tokens=800))
    clock.advance(60)  # full again while the request ran
    assert await store.settle(r, actual_tokens=0, actual_cost=0.0)
    assert (await admit(store, tenant, s)).headers.remaining_tokens == 1000


async def test_usage_beyond_the_reservation_is_debt_that_delays_the_next_admission(
    store: QuotaStore, tenant: str, clock: FakeClock
) -> None:
    s = scope(tpm=600)  # 10 tokens per second
    r = held(await admit(store, tenant, s, tokens=600))
    assert await store.settle(r, actual_tokens=900, actual_cost=0.0)  # level -300
    refused = await admit(store, tenant, s, tokens=60)
    assert (refused.limit, refused.headers.remaining_tokens) == ("tpm", 0)
    assert refused.retry_after_s == pytest.approx(36.0)
    assert refused.headers.reset_tokens_s == pytest.approx(90.0)  # 900 tokens to refill
    clock.advance(35.9)
    assert not (await admit(store, tenant, s, tokens=60)).allowed
    clock.advance(0.1)
    assert (await admit(store, tenant, s, tokens=60)).allowed


async def test_a_request_larger_than_the_tpm_limit_can_never_pass(store: QuotaStore, tenant: str) -> None:
    d = await admit(store, tenant, scope(tpm=100, rpm=1), tokens=101)
    assert (d.allowed, d.limit, d.exceeds_limit, d.retry_after_s) == (False, "tpm", True, 0.0)


# -- leases: concurrency and in-flight tokens ---------------------------------------------------------


async def test_concurrency_slots_come_back_on_settle(store: QuotaStore, tenant: str) -> None:
    s = scope(max_concurrency=2)
    a = held(await admit(store, tenant, s))
    held(await admit(store, tenant, s))
    refused = await admit(store, tenant, s)
    assert (refused.limit, refused.retry_after_s, refused.exceeds_limit) == ("concurrency", 1.0, False)
    assert await store.settle(a, actual_tokens=0, actual_cost=0.0)
    held(await admit(store, tenant, s))


async def test_new_limits_apply_at_once_to_the_next_admission(store: QuotaStore, tenant: str) -> None:
    # Admission passes a tenant's scopes as one object until its limits change, and the Redis store keeps
    # their encoding by that object: new scopes must be read afresh, in both directions.
    one = scope(max_concurrency=1)
    first = held(await admit(store, tenant, one))
    assert not (await admit(store, tenant, one)).allowed  # the same scopes again: the kept encoding
    raised = scope(max_concurrency=3)
    second = held(await admit(store, tenant, raised))
    assert not (await admit(store, tenant, scope(max_concurrency=2))).allowed  # lowered: 2 held
    await store.settle(first, actual_tokens=0, actual_cost=0.0)
    await store.settle(second, actual_tokens=0, actual_cost=0.0)
    assert (await admit(store, tenant, one)).allowed  # back to the first scopes, with their slot free


async def test_leases_of_a_crashed_holder_expire_after_their_ttl(
    store: QuotaStore, tenant: str, clock: FakeClock
) -> None:
    s = scope(max_concurrency=1)
    crashed = held(await store.admit(tenant, s, tokens=0, cost=0.0, lease_ttl_s=10))  # never settled
    assert (await admit(store, tenant, s)).retry_after_s == 1.0  # the hint, sooner than the expiry
    clock.advance(9.75)
    refused = await admit(store, tenant, s)
    assert refused.limit == "concurrency"
    assert refused.retry_after_s == pytest.approx(0.25)  # the earliest expiry, sooner than the hint
    clock.advance(0.25)
    survivor = held(await admit(store, tenant, s))

    # The crashed holder's late settle still counts once, and does not free the survivor's slot.
    assert await store.settle(crashed, actual_tokens=0, actual_cost=0.0)
    assert not await store.settle(crashed, actual_tokens=0, actual_cost=0.0)
    assert (await admit(store, tenant, s)).limit == "concurrency"
    assert await store.settle(survivor, actual_tokens=0, actual_cost=0.0)


async def test_renew_keeps_a_live_lease(store: QuotaStore, tenant: str, clock: FakeClock) -> None:
    s = scope(max_concurrency=1)
    r = held(await store.admit(tenant, s, tokens=0, cost=0.0, lease_ttl_s=10))
    clock.advance(8)
    assert await store.renew(r)
    clock.advance(8)  # past the first expiry, before the renewed one
    assert not (await admit(store, tenant, s)).allowed
    clock.advance(2)
    held(await admit(store, tenant, s))
    assert not await store.renew(r)  # expired and purged: the slot went to someone else


async def test_max_inflight_tokens(store: QuotaStore, tenant: str) -> None:
    s = scope(max_inflight_tokens=1000)
    a = held(await admit(store, tenant, s, tokens=600))
    refused = await admit(store, tenant, s, tokens=500)
    assert (refused.limit, refused.exceeds_limit) == ("inflight_tokens", False)
    held(await admit(store, tenant, s, tokens=400))
    assert await store.settle(a, actual_tokens=600, actual_cost=0.0)
    held(await admit(store, tenant, s, tokens=500))
    too_big = await admit(store, tenant, s, tokens=1001)
    assert (too_big.limit, too_big.exceeds_limit) == ("inflight_tokens", True)


# -- budgets ------------------------------------------------------------------------------------------


async def test_budget_reserves_the_worst_case_and_settle_charges_the_actual_cost(
    store: QuotaStore, tenant: str, clock: FakeClock
) -> None:
    s = scope(budget_amount=1.0, budget_period="day")
    a = held(await admit(store, tenant, s, cost=0.6))
    in_flight = await admit(store, tenant, s, cost=0.5)
    assert (in_flight.limit, in_flight.retry_after_s) == ("budget", 1.0)  # may free up when `a` settles

    assert await store.settle(a, actual_tokens=0, actual_cost=0.3)
    b = held(await admit(store, tenant, s, cost=0.5))
    assert await store.settle(b, actual_tokens=0, actual_cost=0.5)  # spent 0.8

    spent = await admit(store, tenant, s, cost=0.3)
    assert (spent.limit, spent.exceeds_limit) == ("budget", False)
    assert spent.retry_after_s == pytest.approx(START + 12 * 3600 - clock.now)  # until midnight UTC
    held(await admit(store, tenant, s, cost=0.2))
    too_big = await admit(store, tenant, s, cost=1.5)
    assert (too_big.limit, too_big.exceeds_limit) == ("budget", True)


async def test_concurrent_admissions_never_overrun_the_budget(store: QuotaStore, tenant: str) -> None:
    s = scope(budget_amount=10.0, budget_period="month")
    outstanding: list[Reservation] = []
    spent = 0.0
    for round_ in range(5):
        # 50 admissions race each other and the settlements of the previous round (the last round only
        # admits, to fill what is left).
        settling = outstanding if round_ < 4 else []
        calls: list[Awaitable[object]] = []
        for i in range(50):
            calls.append(admit(store, tenant, s, cost=0.5))
            if i < len(settling):
                calls.append(store.settle(settling[i], actual_tokens=0, actual_cost=0.25))
        results = await asyncio.gather(*calls)
        spent += 0.25 * len(settling)
        admitted = [r.reservation for r in results if isinstance(r, Decision) and r.reservation]
        outstanding = admitted if round_ < 4 else outstanding + admitted
        assert spent + 0.5 * len(outstanding) <= 10.0 + 1e-9
    assert 9.5 < spent + 0.5 * len(outstanding) <= 10.0  # filled, never beyond


@pytest.mark.parametrize("period", ["day", "week", "month"])
async def test_a_spent_budget_comes_back_when_its_period_rolls_over(
    store: QuotaStore, tenant: str, clock: FakeClock, period: str
) -> None:
    s = scope(budget_amount=1.0, budget_period=period)
    assert await store.settle(held(await admit(store, tenant, s, cost=1.0)), actual_tokens=0, actual_cost=1.0)
    refused = await admit(store, tenant, s, cost=0.1)
    _, ends = period_window(period, clock.now)  # type: ignore[arg-type]
    assert refused.limit == "budget" and refused.retry_after_s == pytest.approx(ends - clock.now)
    clock.advance(refused.retry_after_s - 0.001)
    assert not (await admit(store, tenant, s, cost=0.1)).allowed
    clock.advance(0.001)
    held(await admit(store, tenant, s, cost=0.1))


def test_budget_periods() -> None:
    assert period_window("day", START) == ("2026-11-23", START + 12 * 3600)
    assert period_window("week", START) == ("2026-W48", START + 7 * 86400 - 12 * 3600)
    assert period_window("month", START) == ("2026-11", START + 7 * 86400 + 12 * 3600)


# -- scopes, idempotency, headers ---------------------------------------------------------------------


async def test_a_key_with_narrower_limits_is_held_to_them_within_its_tenant(store: QuotaStore, tenant: str) -> None:
    tenant_scope = Scope(f"tenant:{tenant}", QuotaLimits(rpm=8))
    key_a = [tenant_scope, Scope("key:a", QuotaLimits(rpm=5))]
    key_b = [tenant_scope, Scope("key:b", QuotaLimits())]

    decisions = [await admit(store, tenant, key_a) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert (decisions[-1].limit, decisions[-1].scope) == ("rpm", "key:a")
    assert decisions[0].headers.limit_requests == 5  # the key's bucket is the tighter one

    decisions = [await admit(store, tenant, key_b) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True] * 3 + [False]
    assert (decisions[-1].limit, decisions[-1].scope) == ("rpm", f"tenant:{tenant}")
    assert decisions[0].headers.limit_requests == 8


async def test_admission_is_all_or_nothing(store: QuotaStore, tenant: str) -> None:
    tenant_scope = Scope("tenant", QuotaLimits(rpm=100, tpm=10_000, max_concurrency=10))
    narrow = [tenant_scope, Scope("key:a", QuotaLimits(tpm=100))]
    refused = await admit(store, tenant, narrow, tokens=150)
    assert (refused.limit, refused.scope, refused.exceeds_limit) == ("tpm", "key:a", True)
    after = await admit(store, tenant, [tenant_scope], tokens=0)
    assert (after.headers.remaining_requests, after.headers.remaining_tokens) == (99, 10_000)


async def test_settle_is_idempotent(store: QuotaStore, tenant: str) -> None:
    s = scope(tpm=1000, max_concurrency=1, budget_amount=1.0)
    r = held(await admit(store, tenant, s, tokens=500, cost=0.5))
    assert await store.settle(r, actual_tokens=100, actual_cost=0.4)
    assert not await store.settle(r, actual_tokens=100, actual_cost=0.4)
    after = await admit(store, tenant, s, tokens=0, cost=0.6)
    assert after.allowed and after.headers.remaining_tokens == 900  # refunded once, charged 0.4 once
    assert not (await admit(store, tenant, s, tokens=0, cost=0.0)).allowed  # and the slot is taken again


async def test_rate_headers(store: QuotaStore, tenant: str) -> None:
    s = scope(rpm=60, tpm=6000)
    d = await admit(store, tenant, s, tokens=100)
    h = d.headers
    assert (h.limit_requests, h.remaining_requests, h.limit_tokens, h.remaining_tokens) == (60, 59, 6000, 5900)
    assert h.reset_requests_s == pytest.approx(1.0) and h.reset_tokens_s == pytest.approx(1.0)

    unlimited = (await admit(store, tenant, scope(max_concurrency=5))).headers
    assert unlimited.limit_requests is None and unlimited.remaining_tokens is None


async def test_the_first_failing_limit_is_named_and_the_longest_wait_is_given(store: QuotaStore, tenant: str) -> None:
    s = scope(rpm=1, tpm=60)
    held(await admit(store, tenant, s, tokens=50))
    refused = await admit(store, tenant, s, tokens=20)  # rpm: 60 s; tpm: 10 tokens short, 10 s
    assert refused.limit == "rpm" and refused.retry_after_s == pytest.approx(60.0)


async def test_bad_requests_are_refused_before_touching_state(store: QuotaStore) -> None:
    with pytest.raises(ValueError):
        await store.admit("a{b}", scope(), tokens=1, cost=0.0)
    with pytest.raises(ValueError):
        await store.admit("t", [], tokens=1, cost=0.0)
    with pytest.raises(ValueError):
        await store.admit("t", scope(), tokens=-1, cost=0.0)


# -- Redis only ---------------------------------------------------------------------------------------


async def test_redis_keys_share_the_tenant_hash_tag_and_all_expire(
    redis_client: Redis, pipelined: PipelinedRedis, tenant: str, clock: FakeClock
) -> None:
    store = RedisQuotaStore(pipelined, clock=clock)
    limits = QuotaLimits(rpm=10, tpm=1000, max_concurrency=4, max_inflight_tokens=5000, budget_amount=5.0)
    scopes = [Scope(f"tenant:{tenant}", limits), Scope("key:k1", limits)]
    settled = held(await store.admit(tenant, scopes, tokens=100, cost=0.1, lease_ttl_s=30))
    held(await store.admit(tenant, scopes, tokens=100, cost=0.1, lease_ttl_s=5))  # left to expire
    await store.settle(settled, actual_tokens=50, actual_cost=0.05)
    month_left = period_window("month", clock.now)[1] - clock.now
    clock.advance(6)
    await store.admit(tenant, scopes, tokens=100, cost=0.1, lease_ttl_s=30)  # purges the expired lease

    keys = sorted([k.decode() async for k in redis_client.scan_iter(match=f"*{tenant}*")])
    assert keys == sorted(store.keys(tenant, scopes))
    assert all(f"gw:{{{tenant}}}:" in k for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    for k in keys:
        assert await redis_client.pttl(k) > 0, k
    # State and leases live as long as their last lease (30 s) + 1 s of margin; a budget until the end
    # of its period.
    assert 30_000 < await redis_client.pttl(f"gw:{{{tenant}}}:state:key:k1") <= 31_000
    assert 30_000 < await redis_client.pttl(f"gw:{{{tenant}}}:leases:key:k1") <= 31_000
    assert month_left * 1000 < await redis_client.pttl(f"gw:{{{tenant}}}:budget:key:k1") <= (month_left + 1) * 1000
    assert await redis_client.hget(f"gw:{{{tenant}}}:budget:key:k1", "p") == b"2026-11"


async def test_redis_state_written_by_settle_alone_still_expires(
    redis_client: Redis, pipelined: PipelinedRedis, tenant: str, clock: FakeClock
) -> None:
    store = RedisQuotaStore(pipelined, clock=clock)
    scopes = [Scope("tenant:t", QuotaLimits()), Scope("key:k", QuotaLimits(tpm=600))]
    r = held(await store.admit(tenant, scopes, tokens=60, cost=0.0))
    state = f"gw:{{{tenant}}}:state:key:k"
    await redis_client.delete(state)  # as if it had expired while the request ran
    assert await store.settle(r, actual_tokens=660, actual_cost=0.0)  # 600 tokens of debt: 60 s
    assert 60_000 < await redis_client.pttl(state) <= 61_000


async def test_redis_scripts_are_loaded_once_and_reloaded_after_a_flush(tmp_path: Path, tenant: str) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = fast_fail_client(server.url, timeout_s=2.0)
    pipelined = PipelinedRedis.from_url(server.url, timeout_s=2.0)
    try:
        store = RedisQuotaStore(pipelined)  # the server's own clock
        s = scope(rpm=1000, tpm=100_000)
        for _ in range(10):
            await store.settle(held(await admit(store, tenant, s, tokens=10)), actual_tokens=5, actual_cost=0.0)
        stats = await client.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] == 2  # admit and settle, once each
        assert stats["cmdstat_evalsha"]["calls"] >= 20
        assert "cmdstat_eval" not in stats

        await client.script_flush()  # as after a restart or a failover
        await store.settle(held(await admit(store, tenant, s, tokens=10)), actual_tokens=5, actual_cost=0.0)
        stats = await client.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] == 4
    finally:
        await pipelined.aclose()
        await client.aclose()
        server.kill()


async def test_lua_and_python_agree_on_budget_periods(
    redis_client: Redis, pipelined: PipelinedRedis, clock: FakeClock
) -> None:
    store = RedisQuotaStore(pipelined, clock=clock)
    instants = [
        START,
        1_798_761_599.0,  # 2026-12-31 23:59:59, Thursday: 2026-W53
        1_798_761_600.0,  # 2027-01-01
        1_798_934_400.0,  # 2027-01-03, Sunday: still 2026-W53
        1_799_020_800.0,  # 2027-01-04, Monday: 2027-W01
        1_735_516_800.0,  # 2024-12-30, Monday: 2025-W01
        1_709_164_800.0,  # 2024-02-29
        4_107_542_400.0,  # 2100-03-01 (2100 is not a leap year)
        0.0,
    ]
    kinds: list[Period] = ["day", "week", "month"]
    for kind in kinds:
        for at in instants:
            clock.now = at
            tenant = f"t{uuid.uuid4().hex[:12]}"
            s = scope(budget_amount=1e9, budget_period=kind)
            await store.settle(held(await admit(store, tenant, s, cost=1.0)), actual_tokens=0, actual_cost=0.0)
            stored = await redis_client.hget(f"gw:{{{tenant}}}:budget:tenant:t", "p")
            assert stored == period_window(kind, at)[0].encode(), (kind, at)


# -- Redis failures -----------------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own: killing the session's would break the tests that follow."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.kill()


@pytest.fixture(params=["redis", "redis-py"])
async def own_client(request: pytest.FixtureRequest, own_redis: RedisServer) -> AsyncIterator[ScriptClient]:
    client = script_client(request.param, own_redis.url, 0.25)
    yield client
    await client.aclose()  # type: ignore[attr-defined]  # both clients have it


async def test_a_dead_redis_fails_fast_with_quota_backend_error(
    own_redis: RedisServer, own_client: ScriptClient, tenant: str
) -> None:
    store = RedisQuotaStore(own_client)
    r = held(await admit(store, tenant, scope(rpm=10)))
    own_redis.kill()
    with pytest.raises(QuotaBackendError):
        await asyncio.wait_for(admit(store, tenant, scope(rpm=10)), 5)
    with pytest.raises(QuotaBackendError):
        await asyncio.wait_for(store.settle(r, actual_tokens=0, actual_cost=0.0), 5)
    with pytest.raises(QuotaBackendError):
        await asyncio.wait_for(store.renew(r), 5)


async def test_a_hung_redis_fails_with_quota_backend_error_after_the_socket_timeout(
    own_redis: RedisServer, own_client: ScriptClient, tenant: str
) -> None:
    store = RedisQuotaStore(own_client)
    held(await admit(store, tenant, scope(rpm=10)))
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QuotaBackendError):
            await asyncio.wait_for(admit(store, tenant, scope(rpm=10)), 5)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


async def test_failover_runs_on_local_shares_and_recovers(
    own_redis: RedisServer, own_client: ScriptClient, tenant: str, clock: FakeClock
) -> None:
    # A server that keeps what it acknowledged across a kill, as a production Redis with AOF does.
    own_redis.kill()
    own_redis.start(appendonly=True, extra=("--appendfsync", "always"))
    changes: list[bool] = []
    store = FailoverQuotaStore(
        RedisQuotaStore(own_client, clock=clock),
        LocalQuotaStore(clock=clock, wall_clock=clock),
        mode="local",
        replicas=2,
        clock=clock,
        on_change=changes.append,
    )
    s = scope(rpm=10, max_concurrency=10)
    before = held(await admit(store, tenant, s))
    assert before.backend == "redis" and not store.degraded

    own_redis.kill()
    local = [await asyncio.wait_for(admit(store, tenant, s), 5) for _ in range(6)]
    assert store.degraded and changes == [True]
    assert [d.allowed for d in local] == [True] * 5 + [False]  # this replica's half of rpm=10
    assert held(local[0]).backend == "local" and local[0].headers.limit_requests == 5
    with pytest.raises(QuotaBackendError):  # kept by the caller, settled once Redis is back
        await store.settle(before, actual_tokens=0, actual_cost=0.0)

    own_redis.start(appendonly=True, extra=("--appendfsync", "always"))
    assert held(await admit(store, f"{tenant}-2", s)).backend == "local"  # not retried yet
    clock.advance(1.0)
    recovered = held(await admit(store, tenant, s))
    assert recovered.backend == "redis" and not store.degraded and changes == [True, False]
    assert await store.settle(held(local[0]), actual_tokens=0, actual_cost=0.0)  # settled where it was made
    assert await store.settle(recovered, actual_tokens=0, actual_cost=0.0)
    assert await store.settle(before, actual_tokens=0, actual_cost=0.0)  # late, and once
    assert not await store.settle(before, actual_tokens=0, actual_cost=0.0)
    await store.close()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_failover_fails_open_or_closed(
    own_redis: RedisServer, own_client: ScriptClient, tenant: str, clock: FakeClock, mode: FailureMode
) -> None:
    store = FailoverQuotaStore(
        RedisQuotaStore(own_client, clock=clock),
        LocalQuotaStore(clock=clock, wall_clock=clock),
        mode=mode,
        clock=clock,
    )
    own_redis.kill()
    if mode == "closed":
        with pytest.raises(QuotaBackendError):
            await asyncio.wait_for(admit(store, tenant, scope(rpm=1)), 5)
        assert store.degraded
        return
    decisions = [await asyncio.wait_for(admit(store, tenant, scope(rpm=1)), 5) for _ in range(3)]
    assert all(d.allowed for d in decisions) and store.degraded
    r = held(decisions[0])
    assert r.backend == "open" and await store.settle(r, actual_tokens=1, actual_cost=1.0)
    assert math.isclose(decisions[0].retry_after_s, 0.0)
