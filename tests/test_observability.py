"""Observability: Prometheus rules (deploy/prometheus) checked and unit-tested with promtool, the gateway's real
/metrics linted with `promtool check metrics`, and the Grafana dashboards (deploy/grafana) checked as files,
then every panel query run by a real Prometheus that scrapes a real gateway under load.

The load makes every metric the dashboards read exist for real: streams and unary calls, 429s of several
reasons (small rpm, tpm, budget and queue limits on a backend of capacity 1), upstream 500s (simulator
faults), a salt-ignoring backend (a second simulator with --ignore-cache-salt), cached tokens (a repeated
prompt), spend in two currencies, and a Redis outage (this module's own redis-server, stopped and started).
A light background load keeps running while the panels are queried, so latency quantiles are numbers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.admin import create_key, create_tenant
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import free_port
from tests.support.prometheus import PrometheusServer, promtool
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = (PROMETHEUS / "rules" / "recording.yaml", PROMETHEUS / "rules" / "alerts.yaml")
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yaml"))

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTIN = {"type": "grafana", "uid": "-- Grafana --"}
TENANT = "acme"
# What Grafana would put in place of its variables; windows small enough for a test that lasts seconds,
# and at least two 1s scrapes wide so rate() has samples.
VARIABLES = {"tenant": TENANT, "__rate_interval": "15s", "__interval": "5s", "__range": "5m"}
RUNBOOK_PREFIX = "docs/OPERATIONS.md#"
METRICS_TOKEN = "metrics-token-0123456789abcdef"

Json = dict[str, Any]


# --- reading the files --------------------------------------------------------------------------------


def load_dashboards() -> dict[str, Json]:
    return {path.stem: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def all_panels(panels: list[Json]) -> Iterator[Json]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard}/{self.panel}/{self.ref}"

    @property
    def promql(self) -> str:
        return substitute(self.expr)


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def panel_queries() -> list[PanelQuery]:
    queries = []
    for name, dashboard in load_dashboards().items():
        for panel in all_panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                queries.append(PanelQuery(name, panel["title"], target["refId"], target["expr"]))
    return queries


def alert_rules() -> list[Json]:
    doc = yaml.safe_load(RULE_FILES[1].read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recorded_names() -> list[str]:
    doc = yaml.safe_load(RULE_FILES[0].read_text())
    return [rule["record"] for group in doc["groups"] for rule in group["rules"]]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


PANEL_QUERIES = panel_queries()


# --- rules ----------------------------------------------------------------------------------------------


def test_rules_and_example_config_pass_promtool_check() -> None:
    result = run(promtool(), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(promtool(), "check", "config", str(PROMETHEUS / "prometheus.example.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = run(promtool(), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def test_every_alert_says_what_to_do() -> None:
    # The anchors GitHub gives the guide's headings: lower case, punctuation dropped, spaces as hyphens.
    headings = re.findall(r"^#+ (.+)$", (ROOT / RUNBOOK_PREFIX.split("#")[0]).read_text(), re.MULTILINE)
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook_url"].startswith(RUNBOOK_PREFIX), rule["alert"]
        assert annotations["runbook_url"].removeprefix(RUNBOOK_PREFIX) in anchors, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]


# --- dashboards as files --------------------------------------------------------------------------------


def test_dashboards_import_as_they_are() -> None:
    dashboards = load_dashboards()
    assert set(dashboards) == {"overview", "tenant", "fairness", "billing"}
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in dashboards.items():
        assert dashboard["id"] is None, name  # an id would clash with the importing Grafana's own
        assert dashboard["schemaVersion"] >= 36, name
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        ids = [p["id"] for p in all_panels(dashboard["panels"])]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in all_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DATASOURCE, f"{name}/{panel['title']}"
            assert panel["targets"], f"{name}/{panel['title']}"
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, f"{name}/{panel['title']}"
        # No datasource anywhere (annotations, variables, links) but the variable or Grafana's own.
        for ref in _datasource_refs(dashboard):
            assert ref in (DATASOURCE, GRAFANA_BUILTIN), f"{name}: hard-wired datasource {ref}"


def _datasource_refs(node: object) -> Iterator[object]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


def test_tenant_dashboard_has_a_tenant_variable() -> None:
    variable = next(v for v in load_dashboards()["tenant"]["templating"]["list"] if v["name"] == "tenant")
    assert variable["type"] == "query"
    assert variable["datasource"] == DATASOURCE
    assert variable["definition"] == "label_values(gateway_requests_total, tenant)"
    tenant_queries = [q for q in PANEL_QUERIES if q.dashboard == "tenant"]
    assert all('tenant="$tenant"' in q.expr for q in tenant_queries)


def test_panel_windows_follow_grafana_variables() -> None:
    """A fixed `[5m]` would be wrong for someone's scrape interval; Grafana's variables adapt to it."""
    for query in PANEL_QUERIES:
        for window in re.findall(r"\[([^\]]*)\]", query.expr):
            assert window in ("$__rate_interval", "$__range", "$__interval"), f"{query.id}: [{window}]"


def test_every_panel_query_parses(tmp_path: Path) -> None:
    # promtool has no PromQL parser command, but it parses every expression of a rule file.
    names = {f"panel_query_{i}": query for i, query in enumerate(PANEL_QUERIES)}
    rules = [{"record": name, "expr": query.promql} for name, query in names.items()]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = run(promtool(), "check", "rules", str(path))
    output = result.stdout + result.stderr
    for name, query in names.items():
        output = output.replace(name, query.id)
    assert result.returncode == 0, output


# --- a real Prometheus scraping a real gateway ----------------------------------------------------------

PROMPT = "Summarise the quarterly report for the board in three short bullet points, please. " * 6
MSG = [{"role": "user", "content": PROMPT}]


@dataclass
class Observed:
    prometheus: PrometheusServer
    metrics: str  # the gateway's /metrics once the load is done


class Client:
    def __init__(self, gateway: GatewayProc) -> None:
        self.http = httpx.Client(base_url=gateway.url, timeout=30)
        self._metrics_auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}

    def chat(self, key: str, model: str = "chat", *, stream: bool = False, max_tokens: int = 8) -> int:
        body = {"model": model, "messages": MSG, "max_tokens": max_tokens, "stream": stream}
        headers = {"Authorization": f"Bearer {key}"}
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            resp.read()
            return resp.status_code

    def until_refused(self, key: str, limit: int = 30, **kwargs: Any) -> None:
        """Requests until the first 429, which must come after some answers (the tenant gets a label)."""
        statuses: list[int] = []
        while len(statuses) < limit and 429 not in statuses:
            statuses.append(self.chat(key, **kwargs))
        assert statuses[0] == 200 and statuses[-1] == 429, statuses

    def metrics(self) -> str:
        resp = self.http.get("/metrics", headers=self._metrics_auth)
        resp.raise_for_status()
        return resp.text

    def close(self) -> None:
        self.http.close()


class Background:
    """Light steady traffic while the panels are queried, so rates are not zero and quantiles not NaN."""

    def __init__(self, client: Client, keys: dict[str, str]) -> None:
        self._client = client
        self._keys = keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(httpx.HTTPError):
                self._client.chat(self._keys["acme"], stream=True)
                self._client.chat(self._keys["delta"], "chat-eu")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def gateway_config(sim: SimHandle, legacy: SimHandle, redis: RedisServer, workdir: Path, down_port: int) -> Json:
    return {
        "redis_url": redis.url,
        # Keys seen before keep working while Redis is down (the outage below).
        "auth_cache_ttl_s": 60,
        "shutdown_drain_s": 0,
        "backends": [
            {"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 1},
            {"name": "legacy", "kind": "vllm", "url": legacy.url, "capacity": 4},
        ],
        "models": [
            {"name": "chat", "backends": ["sim"], "price": {"input_per_1k": 0.5, "output_per_1k": 1.5}},
            {
                "name": "chat-eu",
                "backends": ["sim"],
                "price": {"input_per_1k": 0.4, "output_per_1k": 1.2, "currency": "EUR"},
            },
            {"name": "legacy-chat", "backends": ["legacy"]},
            # For isolated tenants the first backend (ignoring salts) is skipped: a fallback ("unavailable").
            {"name": "chat-spill", "backends": ["legacy", "sim"]},
        ],
        "billing": {
            "sinks": [
                {"kind": "jsonl", "path": str(workdir / "billing.jsonl")},
                # Nothing listens there: its events fail, wait in the spool, and the spool panels show them.
                {"kind": "webhook", "url": f"http://127.0.0.1:{down_port}/usage", "retries": 0},
            ]
        },
    }


def provision(gw: GatewayProc) -> dict[str, str]:
    url, admin = gw.url, gw.admin_key
    create_tenant(url, admin, "acme", weight=3, limits={"max_queue_depth": 1})
    create_tenant(url, admin, "beta", weight=1, limits={"tpm": 600})
    create_tenant(url, admin, "gamma", weight=1, budget={"amount": 0.3, "period": "day"})
    create_tenant(url, admin, "delta", weight=2)
    return {
        "acme": create_key(url, admin, "acme", name="main"),
        "acme-tight": create_key(url, admin, "acme", name="tight", limits={"rpm": 2}),
        "beta": create_key(url, admin, "beta", name="main"),
        "gamma": create_key(url, admin, "gamma", name="main"),
        "delta": create_key(url, admin, "delta", name="main"),
    }


def drive_load(client: Client, sim: SimHandle, redis: RedisServer, keys: dict[str, str]) -> None:
    # Unary and streamed answers, one prompt over and over (prefix-cache hits), in two currencies.
    for i in range(4):
        assert client.chat(keys["acme"], stream=i % 2 == 0) == 200
        assert client.chat(keys["delta"], "chat-eu", stream=i % 2 == 1) == 200
    # More than a backend of capacity 1 and a queue of depth 1 take: queued requests, then queue_full.
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: client.chat(keys["acme"], stream=True, max_tokens=16), range(6)))
    assert 429 in statuses and 200 in statuses, statuses
    client.until_refused(keys["acme-tight"])  # rpm
    client.until_refused(keys["beta"], max_tokens=40)  # tpm
    client.until_refused(keys["gamma"])  # budget
    # Upstream 500s: the gateway answers 502 and counts them by backend.
    sim.set_faults("error_500", count=3)
    statuses = [client.chat(keys["delta"]) for _ in range(4)]
    assert statuses.count(502) == 3, statuses
    # The only backend of legacy-chat ignores cache_salt: refused (fail closed) for a tenant-scoped tenant.
    assert client.chat(keys["delta"], "legacy-chat") == 503
    # chat-spill falls back past it to a backend that keeps caches apart.
    assert client.chat(keys["delta"], "chat-spill") == 200
    # A Redis outage: admission falls back to local limits and says so; then Redis comes back.
    redis.stop()
    client.chat(keys["acme-tight"])
    assert 'gateway_redis_degraded{mode="local"} 1.0' in client.metrics()
    redis.start(appendonly=True)
    deadline = time.monotonic() + 10
    while 'gateway_redis_degraded{mode="local"} 0.0' not in client.metrics():
        # The quota store tries Redis again once a second, on a request's admission.
        assert time.monotonic() < deadline, "the gateway did not notice that Redis is back"
        client.chat(keys["acme-tight"])
        time.sleep(0.3)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("observability")
    with contextlib.ExitStack() as stack:
        redis = RedisServer(workdir / "redis")
        redis.start(appendonly=True)
        stack.callback(redis.kill)
        sim = start_sim("--ttft-ms", "10", "--itl-ms", "2", log_dir=workdir)
        stack.callback(sim.stop)
        legacy = start_sim("--ignore-cache-salt", "--ttft-ms", "5", log_dir=workdir)
        stack.callback(legacy.stop)
        config = gateway_config(sim, legacy, redis, workdir, free_port())
        gw = start_gateway(config, workdir / "gateway", env={"GATEWAY_METRICS_TOKEN": METRICS_TOKEN})
        stack.callback(gw.stop)
        prometheus = PrometheusServer(
            workdir / "prometheus", [f"127.0.0.1:{gw.port}"], rule_files=RULE_FILES, bearer_token=METRICS_TOKEN
        )
        prometheus.start()
        stack.callback(prometheus.stop)
        client = Client(gw)
        stack.callback(client.close)
        keys = provision(gw)
        drive_load(client, sim, redis, keys)
        metrics = client.metrics()
        background = Background(client, keys)
        background.start()
        stack.callback(background.stop)
        # Prometheus starts scraping up to 5s after it starts (its discovery throttle). Wait until the last
        # series of the load has three samples, so every rate() has two, and the rules have seen them.
        expr = "count_over_time(gateway_redis_failures_total[1m]) >= 3"
        assert prometheus.wait_for(expr, timeout=20), f"{expr}: never true\n{prometheus.output()}"
        yield Observed(prometheus, metrics)


def test_gateway_metrics_pass_promtool_check(observed: Observed) -> None:
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=observed.metrics, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_every_metric_has_samples_and_a_panel(observed: Observed) -> None:
    """The load leaves no metric empty, and no metric the gateway exports is missing from the dashboards."""
    families = re.findall(r"^# TYPE (gateway_\w+) \w+$", observed.metrics, re.MULTILINE)
    names = [f for f in families if not f.endswith("_created")]  # prometheus_client's creation times
    assert names
    panels = " ".join(q.expr for q in PANEL_QUERIES)
    for name in names:
        assert re.search(rf"^{name}(_total|_bucket)?[{{ ]", observed.metrics, re.MULTILINE), f"{name}: no sample"
        assert re.search(rf"\b{name}(_bucket)?\b", panels), f"{name}: on no dashboard"


def test_load_produced_every_refusal_reason(observed: Observed) -> None:
    reasons = set(re.findall(r'gateway_rejections_total\{reason="(\w+)"', observed.metrics))
    assert {"rpm", "tpm", "budget", "queue_full"} <= reasons


def test_a_sink_that_is_down_fills_the_spool(observed: Observed) -> None:
    spool = observed.prometheus.query('sum by (sink) (gateway_billing_spool_events{sink="webhook"})')
    assert float(spool[0]["value"][1]) > 0
    failed = observed.prometheus.query('gateway_billing_events_total{sink="webhook",outcome="failed"}')
    assert float(failed[0]["value"][1]) > 0


def test_prometheus_scrapes_the_gateway_and_evaluates_every_rule(observed: Observed) -> None:
    targets = observed.prometheus.http.get("/api/v1/targets").json()["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    groups = observed.prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(recorded_names()) + len(alert_rules())
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


def test_tenant_variable_lists_the_tenants(observed: Observed) -> None:
    tenants = observed.prometheus.label_values("tenant", "gateway_requests_total")
    assert {"acme", "beta", "gamma", "delta"} <= set(tenants)


@pytest.mark.parametrize("query", PANEL_QUERIES, ids=[q.id for q in PANEL_QUERIES])
def test_every_panel_query_returns_data(observed: Observed, query: PanelQuery) -> None:
    result = observed.prometheus.query(query.promql)
    assert result, f"{query.id}: no data for {query.promql}"
    values = [float(sample["value"][1]) for sample in result]
    assert any(math.isfinite(v) for v in values), f"{query.id}: only {values} for {query.promql}"


@pytest.mark.parametrize("name", recorded_names())
def test_every_recording_rule_has_data(observed: Observed, name: str) -> None:
    # Rule groups run each second, each at its own offset: the first test may come before a group's turn.
    result = observed.prometheus.wait_for(name, timeout=5)
    assert result, f"{name}: no data"
    assert any(math.isfinite(float(sample["value"][1])) for sample in result), result


def test_salt_alert_is_pending_for_the_backend_that_ignores_salts(observed: Observed) -> None:
    result = observed.prometheus.query('ALERTS{alertname="GatewayBackendIgnoresCacheSalt"}')
    assert [(r["metric"]["backend"], r["metric"]["alertstate"]) for r in result] == [("legacy", "pending")]


@pytest.mark.parametrize("workers", [False, True])
def test_the_request_paths_fast_updates_match_the_public_api(workers: bool, tmp_path: Path) -> None:
    """`Metrics.adder` and `Metrics.observer` write prometheus_client's values directly (the request path's
    updates, without the library's per-call checks): the exposition must be what the public API gives, in
    one process and with --workers' shared files, so a library upgrade that changes the internals fails here."""
    from prometheus_client import values
    from prometheus_client.mmap_dict import MmapedDict

    from gateway.telemetry.metrics import Metrics

    original = values.ValueClass

    def exposition(fast: bool, directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
        if workers:
            directory.mkdir()
            # What --workers sets up before its workers start (the values then live in shared files).
            monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
            values.ValueClass = values.MultiProcessValue(lambda: 1234)
        try:
            m = Metrics(multiprocess_dir=str(directory) if workers else None)
            for tenant, n in (("a", 3), ("b", 1)):
                for i in range(n):
                    wait, tokens = 0.0004 * 10**i, 7 * (i + 1)
                    if fast:
                        m.adder(m.requests, tenant, "m", "200")(1)
                        m.adder(m.tokens, tenant, "m", "prompt")(tokens)
                        m.adder(m.spend, tenant, "USD")(0.125)
                        m.adder(m.inflight, tenant)(1)
                        m.adder(m.inflight, tenant)(-1)
                        m.observer(m.queue_wait, tenant, "m")(wait)
                        m.observer(m.duration, tenant, "m")(wait * 50)
                        m.observer(m.duration, tenant, "m")(10_000.0)  # beyond the last bound: +Inf only
                        m.observer(m.duration, tenant, "m")(0.25)  # on a bound: in its bucket
                    else:
                        m.requests.labels(tenant, "m", "200").inc()
                        m.tokens.labels(tenant, "m", "prompt").inc(tokens)
                        m.spend.labels(tenant, "USD").inc(0.125)
                        m.inflight.labels(tenant).inc()
                        m.inflight.labels(tenant).dec()
                        m.queue_wait.labels(tenant, "m").observe(wait)
                        m.duration.labels(tenant, "m").observe(wait * 50)
                        m.duration.labels(tenant, "m").observe(10_000.0)
                        m.duration.labels(tenant, "m").observe(0.25)
            text = m.exposition().decode()
            del m
        finally:
            values.ValueClass = original
            # The library never closes its value files: this test's, closed here.
            for held in gc.get_objects():
                if isinstance(held, MmapedDict) and held._fname.startswith(str(directory)):
                    held.close()
        # Timestamps of creation differ between the two runs; nothing else may.
        return "\n".join(line for line in text.splitlines() if "_created" not in line)

    with pytest.MonkeyPatch.context() as patch:
        fast = exposition(True, tmp_path / "fast", patch)
    with pytest.MonkeyPatch.context() as patch:
        public = exposition(False, tmp_path / "public", patch)
    assert 'gateway_queue_wait_seconds_bucket{le="0.001",model="m",tenant="a"} 1.0' in fast
    assert 'gateway_requests_total{model="m",status="200",tenant="a"} 3.0' in fast
    assert fast == public
