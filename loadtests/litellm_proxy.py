"""LiteLLM Proxy as the benchmarks' reference point: its venv, its config and its process.

The proxy comes from PyPI at one exact, vetted version (``loadtests/litellm/requirements.in``, hashed lock
beside it), installed by ``loadtests/litellm/setup`` into ``loadtests/.venvs/litellm``, apart from the
gateway's venv. It runs with no database, no cache, no callbacks and one uvicorn worker, and fully offline:
every remote catalogue LiteLLM would fetch (the model price map, Anthropic beta headers, blog posts,
autorouter presets, policy templates) is read from its bundled copy, the Hugging Face hub is offline, and
it gets a clean environment (no proxy, database or Redis variables from the caller's) with its caches in
``workdir``. ``loadtests/litellm/smoke.py`` shows it working and checks it connects to nothing but loopback.

Use from a benchmark::

    ensure_venv()  # installs if needed; venv_ready() only tells whether it is installed
    proc = start_litellm(f"http://127.0.0.1:{upstream_port}", port, cpu=0, workdir=tmp, master_key=KEY)
    ...  # POST /v1/chat/completions with "Authorization: Bearer KEY" and "model": "bench-model"
    stop(proc)  # loadtests.common.stop
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from loadtests.common import ROOT, stop

VENV = ROOT / "loadtests" / ".venvs" / "litellm"
SETUP = ROOT / "loadtests" / "litellm" / "setup"
LITELLM = VENV / "bin" / "litellm"

#: Environment of the proxy process (on top of PATH, HOME and the locale): offline and quiet.
OFFLINE_ENV = {
    # Bundled copies instead of fetching from GitHub / docs.litellm.ai at import or on first use.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    # No admin UI, no Swagger page: the benchmark only needs the OpenAI routes.
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    # Errors only: LiteLLM's own loggers and uvicorn's (which then writes no access log line per request).
    "LITELLM_LOG": "ERROR",
    "PYTHONUNBUFFERED": "1",
    "no_proxy": "*",
    "NO_PROXY": "*",
}


def _stamp() -> Path:
    """The stamp loadtests/litellm/setup leaves for the current lock files (the same digest it computes)."""
    listing = "".join(
        f"{hashlib.sha256((ROOT / rel).read_bytes()).hexdigest()}  {rel}\n"
        for rel in ("loadtests/litellm/requirements.lock", "requirements/pip.lock")
    )
    return VENV / f".installed-{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def venv_ready() -> bool:
    """Whether the venv is installed from the current lock files (setup would do nothing)."""
    return LITELLM.exists() and _stamp().exists()


def ensure_venv() -> Path:
    """Install the pinned LiteLLM Proxy into its own venv unless already done; returns its python."""
    subprocess.run([str(SETUP)], check=True, stdout=subprocess.DEVNULL, cwd=str(ROOT))
    return VENV / "bin" / "python"


def litellm_version() -> str:
    """The installed LiteLLM's version, read from the venv's metadata (LiteLLM itself is not imported)."""
    site = list(VENV.glob("lib/python3*/site-packages"))
    for dist in importlib.metadata.distributions(name="litellm", path=[str(p) for p in site]):
        return dist.version
    raise RuntimeError(f"litellm is not installed in {VENV}: run {SETUP.relative_to(ROOT)}")


def write_config(
    path: Path, upstream_base_url: str, *, master_key: str, model: str = "bench-model", upstream_model: str = "bench-up"
) -> Path:
    """The proxy's config: one model routed to an OpenAI-compatible upstream, a master key, nothing else."""
    api_base = upstream_base_url.rstrip("/")
    if not api_base.endswith("/v1"):
        api_base += "/v1"
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{upstream_model}",
                    "api_base": api_base,
                    "api_key": "sk-bench-upstream-dummy",
                    # A price, as a deployment of a model unknown to LiteLLM's price map would set: cost
                    # tracking then runs its normal path instead of failing the lookup on every request.
                    "input_cost_per_token": 1e-6,
                    "output_cost_per_token": 2e-6,
                },
            }
        ],
        "litellm_settings": {
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "set_verbose": False,
            "json_logs": False,
            "num_retries": 0,
            "request_timeout": 600,
        },
        "general_settings": {
            "master_key": master_key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "background_health_checks": False,
            # Clients connect directly: an empty list says so (and silences the start-up warning).
            "trusted_proxy_ranges": [],
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _env(workdir: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    cache = workdir / "cache"
    env.update(
        OFFLINE_ENV,
        HOME=str(workdir),
        TMPDIR=str(workdir),
        XDG_CACHE_HOME=str(cache),
        HF_HOME=str(cache / "huggingface"),
    )
    return env


def _log_tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _post_chat(port: int, master_key: str, model: str) -> tuple[int, bytes]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 4})
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {master_key}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_litellm(
    upstream_base_url: str,
    port: int,
    *,
    cpu: int | None,
    workdir: Path,
    master_key: str,
    model: str = "bench-model",
    upstream_model: str = "bench-up",
    timeout: float = 120.0,
) -> subprocess.Popen[bytes]:
    """Start LiteLLM Proxy on 127.0.0.1:``port`` in front of ``upstream_base_url`` and wait until it serves.

    ``upstream_base_url`` is the upstream's root or its ``/v1`` URL. Clients call ``model``; the proxy sends
    ``upstream_model`` upstream. One uvicorn worker in the returned process itself (its pid is the server's,
    for RSS and CPU from /proc), pinned to ``cpu`` with taskset when given. Ready means /health/readiness
    answered and one real chat completion went through the upstream and back. Its log is
    ``workdir/litellm.log``; on failure the process is stopped and the error carries the log's tail.
    Stop it with ``loadtests.common.stop``.
    """
    if not LITELLM.exists():
        raise RuntimeError(f"{LITELLM} is missing: run {SETUP.relative_to(ROOT)} (or ensure_venv())")
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "litellm.yaml", upstream_base_url, master_key=master_key, model=model, upstream_model=upstream_model
    )
    log = workdir / "litellm.log"
    args = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    if cpu is not None and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        args = ["taskset", "-c", str(cpu), *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(workdir), cwd=str(workdir))
    try:
        _wait_ready(proc, port, master_key, model, timeout)
    except BaseException as e:
        stop(proc)
        if not isinstance(e, Exception):
            raise
        raise RuntimeError(f"LiteLLM Proxy did not become ready ({e}); log {log}:\n{_log_tail(log)}") from e
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], port: int, master_key: str, model: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout:.0f} s")
        try:
            with opener.open(f"http://127.0.0.1:{port}/health/readiness", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.1)
    status, body = _post_chat(port, master_key, model)
    if status != 200 or not json.loads(body).get("choices"):
        raise RuntimeError(f"first chat completion answered {status}: {body[:500]!r}")


@contextlib.contextmanager
def running_litellm(
    upstream_base_url: str,
    port: int,
    *,
    cpu: int | None,
    workdir: Path,
    master_key: str,
    model: str = "bench-model",
    upstream_model: str = "bench-up",
) -> Iterator[subprocess.Popen[bytes]]:
    """``start_litellm`` as a context manager that stops the proxy on exit."""
    proc = start_litellm(
        upstream_base_url,
        port,
        cpu=cpu,
        workdir=workdir,
        master_key=master_key,
        model=model,
        upstream_model=upstream_model,
    )
    try:
        yield proc
    finally:
        stop(proc)
