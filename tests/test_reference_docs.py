"""The reference pages in docs/reference/ against what the code does, so a page fails a test when it drifts.

- configuration.md: every field of the settings models (walked recursively), with its default and its
  choices, and nothing the models no longer have; the environment override rule as documented; the
  example as a configuration the gateway accepts.
- metrics.md: against the live /metrics of a real gateway (a process on loopback, the simulator as its
  backend, its own redis-server) after requests that make every metric exist: answers, streams, 401,
  404, 429, upstream 500s, a stream cut by the backend and one left by the client, a fallback, an
  isolation refusal, a queue, and a Redis outage. Both ways: every exported family is documented, with
  its type and labels, and every documented metric has samples.
- billing-event.md and billing-event.schema.json: the schema is valid draft 2020-12, the page and the
  schema name the same fields, and every event the same real gateway wrote to its jsonl sink validates.
- Every link between the pages, and every anchor, resolves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway import config as config_module
from gateway.config import Settings, load_settings
from gateway.tenancy import model as tenancy_model
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.sim import SimHandle, start_sim

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
CONFIGURATION = REFERENCE / "configuration.md"
METRICS = REFERENCE / "metrics.md"
BILLING_EVENT = REFERENCE / "billing-event.md"
BILLING_SCHEMA = REFERENCE / "billing-event.schema.json"


# --- reading Markdown ------------------------------------------------------------------------------------


@dataclass
class Section:
    heading: str
    rows: list[list[str]]  # the rows of the tables under the heading, without their header rows
    text: str


def sections(path: Path) -> list[Section]:
    found: list[Section] = []
    current = Section("", [], "")
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^#+ (.+)$", line)
        if heading:
            found.append(current)
            current = Section(heading.group(1).strip(), [], "")
            continue
        current.text += line + "\n"
        if in_code or not line.startswith("|"):
            continue
        if re.match(r"^\|[-:| ]+\|$", line):
            current.rows.pop()  # the line above the rule is the table's header
        else:
            current.rows.append(split_row(line))
    found.append(current)
    return found


def split_row(line: str) -> list[str]:
    # `\|` inside a cell is an escaped bar (`local` \| `open`), not a column.
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- walking the settings models -------------------------------------------------------------------------


def nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The settings model inside a field's type, and whether the field holds a list of them."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = nested_model(arg)
            if found is not None:
                return found
        return None
    if origin is tuple:
        inner = nested_model(typing.get_args(annotation)[0])
        return None if inner is None else (inner[0], True)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None


def mentions_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(mentions_model(arg) for arg in typing.get_args(annotation))


def model_paths(model: type[BaseModel] = Settings, path: str = "") -> dict[str, type[BaseModel]]:
    """Every section of the configuration, by its path as the page writes it (`tenants[].keys[].limits`)."""
    found = {path: model}
    for name, info in model.model_fields.items():
        nested = nested_model(info.annotation)
        # A model inside a type this walk does not know (a mapping of models, say) must not go unchecked.
        assert nested is not None or not mentions_model(info.annotation), f"{path}.{name}: teach model_paths"
        if nested is not None:
            child, is_list = nested
            child_path = (f"{path}.{name}" if path else name) + ("[]" if is_list else "")
            found.update(model_paths(child, child_path))
    return found


def literal_choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [choice for arg in typing.get_args(annotation) for choice in literal_choices(arg)]
    return []


def plain(value: Any) -> Any:
    """A default as YAML would read it back: tuples as lists."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def documented_default(cell: str) -> Any:
    values = ticked(cell)
    assert len(values) == 1, f"a default is one `value`: {cell!r}"
    return yaml.safe_load(values[0])


# --- configuration.md ------------------------------------------------------------------------------------

PATHS = model_paths()


def config_sections() -> dict[str, Section]:
    """The page's field tables by the paths their headings name (`Top level` is the root)."""
    found: dict[str, Section] = {}
    for section in sections(CONFIGURATION):
        names = [""] if section.heading == "Top level" else ticked(section.heading)
        for name in names:
            assert name not in found, f"two sections for `{name}`"
            found[name] = section
    return found


SECTIONS = config_sections()


def test_every_settings_section_has_its_table() -> None:
    undocumented = sorted(set(PATHS) - set(SECTIONS))
    assert not undocumented, f"configuration.md has no section for {undocumented}"
    # A section heading that names no part of the settings any more (on_limit's keys have their own table).
    stale = sorted(set(SECTIONS) - set(PATHS) - {"on_limit"})
    assert not stale, f"configuration.md documents sections that no longer exist: {stale}"


@pytest.mark.parametrize("path", sorted(PATHS), ids=lambda p: p or "top-level")
def test_every_field_is_documented_with_its_default_and_choices(path: str) -> None:
    model = PATHS[path]
    rows = {ticked(row[0])[0]: row for row in SECTIONS[path].rows if ticked(row[0])}
    fields: dict[str, FieldInfo] = model.model_fields
    where = f"configuration.md, section `{path or 'Top level'}`"
    missing, stale = sorted(set(fields) - set(rows)), sorted(set(rows) - set(fields))
    assert not missing, f"{where}: fields not documented: {missing}"
    assert not stale, f"{where}: documented fields that no longer exist: {stale}"
    for name, field in fields.items():
        row = rows[name]
        assert len(row) == 4 and all(row), f"{where}, `{name}`: a row is | field | type | default | meaning |"
        _, kind, default, _ = row
        for choice in literal_choices(field.annotation):
            assert f"`{choice}`" in kind, f"{where}, `{name}`: the choice `{choice}` is not in its type"
        if field.is_required():
            assert default == "required", f"{where}, `{name}`: it is required"
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            assert default.startswith("see "), f"{where}, `{name}`: a section's default is its own table"
            continue
        assert documented_default(default) == plain(value), f"{where}, `{name}`: the default is {value!r}"


def test_on_limit_lists_every_limit() -> None:
    section = SECTIONS["on_limit"]
    documented = {ticked(row[0])[0] for row in section.rows}
    assert documented == tenancy_model._LIMITS


def test_environment_variables_that_are_not_overrides_are_listed() -> None:
    section = next(s for s in sections(CONFIGURATION) if s.heading == "Environment overrides")
    documented = {ticked(row[0])[0] for row in section.rows}
    assert documented == config_module._NOT_OVERRIDES


def test_override_examples_do_what_the_page_says(tmp_path: Path) -> None:
    """Each `GATEWAY_...=value  # path` line of the page, applied alone, sets the field it names."""
    section = next(s for s in sections(CONFIGURATION) if s.heading == "Environment overrides")
    examples = re.findall(r"^(GATEWAY_\w+)=(\S+)\s+# (\S+)$", section.text, re.MULTILINE)
    assert len(examples) >= 3
    for name, value, path in examples:
        settings: Any = load_settings(None, env={name: value})
        for part in path.split("."):
            settings = getattr(settings, part)
        assert settings == yaml.safe_load(value), f"{name}={value} should set {path}"


def test_the_example_is_a_configuration_the_gateway_accepts(tmp_path: Path) -> None:
    text = (CONFIGURATION).read_text()
    heading = text.index("## A complete example")
    block = re.search(r"```yaml\n(.*?)```", text[heading:], re.DOTALL)
    assert block is not None
    path = tmp_path / "gateway.yaml"
    path.write_text(block.group(1))
    env = {"ACME_CI_KEY": "sk-gw-example", "ANTHROPIC_API_KEY": "sk-ant-example"}
    settings = load_settings(path, env=env)
    assert settings.tenants[0].on_limit == {"budget": "downgrade:haiku", "queue": "fallback"}


def test_secret_fields_are_refused_in_the_file(tmp_path: Path) -> None:
    """The page says which fields only come from the environment; the file may not hold them."""
    section = SECTIONS[""]
    secrets = {ticked(row[0])[0] for row in section.rows if row[3].startswith(("secret", "not settable"))}
    assert secrets == config_module._SECRET_FIELDS & set(Settings.model_fields)
    for name in secrets:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"{name}: x\n")
        with pytest.raises(config_module.ConfigError, match=name):
            load_settings(path, env={})


# --- a real gateway: its /metrics and its billing events ------------------------------------------------

PROMPT = "Summarise the quarterly report for the board in three short bullet points, please. " * 6
MAIN_KEY = "sk-gw-" + "m" * 43
TIGHT_KEY = "sk-gw-" + "t" * 43
# Requests that reach a backend, each with its own x-request-id; the gateway bills each exactly once.
BILLED = (
    "unary",
    "cached",
    "stream",
    "completions",
    "embeddings",
    "fallback",
    "tight",
    "upstream-500",
    "cut-by-backend",
    "holds-the-slot",
    "queued",
    "left-by-client",
    "redis-down",
)


@dataclass
class Live:
    metrics: str
    events: list[dict[str, Any]]
    configured_models: set[str]


def gateway_config(sim: SimHandle, redis: RedisServer, workdir: Path) -> dict[str, Any]:
    nobody = f"http://127.0.0.1:{free_port()}"
    return {
        "redis_url": redis.url,
        "shutdown_drain_s": 0,
        "backends": [
            # Capacity 1: a second request while one runs waits in the fair queue.
            {"name": "sim", "kind": "vllm", "url": sim.url, "capacity": 1},
            # Nothing listens there: down at the first health check, so requests skip it (a fallback).
            {"name": "down", "kind": "vllm", "url": nobody},
            # Shares one prefix cache across callers without salts: refused for a tenant-scoped tenant.
            {"name": "shared", "kind": "openai", "url": sim.url, "shares_prefix_cache": True},
        ],
        "models": [
            {"name": "chat", "backends": ["sim"], "price": {"input_per_1k": 0.5, "output_per_1k": 1.5}},
            {"name": "spill", "backends": ["down", "sim"]},
            {"name": "shared-cache", "backends": ["shared"]},
        ],
        "tenants": [
            {
                "id": "acme",
                # A limit, so that every request asks the quota store (in Redis) for admission.
                "limits": {"rpm": 100_000},
                "keys": [
                    {"name": "main", "key_env": "REFERENCE_MAIN_KEY"},
                    {"name": "tight", "key_env": "REFERENCE_TIGHT_KEY", "models": ["chat"], "limits": {"rpm": 1}},
                ],
            }
        ],
        "billing": {
            "sinks": [
                {"kind": "jsonl", "path": str(workdir / "billing.jsonl")},
                # Nothing listens there either: its events fail and wait in the spool.
                {"kind": "webhook", "url": nobody + "/usage", "retries": 0, "backoff_initial_s": 0.05},
            ],
            "shutdown_timeout_s": 2,
        },
    }


def drive(gw: GatewayProc, sim: SimHandle, redis: RedisServer) -> None:
    """One of each request the reference pages speak of."""

    def client(key: str = MAIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)

    def rid(name: str) -> dict[str, str]:
        return {"x-request-id": f"ref-{name}"}

    main = client()
    messages: Any = [{"role": "user", "content": PROMPT}]
    main.chat.completions.create(model="chat", messages=messages, max_tokens=4, extra_headers=rid("unary"))
    # The same prompt again: the simulator's prefix cache serves most of it (cached tokens).
    main.chat.completions.create(model="chat", messages=messages, max_tokens=4, extra_headers=rid("cached"))
    stream = main.chat.completions.create(
        model="chat",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=rid("stream"),
    )
    assert [chunk for chunk in stream]
    main.completions.create(model="chat", prompt="Once upon a time", max_tokens=3, extra_headers=rid("completions"))
    main.embeddings.create(model="chat", input="a sentence to embed", extra_headers=rid("embeddings"))
    fallback = main.chat.completions.with_raw_response.create(
        model="spill", messages=messages, max_tokens=2, extra_headers=rid("fallback")
    )
    assert fallback.headers["x-gateway-fallback-from"] == "down"
    with pytest.raises(openai.InternalServerError) as refused:
        main.chat.completions.create(model="shared-cache", messages=messages, max_tokens=2)
    assert refused.value.status_code == 503
    # 429: the tight key's one request per minute.
    tight = client(TIGHT_KEY)
    tight.chat.completions.create(model="chat", messages=messages, max_tokens=2, extra_headers=rid("tight"))
    with pytest.raises(openai.RateLimitError):
        tight.chat.completions.create(model="chat", messages=messages, max_tokens=2)
    # A configured model this key may not use: 404, as if it did not exist.
    with pytest.raises(openai.NotFoundError):
        tight.chat.completions.create(model="spill", messages=messages, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client("sk-gw-" + "u" * 43).chat.completions.create(model="chat", messages=messages)
    with pytest.raises(openai.NotFoundError):
        main.chat.completions.create(model="no-such-model", messages=messages)
    # The backend answers 500: the client gets 502.
    sim.set_faults("error_500", count=1)
    with pytest.raises(openai.InternalServerError):
        main.chat.completions.create(model="chat", messages=messages, max_tokens=2, extra_headers=rid("upstream-500"))
    # The backend drops the connection mid-stream: the stream ends with an error event.
    sim.set_faults("drop_midstream", count=1, after_tokens=3)
    with pytest.raises(openai.APIError):
        cut = main.chat.completions.create(
            model="chat", messages=messages, max_tokens=50, stream=True, extra_headers=rid("cut-by-backend")
        )
        for _ in cut:
            pass
    sim.set_faults("none")
    # One stream holds the backend's only slot while another request waits in the fair queue for it.
    holder = main.chat.completions.create(
        model="chat", messages=messages, max_tokens=1000, stream=True, extra_headers=rid("holds-the-slot")
    )
    next(iter(holder))
    queued = threading.Thread(
        target=lambda: client().chat.completions.create(
            model="chat", messages=messages, max_tokens=2, extra_headers=rid("queued")
        )
    )
    queued.start()
    deadline = time.monotonic() + 10
    while 'gateway_queued_requests{tenant="acme"} 1.0' not in httpx.get(gw.url + "/metrics").text:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.01)
    for _ in holder:
        pass
    queued.join(30)
    # A client that leaves a stream after its first chunks.
    body = {"model": "chat", "messages": messages, "max_tokens": 500, "stream": True}
    headers = {"Authorization": f"Bearer {MAIN_KEY}", **rid("left-by-client")}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
    # Redis goes away: admission falls back to its local limits, and says so.
    redis.stop()
    main.chat.completions.create(model="chat", messages=messages, max_tokens=2, extra_headers=rid("redis-down"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("reference")
    with contextlib.ExitStack() as stack:
        redis = RedisServer(workdir / "redis")
        redis.start()
        stack.callback(redis.kill)
        sim = start_sim("--ttft-ms", "5", "--itl-ms", "2", log_dir=workdir)
        stack.callback(sim.stop)
        config = gateway_config(sim, redis, workdir)
        env = {"REFERENCE_MAIN_KEY": MAIN_KEY, "REFERENCE_TIGHT_KEY": TIGHT_KEY}
        gw = start_gateway(config, workdir / "gateway", env=env)
        stack.callback(gw.stop)
        drive(gw, sim, redis)
        metrics = httpx.get(gw.url + "/metrics").text
        # SIGTERM: the gateway drains (the client that left is billed by then) and flushes billing.
        assert gw.stop() == 0, gw.output()
        events = [json.loads(line) for line in (workdir / "billing.jsonl").read_text().splitlines()]
        yield Live(metrics, events, {m["name"] for m in config["models"]})


# --- metrics.md ------------------------------------------------------------------------------------------


@dataclass
class Family:
    kind: str
    labels: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # label -> the values seen
    samples: int = 0


def exported(exposition: str) -> dict[str, Family]:
    """The families of a Prometheus text exposition, with their samples' labels (`le` left out)."""
    found: dict[str, Family] = {}
    current: Family | None = None
    for line in exposition.splitlines():
        declared = re.match(r"^# TYPE (\S+) (\S+)$", line)
        if declared:
            current = found[declared.group(1)] = Family(declared.group(2))
        elif line and not line.startswith("#"):
            assert current is not None, line
            current.samples += 1
            for label, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line.split("} ")[0]):
                if label != "le":
                    current.labels.setdefault(label, set()).add(value)
    return found


@dataclass(frozen=True)
class Documented:
    kind: str
    labels: frozenset[str]


def documented_metrics() -> dict[str, Documented]:
    section = next(s for s in sections(METRICS) if s.heading == "Metrics")
    found = {}
    for name_cell, kind, labels, meaning in section.rows:
        (name,) = ticked(name_cell)
        assert meaning, name
        found[name] = Documented(kind, frozenset(ticked(labels)))
    return found


# Documented metrics that may have no samples in the test's scrape, each with the condition it lacks.
# (None today: the load below makes every one of them exist.)
ONLY_UNDER_CONDITIONS: dict[str, str] = {}


def created_of(name: str, documented: dict[str, Documented]) -> str | None:
    """The documented counter or histogram whose `_created` family this is (the client library's)."""
    if not name.endswith("_created"):
        return None
    base = name.removesuffix("_created")
    return next((n for n in (base + "_total", base) if n in documented), None)


def test_every_exported_metric_is_documented_with_its_type_and_labels(live: Live) -> None:
    documented = documented_metrics()
    gateway = {name: family for name, family in exported(live.metrics).items() if name.startswith("gateway_")}
    assert len(gateway) >= 20
    problems = []
    for name, family in gateway.items():
        if created_of(name, documented) is not None:
            continue
        if name not in documented:
            problems.append(f"{name} ({family.kind}) is not documented")
            continue
        if family.kind != documented[name].kind:
            problems.append(f"{name} is a {family.kind}, not a {documented[name].kind}")
        if family.samples and set(family.labels) != documented[name].labels:
            problems.append(f"{name} has the labels {sorted(family.labels)}, not {sorted(documented[name].labels)}")
    assert not problems, "metrics.md:\n" + "\n".join(problems)
    assert "`<name>_created`" in METRICS.read_text()


def test_every_documented_metric_is_exported(live: Live) -> None:
    families = exported(live.metrics)
    problems = []
    for name in documented_metrics():
        if name not in families:
            problems.append(f"{name} is documented but no longer exported")
        elif not families[name].samples and name not in ONLY_UNDER_CONDITIONS:
            problems.append(f"{name} has no samples after the test's load")
    assert not problems, "metrics.md:\n" + "\n".join(problems)


def test_label_values_are_bounded(live: Live) -> None:
    """Tenants the gateway does not know, and models it does not serve, never become label values."""
    families = exported(live.metrics)
    page = METRICS.read_text()
    tenants = {"acme", "other", "unauthenticated"}
    models = live.configured_models | {"unknown"}
    for name, family in families.items():
        assert tenants >= family.labels.get("tenant", set()), name
        assert models >= family.labels.get("model", set()), name
    # The placeholders the page promises are the ones the gateway uses.
    requests = families["gateway_requests_total"].labels
    assert "unauthenticated" in requests["tenant"] and "unknown" in requests["model"]
    # A configured model the key may not use counts under its name (the page says so).
    assert 'gateway_requests_total{model="spill",status="404",tenant="acme"}' in live.metrics
    for placeholder in ("`other`", "`unauthenticated`", "`unknown`"):
        assert placeholder in page
    assert "no-such-model" not in live.metrics


# --- billing-event.md and its JSON Schema ----------------------------------------------------------------


def billing_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(BILLING_SCHEMA.read_text())
    return schema


def test_billing_schema_is_draft_2020_12() -> None:
    schema = billing_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_billing_page_and_schema_name_the_same_fields() -> None:
    schema = billing_schema()
    usage = schema["$defs"]["usage"]
    page = {s.heading: {ticked(row[0])[0] for row in s.rows} for s in sections(BILLING_EVENT) if s.rows}
    assert page["Envelope"] == set(schema["properties"]) == set(schema["required"])
    assert page["`data`"] == set(usage["properties"]) == set(usage["required"])
    data_section = next(s for s in sections(BILLING_EVENT) if s.heading == "`data`").text
    for name in usage["properties"]["timings"]["properties"]:
        assert f"`{name}`" in data_section, f"billing-event.md does not explain timings.{name}"


def test_billing_example_is_valid() -> None:
    text = BILLING_EVENT.read_text()
    block = re.search(r"```json\n(.*?)```", text, re.DOTALL)
    assert block is not None
    jsonschema.Draft202012Validator(billing_schema()).validate(json.loads(block.group(1)))


def test_events_from_a_real_gateway_validate(live: Live) -> None:
    # The schema allows no field it does not list: a field added to the event fails here until the schema
    # and billing-event.md describe it.
    validator = jsonschema.Draft202012Validator(billing_schema(), format_checker=jsonschema.FormatChecker())
    for event in live.events:
        errors = sorted(validator.iter_errors(event), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_event_id_is_the_gateway_s_and_request_id_the_client_s(live: Live) -> None:
    # REQUEST_ID / evt_: the event id is made by the gateway, unique per request, never the client's
    # x-request-id; that one is `data.request_id`.
    request_ids = [event["data"]["request_id"] for event in live.events]
    assert sorted(request_ids) == sorted(f"ref-{name}" for name in BILLED)
    ids = [event["id"] for event in live.events]
    assert all(i.startswith("evt_") for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_one_event_per_request_that_reached_a_backend(live: Live) -> None:
    """Each field says what the page says it does, for the request that should set it."""
    by_request = {event["data"]["request_id"]: event["data"] for event in live.events}
    assert len(live.events) == len(by_request) == len(BILLED)
    assert {event["subject"] for event in live.events} == {d["tenant"] for d in by_request.values()} == {"acme"}
    assert all(d["cost"] > 0 for d in by_request.values() if d["model"] == "chat" and d["status"] == 200)
    ok = {name: by_request[f"ref-{name}"] for name in BILLED}
    assert ok["completions"]["endpoint"] == "completions" and ok["embeddings"]["endpoint"] == "embeddings"
    assert ok["unary"]["cached_tokens"] == 0 < ok["cached"]["cached_tokens"] <= ok["cached"]["prompt_tokens"]
    assert ok["stream"]["stream"] and ok["stream"]["timings"]["ttft_ms"] is not None
    assert ok["unary"]["timings"]["ttft_ms"] is None and ok["unary"]["finish_reason"] == "length"
    assert ok["queued"]["timings"]["queue_ms"] > 0 == ok["unary"]["timings"]["queue_ms"]
    assert (ok["fallback"]["fallback_from"], ok["fallback"]["fallback_reason"]) == ("down", "unavailable")
    assert ok["fallback"]["backend"] == "sim" and ok["unary"]["fallback_from"] is None
    # The backend answered 500 before working on the request: the client got 502, nothing was processed.
    failed = ok["upstream-500"]
    assert (failed["status"], failed["partial"]) == (502, False)
    assert failed["prompt_tokens"] == failed["completion_tokens"] == failed["cost"] == 0
    # Cut short after the backend began: billed from the gateway's prompt estimate and the tokens relayed.
    for name, status in (("cut-by-backend", 502), ("left-by-client", 499)):
        cut = ok[name]
        assert (cut["status"], cut["partial"], cut["finish_reason"]) == (status, True, None), name
        assert cut["prompt_tokens"] > 0 and cut["completion_tokens"] > 0 and cut["cached_tokens"] == 0, name
    whole = [d for d in ok.values() if d["status"] == 200]
    assert len(whole) == len(BILLED) - 3 and not any(d["partial"] for d in whole)


# --- links -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", sorted(REFERENCE.glob("*.md")), ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, fragment = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: broken link {target}"
        if fragment:
            anchors = {anchor(s.heading) for s in sections(linked) if s.heading}
            assert fragment in anchors, f"{page.name}: no heading for #{fragment} in {linked.name}"
