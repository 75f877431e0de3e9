"""Timing of key comparison: rejecting a wrong key takes as long when it shares all but its last character
with a real key as when it shares nothing but the `sk-gw-` prefix.

By construction the candidate is hashed (SHA-256) before anything is compared, so the bytes compared bear
no relation to how much of the candidate is right, and digests are compared with `hmac.compare_digest`.
These tests hold it statistically, in-process: over loopback sockets the round trip's jitter (tens of
microseconds) would hide any leak smaller than that, while here a leak of a microsecond shows. To stay
quiet on a shared, noisy machine they compare medians of interleaved samples (both kinds see the same
disturbances) with generous bounds; a Python early-exit comparison, for one, comes out several times
slower for the near miss and fails them.
"""

from __future__ import annotations

import random
import statistics
import string
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.auth import Authenticator, secret_matches
from gateway.auth.keys import generate_key, hash_key
from gateway.errors import AuthenticationError
from gateway.tenancy import KeyRecord, Tenant
from gateway.tenancy.store import SqliteStore

SAMPLES = 3000
# Median ratio near-miss / far-miss; a leak of the kind a prefix attack needs moves it far beyond this.
LOW, HIGH = 0.8, 1.25
ALPHABET = string.ascii_letters + string.digits + "-_"


def near_misses(key: str) -> list[str]:
    """Keys equal to `key` but for the last character."""
    return [key[:-1] + c for c in ALPHABET if c != key[-1]]


def far_misses(key: str, prefix: str, n: int) -> list[str]:
    """Keys of the same length whose first character after `prefix` already differs from `key`'s."""
    rng = random.Random(9)
    out = []
    while len(out) < n:
        rest = "".join(rng.choice(ALPHABET) for _ in range(len(key) - len(prefix)))
        if rest[0] != key[len(prefix)]:
            out.append(prefix + rest)
    return out


async def median_ratio(reject: Callable[[str], Awaitable[None]], near: list[str], far: list[str]) -> float:
    rng = random.Random(9)
    times: dict[str, list[int]] = {"near": [], "far": []}
    for _ in range(100):  # warm caches and the interpreter's specialisations first
        await reject(near[0])
        await reject(far[0])
    for i in range(SAMPLES):
        pair = [("near", near[i % len(near)]), ("far", far[i % len(far)])]
        rng.shuffle(pair)  # interleaved, in random order: drift and noise hit both kinds alike
        for kind, candidate in pair:
            started = time.perf_counter_ns()
            await reject(candidate)
            times[kind].append(time.perf_counter_ns() - started)
    ratio = statistics.median(times["near"]) / statistics.median(times["far"])
    print(f"median near/far: {ratio:.3f} ({SAMPLES} samples each)")
    return ratio


async def test_rejecting_a_virtual_key_takes_no_longer_for_a_matching_prefix(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.create_tenant(Tenant(id="t1"))
    secret = generate_key()
    record = KeyRecord(id="key_1", tenant_id="t1", secret_hash=hash_key(secret), prefix=secret[:10], created_at=0)
    await store.create_key(record)
    now = [0.0]
    # Every call is a cache miss (the clock jumps past the negative TTL), so every rejection reads the
    # store: the path a guesser who never repeats a guess takes.
    auth = Authenticator(store, clock=lambda: now[0])

    async def reject(candidate: str) -> None:
        now[0] += 10
        try:
            await auth.authenticate(b"Bearer " + candidate.encode())
        except AuthenticationError:
            return
        raise AssertionError("a wrong key was accepted")

    ratio = await median_ratio(reject, near_misses(secret), far_misses(secret, "sk-gw-", 64))
    await store.close()
    assert LOW < ratio < HIGH, ratio


async def test_rejecting_an_admin_key_takes_no_longer_for_a_matching_prefix() -> None:
    admin_key = "sk-admin-" + generate_key()[6:]

    async def reject(candidate: str) -> None:
        assert not secret_matches(candidate, admin_key)

    ratio = await median_ratio(reject, near_misses(admin_key), far_misses(admin_key, "sk-admin-", 64))
    assert LOW < ratio < HIGH, ratio
