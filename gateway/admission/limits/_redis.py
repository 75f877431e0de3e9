"""`RedisQuotaStore`: the quota state shared by every replica, one Lua script evaluation per call.

Keys, for tenant `acme` and scope `tenant:acme` (the `{acme}` hash tag puts all of a tenant's keys in
one Redis Cluster slot, so a script may touch them together):

    gw:{acme}:state:tenant:acme    hash  when the rpm/tpm buckets are full again (GCRA), in-flight sums
    gw:{acme}:leases:tenant:acme   zset  in-flight leases "<id>|<tokens>|<cost>" scored by expiry
    gw:{acme}:budget:tenant:acme   hash  budget period id and the spend in it
    gw:{acme}:expired              zset  leases that expired unsettled, kept an hour for a late settle

Every key has a TTL: state and leases until the buckets are full and the last lease ends, budgets until
their period ends. Scripts (lua/*.lua) are sent by EVALSHA; a NOSCRIPT answer (first use, a restarted
or failed-over server) loads them once and retries. Production uses the Redis server's clock (`TIME`),
so replicas' clocks do not matter; `clock` exists for tests, which drive time exactly.

The client is `PipelinedRedis` (`_resp.py`: one pipelined connection, a fraction of redis-py's asyncio
client's cost per call) or any redis-py client. Errors of either become `QuotaBackendError` here, at once:
this store never retries, so how fast a failure surfaces is the client's timeout. A call that fails or is
cancelled after the script ran may have reserved: its leases expire after their TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Sequence
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
    QuotaBackendError,
    RateHeaders,
    Reservation,
    Scope,
    check_request,
    check_usage,
)

__all__ = ["RedisQuotaStore", "ScriptClient", "fast_fail_client"]


class ScriptClient(Protocol):
    """What the store needs of a Redis client: `gateway.admission.limits.PipelinedRedis` in production, or redis-py's
    `Redis`/`RedisCluster`. Failures are redis-py's exception classes either way."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

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
    return (lua / "common.lua").read_text("utf-8") + "\n" + (lua / f"{name}.lua").read_text("utf-8")


class _Script:
    """One Lua script, run by EVALSHA and loaded only when the server does not know it."""

    def __init__(self, name: str) -> None:
        self.source = _source(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: ScriptClient, keys: list[str], args: list[str | int | float]) -> Any:
        try:
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(self.source)
                return await client.evalsha(self.sha, len(keys), *keys, *args)
        except RedisError as exc:
            raise QuotaBackendError(f"quota backend unavailable: {type(exc).__name__}") from exc
        except OSError as exc:  # a socket error redis-py did not wrap
            raise QuotaBackendError(f"quota backend unavailable: {type(exc).__name__}") from exc


def _opt(value: float | None) -> str | int | float:
    return "" if value is None else value


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    text = _str(value)
    return None if text == "" else int(text)


def _seconds(value: Any) -> float | None:
    """The scripts answer durations in whole microseconds (see `us` in lua/common.lua)."""
    text = _str(value)
    return None if text == "" else int(text) / 1e6


class RedisQuotaStore:
    def __init__(
        self, client: ScriptClient, *, key_prefix: str = "gw", clock: Callable[[], float] | None = None
    ) -> None:
        """`client` belongs to the caller (`PipelinedRedis`, or redis-py's from `fast_fail_client`); `close()`
        leaves it open.

        `clock` is for tests only: its time replaces the server's `TIME` inside the scripts.
        """
        self._client = client
        self._prefix = key_prefix
        self._clock = clock
        self._admit: _Script | None = None
        self._settle: _Script | None = None
        self._renew: _Script | None = None

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
    ) -> Decision:
        scopes = tuple(scopes)
        check_request(tenant, scopes, tokens, cost, lease_ttl_s)
        reservation = Reservation(
            id=secrets.token_hex(12),
            tenant=tenant,
            scopes=scopes,
            tokens=tokens,
            cost=cost,
            lease_ttl_s=lease_ttl_s,
            backend="redis",
        )
        args: list[str | int | float] = [
            self._now(),
            reservation.member,
            tokens,
            repr(cost),
            repr(lease_ttl_s),
            len(scopes),
        ]
        for scope in scopes:
            lim = scope.limits
            budget = lim.budget_amount is not None
            args += [
                _opt(lim.rpm),
                _opt(lim.tpm),
                _opt(lim.max_concurrency),
                _opt(lim.max_inflight_tokens),
                repr(lim.budget_amount) if budget else "",
                lim.budget_period if budget else "",
            ]
        if self._admit is None:
            self._admit = _Script("admit")
        call = self._admit(self._client, self.keys(tenant, scopes), args)
        if timeout_s is None:
            out = await call
        else:
            # Only a request that already spent part of its allowance gets a timer here; the client's own
            # timeout bounds every other call.
            if timeout_s <= 0:
                call.close()
                raise QuotaBackendError("quota backend: no time left for this request")
            try:
                async with asyncio.timeout(timeout_s):
                    out = await call
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
        if int(out[0]) == 1:
            return Decision(allowed=True, reservation=reservation, headers=headers)
        return Decision(
            allowed=False,
            reservation=None,
            headers=headers,
            limit=cast(LimitName, _str(out[1])),
            scope=scopes[int(out[2]) - 1].name,
            retry_after_s=int(out[3]) / 1e6,
            exceeds_limit=int(out[4]) == 1,
        )

    async def settle(self, reservation: Reservation, *, actual_tokens: int, actual_cost: float) -> bool:
        check_usage(actual_tokens, actual_cost)
        args: list[str | int | float] = [
            self._now(),
            reservation.member,
            reservation.tokens,
            repr(reservation.cost),
            actual_tokens,
            repr(float(actual_cost)),
            len(reservation.scopes),
        ]
        for scope in reservation.scopes:
            lim = scope.limits
            args += [_opt(lim.tpm), lim.budget_period if lim.budget_amount is not None else ""]
        if self._settle is None:
            self._settle = _Script("settle")
        out = await self._settle(self._client, self.keys(reservation.tenant, reservation.scopes), args)
        return int(out) == 1

    async def renew(self, reservation: Reservation) -> bool:
        args: list[str | int | float] = [
            self._now(),
            reservation.member,
            repr(reservation.lease_ttl_s),
            len(reservation.scopes),
        ]
        if self._renew is None:
            self._renew = _Script("renew")
        out = await self._renew(self._client, self.keys(reservation.tenant, reservation.scopes), args)
        return int(out) == 1

    async def close(self) -> None:
        """Nothing to release: the client is the caller's."""
