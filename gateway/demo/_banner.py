"""What the demo prints once everything runs: where, the keys, and commands that work as printed."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.demo._scenario import MODEL, SIM_CONCURRENCY, STEADY, TENANTS

__all__ = ["Running", "banner"]


@dataclass(frozen=True, slots=True)
class Running:
    base_url: str
    port_note: str
    sim_url: str
    admin_key: str
    keys: dict[str, str]
    config_path: Path


def banner(run: Running, load: bool) -> str:
    key = run.keys[STEADY.id]
    tenants = "\n".join(f"  {t.id:<7} {t.describe():<50} key {run.keys[t.id]}" for t in TENANTS)
    then = "" if load else "\nTo see the weights and a 429 at work, start the demo with --load.\n"
    return f"""
The gateway demo is running.

  gateway    {run.base_url}{run.port_note}
  simulator  {run.sim_url}   (a simulated vLLM running {SIM_CONCURRENCY} requests at a time)
  console    {run.base_url}/console/   (sign in with the admin key)
  admin key  {run.admin_key}
  config     {run.config_path}

Two tenants, created over the admin API, so the CLI, the API and the console can change them:
{tenants}

Python (pip install openai):

from openai import OpenAI
client = OpenAI(base_url="{run.base_url}/v1", api_key="{key}")
reply = client.chat.completions.with_raw_response.create(
    model="{MODEL}", messages=[{{"role": "user", "content": "Hello!"}}]
)
print(reply.parse().choices[0].message.content)
print("requests left this minute:", reply.headers["x-ratelimit-remaining-requests"])
for chunk in client.chat.completions.create(
    model="{MODEL}", messages=[{{"role": "user", "content": "Stream, please"}}], stream=True
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)

print()

From another shell (the admin CLI and the README's commands read these variables):

  export {_path_setting()}GATEWAY_URL={run.base_url} GATEWAY_ADMIN_KEY={run.admin_key}
  gateway tenants list
  gateway tenants update {STEADY.id} --weight 7    # under --load, the shares move to 7:1
  curl -s $GATEWAY_URL/v1/models -H "Authorization: Bearer {key}"
{then}
Ctrl-C stops the gateway and the simulator.
"""


def _path_setting() -> str:
    """`PATH=...` putting this `gateway` command first: scripts/demo's venv is on no shell's PATH."""
    return f'PATH={shlex.quote(str(Path(sys.executable).parent))}{os.pathsep}"$PATH" '
