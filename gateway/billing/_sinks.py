"""Billing sinks: where batches of events go. Each either takes a whole batch or raises `SinkError`.

    jsonl         append the batch to a file in one write, fsync, under flock (workers share the file)
    redis_stream  XADD each event (MAXLEN ~ bound) in one MULTI/EXEC with a progress marker, own client
    webhook       POST a JSON array (CloudEvents batch mode); only a 2xx counts; retries with backoff, jitter

Errors of the layer below (OSError, redis, aiohttp) become `SinkError` here, at the seam.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiohttp
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from gateway.billing._event import Record
from gateway.billing._spool import append_durably
from gateway.config import ConfigError, Settings, SinkConfig

__all__ = ["JsonlSink", "RedisStreamSink", "Sink", "SinkError", "WebhookSink", "open_sink"]

# The progress marker only has to outlive an outage; it expires on its own after that.
_MARKER_TTL_S = 7 * 24 * 3600
_CONTENT_TYPE = "application/cloudevents-batch+json"


class SinkError(Exception):
    """A batch was not (entirely) delivered; its first `delivered` events were."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


class Sink(Protocol):
    async def open(self) -> None: ...

    async def deliver(self, batch: Sequence[Record]) -> None:
        """Deliver the whole batch, in order, or raise `SinkError`."""
        ...

    async def close(self) -> None: ...


def open_sink(config: SinkConfig, settings: Settings) -> Sink:
    if config.kind == "jsonl":
        return JsonlSink(config.path or ".gateway/billing.jsonl")
    if config.kind == "redis_stream":
        url = config.url or settings.redis_url
        if not url:
            raise ConfigError(f"billing sink {config.label!r}: set its url or the gateway's redis_url")
        return RedisStreamSink(url, config.stream, maxlen=config.maxlen, timeout_s=config.timeout_s)
    assert config.url is not None  # SinkConfig checks that a webhook has one
    return WebhookSink(config.url, timeout_s=config.timeout_s, retries=config.retries)


class JsonlSink:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    async def deliver(self, batch: Sequence[Record]) -> None:
        data = b"".join([payload + b"\n" for _, payload in batch])
        try:
            # fsync takes milliseconds: off the event loop, or every request in flight would wait for it.
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise SinkError(f"jsonl {self.path}: {exc.strerror or exc}") from exc

    def _write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise OSError("the sink is not open")
        # Workers of one replica append to the same file: the lock keeps batches whole and lets a failed
        # write be cut back without cutting another process's lines.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            append_durably(fd, data, os.fstat(fd).st_size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RedisStreamSink:
    """XADD to a stream. A batch is one MULTI/EXEC, so it lands whole or not at all.

    When the answer to an EXEC is lost (the connection dropped, a timeout), the batch may or may not have
    landed. The same transaction sets a marker key to the batch's last id, so the next attempt reads the
    marker and skips what already landed: no duplicate within a run. The marker is per process, so a crash
    (or a restart) right after such a failure can still re-send that one batch: the documented window.
    """

    def __init__(self, url: str, stream: str, *, maxlen: int, timeout_s: float) -> None:
        self.stream = stream
        self._url = url
        self._maxlen = maxlen
        self._timeout_s = timeout_s
        # The marker shares the stream's hash slot (MULTI/EXEC needs one slot on a cluster).
        tag = stream if "{" in stream else "{" + stream + "}"
        self.marker = f"{tag}:delivered:{os.urandom(8).hex()}"
        self._client: Redis | None = None
        self._uncertain: tuple[str, frozenset[str]] | None = None  # (last id, ids) of a batch of unknown fate
        self._landed: set[str] = set()

    async def open(self) -> None:
        # Its own client: short timeouts, and no retries, since a blind retry of an EXEC whose answer was
        # lost is exactly what would duplicate a batch.
        self._client = Redis.from_url(
            self._url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    async def deliver(self, batch: Sequence[Record]) -> None:
        client = self._client
        if client is None:
            raise SinkError("redis: the sink is not open")
        sending: Sequence[Record] = ()
        try:
            if self._uncertain is not None:
                last, ids = self._uncertain
                landed = await client.get(self.marker) == last.encode()
                self._landed = set(ids) if landed else set()
                self._uncertain = None
            skip = 0
            while skip < len(batch) and batch[skip][0] in self._landed:
                self._landed.discard(batch[skip][0])
                skip += 1
            if skip < len(batch):
                self._landed.clear()
            sending = batch[skip:]
            if not sending:
                return
            async with client.pipeline(transaction=True) as pipe:
                for rid, payload in sending:
                    pipe.xadd(self.stream, {"id": rid, "event": payload}, maxlen=self._maxlen, approximate=True)
                pipe.set(self.marker, sending[-1][0], ex=_MARKER_TTL_S)
                await pipe.execute()
        except ResponseError as exc:
            # Redis answered (e.g. WRONGTYPE): the fate of the batch is known, it did not land.
            raise SinkError(f"redis: {exc}") from exc
        except (RedisError, OSError) as exc:
            if sending:
                self._uncertain = (sending[-1][0], frozenset(rid for rid, _ in sending))
            raise SinkError(f"redis: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebhookSink:
    """POST each batch as a JSON array. A 5xx, 408, 429, timeout or connection error is retried within the
    delivery; anything else that is not 2xx fails it at once (the lane spools it and tries again later)."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float = 0.1) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"content-type": _CONTENT_TYPE})

    async def deliver(self, batch: Sequence[Record]) -> None:
        session = self._session
        if session is None:
            raise SinkError("webhook: the sink is not open")
        body = b"[" + b",".join([payload for _, payload in batch]) + b"]"
        problem = ""
        for attempt in range(self._retries + 1):
            if attempt:
                # Full jitter: replicas that failed together do not come back together.
                await asyncio.sleep(random.uniform(0.5, 1.0) * self._backoff_s * 2 ** (attempt - 1))
            try:
                async with session.post(self.url, data=body) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return
                    problem = f"HTTP {resp.status}"
                    if resp.status < 500 and resp.status not in (408, 429):
                        break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = type(exc).__name__
        raise SinkError(f"webhook: {problem}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
