"""gateway.wire.deadline on a real event loop: a deadline expires once and never before its time, wherever it
was moved to meanwhile; cleared or closed, it does not expire."""

from __future__ import annotations

import asyncio
import itertools

import uvloop

from gateway.wire.deadline import Deadline


class Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.times: list[float] = []
        self.expired = asyncio.Event()

    def __call__(self) -> None:
        self.times.append(self.loop.time())
        self.expired.set()


async def expiry(recorder: Recorder) -> float:
    await asyncio.wait_for(recorder.expired.wait(), 5)
    return recorder.times[0]


async def test_expires_once_not_before_its_time() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder(loop)
    deadline = Deadline(loop, recorder)
    when = loop.time() + 0.05
    deadline.at(when)
    assert await expiry(recorder) >= when - 0.001
    await asyncio.sleep(0.1)
    assert len(recorder.times) == 1 and deadline.when is None


async def test_moved_later_it_expires_at_the_new_time_only() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder(loop)
    deadline = Deadline(loop, recorder)
    deadline.at(loop.time() + 0.05)
    later = loop.time() + 0.2
    deadline.at(later)  # the timer armed for the first time fires early, and waits again
    assert await expiry(recorder) >= later - 0.001
    await asyncio.sleep(0.1)
    assert len(recorder.times) == 1


async def test_moved_earlier_it_expires_at_the_new_time() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder(loop)
    deadline = Deadline(loop, recorder)
    deadline.at(loop.time() + 60)
    sooner = loop.time() + 0.05
    deadline.at(sooner)
    assert sooner - 0.001 <= await expiry(recorder) < sooner + 5


async def test_max_sleep_does_not_make_it_expire_early() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder(loop)
    deadline = Deadline(loop, recorder, max_sleep=0.02)
    when = loop.time() + 0.15
    deadline.at(when)  # the timer wakes every 20 ms meanwhile
    assert await expiry(recorder) >= when - 0.001
    assert len(recorder.times) == 1


async def test_cleared_or_closed_it_does_not_expire() -> None:
    loop = asyncio.get_running_loop()
    cleared, closed = Recorder(loop), Recorder(loop)
    one, two = Deadline(loop, cleared), Deadline(loop, closed)
    one.at(loop.time() + 0.02)
    two.at(loop.time() + 0.02)
    one.clear()
    two.close()
    two.at(loop.time() + 0.02)  # closed for good
    await asyncio.sleep(0.15)
    assert cleared.times == [] and closed.times == []
    one.at(loop.time() + 0.02)  # a cleared one can be set again
    await expiry(cleared)


async def test_the_callback_may_set_the_next_deadline() -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []
    done = asyncio.Event()

    def expired() -> None:
        times.append(loop.time())
        if len(times) < 3:
            deadline.at(loop.time() + 0.03)
        else:
            done.set()

    deadline = Deadline(loop, expired)
    deadline.at(loop.time() + 0.03)
    await asyncio.wait_for(done.wait(), 5)
    assert len(times) == 3 and all(b - a >= 0.029 for a, b in itertools.pairwise(times))


def test_on_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_expires_once_not_before_its_time())
        runner.run(test_moved_later_it_expires_at_the_new_time_only())
        runner.run(test_moved_earlier_it_expires_at_the_new_time())
        runner.run(test_cleared_or_closed_it_does_not_expire())
