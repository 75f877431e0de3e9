"""A network and import guard for a child process, installed by putting this directory on PYTHONPATH.

Python imports `sitecustomize` at start-up; this one adds an audit hook (PEP 578) that, in the process it
runs in, refuses every connection and name lookup that is not for loopback, and records to the file named
by `NETGUARD_LOG` each refusal and each first import of litellm or tiktoken. Tests read that
file: a gateway that must stay offline, or never load litellm, is checked from inside the real process.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

_LOG = os.environ.get("NETGUARD_LOG")
_WATCHED = ("litellm", "tiktoken")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _record(line: str) -> None:
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(line + "\n")


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.connect":
        sock, address = args
        inet = getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple)
        if inet and not _is_loopback(address[0]):
            _record(f"connect {address[0]}:{address[1]}")
            raise OSError("network access outside loopback is blocked by the test guard")
    elif event == "socket.getaddrinfo":
        host = args[0]
        if host is not None and not _is_loopback(host):
            _record(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, "name lookups are blocked by the test guard")
    elif event == "import":
        name = args[0]
        if isinstance(name, str) and name in _WATCHED and name not in sys.modules:
            _record(f"import {name}")


if _LOG:
    sys.addaudithook(_hook)
