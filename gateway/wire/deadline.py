"""`Deadline`: one moving deadline on one event-loop timer, for the wire protocols' timeouts.

Why a helper instead of `loop.call_at` and `cancel()`
-----------------------------------------------------
Every request moves a deadline of its connection: the HTTP server's (head, body, keep-alive), the HTTP
client's (the backend's silence), the Redis client's (the oldest command in flight). Arming a timer and
cancelling it at each move costs measurable CPU per request on uvloop (`loadtests/bench_httpclient.py`
measures the client's cost per request). So the timer here is armed once and left alone:

- moving the deadline *later* is an assignment; a timer that fires before the deadline arms itself again
  for the new time (a timer may fire a clock tick early: that counts as on time, so that it does not
  re-arm itself in a busy loop);
- clearing it is an assignment too; a pending timer then fires once and stops;
- only moving it *earlier* than the pending timer arms a new one. With `max_sleep` the timer never sleeps
  longer than that, so an owner whose deadlines are all at least `max_sleep` away never needs a new one.

The owner keeps the meaning (which deadline it is, what to do when it passes); this class keeps the timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

__all__ = ["Deadline"]

# A timer may fire up to a clock tick early; counting that as "not yet" would re-arm it in a busy loop.
_TIMER_SLACK: Final = 0.001


class Deadline:
    """Calls `expired()` once the loop's clock passes `when` (if it is still set by then).

    `expired` runs from the timer's callback with `when` already cleared, so it may set a new deadline.
    """

    __slots__ = ("_expired", "_handle", "_loop", "_max_sleep", "_timer_at", "when")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None], *, max_sleep: float | None = None
    ) -> None:
        self._loop = loop
        self._expired: Callable[[], None] | None = expired
        self._max_sleep = max_sleep
        self._handle: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the pending timer fires
        #: The deadline, in the loop's time (`loop.time()`), or None for none.
        self.when: float | None = None

    def at(self, when: float) -> None:
        """Expire at `when`, in the loop's time, in place of any earlier setting."""
        self.when = when
        if self._handle is None:
            self._arm(when)
        elif when < self._timer_at:
            self._handle.cancel()
            self._arm(when)

    def clear(self) -> None:
        """No deadline until the next `at`."""
        self.when = None

    def close(self) -> None:
        """No deadline ever again: the timer is cancelled and `expired` dropped (it usually points back at the
        owner, which points at this: no reference cycle is left behind)."""
        self.when = None
        self._expired = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._expired is None:
            return  # closed
        if self._max_sleep is not None:
            when = min(when, self._loop.time() + self._max_sleep)
        self._timer_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if self._loop.time() < when - _TIMER_SLACK:
            self._arm(when)
            return
        self.when = None
        if self._expired is not None:
            self._expired()
