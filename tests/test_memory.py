"""No request path leaves reference cycles: what a request makes is freed by reference counting when it
ends, not at some later garbage collection (cycles that escape to the old generation are what made RSS
creep in the soak, docs/BENCHMARKS.md). The gateway runs in a probe process that counts the gateway's own
objects found in cycles after requests of every kind (tests/support/gc_probe.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.procs import ROOT, free_port
from tests.support.redis_server import RedisServer
from tests.support.sim import start_sim

KEY = "sk-gw-" + "M" * 43
ADMIN = "sk-admin-probe-0123456789"


def test_request_paths_leave_no_reference_cycles(tmp_path: Path, redis_server: RedisServer) -> None:
    sim = start_sim("--ttft-ms", "0", "--itl-ms", "1", log_dir=tmp_path)
    try:
        config = {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "state_path": str(tmp_path / "state.db"),
            "redis_url": redis_server.url,
            "backends": [{"name": "sim", "kind": "vllm", "url": sim.url}],
            "models": [{"name": "m", "backends": ["sim"], "price": {"input_per_1k": 1.0, "output_per_1k": 1.0}}],
            "tenants": [{"id": "probe", "keys": [{"name": "k", "key_env": "PROBE_KEY"}], "limits": {"rpm": 100_000}}],
            "billing": {"sinks": [{"kind": "jsonl", "path": str(tmp_path / "billing.jsonl")}]},
            "log_level": "warning",
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {"PROBE_KEY": KEY, "GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_SALT_SECRET": "s" * 32, "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-m", "tests.support.gc_probe", str(path), ADMIN, KEY],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        sim.stop()
    statuses = result["statuses"]
    # Every kind of request happened: 200s (unary and streams, and the streams left mid-way), 401s, 429s.
    assert statuses.get("200", 0) >= 150 + 30 and statuses.get("401") == 50 and statuses.get("429", 0) >= 45
    assert result["in_cycles"] == {}, result["in_cycles"]
