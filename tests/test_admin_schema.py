"""The admin API fuzzed from its own OpenAPI document with schemathesis (its CLI, every phase: examples,
coverage, fuzzing and stateful sequences built from the document's links), against a real gateway
process with the admin key, every operation.

Every check runs except `negative_data_rejection`: the API takes input the way pydantic does by default
(a Unix time where the document says date-time, `"5"` for 5, `0` for false), which a JSON Schema cannot
say; taking an unambiguous value is neither a server error nor a wrong answer. A server error, an answer
that does not match the document (status, content type, headers, body schema), a refused request the
document allows, an ignored admin key, a wrong `Allow` header: each fails this test.

Bugs this found are fixed in gateway/admin/ and pinned by tests in test_admin.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import GatewayProc, start_gateway

# Examples per operation and phase; the run takes about 20 s on the 2-core VM.
MAX_EXAMPLES = 100
SEED = 9


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    # A config-managed tenant and key too, so the 409 config_managed answers are reached.
    config = {"tenants": [{"id": "declared", "keys": [{"name": "ci", "key_hash": "0" * 64}]}]}
    proc = start_gateway(config, tmp_path_factory.mktemp("gw-schema"))
    yield proc
    proc.stop()


def st_run(gw: GatewayProc, report_dir: Path) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        gw.url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {gw.admin_key}",
        "--checks",
        "all",
        "--exclude-checks",
        "negative_data_rejection",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=report_dir)


def test_every_admin_operation_conforms_to_the_openapi_document(gw: GatewayProc, tmp_path: Path) -> None:
    operations = sum(len(methods) for methods in httpx.get(gw.url + "/openapi.json").json()["paths"].values())
    result = st_run(gw, tmp_path)
    out = result.stdout + result.stderr
    # The figures SECURITY.md quotes: operations tested and cases generated.
    summary = re.search(r"Tested: (\d+)", out)
    cases = re.search(r"(\d+) generated", out)
    print(
        f"schemathesis: {operations} operations, {summary and summary.group(1)} tested, "
        f"{cases and cases.group(1)} cases"
    )
    assert result.returncode == 0, out[-6000:]
    assert summary is not None and int(summary.group(1)) == operations >= 14, out[-2000:]
    assert cases is not None and int(cases.group(1)) >= 10 * operations
    log = gw.output()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    assert gw.admin_key not in log
    assert gw.proc.popen is not None and gw.proc.popen.poll() is None
