"""Reading an engine's own load from its /metrics (vLLM's names): the gauges the capacity control sizes the
limit with, and the queue-time histogram that tells how long requests wait inside the engine."""

from __future__ import annotations

from gateway.admission.capacity import EngineLoad, engine_wait, parse_engine_metrics

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 3.0
vllm:num_requests_running{engine="0",model_name="b"} 1.0
vllm:num_requests_waiting{engine="0",model_name="a"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.5
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="a"} 10.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="a"} 4.0
vllm:request_queue_time_seconds_count{engine="0",model_name="a"} 10.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="b"} 1.0
vllm:request_queue_time_seconds_count{engine="0",model_name="b"} 5.0
"""


def load(waiting: float, queue_s: float | None, queued: float | None) -> EngineLoad:
    return EngineLoad(running=4, waiting=waiting, kv_usage=0.1, at=0.0, queue_s=queue_s, queued=queued)


def test_gauges_and_the_queue_time_histogram_are_summed_over_models() -> None:
    got = parse_engine_metrics(VLLM, at=5.0)
    assert got == EngineLoad(running=4.0, waiting=2.0, kv_usage=0.5, at=5.0, queue_s=5.0, queued=15.0)


def test_an_engine_without_the_histogram_has_no_queue_figures() -> None:
    got = parse_engine_metrics("vllm:num_requests_running 2\nvllm:num_requests_waiting 0\n", at=1.0)
    assert got is not None and got.queue_s is None and got.queued is None
    assert engine_wait(None, got, 0.7) == 0.0
    assert parse_engine_metrics("http_requests_total 3\n", at=1.0) is None


def test_the_wait_is_the_mean_of_those_that_left_the_queue_since_the_last_reading() -> None:
    # 4 requests left the queue since, having waited 2 s together: 0.5 s each (not the 5/15 since start).
    assert engine_wait(load(3, 5.0, 15.0), load(3, 7.0, 19.0), 0.0) == 0.5


def test_with_none_leaving_the_last_figure_holds_while_something_waits() -> None:
    assert engine_wait(load(3, 5.0, 15.0), load(3, 5.0, 15.0), 0.8) == 0.8
    assert engine_wait(load(3, 5.0, 15.0), load(0, 5.0, 15.0), 0.8) == 0.0


def test_a_first_reading_or_a_restarted_engine_starts_again() -> None:
    assert engine_wait(None, load(0, 50.0, 100.0), 0.8) == 0.0
    assert engine_wait(load(3, 50.0, 100.0), load(0, 1.0, 2.0), 0.8) == 0.0  # counters went back: restarted
