"""Unique ids for what the request path makes per request: waiters in the fair queue, reservations in
the quota store, billing events.

A random prefix per process and a counter: unique across processes and replicas (64 random bits each) and
within one (the counter), at about a fifth of the cost of `os.urandom` per id (a system call each). These
ids name things; none of them is a secret or a capability. The prefix is drawn again in a forked child
(`--workers`), so workers never share one.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["unique_id"]

_prefix = ""
_counter = itertools.count()


def _draw() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count()


def unique_id() -> str:
    """24 hex digits, never repeated by this process or (to a 64-bit chance) any other."""
    return f"{_prefix}{next(_counter):08x}"


_draw()
os.register_at_fork(after_in_child=_draw)
