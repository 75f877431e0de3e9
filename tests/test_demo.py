"""`gateway demo` as a new user meets it: a real process with its default ports taken, the snippet and the
commands it prints, the README's commands, `--load`, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.demo._sim import serves_model
from tests.support.procs import ROOT, free_port
from tests.support.sim import start_sim

BANNER_END = "Ctrl-C stops the gateway and the simulator."


class DemoProc:
    """`python -m gateway demo` in its own session (so a test can Ctrl-C it as a terminal would)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.out_path = tmp_path / "demo.out"
        self.err_path = tmp_path / "demo.err"
        self.state_dir = tmp_path / "state"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "gateway", "demo", "--state-dir", str(self.state_dir), *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.stdout()
            if text in out:
                return out
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} from the demo\n--- stdout\n{self.stdout()}\n--- stderr\n{self.stderr()}")

    def children(self) -> list[int]:
        pids: list[int] = []
        for task in Path(f"/proc/{self.popen.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def ctrl_c(self, *, whole_group: bool) -> int:
        """SIGINT as a terminal sends it (to the whole process group) or as `kill -INT` (the demo alone)."""
        if whole_group:
            os.killpg(self.popen.pid, signal.SIGINT)
        else:
            self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(30)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Any]:
    started: list[DemoProc] = []

    def start(*args: str) -> DemoProc:
        demo = DemoProc(tmp_path / f"demo{len(started)}", *args)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.kill()


class Banner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.url = _one(r"^  gateway +(http://\S+)", text)
        self.sim_url = _one(r"^  simulator +(http://\S+)", text)
        self.admin_key = _one(r"^  admin key +(sk-admin-\S+)", text)
        self.keys = dict(re.findall(r"^  (team-[ab]) .* key (sk-gw-\S+)$", text, re.M))
        self.snippet = text[text.index("from openai import OpenAI") : text.index("\nprint()\n") + len("\nprint()\n")]
        block = text[text.index("From another shell") :].split("\n\n")[1]
        self.shell = [line.strip() for line in block.splitlines()]

    def env(self) -> dict[str, str]:
        """The environment after the banner's `export` line, run by a real shell."""
        export = self.shell[0]
        assert export.startswith("export ")
        printed = subprocess.run(["bash", "-c", f"{export} && env -0"], capture_output=True, check=True).stdout
        return dict(item.split("=", 1) for item in printed.decode().split("\0") if "=" in item)


def _one(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.M)
    assert found, f"{pattern!r} not in:\n{text}"
    return found.group(1)


def _occupy(port: int) -> socket.socket | None:
    """Listen on `port` so the demo finds it taken; None if another process holds it already."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger there
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        assert exc.errno == errno.EADDRINUSE
        return None
    sock.listen()
    sock.setblocking(False)
    return sock


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_takes_free_ports_when_the_defaults_are_taken_and_serves_the_sdk(start_demo: Any) -> None:
    holders = [_occupy(8080), _occupy(8000)]
    try:
        demo = start_demo()
        banner = Banner(demo.wait_for(BANNER_END))
        assert _port(banner.url) != 8080
        assert _port(banner.sim_url) != 8000
        assert "8080 is in use, so the demo took" in banner.text
        # What answers at the simulator's address is the demo's own child, started for this run.
        children = demo.children()
        assert len(children) == 1
        cmdline = Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--port") + 1] == str(_port(banner.sim_url)).encode()
        run_model = next(arg for arg in cmdline if arg.startswith(b"demo-")).decode()
        assert serves_model(banner.sim_url, run_model) is True
        assert f'url: "{banner.sim_url}"' in (demo.state_dir / "gateway.yaml").read_text()

        # The snippet as printed, pasted into Python: an answer, the rate-limit headers, a stream.
        pasted = subprocess.run([sys.executable, "-c", banner.snippet], capture_output=True, text=True, timeout=60)
        assert pasted.returncode == 0, pasted.stderr
        assert "requests left this minute: 1199" in pasted.stdout
        assert pasted.stdout.count("tok0") == 2

        client = openai.OpenAI(base_url=banner.url + "/v1", api_key=banner.keys["team-b"], max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.headers["x-ratelimit-limit-requests"] == "180"
        assert reply.headers["x-ratelimit-limit-tokens"] == "100000"

        assert demo.ctrl_c(whole_group=True) == 0
        assert "Stopped the gateway and the simulator." in demo.stdout()
        assert not [pid for pid in children if _alive(pid)]
        with pytest.raises(httpx.ConnectError):
            httpx.get(banner.url + "/livez")
    finally:
        for holder in holders:
            if holder is not None:
                holder.close()


def _readme_commands() -> list[str]:
    """The README's shell commands that talk to a running gateway: curl and the admin CLI."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith(("curl ", "gateway tenants ", "gateway keys ")):
                commands.append(command)
    return commands


def test_the_commands_printed_and_in_the_readme_work_against_the_demo(start_demo: Any) -> None:
    demo = start_demo()
    banner = Banner(demo.wait_for(BANNER_END))
    env = banner.env()

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        assert '"error"' not in done.stdout, f"{command}\n{done.stdout}"
        return done.stdout

    for command in banner.shell[1:]:
        run(command)
    assert re.search(r"^team-a +Team A +7(\.0)? ", run("gateway tenants list"), re.M)  # the weight the banner set

    readme = _readme_commands()
    assert any(c.startswith("curl ") for c in readme) and any(c.startswith("gateway tenants create") for c in readme)
    made: dict[str, str] = {}
    for command in readme:
        out = run(command.replace("key_...", made.get("key id", "key_...")))
        made.update(re.findall(r"^(key id|secret): (\S+)$", out, re.M))
    assert made["secret"].startswith("sk-gw-")

    # The tenant the README's CLI lines made can use the model the demo serves, with the key they made.
    client = openai.OpenAI(base_url=banner.url + "/v1", api_key=made["secret"], max_retries=0)
    answer = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    assert demo.ctrl_c(whole_group=True) == 0


def test_load_shows_shares_by_weight_and_429s_for_the_limited_tenant(start_demo: Any) -> None:
    demo = start_demo("--load", "--load-seconds", "25")
    banner = Banner(demo.wait_for(BANNER_END))
    out = demo.wait_for("Load done", timeout=120)
    assert re.search(r"^\[ *\d+s\] team-a .*req/s .*share .*entitled to 75%", out, re.M)
    summary = out[out.index("Load done") :]
    assert re.search(r"team-b .*429s: \d+ \(.*queue_full \d+", summary)
    assert re.search(r"team-a .*429s: none", summary)

    stats = httpx.get(banner.url + "/admin/stats", headers={"Authorization": f"Bearer {banner.admin_key}"}).json()
    tenants = {t["id"]: t for t in stats["tenants"]}
    assert tenants["team-b"]["rejections"].get("queue_full", 0) > 0
    assert not tenants["team-a"]["rejections"]

    def service(tenant: str) -> int:
        tokens = tenants[tenant]["tokens"]
        return int(tokens["prompt"] + 2 * tokens["completion"])

    # Weights 3:1 with both tenants backlogged; loose bounds, this is a smoke test and not a benchmark.
    assert 2.0 <= service("team-a") / service("team-b") <= 4.5

    children = demo.children()
    assert children
    assert demo.ctrl_c(whole_group=False) == 0  # the demo alone: it must stop the simulator itself
    assert not [pid for pid in children if _alive(pid)]


@pytest.mark.parametrize("flag", ["--port", "--sim-port"])
def test_a_named_port_in_use_is_refused_before_anything_starts(start_demo: Any, flag: str) -> None:
    holder = _occupy(free_port())
    assert holder is not None
    try:
        demo = start_demo(flag, str(holder.getsockname()[1]))
        assert demo.popen.wait(30) == 2
        assert demo.stdout() == ""
        assert f"in use by another process; pick another with {flag}" in demo.stderr()
    finally:
        holder.close()


def test_a_state_dir_with_files_the_demo_did_not_write_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    demo = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--state-dir", str(mine)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert demo.returncode == 2
    assert demo.stdout == ""
    assert "choose another with --state-dir" in demo.stderr
    assert (mine / "notes.txt").read_text() == "keep me"


def test_the_simulator_is_recognised_by_the_model_id_of_this_run(tmp_path: Path) -> None:
    ours = start_sim("--model", "sim-model", "--model", "demo-0123", log_dir=tmp_path)
    try:
        assert serves_model(ours.url, "demo-0123") is True
        assert serves_model(ours.url, "demo-4567") is False  # another run's, or another server: not ours
    finally:
        ours.stop()
    assert serves_model(ours.url, "demo-0123") is None  # nothing answers there now


def test_ctrl_c_while_the_simulator_starts_leaves_no_child(start_demo: Any) -> None:
    demo = start_demo()
    children: list[int] = []
    while not children:  # the simulator takes a second or more to import and listen: Ctrl-C lands meanwhile
        assert demo.popen.poll() is None, demo.stderr()
        children = demo.children()
        time.sleep(0.01)
    assert demo.ctrl_c(whole_group=False) == 0
    assert BANNER_END not in demo.stdout()
    assert not [pid for pid in children if _alive(pid)]
