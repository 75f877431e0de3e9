"""`gateway demo`: the simulator, the gateway and two demo tenants in one command.

Everything the demo makes (state file, keys, admin key) is new on each run and lives under --state-dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.auth.keys import generate_key
from gateway.config import load_settings
from gateway.serve import configure_logging, uvicorn_config

__all__ = ["run_demo"]

_CONFIG = """\
listen: {{host: {host}, port: {port}}}
state_path: {state}
backends:
  - {{name: sim, kind: vllm, url: "http://127.0.0.1:{sim_port}", capacity: 64}}
models:
  - name: demo-model
    backends: [sim]
    upstream_model: sim-model
    price: {{input_per_1k: 0.0002, output_per_1k: 0.0006, currency: USD}}
tenants:
  - id: team-a
    name: Team A
    weight: 2
    keys: [{{name: demo, key_env: DEMO_TEAM_A_KEY}}]
  - id: team-b
    name: Team B
    weight: 1
    keys: [{{name: demo, key_env: DEMO_TEAM_B_KEY}}]
billing:
  sinks: [{{kind: jsonl, path: {billing}}}]
"""


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway demo: the simulator exited ({proc.returncode})")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"gateway demo: the simulator did not start at {url}")


def _banner(host: str, port: int, keys: dict[str, str], admin_key: str, config_path: Path) -> str:
    base = f"http://{host}:{port}"
    return f"""
Gateway demo is running at {base}  (simulated vLLM behind it; Ctrl-C stops both)

  tenant team-a key:  {keys["team-a"]}
  tenant team-b key:  {keys["team-b"]}
  admin key:          {admin_key}
  console:            {base}/console/  (sign in with the admin key)
  config:             {config_path}

Paste into Python (pip install openai):

from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{keys["team-a"]}")
print(client.chat.completions.create(
    model="demo-model", messages=[{{"role": "user", "content": "Hello!"}}]
).choices[0].message.content)
for chunk in client.chat.completions.create(
    model="demo-model", messages=[{{"role": "user", "content": "Stream, please"}}], stream=True
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

Admin API (create a tenant and a key):

curl -s -X POST {base}/admin/tenants -H "Authorization: Bearer {admin_key}" \\
     -H "content-type: application/json" -d '{{"id": "team-c", "weight": 1}}'
curl -s -X POST {base}/admin/tenants/team-c/keys -H "Authorization: Bearer {admin_key}" \\
     -H "content-type: application/json" -d '{{"name": "laptop"}}'

Metrics: {base}/metrics    OpenAPI: {base}/openapi.json
"""


def run_demo(host: str, port: int, sim_port: int, state_dir: str) -> int:
    state = Path(state_dir).resolve()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    config_path = state / "gateway.yaml"
    config_path.write_text(
        _CONFIG.format(
            host=host, port=port, sim_port=sim_port, state=state / "state.db", billing=state / "billing.jsonl"
        )
    )
    keys = {"team-a": generate_key(), "team-b": generate_key()}
    admin_key = "sk-admin-" + secrets.token_urlsafe(24)
    env = {
        "DEMO_TEAM_A_KEY": keys["team-a"],
        "DEMO_TEAM_B_KEY": keys["team-b"],
        "GATEWAY_ADMIN_KEY": admin_key,
        "GATEWAY_SALT_SECRET": secrets.token_urlsafe(32),
    }
    settings = load_settings(config_path, env=env)
    configure_logging("warning")
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--host", "127.0.0.1", "--port", str(sim_port)])
    try:
        _wait(f"http://127.0.0.1:{sim_port}/health", sim)
        server = uvicorn.Server(uvicorn_config(create_app(settings), settings, host, port))

        async def main() -> None:
            serving = asyncio.create_task(server.serve())
            while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn offers no event
                await asyncio.sleep(0.05)
            if server.started:
                print(_banner(host, port, keys, admin_key, config_path), flush=True)
            await serving

        asyncio.run(main())
        return 0 if server.started else 1
    finally:
        sim.terminate()
        try:
            sim.wait(5)
        except subprocess.TimeoutExpired:
            sim.kill()
