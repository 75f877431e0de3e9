"""Start the gateway as a real process (`python -m gateway serve`) from a config dict, on a free port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import Proc, free_port, python_cmd, wait_http


class GatewayProc:
    def __init__(self, proc: Proc, port: int, admin_key: str, config_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin_key = admin_key
        self.config_path = config_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        return self.proc.stop()

    def output(self) -> str:
        return self.proc.output()


def start_gateway(
    config: dict[str, Any],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    admin_key: str = "sk-admin-test-0123456789",
    wait: bool = True,
    extra_args: tuple[str, ...] = (),
    wrap: tuple[str, ...] = (),
) -> GatewayProc:
    """`wrap` is a command the gateway's command line is appended to (e.g. `unshare ...`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"state_path": str(workdir / "state.db"), **config, "listen": {"host": "127.0.0.1", "port": port}}
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    full_env = {
        "GATEWAY_ADMIN_KEY": admin_key,
        "GATEWAY_SALT_SECRET": "test-salt-secret-0123456789abcdef",
        **(env or {}),
    }
    command = [*wrap, *python_cmd("serve", "--config", str(config_path), *extra_args)]
    proc = Proc(command, workdir / "gateway.log", full_env)
    proc.start()
    if wait:
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, proc=proc.popen)
        except Exception:
            proc.kill()
            raise RuntimeError("gateway did not become ready:\n" + proc.output()) from None
    return GatewayProc(proc, port, admin_key, config_path)
