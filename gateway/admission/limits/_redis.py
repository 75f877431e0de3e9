"""`RedisQuotaStore`: the quota state shared by every replica, one Lua script evaluation per call.

Keys, for tenant `acme` and scope `tenant:acme` (each carries the `{acme}` hash tag):

    gw:{acme}:state:tenant:acme    hash  when the rpm/tpm buckets are full again (GCRA), in-flight sums
    gw:{acme}:leases:tenant:acme   zset  in-flight leases "<id>|<tokens>|<cost>" scored by expiry
    gw:{acme}:budget:tenant:acme   hash  budget period id and the spend in it
    gw:{acme}:expired              zset  leases that expired unsettled, kept an hour for a late settle

and, for each backend pool, its fair queue (lua/fairshare.lua: permits, loads, limits, counters, queues)
under `gw:pool:{<backend>}:`, with `gw:replicas` (the live replicas) and `gw:grants:<replica>` (permits
granted to a replica's waiting requests, popped by its `GrantListener`). A request's quotas and its permit
are decided by one script evaluation (admit.lua), and given back by one (settle.lua).

So one call touches a tenant's keys, one or more pools' keys (named in ARGV, not KEYS) and `gw:replicas`
and `gw:grants:*` together. Redis Cluster runs a script only on keys of one slot, declared in KEYS, so it
refuses these calls whatever the hash tags say; and `PipelinedRedis` follows no MOVED or ASK redirection.
Redis must be one standalone primary (a managed one with failover behind one address is fine):
docs/OPERATIONS.md, "Scaling out with Redis", says what to do with Sentinel or Cluster.

Every key has a TTL: state and leases until the buckets are full and the last lease ends, budgets until
their period ends. Scripts (lua/*.lua) are sent by EVALSHA; a NOSCRIPT answer (first use, a restarted
or failed-over server) loads them once and retries. Production uses the Redis server's clock (`TIME`),
so replicas' clocks do not matter; `clock` exists for tests, which drive time exactly.

The client is `PipelinedRedis` (gateway/wire/resp.py: one pipelined connection, a fraction of redis-py's
asyncio client's cost per call) or any redis-py client. Errors of either become `QuotaBackendError` here,
at once: this store never retries, so how fast a failure surfaces is the client's timeout. A call that fails or is
cancelled after the script ran may have reserved: its leases expire after their TTL.

Most of what admit and settle send repeats from one request to the next (a tenant's keys and limits, a
pool's names, a tenant's weight): it is encoded once (`Packed`) and kept, found by the scopes object the
caller passes. Admission passes a tenant's scopes as one object until its limits change, so a caller must
not change a scopes list it passed; new limits come as new scopes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.admission.limits._types import (
    Decision,
    LimitName,
    Permit,
    Place,
    PlaceAsk,
    PoolStatus,
    QuotaBackendError,
    RateHeaders,
    Release,
    Reservation,
    Scope,
    check_request,
    check_usage,
)
from gateway.ids import unique_id
from gateway.wire.resp import Packed

__all__ = ["RedisQuotaStore", "ScriptClient", "fast_fail_client"]


class ScriptClient(Protocol):
    """What the store needs of a Redis client: `gateway.admission.limits.PipelinedRedis` in production, or redis-py's
    `Redis`/`RedisCluster`. Failures are redis-py's exception classes either way."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...

    async def script_load(self, script: str) -> Any: ...


def fast_fail_client(url: str, *, timeout_s: float = 0.25, **kwargs: Any) -> Redis:
    """A client fit for the admission path: short socket timeouts and no retries.

    redis-py's default retries up to 10 times with backoff, which would hold requests for seconds while
    Redis is down; the gateway's failure mode (local / open / closed) is the better answer.
    """
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )


@cache
def _source(name: str) -> str:
    lua = resources.files("gateway.admission.limits") / "lua"
    parts = ("common", "fairshare", name)
    return "\n".join((lua / f"{part}.lua").read_text("utf-8") for part in parts)


class _Script:
    """One Lua script, run by EVALSHA and loaded only when the server does not know it."""

    def __init__(self, name: str) -> None:
        self.source = _source(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: ScriptClient, keys: list[str], args: list[str | int | float]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            return await self.recover(client, keys, args, exc)

    async def recover(
        self, client: ScriptClient, keys: list[str], args: list[str | int | float], exc: Exception
    ) -> Any:
        """After a call failed with `exc`: load the script and run it again if the server did not know it,
        else raise the failure as the store's own."""
        try:
            if not isinstance(exc, NoScriptError):
                raise exc
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except RedisError as error:
            raise QuotaBackendError(f"quota backend unavailable: {type(error).__name__}") from error
        except OSError as error:  # a socket error redis-py did not wrap
            raise QuotaBackendError(f"quota backend unavailable: {type(error).__name__}") from error


def _opt(value: float | None) -> str | int | float:
    return "" if value is None else value


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    """A script's number (an integer reply), or None for its '' (unlimited)."""
    if type(value) is int:
        return value
    text = _str(value)
    return None if text == "" else int(text)


def _seconds(value: Any) -> float | None:
    """The scripts answer durations in whole microseconds (see `us` in lua/common.lua)."""
    if type(value) is int:
        return value / 1e6
    text = _str(value)
    return None if text == "" else int(text) / 1e6


@dataclass(slots=True, eq=False)
class _Runs:
    """What admit.lua and settle.lua are sent for one tenant's scopes, encoded once: the command up to its
    last key, and the lease TTL and limits (admit) or the limits (settle) that follow a request's own figures.
    Kept with the scopes they were made from (`given` by admission, `scopes` as reservations carry them),
    which also keeps their ids from being reused while they are cached."""

    given: Sequence[Scope]
    scopes: tuple[Scope, ...]
    lease_ttl_s: float
    keys: list[str]
    admit_head: Packed
    settle_head: Packed
    admit_limits: Packed
    settle_limits: Packed


def _plain(args: list[Any]) -> list[Any]:
    """The arguments with every `Packed` run spelt out (for a client other than `PipelinedRedis`)."""
    out: list[Any] = []
    for arg in args:
        if type(arg) is Packed:
            out += arg.args
        else:
            out.append(arg)
    return out


def _bounded(cache: dict[Any, Any]) -> dict[Any, Any]:
    """`cache`, emptied first if it holds 4,096 entries: what it keeps is made from configuration (tenants,
    keys, pools), so a bound this size is only reached by churn, and refills from use."""
    if len(cache) >= 4096:
        cache.clear()
    return cache


class RedisQuotaStore:
    def __init__(
        self,
        client: ScriptClient,
        *,
        key_prefix: str = "gw",
        replica: str = "r",
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`client` belongs to the caller (`PipelinedRedis`, or redis-py's from `fast_fail_client`); `close()`
        leaves it open. `replica` names this process in the fair queues (its grant list, its heartbeat).

        `clock` is for tests only: its time replaces the server's `TIME` inside the scripts.
        """
        self._client = client
        self._prefix = key_prefix
        self.replica = replica
        self._clock = clock
        self._admit = _Script("admit")
        self._settle = _Script("settle")
        self._renew: _Script | None = None
        self._cancel: _Script | None = None
        self._capacity: _Script | None = None
        self._beat: _Script | None = None
        self._lead: _Script | None = None
        self.replicas_key = f"{key_prefix}:replicas"
        self.grants_prefix = f"{key_prefix}:grants:"
        # `PipelinedRedis` takes a command as parts, some of them encoded once (`Packed`); other clients get
        # plain arguments.
        self._execute_parts: Callable[..., Awaitable[Any]] | None = getattr(client, "execute_parts", None)
        # What admit and settle send for a tenant's scopes, for a request's place in the fair queue and for a
        # permit given back, encoded once (see `_Runs`).
        self._runs: dict[tuple[str, int], _Runs] = {}
        self._asks: dict[tuple[Any, ...], tuple[Packed, Packed]] = {}
        self._pools: dict[tuple[str, tuple[str, ...]], Packed] = {}
        self._releases: dict[tuple[Any, ...], tuple[Packed, Packed, Packed]] = {}

    def pool_prefix(self, pool: str) -> str:
        return f"{self._prefix}:pool:{{{pool}}}:"

    @property
    def grants_key(self) -> str:
        """The list this replica's grant listener pops."""
        return self.grants_prefix + self.replica

    def keys(self, tenant: str, scopes: Sequence[Scope]) -> list[str]:
        """The keys the scripts touch, in their calling convention (lua/common.lua)."""
        base = f"{self._prefix}:{{{tenant}}}"
        keys = [f"{base}:expired"]
        for scope in scopes:
            keys += [f"{base}:state:{scope.name}", f"{base}:leases:{scope.name}", f"{base}:budget:{scope.name}"]
        return keys

    def _now(self) -> str | float:
        return "" if self._clock is None else self._clock()

    async def admit(
        self,
        tenant: str,
        scopes: Sequence[Scope],
        *,
        tokens: int,
        cost: float,
        lease_ttl_s: float = 60.0,
        timeout_s: float | None = None,
        place: PlaceAsk | None = None,
    ) -> Decision:
        runs = self._runs.get((tenant, id(scopes)))
        if runs is None or runs.given is not scopes or runs.lease_ttl_s != lease_ttl_s:
            runs = self._tenant_runs(tenant, scopes, lease_ttl_s)
        scopes = runs.scopes
        check_request(tenant, scopes, tokens, cost, lease_ttl_s, allow_no_scopes=place is not None)
        reservation = Reservation(
            id=unique_id(),
            tenant=tenant,
            scopes=scopes,
            tokens=tokens,
            cost=cost,
            lease_ttl_s=lease_ttl_s,
            backend="redis",
        )
        args: list[Any] = [self._now(), reservation.member, tokens, repr(cost), runs.admit_limits]
        if place is None:
            args.append(0)
        else:
            self._place_args(place, args)
        script = self._admit
        if timeout_s is None:
            # The script's call inlined (not `await script(...)`): one coroutine less on every request.
            try:
                out = await self._evalsha(script, runs, args)
            except (RedisError, OSError) as exc:
                out = await script.recover(self._client, runs.keys, _plain(args), exc)
        else:
            # Only a request that already spent part of its allowance gets a timer here; the client's own
            # timeout bounds every other call.
            if timeout_s <= 0:
                raise QuotaBackendError("quota backend: no time left for this request")
            try:
                async with asyncio.timeout(timeout_s):
                    out = await script(self._client, runs.keys, _plain(args))
            except TimeoutError:
                raise QuotaBackendError("quota backend unavailable: TimeoutError") from None
        headers = RateHeaders(
            limit_requests=_int(out[5]),
            remaining_requests=_int(out[6]),
            reset_requests_s=_seconds(out[7]),
            limit_tokens=_int(out[8]),
            remaining_tokens=_int(out[9]),
            reset_tokens_s=_seconds(out[10]),
        )
        placed = _str(out[11]) if place is not None else ""
        permit = None
        if placed == "granted" and place is not None:
            permit = Permit(place.pools[int(out[12]) - 1].pool, _str(out[13]), place.waiter, origin="redis")
        if int(out[0]) == 1:
            return Decision(
                allowed=True,
                reservation=reservation if scopes else None,
                headers=headers,
                place=cast(Place, placed),
                permit=permit,
                ahead=int(out[14]) if place is not None else 0,
                backlog=int(out[15]) if place is not None else 0,
                origin="redis",
            )
        where = int(out[2])
        return Decision(
            allowed=False,
            reservation=None,
            headers=headers,
            limit=cast(LimitName, _str(out[1])),
            scope=scopes[where - 1].name if where >= 1 else None,
            retry_after_s=int(out[3]) / 1e6,
            exceeds_limit=int(out[4]) == 1,
            place=cast(Place, placed),
            ahead=int(out[14]) if place is not None else 0,
            backlog=int(out[15]) if place is not None else 0,
            origin="redis",
        )

    def _place_args(self, place: PlaceAsk, args: list[Any]) -> None:
        """The fair queue's arguments of admit.lua, after the scopes'."""
        key = (
            place.tenant,
            place.weight,
            place.band,
            place.lease_ttl_s,
            place.max_queue_depth,
            place.spill,
            place.load_factor,
        )
        runs = self._asks.get(key)
        if runs is None:
            runs = (
                Packed(self.replica, place.tenant, repr(float(place.weight)), str(place.band)),
                Packed(
                    repr(float(place.lease_ttl_s)),
                    "" if place.max_queue_depth is None else place.max_queue_depth,
                    1 if place.spill else 0,
                    repr(float(place.load_factor)),
                    self.replicas_key,
                    self.grants_prefix,
                ),
            )
            _bounded(self._asks)[key] = runs
        args += [len(place.pools), place.waiter, runs[0], repr(float(place.cost)), runs[1]]
        for pool in place.pools:
            if pool.key:  # an affinity key is the request's own: not worth keeping
                args += [self.pool_prefix(pool.pool), pool.routing()]
                continue
            found = self._pools.get((pool.pool, pool.ranking))
            if found is None:
                found = Packed(self.pool_prefix(pool.pool), pool.routing())
                _bounded(self._pools)[(pool.pool, pool.ranking)] = found
            args.append(found)

    async def settle(
        self,
        reservation: Reservation | None,
        *,
        actual_tokens: int,
        actual_cost: float,
        release: Release | None = None,
    ) -> bool:
        check_usage(actual_tokens, actual_cost)
        if reservation is None and release is None:
            return False
        scopes = reservation.scopes if reservation is not None else ()
        tenant = reservation.tenant if reservation is not None else release.tenant  # type: ignore[union-attr]
        runs = self._runs.get((tenant, id(scopes)))
        if runs is None or runs.scopes is not scopes:
            runs = self._tenant_runs(tenant, scopes, reservation.lease_ttl_s if reservation is not None else 60.0)
        args: list[Any] = [
            self._now(),
            reservation.member if reservation is not None else "",
            reservation.tokens if reservation is not None else 0,
            repr(reservation.cost) if reservation is not None else "0.0",
            actual_tokens,
            repr(float(actual_cost)),
            runs.settle_limits,
        ]
        if release is None:
            args.append(0)
        else:
            key = (release.permit.pool, release.tenant, release.weight, release.band, release.load_factor)
            given = self._releases.get(key)
            if given is None:
                given = (
                    Packed(1, self.pool_prefix(release.permit.pool)),
                    Packed(release.tenant, repr(float(release.weight)), str(release.band)),
                    Packed(repr(float(release.load_factor)), self.replicas_key, self.grants_prefix),
                )
                _bounded(self._releases)[key] = given
            args += [
                given[0],
                release.permit.member,
                given[1],
                repr(float(release.estimate)),
                repr(float(release.actual)),
                given[2],
            ]
        script = self._settle
        try:
            out = await self._evalsha(script, runs, args)
        except (RedisError, OSError) as exc:
            out = await script.recover(self._client, runs.keys, _plain(args), exc)
        return int(out) == 1

    def _tenant_runs(self, tenant: str, given: Sequence[Scope], lease_ttl_s: float) -> _Runs:
        scopes = tuple(given)
        admit_limits: list[Any] = [repr(lease_ttl_s), len(scopes)]
        settle_limits: list[Any] = [len(scopes)]
        for scope in scopes:
            lim = scope.limits
            budget = lim.budget_amount is not None
            admit_limits += [
                _opt(lim.rpm),
                _opt(lim.tpm),
                _opt(lim.max_concurrency),
                _opt(lim.max_inflight_tokens),
                repr(lim.budget_amount) if budget else "",
                lim.budget_period if budget else "",
            ]
            settle_limits += [_opt(lim.tpm), lim.budget_period if budget else ""]
        keys = self.keys(tenant, scopes)
        runs = _Runs(
            given=given,
            scopes=scopes,
            lease_ttl_s=lease_ttl_s,
            keys=keys,
            admit_head=Packed("EVALSHA", self._admit.sha, len(keys), *keys),
            settle_head=Packed("EVALSHA", self._settle.sha, len(keys), *keys),
            admit_limits=Packed(*admit_limits),
            settle_limits=Packed(*settle_limits),
        )
        # Found by the scopes admission passes, and by the tuple of them its reservations carry to settle.
        _bounded(self._runs)[(tenant, id(given))] = runs
        self._runs[(tenant, id(scopes))] = runs
        return runs

    def _evalsha(self, script: _Script, runs: _Runs, args: list[Any]) -> Awaitable[Any]:
        if self._execute_parts is not None:
            head = runs.admit_head if script is self._admit else runs.settle_head
            return self._execute_parts(head, *args)
        return self._client.evalsha(script.sha, len(runs.keys), *runs.keys, *_plain(args))

    async def renew(self, reservation: Reservation | None, permit: Permit | None = None, *, ttl_s: float = 0.0) -> bool:
        """Extend the leases of `reservation` and the lease of `permit` (by `ttl_s`, or the reservation's)."""
        if reservation is None and permit is None:
            return False
        scopes = reservation.scopes if reservation is not None else ()
        ttl = reservation.lease_ttl_s if reservation is not None else ttl_s
        args: list[str | int | float] = [
            self._now(),
            reservation.member if reservation is not None else "",
            repr(float(ttl)),
            len(scopes),
            self.pool_prefix(permit.pool) if permit is not None else "",
            permit.member if permit is not None else "",
        ]
        if self._renew is None:
            self._renew = _Script("renew")
        tenant = reservation.tenant if reservation is not None else "_"
        out = await self._renew(self._client, self.keys(tenant, scopes), args)
        return int(out) == 1

    async def cancel(self, place: PlaceAsk, origin: str = "") -> bool:
        """Take a waiting request out of its queue: True if it was still waiting, False if it was granted a
        permit meanwhile (which then arrives on this replica's grant list) or dropped."""
        if self._cancel is None:
            self._cancel = _Script("cancel")
        first = place.pools[0].pool
        args: list[str | int | float] = [
            self._now(),
            self.pool_prefix(first),
            place.tenant,
            str(place.band),
            place.entry(self.replica),
        ]
        out = await self._cancel(self._client, [], args)
        return int(out) == 1

    async def beat(self, ttl_s: float) -> bool:
        """This replica is alive for `ttl_s` more; False if its beat had lapsed (it rejoins)."""
        if self._beat is None:
            self._beat = _Script("beat")
        out = await self._beat(self._client, [self.replicas_key], [self._now(), self.replica, repr(float(ttl_s))])
        return int(out) == 1

    async def lead(self, pool: str, ttl_s: float) -> bool:
        """Whether this replica runs the pool's capacity control (taking or keeping the lead for `ttl_s`)."""
        if self._lead is None:
            self._lead = _Script("lead")
        key = self.pool_prefix(pool) + "lead"
        out = await self._lead(self._client, [key], [self._now(), self.replica, int(ttl_s * 1000)])
        return int(out) == 1

    async def set_capacity(
        self,
        pool: str,
        limits: dict[str, int],
        *,
        load_factor: float = 1.25,
        ttl_s: float = 3600.0,
        write: bool = True,
    ) -> PoolStatus:
        """Set the pool's endpoints and their limits (waiting requests take what that frees) and answer the
        pool's state; with `write` False, only answer it."""
        if self._capacity is None:
            self._capacity = _Script("capacity")
        args: list[str | int | float] = [
            self._now(),
            self.pool_prefix(pool),
            "1" if write else "0",
            self.replicas_key,
            self.grants_prefix,
            repr(float(ttl_s)),
        ]
        if write:
            for endpoint, limit in limits.items():
                args += [endpoint, int(limit)]
        out = await self._capacity(self._client, [], args)
        by_endpoint = {_str(out[i]): int(out[i + 1]) for i in range(3, len(out) - 1, 2)}
        return PoolStatus(int(out[0]), int(out[1]), int(out[2]), by_endpoint)

    async def close(self) -> None:
        """Nothing to release: the client is the caller's."""
