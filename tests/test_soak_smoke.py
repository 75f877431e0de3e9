"""A smoke run of the soak script (loadtests/soak.py) for 12 seconds, so it keeps working between the
10-minute runs recorded in docs/BENCHMARKS.md. What it checks is what the script checks, at a small
scale: every request that reached a backend billed exactly once under a mix of unary requests, streams,
streams the client leaves and 429s, and the gateway alive with a clean log. Memory is not judged here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtests.soak import run


@pytest.mark.slow
def test_the_soak_script_runs_and_billing_matches(tmp_path: Path) -> None:
    args = argparse.Namespace(minutes=0.2, rate=50.0, sample_s=2.0, seed=9, keep=False)
    result = run(args)
    load, billing = result["load"], result["billing"]
    assert load["sent"] >= 500 and not load["transport_errors"], load
    assert set(load["sent_by_kind"]) == {"unary", "stream", "cancel", "limited"}
    assert load["rejected_429"] > 0 and billing["partial"] > 0  # the limited tenant and the cancelled streams
    assert billing["events"] == billing["expected"] > 0
    assert billing["missing"] == billing["duplicates"] == billing["unexpected"] == 0, billing
    assert result["gateway_alive"] and result["gateway_log"]["errors"] == 0
    assert not result["gateway_log"]["admin_key_in_log"]
    assert len(result["samples"]) >= 5 and all(s["rss_mb"] > 0 and s["fds"] > 0 for s in result["samples"])
