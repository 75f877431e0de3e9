"""The backends' fair queues: one suite over both stores (in-process, and a real redis-server through the
gateway's pipelined client), time driven exactly by an injected clock (no sleeps), then what only Redis has
(replicas that stop beating, leadership).

A pool here is a backend with one or more endpoints; each test uses pools and tenants of its own, so tests
share the session's Redis without flushing it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.admission.limits import (
    Decision,
    LocalQuotaStore,
    Permit,
    PipelinedRedis,
    PlaceAsk,
    PoolAsk,
    QuotaLimits,
    RedisQuotaStore,
    Release,
    Scope,
)
from tests.support.redis_server import RedisServer
from tests.test_limits import FakeClock

TTL = 30.0


class Harness:
    """One store and the grants it makes to waiting requests, whichever way it delivers them."""

    def __init__(self, store: LocalQuotaStore | RedisQuotaStore, clock: FakeClock, client: Any = None) -> None:
        self.store = store
        self.clock = clock
        self.client = client
        self.pushed: list[tuple[str, str]] = []
        self.pool = f"p{uuid.uuid4().hex[:10]}"
        if isinstance(store, LocalQuotaStore):
            store.fairshare.on_grant = lambda waiter, endpoint: self.pushed.append((waiter, endpoint))

    async def capacity(self, limits: dict[str, int], pool: str | None = None) -> None:
        await self.store.set_capacity(pool or self.pool, limits)

    def ask(
        self,
        tenant: str,
        *,
        weight: float = 1.0,
        band: int = 0,
        cost: float = 10.0,
        ranking: tuple[str, ...] = ("e1",),
        factor: float = 0.0,
        depth: int | None = None,
        pools: tuple[PoolAsk, ...] | None = None,
        spill: bool = False,
        key: str = "",
        key_ttl: float = 300.0,
    ) -> PlaceAsk:
        return PlaceAsk(
            waiter=uuid.uuid4().hex[:16],
            tenant=tenant,
            weight=weight,
            band=band,
            cost=cost,
            pools=pools or (PoolAsk(self.pool, ranking, key, key_ttl),),
            lease_ttl_s=TTL,
            spill=spill,
            max_queue_depth=depth,
            load_factor=factor,
        )

    async def place(self, ask: PlaceAsk, scopes: list[Scope] | None = None, tokens: int = 0) -> Decision:
        return await self.store.admit(ask.tenant, scopes or [], tokens=tokens, cost=0.0, lease_ttl_s=TTL, place=ask)

    async def release(self, ask: PlaceAsk, permit: Permit, actual: float | None = None) -> bool:
        release = Release(permit, ask.tenant, ask.weight, ask.band, ask.cost, ask.cost if actual is None else actual)
        return await self.store.settle(None, actual_tokens=0, actual_cost=0.0, release=release)

    async def grants(self) -> list[tuple[str, str]]:
        """The grants made to waiting requests since the last call, in order."""
        if isinstance(self.store, RedisQuotaStore):
            key = self.store.grants_key
            raw = await self.client.execute_command("LRANGE", key, 0, -1)
            await self.client.execute_command("DEL", key)
            return [tuple(x.decode().rsplit("|", 1)) for x in raw]  # type: ignore[misc]
        out, self.pushed = self.pushed, []
        return out


@pytest.fixture(params=["local", "redis"])
async def fs(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Harness]:
    clock = FakeClock()
    if request.param == "local":
        yield Harness(LocalQuotaStore(clock=clock, wall_clock=clock), clock)
        return
    client = PipelinedRedis.from_url(redis_server.url, timeout_s=2.0)
    store = RedisQuotaStore(client, clock=clock, replica=f"r{uuid.uuid4().hex[:8]}")
    await store.beat(10**7)
    harness = Harness(store, clock, client)
    yield harness
    await client.aclose()


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def granted(decision: Decision) -> Permit:
    assert decision.allowed and decision.place == "granted" and decision.permit is not None, decision
    return decision.permit


async def test_a_free_permit_is_taken_at_once_and_comes_back(fs: Harness) -> None:
    await fs.capacity({"e1": 2})
    a, b, c = fs.ask(tenant()), fs.ask(tenant()), fs.ask(tenant())
    first, second = granted(await fs.place(a)), granted(await fs.place(b))
    assert (first.endpoint, second.endpoint) == ("e1", "e1") and first.pool == fs.pool
    third = await fs.place(c)
    assert third.allowed and third.place == "queued" and third.permit is None
    assert await fs.release(a, first)
    assert not await fs.release(a, first)  # once
    assert await fs.grants() == [(c.waiter, "e1")]


async def test_waiting_requests_are_served_by_weight(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    light, heavy = tenant(), tenant()
    holder = fs.ask(light)
    held = granted(await fs.place(holder))
    asks = {}
    for _ in range(8):
        for name, weight in ((light, 1.0), (heavy, 3.0)):
            ask = fs.ask(name, weight=weight)
            assert (await fs.place(ask)).place == "queued"
            asks[ask.waiter] = ask
    served: list[str] = []
    current, permit = holder, held
    for _ in range(8):
        await fs.release(current, permit)
        ((waiter, endpoint),) = await fs.grants()
        current, permit = asks[waiter], Permit(fs.pool, endpoint, waiter)
        served.append(current.tenant)
    # Equal costs, weights 1:3: the heavy tenant gets three permits for each of the light one's.
    assert served.count(heavy) == 6 and served.count(light) == 2


async def test_a_tenant_back_from_idle_is_lifted_and_earns_no_credit(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    busy, idle = tenant(), tenant()
    current = fs.ask(busy)
    permit = granted(await fs.place(current))
    # `busy` alone for 20 rounds: its counter climbs to 210 while `idle` stays at 0.
    for _ in range(20):
        nxt = fs.ask(busy)
        assert (await fs.place(nxt)).place == "queued"
        await fs.release(current, permit)
        ((waiter, endpoint),) = await fs.grants()
        current, permit = nxt, Permit(fs.pool, endpoint, waiter)
    asks = {}
    for name in [busy] * 8 + [idle] * 8:
        ask = fs.ask(name)
        await fs.place(ask)
        asks[ask.waiter] = ask
    served = []
    for _ in range(8):
        await fs.release(current, permit)
        ((waiter, endpoint),) = await fs.grants()
        current, permit = asks[waiter], Permit(fs.pool, endpoint, waiter)
        served.append(current.tenant)
    # Lifted to the busy tenant's counter on arrival: they share, instead of `idle` taking all 8 (and more).
    assert 3 <= served.count(idle) <= 5


async def test_a_higher_priority_band_is_served_first(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    holder = fs.ask(tenant())
    permit = granted(await fs.place(holder))
    low, high = fs.ask(tenant(), band=0), fs.ask(tenant(), band=5)
    await fs.place(low)
    await fs.place(high)
    await fs.release(holder, permit)
    assert await fs.grants() == [(high.waiter, "e1")]


async def test_a_full_queue_refuses_the_whole_admission(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    name = tenant()
    rpm = [Scope(f"tenant:{name}", QuotaLimits(rpm=3))]
    granted(await fs.place(fs.ask(name), rpm))
    assert (await fs.place(fs.ask(name, depth=1), rpm)).place == "queued"
    # The queue is full: refused, and the rpm bucket is not charged for it.
    full = await fs.place(fs.ask(name, depth=1), rpm)
    assert not full.allowed and full.limit == "queue_full" and full.place == "full" and full.ahead == 1
    third = await fs.place(fs.ask(name), rpm)
    assert third.allowed and third.headers.remaining_requests == 0  # the third of rpm 3: the refusal took none


async def test_cancel_leaves_the_queue_unless_granted_meanwhile(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    holder, waiting, other = fs.ask(tenant()), fs.ask(tenant()), fs.ask(tenant())
    permit = granted(await fs.place(holder))
    await fs.place(waiting)
    await fs.place(other)
    assert await fs.store.cancel(waiting)
    assert not await fs.store.cancel(waiting)
    await fs.release(holder, permit)
    assert await fs.grants() == [(other.waiter, "e1")]  # the cancelled one was skipped
    assert not await fs.store.cancel(other)  # granted: it must be given back by whoever receives it


async def test_the_least_loaded_endpoint_serves_without_affinity(fs: Harness) -> None:
    await fs.capacity({"e1": 2, "e2": 4})
    endpoints = []
    for _ in range(6):
        endpoints.append(granted(await fs.place(fs.ask(tenant(), ranking=("e1", "e2")))).endpoint)
    # By load relative to the limit: e1 half as big as e2 takes a third.
    assert endpoints.count("e1") == 2 and endpoints.count("e2") == 4
    assert (await fs.place(fs.ask(tenant(), ranking=("e1", "e2")))).place == "queued"


async def test_affinity_keeps_a_prefix_on_its_endpoint_within_bounded_load(fs: Harness) -> None:
    await fs.capacity({"e1": 10, "e2": 10, "e3": 10})
    ranking = ("e2", "e3", "e1")
    picks = [granted(await fs.place(fs.ask(tenant(), ranking=ranking, factor=1.25))).endpoint for _ in range(9)]
    # e2 first, as long as its load stays within 1.25 x the mean; the ranking's next ones take the overflow.
    loads = {e: picks.count(e) for e in ("e1", "e2", "e3")}
    assert picks[0] == "e2" and loads["e2"] >= loads["e3"] >= loads["e1"]
    assert max(loads.values()) <= -(-1.25 * 9 // 3)
    # Another prefix (another ranking) goes its own way.
    assert granted(await fs.place(fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25))).endpoint == "e1"


async def test_an_endpoint_at_its_limit_or_down_takes_nothing(fs: Harness) -> None:
    await fs.capacity({"e1": 1, "e2": 0})
    granted(await fs.place(fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25)))
    assert (await fs.place(fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25))).place == "queued"


# Affinity keys: four endpoints, and rankings that all put e1 first (the worst a hash can draw).
FOUR = {"e1": 100, "e2": 100, "e3": 100, "e4": 100}
E1_FIRST = (("e1", "e2", "e3", "e4"), ("e1", "e3", "e4", "e2"), ("e1", "e4", "e2", "e3"), ("e1", "e2", "e4", "e3"))


async def place_key(fs: Harness, key: str, ranking: tuple[str, ...], key_ttl: float = 300.0) -> str:
    """Where one request with `key` goes (its permit given back at once, so load never binds)."""
    ask = fs.ask(tenant(), ranking=ranking, factor=1.25, key=key, key_ttl=key_ttl)
    permit = granted(await fs.place(ask))
    assert await fs.release(ask, permit)
    return permit.endpoint


async def test_affinity_keys_spread_evenly_and_stay(fs: Harness) -> None:
    await fs.capacity(FOUR)
    keys = [f"{i:016x}" for i in range(32)]
    first = {k: await place_key(fs, k, E1_FIRST[i % 4]) for i, k in enumerate(keys)}
    # Every ranking prefers e1, yet each endpoint holds an even share of the keys: 8 of 32.
    assert sorted(list(first.values()).count(e) for e in FOUR) == [8, 8, 8, 8]
    # And each key stays where it was put.
    for i, k in enumerate(keys):
        assert await place_key(fs, k, E1_FIRST[i % 4]) == first[k]


async def test_an_unused_key_expires_and_frees_its_place(fs: Harness) -> None:
    await fs.capacity(FOUR)
    keys = [f"{i:016x}" for i in range(4)]
    placed = [await place_key(fs, k, E1_FIRST[0], key_ttl=60.0) for k in keys]
    assert placed == ["e1", "e2", "e3", "e4"]
    fs.clock.advance(50.0)
    for k in keys[1:]:  # used again: they stay
        await place_key(fs, k, E1_FIRST[0], key_ttl=60.0)
    fs.clock.advance(20.0)  # the first key's 60 s are up, the others' are not
    # A new key that prefers e2: e2, e3 and e4 hold their share (1 of 3 + 1 keys), e1 holds none now.
    assert await place_key(fs, "ff" * 8, ("e2", "e3", "e4", "e1"), key_ttl=60.0) == "e1"
    # The first key comes back as a new one: it goes where there is room, not necessarily where it was.
    assert await place_key(fs, keys[0], ("e2", "e3", "e4", "e1"), key_ttl=60.0) == "e2"


async def test_a_key_whose_endpoint_left_is_reassigned_and_stays(fs: Harness) -> None:
    await fs.capacity(FOUR)
    assert await place_key(fs, "aa" * 8, E1_FIRST[0]) == "e1"
    await fs.capacity({**FOUR, "e1": 0})
    assert await place_key(fs, "aa" * 8, E1_FIRST[0]) == "e2"
    await fs.capacity(FOUR)
    # e1 is back, but the key's prefix is cached at e2 now: it stays there.
    assert await place_key(fs, "aa" * 8, E1_FIRST[0]) == "e2"
    # And its old place was given back: the next key takes e1.
    assert await place_key(fs, "bb" * 8, E1_FIRST[0]) == "e1"


async def test_a_request_beyond_bounds_spills_without_moving_its_key(fs: Harness) -> None:
    await fs.capacity({"e1": 1, "e2": 10})
    key = "cc" * 8
    holder = fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25, key=key)
    held = granted(await fs.place(holder))
    assert held.endpoint == "e1"
    spilled = fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25, key=key)
    assert granted(await fs.place(spilled)).endpoint == "e2"  # e1 is at its limit: this one request spills
    await fs.release(holder, held)
    assert await place_key(fs, key, ("e1", "e2")) == "e1"  # the key did not move


async def test_a_queued_request_goes_where_its_key_is(fs: Harness) -> None:
    await fs.capacity({"e1": 1, "e2": 1})
    assert await place_key(fs, "dd" * 8, ("e1", "e2")) == "e1"
    assert await place_key(fs, "ee" * 8, ("e1", "e2")) == "e2"
    a = fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25, key="dd" * 8)
    b = fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25, key="ee" * 8)
    pa, pb = granted(await fs.place(a)), granted(await fs.place(b))
    assert (pa.endpoint, pb.endpoint) == ("e1", "e2")
    waiting = fs.ask(tenant(), ranking=("e1", "e2"), factor=1.25, key="ee" * 8)
    assert (await fs.place(waiting)).place == "queued"
    await fs.release(b, pb)
    assert await fs.grants() == [(waiting.waiter, "e2")]


async def test_expired_permits_of_a_crashed_holder_come_back(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    granted(await fs.place(fs.ask(tenant())))  # its holder never releases it
    assert (await fs.place(fs.ask(tenant()))).place == "queued"
    fs.clock.advance(TTL + 1)
    # The next call purges it: a newcomer still waits behind the one already waiting, which is granted.
    decision = await fs.place(fs.ask(tenant()))
    # Exactly one permit came back, and exactly one of the two waiting takes it.
    assert len(await fs.grants()) + (decision.place == "granted") == 1


async def test_renewal_keeps_a_permit_past_its_first_ttl(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    ask = fs.ask(tenant())
    permit = granted(await fs.place(ask))
    fs.clock.advance(TTL * 0.8)
    assert await fs.store.renew(None, permit, ttl_s=TTL)
    fs.clock.advance(TTL * 0.8)
    assert (await fs.place(fs.ask(tenant()))).place == "queued"  # still held
    assert await fs.release(ask, permit)


async def test_raising_the_capacity_grants_waiting_requests(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    granted(await fs.place(fs.ask(tenant())))
    name = tenant()
    waiting = [fs.ask(name) for _ in range(3)]
    for ask in waiting:
        await fs.place(ask)
    await fs.capacity({"e1": 3})
    assert [w for w, _ in await fs.grants()] == [waiting[0].waiter, waiting[1].waiter]


async def test_release_corrects_the_counter_to_the_actual_cost(fs: Harness) -> None:
    await fs.capacity({"e1": 1})
    cheap, dear = tenant(), tenant()
    holder = fs.ask(dear)  # estimated at 10 ...
    permit = granted(await fs.place(holder))
    x, y = fs.ask(dear), fs.ask(cheap)
    await fs.place(x)
    await fs.place(y)
    await fs.release(holder, permit, actual=1000.0)  # ... used 1000: the waiting `dear` is ranked by that
    assert await fs.grants() == [(y.waiter, "e1")]


async def test_spilling_takes_a_free_permit_of_a_later_pool(fs: Harness) -> None:
    second = f"{fs.pool}-b"
    await fs.capacity({"e1": 1})
    await fs.capacity({"f1": 1}, pool=second)
    pools = (PoolAsk(fs.pool, ("e1",)), PoolAsk(second, ("f1",)))
    granted(await fs.place(fs.ask(tenant(), pools=pools, spill=True)))
    spilled = granted(await fs.place(fs.ask(tenant(), pools=pools, spill=True)))
    assert (spilled.pool, spilled.endpoint) == (second, "f1")
    assert (await fs.place(fs.ask(tenant(), pools=pools, spill=False))).place == "queued"


# -- Redis only ----------------------------------------------------------------------------------------


async def test_waiting_requests_of_a_replica_that_stopped_beating_are_dropped(redis_server: RedisServer) -> None:
    clock = FakeClock()
    client = PipelinedRedis.from_url(redis_server.url, timeout_s=2.0)
    try:
        alive = RedisQuotaStore(client, clock=clock, replica=f"r{uuid.uuid4().hex[:8]}")
        dead = RedisQuotaStore(client, clock=clock, replica=f"r{uuid.uuid4().hex[:8]}")
        await alive.beat(10**7)
        await dead.beat(5.0)
        h = Harness(alive, clock, client)
        await h.capacity({"e1": 1})
        holder = h.ask(tenant())
        permit = granted(await h.place(holder))
        lost = h.ask(tenant())
        assert (await dead.admit(lost.tenant, [], tokens=0, cost=0.0, place=lost)).place == "queued"
        kept = h.ask(tenant())
        await h.place(kept)
        clock.advance(10.0)  # `dead` missed its beats
        await h.release(holder, Permit(h.pool, permit.endpoint, holder.waiter))
        assert [w for w, _ in await h.grants()] == [kept.waiter]
        assert not await dead.beat(5.0)  # it rejoins, and is told its beat had lapsed
    finally:
        await client.aclose()


async def test_one_replica_leads_a_pool_until_it_stops_asking(redis_server: RedisServer) -> None:
    clock = FakeClock()
    client = PipelinedRedis.from_url(redis_server.url, timeout_s=2.0)
    try:
        pool = f"p{uuid.uuid4().hex[:10]}"
        a = RedisQuotaStore(client, clock=clock, replica="ra")
        b = RedisQuotaStore(client, clock=clock, replica="rb")
        assert await a.lead(pool, 0.3)
        assert not await b.lead(pool, 0.3)
        assert await a.lead(pool, 0.3)  # kept by asking again
        await asyncio.sleep(0.4)  # the lead key's TTL runs on Redis's own clock
        assert await b.lead(pool, 0.3)
        assert not await a.lead(pool, 0.3)
    finally:
        await client.aclose()


def test_the_entry_format_is_the_scripts() -> None:
    ask = PlaceAsk("w1", "acme", 2.0, 1, 30.0, (PoolAsk("p", ("http://a:1", "http://b:2")),), 30.0, load_factor=1.25)
    assert ask.entry("r9") == "w1|r9|acme|2.0|1|30.0|30.0|1.25|http://a:1,http://b:2"
    keyed = PoolAsk("p", ("http://a:1", "http://b:2"), "0a1b", 300)
    assert keyed.routing() == "#0a1b@300.0,http://a:1,http://b:2"


async def test_replicas_agree_on_where_a_key_is(redis_server: RedisServer) -> None:
    clock = FakeClock()
    client = PipelinedRedis.from_url(redis_server.url, timeout_s=2.0)
    try:
        a = Harness(RedisQuotaStore(client, clock=clock, replica="ka"), clock, client)
        b = Harness(RedisQuotaStore(client, clock=clock, replica="kb"), clock, client)
        b.pool = a.pool
        await a.capacity(FOUR)
        keys = [f"{i:016x}" for i in range(16)]
        through_a = [await place_key(a, k, E1_FIRST[i % 4]) for i, k in enumerate(keys)]
        through_b = [await place_key(b, k, E1_FIRST[i % 4]) for i, k in enumerate(keys)]
        assert through_a == through_b and sorted(through_a.count(e) for e in FOUR) == [4, 4, 4, 4]
        # Every key of the table has a TTL, so nothing outlives its use.
        prefix = a.store.pool_prefix(a.pool)
        for name in ("aff", "affz", "affn"):
            ttl = await client.execute_command("PTTL", prefix + name)
            assert 0 < int(ttl) <= 301_000
    finally:
        await client.aclose()
