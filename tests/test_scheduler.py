"""The fair queue (gateway.admission.fairqueue): VTC fairness, priority bands, back-pressure, cancellation.

Every test drives the scheduler with a fake clock and asyncio tasks; completions are the test calling
release(), so runs are exact and nothing sleeps on wall time.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from gateway.admission.fairqueue import Job, QueueFull, QueueTimeout, Scheduler, Ticket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle() -> None:
    # A granted waiter resumes on the next loop iteration; a few spare ones cover task start-up.
    for _ in range(3):
        await asyncio.sleep(0)


def job(
    tenant: str, *, weight: float = 1.0, priority: int = 0, input_tokens: int = 100, est_output_tokens: int = 50
) -> Job:
    return Job(tenant, weight, priority, input_tokens, est_output_tokens)


def cost(input_tokens: int, output_tokens: int) -> float:
    return float(input_tokens + 2 * output_tokens)


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


class Harness:
    """Runs each acquire() in its own task (one per client request) and keeps grants in dispatch order."""

    def __init__(self, capacity: int) -> None:
        self.clock = FakeClock()
        self.sched = Scheduler(capacity, clock=self.clock)
        self.granted: deque[Ticket] = deque()
        self.tasks: list[asyncio.Task[Ticket]] = []

    def submit(
        self, j: Job, *, max_wait_s: float | None = None, max_queue_depth: int | None = None
    ) -> asyncio.Task[Ticket]:
        async def run() -> Ticket:
            ticket = await self.sched.acquire(j, max_wait_s=max_wait_s, max_queue_depth=max_queue_depth)
            self.granted.append(ticket)
            return ticket

        task = asyncio.create_task(run())
        self.tasks.append(task)
        return task

    def complete_oldest(self, output_tokens: int | None = None) -> Ticket:
        ticket = self.granted.popleft()
        out = ticket.job.est_output_tokens if output_tokens is None else output_tokens
        self.sched.release(ticket, input_tokens=ticket.job.input_tokens, output_tokens=out)
        return ticket

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        while self.granted:
            self.complete_oldest()
        await settle()
        assert self.sched.total_in_flight == 0
        assert self.sched.snapshot()["queued"] == 0


Make = Callable[[int], Harness]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Harnesses for one test; each is drained at the end and must leave no slot or queue entry behind."""
    harnesses: list[Harness] = []

    def factory(capacity: int) -> Harness:
        h = Harness(capacity)
        harnesses.append(h)
        return h

    yield factory
    for h in harnesses:
        await h.close()


# -- work conservation ---------------------------------------------------------------------------------


async def test_single_tenant_gets_all_the_capacity_at_once() -> None:
    sched = Scheduler(4, clock=FakeClock())
    # The fast path completes without suspending: a direct await returns a ticket.
    tickets = [await sched.acquire(job("a")) for _ in range(4)]
    assert sched.in_flight("a") == 4
    assert sched.total_in_flight == 4
    assert all(t.queue_wait_s == 0.0 for t in tickets)
    for t in tickets:
        sched.release(t, input_tokens=100, output_tokens=50)
    assert sched.total_in_flight == 0


async def test_waiting_jobs_fill_every_freed_slot(make: Make) -> None:
    h = make(3)
    for _ in range(10):
        h.submit(job("a"))
    await settle()
    assert (h.sched.in_flight("a"), h.sched.queued("a")) == (3, 7)
    h.complete_oldest()
    await settle()
    assert (h.sched.in_flight("a"), h.sched.queued("a")) == (3, 6)


async def test_a_newcomer_does_not_barge_past_the_queue(make: Make) -> None:
    h = make(1)
    h.submit(job("a"))
    h.submit(job("b"))
    await settle()
    assert h.sched.queued("b") == 1
    h.complete_oldest()
    # The slot went to b on release; c, arriving in the same instant, has to wait.
    c = h.submit(job("c"))
    await settle()
    assert h.granted[0].job.tenant == "b"
    assert h.sched.queued("c") == 1 and not c.done()


# -- VTC fairness --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    weight: float
    per_step: int  # requests offered per completion
    input_tokens: int
    output_tokens: int
    est_output_tokens: int | None = None  # None: the estimate is exact


async def run_backlogged(
    h: Harness, loads: dict[str, Load], steps: int, depth: int = 40
) -> tuple[dict[str, float], Counter[str]]:
    """Offer `per_step` requests per tenant per completion (up to `depth` queued, as max_queue_depth would),
    complete the oldest job each step, and return the served cost (actual tokens) and offered counts."""
    served: dict[str, float] = defaultdict(float)
    offered: Counter[str] = Counter()
    for _ in range(steps):
        for name, load in loads.items():
            est = load.output_tokens if load.est_output_tokens is None else load.est_output_tokens
            for _ in range(load.per_step):
                offered[name] += 1
                if h.sched.queued(name) < depth:
                    h.submit(job(name, weight=load.weight, input_tokens=load.input_tokens, est_output_tokens=est))
        await settle()
        h.clock.advance(0.05)
        load = loads[h.granted[0].job.tenant]
        ticket = h.complete_oldest(load.output_tokens)
        served[ticket.job.tenant] += cost(load.input_tokens, load.output_tokens)
    return served, offered


async def test_equal_weights_ten_times_the_load_share_one_to_one(make: Make) -> None:
    h = make(4)
    loads = {"heavy": Load(1, 10, 100, 50), "light": Load(1, 1, 300, 100)}
    served, offered = await run_backlogged(h, loads, steps=3000)
    assert offered["heavy"] == 10 * offered["light"]
    ratio = served["heavy"] / served["light"]
    index = jain([served["heavy"], served["light"]])
    print(f"\n10x load, equal weights: served ratio {ratio:.4f}, Jain {index:.6f}")
    assert 0.95 <= ratio <= 1.05
    assert index >= 0.99


@pytest.mark.parametrize("capacity", [1, 4])
async def test_weights_one_two_three_four(make: Make, capacity: int) -> None:
    h = make(capacity)
    loads = {
        "w1": Load(1, 3, 200, 100),
        "w2": Load(2, 3, 50, 20),
        "w3": Load(3, 3, 500, 300),
        "w4": Load(4, 3, 120, 40),
    }
    served, _ = await run_backlogged(h, loads, steps=4000)
    normalised = [served[name] / load.weight for name, load in loads.items()]
    ratios = [served[name] / served["w1"] for name in loads]
    print(
        f"\nweights 1:2:3:4, capacity {capacity}: ratios {[round(r, 3) for r in ratios]}, Jain {jain(normalised):.6f}"
    )
    for name, load in loads.items():
        assert served[name] / served["w1"] == pytest.approx(load.weight, rel=0.05)
    assert jain(normalised) >= 0.99


async def test_underestimated_output_is_charged_on_release(make: Make) -> None:
    h = make(1)
    h.submit(job("x", weight=2, input_tokens=100, est_output_tokens=10))
    await settle()
    assert h.sched.counter("x") == pytest.approx((100 + 2 * 10) / 2)
    h.complete_oldest(output_tokens=100)  # ten times the estimate
    assert h.sched.counter("x") == pytest.approx((100 + 2 * 100) / 2)


async def test_estimate_correction_keeps_the_served_cost_fair(make: Make) -> None:
    h = make(2)
    # x's requests turn out ten times longer than estimated; y estimates exactly.
    loads = {"x": Load(1, 2, 100, 500, est_output_tokens=50), "y": Load(1, 2, 100, 500)}
    served, _ = await run_backlogged(h, loads, steps=2000)
    ratio = served["x"] / served["y"]
    print(f"\n10x underestimate: served ratio {ratio:.4f}")
    assert ratio == pytest.approx(1.0, rel=0.05)


async def test_a_returning_tenant_is_lifted_to_the_backlog_and_gets_no_burst(make: Make) -> None:
    h = make(2)
    h.submit(job("b"))
    await settle()
    h.complete_oldest()
    b_before = h.sched.counter("b")
    # a alone keeps the backend busy for a long time while b is idle.
    await run_backlogged(h, {"a": Load(1, 2, 100, 50)}, steps=500)
    a_counter = h.sched.counter("a")
    assert a_counter > 100 * b_before
    for _ in range(40):
        h.submit(job("b"))
    await settle()
    # Lifted to the minimum over the backlogged tenants (only a), then charged for nothing yet.
    assert h.sched.counter("b") == pytest.approx(a_counter)
    served, _ = await run_backlogged(h, {"a": Load(1, 2, 100, 50), "b": Load(1, 0, 100, 50)}, steps=40)
    # Equal sizes, equal weights: b alternates with a instead of taking every slot to "catch up".
    assert 18 <= served["b"] / cost(100, 50) <= 22


async def test_with_nobody_waiting_a_newcomer_is_lifted_to_the_last_dispatched(make: Make) -> None:
    h = make(2)
    # a runs one request at a time: nothing ever waits, every dispatch is the fast path.
    for _ in range(100):
        ticket = await h.sched.acquire(job("a"))
        h.sched.release(ticket, input_tokens=100, output_tokens=50)
    assert h.sched.counter("a") == pytest.approx(100 * cost(100, 50))
    ticket = await h.sched.acquire(job("b"))
    assert h.sched.counter("b") == pytest.approx(h.sched.counter("a") + cost(100, 50))
    h.sched.release(ticket, input_tokens=100, output_tokens=50)


# -- priority bands ------------------------------------------------------------------------------------


async def test_higher_priority_is_served_first_while_backlogged(make: Make) -> None:
    h = make(1)
    h.submit(job("hold"))
    for _ in range(5):
        h.submit(job("low", priority=0, input_tokens=1, est_output_tokens=0))  # cheapest counter
    for _ in range(5):
        h.submit(job("high", priority=1, input_tokens=1000, est_output_tokens=1000))
    await settle()
    order = []
    for i in range(10):
        if i == 2:
            h.submit(job("high", priority=1))  # arrives while low still waits: goes ahead of it
        h.complete_oldest()
        await settle()
        order.append(h.granted[0].job.tenant)
    assert order == ["high"] * 6 + ["low"] * 4


# -- back-pressure -------------------------------------------------------------------------------------


async def test_queue_full_advertises_the_observed_drain_interval(make: Make) -> None:
    h = make(1)
    for _ in range(4):
        h.submit(job("a"), max_queue_depth=3)
    await settle()
    assert h.sched.queued("a") == 3
    # The head of a's queue leaves every 2 s.
    for _ in range(5):
        h.clock.advance(2.0)
        h.complete_oldest()
        h.submit(job("a"), max_queue_depth=3)
        await settle()
    with pytest.raises(QueueFull) as info:
        await h.sched.acquire(job("a"), max_queue_depth=3)
    assert info.value.retry_after_s == pytest.approx(2.0)
    assert h.sched.queued("a") == 3


async def test_queue_full_before_any_backlog_uses_the_share_of_the_service_rate(make: Make) -> None:
    h = make(1)
    for _ in range(3):  # requests that take 3 s each
        ticket = await h.sched.acquire(job("a"))
        h.clock.advance(3.0)
        h.sched.release(ticket, input_tokens=100, output_tokens=50)
    h.submit(job("a"))
    h.submit(job("a"))
    h.submit(job("b"))
    await settle()
    # b shares the band with a (equal weights): it gets half of one slot's 1/3 s^-1.
    with pytest.raises(QueueFull) as info:
        await h.sched.acquire(job("b"), max_queue_depth=1)
    assert info.value.retry_after_s == pytest.approx(6.0)


async def test_queue_full_with_no_data_is_still_positive() -> None:
    sched = Scheduler(0, clock=FakeClock())
    with pytest.raises(QueueFull) as info:
        await sched.acquire(job("a"), max_queue_depth=0)
    assert info.value.retry_after_s >= 0.05


async def test_max_wait_times_out_on_the_fake_clock(make: Make) -> None:
    h = make(1)
    h.submit(job("hold"))
    first = h.submit(job("b"), max_wait_s=5.0)
    second = h.submit(job("b"), max_wait_s=5.0)
    await settle()
    h.clock.advance(4.9)
    assert h.sched.expire() == 0
    h.clock.advance(0.2)
    assert h.sched.expire() == 2
    await settle()
    for task in (first, second):
        with pytest.raises(QueueTimeout) as info:
            task.result()
        assert info.value.retry_after_s >= 0.05
    assert h.sched.queued("b") == 0
    assert h.sched.total_in_flight == 1


async def test_timeout_retry_after_counts_the_jobs_ahead(make: Make) -> None:
    h = make(1)
    h.submit(job("a"))
    for _ in range(3):
        h.submit(job("a"), max_wait_s=1000.0)
    await settle()
    for _ in range(4):  # the head of a's queue leaves every 0.5 s
        h.clock.advance(0.5)
        h.complete_oldest()
        h.submit(job("a"), max_wait_s=1000.0)
        await settle()
    impatient = h.submit(job("a"), max_wait_s=10.0)
    await settle()
    h.clock.advance(20.0)
    assert h.sched.expire() == 1
    await settle()
    with pytest.raises(QueueTimeout) as info:
        impatient.result()
    # Three jobs were ahead of it: the rest of its wait was four drain intervals.
    assert info.value.retry_after_s == pytest.approx(4 * 0.5)
    assert h.sched.queued("a") == 3


async def test_the_loop_timer_expires_waiters_without_an_explicit_expire(make: Make) -> None:
    h = make(1)
    h.submit(job("hold"))
    waiter = h.submit(job("b"), max_wait_s=0.0)
    await settle()
    await settle()
    assert isinstance(waiter.exception(), QueueTimeout)
    assert h.sched.queued("b") == 0


async def test_a_job_granted_before_its_deadline_is_not_expired(make: Make) -> None:
    h = make(1)
    h.submit(job("hold"))
    waiter = h.submit(job("b"), max_wait_s=1.0)
    await settle()
    h.complete_oldest()
    await settle()
    h.clock.advance(10.0)
    assert h.sched.expire() == 0
    assert waiter.result().job.tenant == "b"


# -- cancellation --------------------------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_queue_at_once(make: Make) -> None:
    h = make(1)
    h.submit(job("hold"))
    gone = h.submit(job("b"))
    stays = h.submit(job("b"))
    await settle()
    assert h.sched.queued("b") == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert h.sched.queued("b") == 1
    h.complete_oldest()
    await settle()
    assert stays.result().job.tenant == "b"
    assert h.sched.total_in_flight == 1


async def test_a_release_in_the_same_instant_as_a_cancel_skips_the_cancelled_waiter(make: Make) -> None:
    h = make(1)
    h.submit(job("hold"))
    gone = h.submit(job("b"))
    stays = h.submit(job("c"))
    await settle()
    gone.cancel()
    h.complete_oldest()  # before gone's task has run its cancellation
    await settle()
    assert gone.cancelled()
    assert stays.result().job.tenant == "c"
    assert h.sched.total_in_flight == 1
    assert h.sched.queued("b") == 0


@pytest.mark.parametrize("another_waits", [False, True])
async def test_a_cancel_racing_a_grant_gives_the_slot_back(make: Make, another_waits: bool) -> None:
    h = make(1)
    h.submit(job("hold"))
    racer = h.submit(job("b"))
    if another_waits:
        h.submit(job("c"))
    await settle()
    counter_before = h.sched.counter("b")
    h.complete_oldest()  # grants b's slot ...
    racer.cancel()  # ... and b's client disconnects before b's task resumes
    await settle()
    assert racer.cancelled()
    assert h.sched.in_flight("b") == 0
    assert h.sched.counter("b") == pytest.approx(counter_before)  # the charge was refunded
    if another_waits:
        assert h.granted[0].job.tenant == "c"
        assert h.sched.total_in_flight == 1
    else:
        assert h.sched.total_in_flight == 0
        ticket = await h.sched.acquire(job("d"))  # the slot is free again
        h.sched.release(ticket, input_tokens=1, output_tokens=1)


# -- capacity and release ------------------------------------------------------------------------------


async def test_set_capacity_grows_at_once_and_shrinks_gracefully(make: Make) -> None:
    h = make(1)
    for _ in range(6):
        h.submit(job("a"))
    await settle()
    h.sched.set_capacity(4)
    await settle()
    assert (h.sched.capacity, h.sched.total_in_flight, h.sched.queued("a")) == (4, 4, 2)
    h.sched.set_capacity(1)
    assert h.sched.total_in_flight == 4  # in flight keeps running
    for expected in (3, 2, 1, 1):
        h.complete_oldest()
        await settle()
        assert h.sched.total_in_flight == expected
    assert h.sched.queued("a") == 1
    h.sched.set_capacity(0)
    h.complete_oldest()
    await settle()
    assert (h.sched.total_in_flight, h.sched.queued("a")) == (0, 1)
    h.sched.set_capacity(1)
    await settle()
    assert (h.sched.total_in_flight, h.sched.queued("a")) == (1, 0)
    with pytest.raises(ValueError):
        h.sched.set_capacity(-1)


async def test_release_is_idempotent() -> None:
    sched = Scheduler(2, clock=FakeClock())
    ticket = await sched.acquire(job("a"))
    other = await sched.acquire(job("a"))
    sched.release(ticket, input_tokens=100, output_tokens=500)
    state = sched.snapshot()
    sched.release(ticket, input_tokens=100, output_tokens=500)
    assert sched.snapshot() == state
    assert ticket.released and not other.released
    assert state == {
        "capacity": 2,
        "in_flight": 1,
        "queued": 0,
        "tenants": {"a": {"queued": 0, "in_flight": 1, "counter": pytest.approx(2 * 200 + 900)}},
    }
    sched.release(other, input_tokens=100, output_tokens=50)


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Scheduler(-1)
    with pytest.raises(ValueError):
        await Scheduler(1).acquire(job("a", weight=0))


# -- invariants under random traffic -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
async def test_random_traffic_keeps_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    capacity = rng.randint(1, 4)
    sched = Scheduler(capacity, clock=clock)
    tenants = [f"t{i}" for i in range(rng.randint(1, 5))]
    granted: list[Ticket] = []
    in_flight: list[Ticket] = []
    submitted: dict[asyncio.Task[Ticket], Job] = {}

    async def client(j: Job, max_wait_s: float | None, depth: int | None) -> Ticket:
        ticket = await sched.acquire(j, max_wait_s=max_wait_s, max_queue_depth=depth)
        granted.append(ticket)
        in_flight.append(ticket)
        return ticket

    allowed = capacity  # in flight may exceed capacity only by what was running when it shrank
    for _ in range(300):
        op = rng.random()
        if op < 0.45:
            j = Job(
                rng.choice(tenants),
                rng.choice([0.5, 1.0, 3.0]),
                rng.choice([0, 0, 1]),
                rng.randint(0, 50),
                rng.randint(0, 50),
            )
            wait = rng.choice([None, None, rng.uniform(0, 3)])
            depth = rng.choice([None, 2, 5])
            submitted[asyncio.create_task(client(j, wait, depth))] = j
        elif op < 0.75 and in_flight:
            ticket = in_flight.pop(rng.randrange(len(in_flight)))
            sched.release(ticket, input_tokens=rng.randint(0, 50), output_tokens=rng.randint(0, 100))
            if rng.random() < 0.1:
                sched.release(ticket, input_tokens=1, output_tokens=1)
        elif op < 0.85:
            waiting = [t for t in submitted if not t.done()]
            if waiting:
                rng.choice(waiting).cancel()
        elif op < 0.95:
            clock.advance(rng.uniform(0, 1))
            sched.expire()
        else:
            new = rng.randint(0, 4)
            allowed = max(new, min(allowed, sched.total_in_flight))
            sched.set_capacity(new)
            capacity = new
        if rng.random() < 0.8:
            await settle()
        snap = sched.snapshot()
        assert snap["in_flight"] == sum(t["in_flight"] for t in snap["tenants"].values())
        assert snap["in_flight"] <= max(capacity, allowed)
        allowed = max(capacity, min(allowed, snap["in_flight"]))
        await settle()
        snap = sched.snapshot()
        # Work conserving: once the loop has settled, nothing waits while a slot is free.
        if sched.total_in_flight < capacity:
            assert snap["queued"] == 0
        assert sched.total_in_flight == len(in_flight)

    # Drain: everything finishes, nothing leaks.
    sched.set_capacity(max(capacity, 1))
    while True:
        await settle()
        if not in_flight:
            break
        ticket = in_flight.pop(0)
        sched.release(ticket, input_tokens=1, output_tokens=1)
    outcomes: Counter[str] = Counter()
    for task, j in submitted.items():
        assert task.done()
        if task.cancelled():
            outcomes["cancelled"] += 1
        elif task.exception() is not None:
            assert isinstance(task.exception(), QueueFull | QueueTimeout)
            outcomes["rejected"] += 1
        else:
            assert task.result().job is j
            outcomes["served"] += 1
    assert len({id(t) for t in granted}) == len(granted) == outcomes["served"]
    assert all(t.released for t in granted)
    assert sched.total_in_flight == 0
    assert all(sched.in_flight(t) == 0 and sched.queued(t) == 0 for t in tenants)
