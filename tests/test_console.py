"""The admin console (/console/): how its files are served, that the package ships them with the vendored
chart library unchanged, the console's rate and merge-patch arithmetic (Node's test runner), and the whole
console in Debian's Chromium driven by playwright-core (tests/browser/console.mjs) against a real gateway
and simulator under load, down to the admin API reference it renders from /openapi.json. Screenshots go to
the test's tmp dir and to .artifacts/console/ (git-ignored)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.admin import tenant_with_key
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.sim import SimHandle, start_sim

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = Path(__file__).parent / "browser"
STATIC = ROOT / "gateway" / "admin" / "console" / "static"
ARTIFACTS = ROOT / ".artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SimHandle]]:
    """Two engines in one pool. Slow enough that two slots at each (four in all) are a bottleneck for two
    tenants: the fair queue decides."""
    log_dir = tmp_path_factory.mktemp("sim-console")
    handles = [start_sim("--ttft-ms", "20", "--itl-ms", "2", log_dir=log_dir) for _ in range(2)]
    yield handles
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    """An engine that runs one request at a time and that other clients also use, bypassing the gateway:
    requests wait inside it whatever the gateway does."""
    handle = start_sim(
        "--ttft-ms", "5", "--itl-ms", "2", "--max-concurrency", "1", log_dir=tmp_path_factory.mktemp("busy")
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gw(sims: list[SimHandle], busy: SimHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    config = {
        "backends": [
            {"name": "sim", "kind": "vllm", "endpoints": [s.url for s in sims], "capacity": 2},
            {"name": "busy", "kind": "vllm", "url": busy.url, "capacity": 2},
        ],
        "models": [
            {
                "name": "chat-model",
                "backends": ["sim"],
                "price": {"input_per_1k": 0.01, "output_per_1k": 0.03, "currency": "USD"},
            }
        ],
    }
    proc = start_gateway(config, tmp_path_factory.mktemp("gw-console"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """playwright-core and uplot from tests/browser/package-lock.json (npm ci once)."""
    npm = shutil.which("npm")
    assert npm, "npm is needed for the console's browser tests"
    installed = BROWSER_DIR / "node_modules"
    lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())["packages"]

    def current(name: str) -> bool:
        manifest = installed / name / "package.json"
        return (
            manifest.exists() and json.loads(manifest.read_text())["version"] == lock[f"node_modules/{name}"]["version"]
        )

    if not (current("playwright-core") and current("uplot")):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=BROWSER_DIR, check=True, timeout=300)
    return installed


# --- serving --------------------------------------------------------------------------------------------


def test_assets_are_served_with_strict_headers(gw: GatewayProc) -> None:
    index = httpx.get(gw.url + "/console/")
    assert index.status_code == 200
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    csp = index.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp
    assert index.headers["x-content-type-options"] == "nosniff"
    assert index.headers["x-frame-options"] == "DENY"
    assert index.headers["referrer-policy"] == "no-referrer"
    assert index.headers["cache-control"] == "no-cache" and index.headers["etag"]
    assert index.headers["x-request-id"]
    # No inline script or style anywhere in the page (the CSP would refuse it anyway).
    assert "<script>" not in index.text and "style=" not in index.text and "<style" not in index.text

    types = {
        "/console/js/main.js": "text/javascript; charset=utf-8",
        "/console/app.css": "text/css; charset=utf-8",
        "/console/vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
        "/console/favicon.svg": "image/svg+xml",
        "/console/api.html": "text/html; charset=utf-8",
        "/console/js/reference.js": "text/javascript; charset=utf-8",
    }
    for path, content_type in types.items():
        resp = httpx.get(gw.url + path)
        assert resp.status_code == 200, path
        assert resp.headers["content-type"] == content_type
        assert resp.headers["content-security-policy"] == csp

    # Unchanged files cost a 304; HEAD has the headers without the body.
    again = httpx.get(
        gw.url + "/console/app.css", headers={"If-None-Match": httpx.get(gw.url + "/console/app.css").headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    head = httpx.head(gw.url + "/console/js/api.js")
    assert head.status_code == 200 and int(head.headers["content-length"]) > 0 and head.content == b""

    redirect = httpx.get(gw.url + "/console")
    assert redirect.status_code == 308 and redirect.headers["location"] == "/console/"
    # FastAPI's own documentation pages would load Swagger UI and ReDoc from a CDN: they lead to the
    # reference the console renders from its own files instead.
    for old in ("/docs", "/redoc"):
        moved = httpx.get(gw.url + old)
        assert moved.status_code == 308 and moved.headers["location"] == "/console/api.html", old
    refused = httpx.post(gw.url + "/console/", content=b"x")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert refused.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "path",
    [
        "/console/../gateway/config.py",
        "/console/%2e%2e/%2e%2e/pyproject.toml",
        "/console/..%2f_serve.py",
        "/console/js/../../_serve.py",
        "/console/_serve.py",
        "/console/__init__.py",
        "/console/static/index.html",
        "/console//etc/passwd",
        "/console/js/main.js%00.css",
        "/consolex",
    ],
)
def test_no_path_leaves_the_file_table(gw: GatewayProc, path: str) -> None:
    resp = httpx.get(gw.url + path)
    assert resp.status_code == 404, path
    assert resp.json()["error"]["code"] == "not_found"
    assert "import" not in resp.text and "root:" not in resp.text
    # Clients resolve dot segments before sending; a raw request line does not.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    assert status in (b"HTTP/1.1 404 Not Found", b"HTTP/1.1 400 Bad Request"), (path, status)
    assert b"import " not in answer and b"root:" not in answer


def test_package_ships_the_console_and_the_vendored_library_unchanged(node_modules: Path) -> None:
    # pyproject's package-data takes everything under console/static; the table serves these kinds only.
    shipped = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*") if p.is_file())
    assert {"index.html", "app.css", "js/main.js", "vendor/uPlot.iife.min.js", "vendor/uPlot.LICENSE.txt"} <= set(
        shipped
    )
    assert all(p.rsplit(".", 1)[-1] in {"html", "js", "css", "svg", "txt"} for p in shipped), shipped
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"admin/console/static/**/*"' in pyproject
    # The vendored files are byte for byte the ones of the npm package the lock file pins.
    lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())
    version = lock["packages"]["node_modules/uplot"]["version"]
    assert f"uPlot {version}" in (STATIC / "vendor" / "README.txt").read_text()
    dist = node_modules / "uplot"
    for ours, theirs in (
        ("uPlot.iife.min.js", "dist/uPlot.iife.min.js"),
        ("uPlot.min.css", "dist/uPlot.min.css"),
        ("uPlot.LICENSE.txt", "LICENSE"),
    ):
        assert (STATIC / "vendor" / ours).read_bytes() == (dist / theirs).read_bytes(), ours
    # Nothing in the console names another origin.
    for path in STATIC.rglob("*"):
        if path.is_file() and path.suffix in {".html", ".js", ".css"} and "vendor" not in path.parts:
            assert "http://" not in path.read_text() and "https://" not in path.read_text(), path


@pytest.mark.parametrize("suite", ["rates.test.mjs", "patch.test.mjs", "pools.test.mjs"])
def test_console_arithmetic(suite: str) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for the console's tests"
    result = subprocess.run([node, "--test", str(BROWSER_DIR / suite)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


# --- in the browser -------------------------------------------------------------------------------------


def test_console_in_chromium(
    gw: GatewayProc, sims: list[SimHandle], busy: SimHandle, node_modules: Path, tmp_path: Path
) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (scripts/test installs it)"
    beta = tenant_with_key(gw.url, gw.admin_key, "beta", weight=1)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    config = {
        "url": gw.url,
        "adminKey": gw.admin_key,
        "betaKey": beta,
        "model": "chat-model",
        "busyUrl": busy.url,
        "shots": str(shots),
        "chromium": CHROMIUM,
    }
    config_path = tmp_path / "scenario.json"
    config_path.write_text(json.dumps(config))
    started = time.monotonic()
    result = subprocess.run(
        [shutil.which("node") or "node", "console.mjs", str(config_path)],
        cwd=BROWSER_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, ARTIFACTS / png.name)
    assert result.returncode == 0, result.stderr[-4000:]
    seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert "failure" not in seen, seen.get("failure", "") + "\n" + json.dumps(seen.get("steps"))
    (ARTIFACTS / "seen.json").write_text(json.dumps(seen, indent=1))

    # Nothing but the gateway was asked for, and the page logged no error (a CSP violation would be one).
    assert seen["external"] == []
    assert seen["consoleErrors"] == []
    assert seen["requests"] > 20

    # Sign-in: from the keyboard; a wrong key is said next to the field; a reload forgets the key.
    assert seen["loginFocused"] == "admin_key"
    assert seen["loginError"] == "This key is not the admin key." and seen["loginInvalid"] == "true"
    # The page moves focus to the heading it draws; from there the keyboard walks back through the header.
    assert seen["headingFocused"] == "Tenants"
    assert seen["tabOrder"][-1] == "Skip to content" and {"Sign out", "Fairness", "Tenants"} <= set(seen["tabOrder"])
    assert seen["afterSkip"] == "main"
    assert seen["reloadSignsOut"] is True

    # The API's validation errors land next to the field they name, with focus on it.
    assert seen["weightError"] == "Input should be greater than 0" and seen["weightFocused"] == "weight"
    assert seen["weightDescribedBy"] is True
    assert "valid integer" in seen["rpmError"] and seen["rpmFocused"] == "rpm"

    # Keys: the secret is shown once, copied, then gone from the page; revoke and rotate take effect.
    assert seen["secretShape"] and seen["clipboardMatches"] and seen["secretGoneFromPage"]
    assert seen["secretFocused"] == "secret-value"
    assert (seen["ciStateBefore"], seen["ciStatusBefore"]) == ("active", 200)
    assert seen["revokeDialogFocus"] == "Cancel" and seen["focusAfterEscape"] == "Revoke ci"
    assert (seen["ciStateAfter"], seen["ciStatusAfter"]) == ("revoked", 401)
    assert sorted(seen["rotatedStates"]) == ["active", "expiring", "revoked"]
    assert seen["rotatedDiffers"] and seen["oldKeyInGrace"] == 200 and seen["newKeyWorks"] == 200

    # The live view moved under load: every chart filled, and the numbers are the load's.
    live = seen["live"]
    first, later = live["live1"], live["live2"]
    assert live["firstSeen"]["points"] < first["charts"]["requests"]["points"] < later["charts"]["requests"]["points"]
    assert all(chart["points"] >= 3 for chart in first["charts"].values())
    assert first["requests"] > 5 and first["tokens"] > 50
    assert 0 < first["share"] <= 1 and first["wait"] > 0
    assert first["limited"] > 0  # the oversized client's 429s
    # The 429 chart draws the reasons that occurred, each named, and not the five or more that did not.
    assert "in-flight tokens" in first["limitedSeries"] and len(first["limitedSeries"]) <= 2
    assert all(label in first["limitedWords"] for label in first["limitedSeries"])
    # A tenant with no 429s gets a note instead of lines at zero.
    assert seen["betaLimited"] == {"series": "", "note": "No 429s in this window.", "plotHidden": True}
    assert 0.5 < first["cache"] <= 1  # a shared prompt prefix
    assert later["spend"] > first["spend"] > 0
    # The fair queue's work: acme (weight 3) against beta (weight 1), both backlogged.
    shares = seen["fairness"]["shares"]
    assert abs(shares["acme"] - 0.75) < 0.08 and abs(shares["beta"] - 0.25) < 0.08, shares
    assert seen["fairness"]["jain"] > 0.95 and seen["fairness"]["jainState"] == "contended"
    # Light traffic of both tenants, nothing queued: no index (their shares say what they asked for).
    uncontended = seen["uncontended"]
    assert (uncontended["state"], uncontended["text"], uncontended["value"]) == ("uncontended", "No contention", "")
    assert uncontended["sub"] == "no tenant had requests queued"
    assert seen["fairness"]["chart"]["series"] == 4 and seen["fairness"]["chart"]["points"] >= 3
    assert seen["tenantsRate"].endswith("/s") and seen["tenantsRate"] != "0/s"
    # The pool's two engines under that load: each one's limit (at most its capacity, 2) with permits held
    # against it, the engine's own running and waiting, and requests served; nothing queues inside the
    # engines (the capacity control keeps the queue in the gateway), so no warning.
    backends = seen["backends"]
    assert [e["id"] for e in backends["endpoints"]] == sorted(f"127.0.0.1:{s.port}" for s in sims)
    for endpoint in backends["endpoints"]:
        assert 1 <= endpoint["limit"] <= 2 and 1 <= endpoint["permits"] <= endpoint["limit"], endpoint
        assert endpoint["cells"][1].startswith(f"{endpoint['permits']} / {endpoint['limit']}")
        assert endpoint["running"] != "" and endpoint["waiting"] != "" and endpoint["rate"] > 0
        assert endpoint["state"] == "" and endpoint["hit"] != ""
    assert backends["warningHidden"] and backends["scopeHidden"]
    assert backends["summary"].startswith("2 endpoints · ")
    assert backends["chart"]["points"] >= 3 and backends["chart"]["series"] == "Permits|Limit|Waiting in engines"
    # Clients that bypass the gateway keep requests waiting inside the busy engine: its row says so, and
    # the warning under its name says where the queue is and what to check.
    queue = seen["engineQueue"]
    assert queue["rows"] == [{"id": f"127.0.0.1:{busy.port}", "state": "queueing", "badge": "queue in the engine"}]
    assert queue["warning"].startswith(f"Requests keep waiting inside 127.0.0.1:{busy.port} (more than one on average")
    assert queue["simWarningHidden"] and int(queue["waiting"]) > 1
    # With a second process publishing, both pages say their figures are across all of them.
    assert seen["fairnessScope"].startswith("Across all 2 gateway processes")
    assert seen["backendsScope"].startswith("Across all 2 gateway processes")
    assert seen["load"]["acme"]["200"] > 50 and seen["load"]["beta"]["200"] > 20

    # Readable in a narrow window: nothing wider than the viewport.
    assert seen["narrowOverflow"] <= 0 and seen["narrowKeysOverflow"] <= 0 and seen["narrowBackendsOverflow"] <= 0
    # Every time label fits its chart, wide and narrow: none cut at the canvas's edge.
    assert first["cutLabels"] == [] and seen["narrowCutLabels"] == [] and seen["probeCharts"] == 3
    # Every field has a label and every control a name, on every page visited.
    assert all(found == [] for found in seen["a11y"].values()), seen["a11y"]
    assert set(seen["a11y"]) >= {
        "tenantForm",
        "secretDialog",
        "keys",
        "live",
        "fairness",
        "backends",
        "tenants",
        "settings",
        "reference",
    }

    # What the console did is what the admin API now says.
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    # The edit form sent only what changed (a cleared field as null), so what it does not show (on_limit)
    # and what it showed unchanged (tpm, set through the API just before) were kept.
    tenant_patches = [p["body"] for p in seen["patches"] if p["path"] == "/admin/tenants/acme"]
    assert tenant_patches == [
        {"limits": {"rpm": 1.5}},
        {"weight": 2, "limits": {"max_inflight_tokens": None}, "cache_scope": "group:research"},
    ]
    tenant = httpx.get(gw.url + "/admin/tenants/acme", headers=admin).json()
    assert tenant["weight"] == 2 and tenant["cache_scope"] == "group:research" and tenant["name"] == "Acme Research"
    assert tenant["budget"] == {"amount": 5.0, "period": "day"} and tenant["on_limit"] == {"queue": "fallback"}
    assert tenant["limits"] == {
        "rpm": 6000,
        "tpm": 900000,
        "max_concurrency": 12,
        "max_inflight_tokens": None,
        "max_queue_wait_ms": None,
        "max_queue_depth": None,
    }

    # The API reference shows every operation and schema of the document, and its links lead somewhere.
    doc = httpx.get(gw.url + "/openapi.json").json()
    operations = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
    reference = seen["reference"]
    assert set(reference["operations"]) == operations and len(reference["operations"]) == len(operations)
    assert sorted(reference["schemas"]) == sorted(doc["components"]["schemas"])
    assert reference["brokenLinks"] == [] and "TenantPatch" in reference["patchBody"]
    keys = httpx.get(gw.url + "/admin/tenants/acme/keys", headers=admin).json()
    assert sorted((k["name"], k["revoked"]) for k in keys) == [("ci", True), ("load", False), ("load", False)]
    actions = [e["action"] for e in httpx.get(gw.url + "/admin/audit", headers=admin).json()["data"]]
    assert {"tenant.create", "key.create", "key.revoke", "key.rotate", "tenant.update"} <= set(actions)
    assert time.monotonic() - started < 240
    for name in (
        "01-login",
        "04-key-secret",
        "06-live",
        "07-fairness",
        "07a-fairness-no-contention",
        "07c-backends",
        "07d-fairness-across-processes",
        "07e-backends-engine-queue",
        "07b-live-no-429s",
        "10-narrow-live",
        "10a-narrow-time-axis",
        "13-api-reference",
    ):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000, name
