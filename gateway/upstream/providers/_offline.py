"""Loading litellm without the network: where its package data lies, the settings that keep it offline, and
the one function that imports it.

litellm does network and file work of its own unless told otherwise, and every one of these was seen in
the pinned release (1.104.9):

- at import it fetches its model price map from GitHub (`LITELLM_LOCAL_MODEL_COST_MAP=True` makes it read
  the copy bundled in the package);
- at import, in its default "DEV" mode, it loads a `.env` file from the working directory into the
  process environment (`LITELLM_MODE=PRODUCTION` stops that: the gateway reads its settings once, itself);
- on its first completion it loads tiktoken's cl100k_base, which tiktoken downloads unless
  `TIKTOKEN_CACHE_DIR` points at a copy (litellm ships one; the gateway checks its hash first, so a
  missing or altered file can never turn into a download);
- huggingface_hub (a dependency) phones home unless `HF_HUB_OFFLINE` / `HF_HUB_DISABLE_TELEMETRY` are set;
- optional native (Rust) paths would open sockets Python cannot audit; `LITELLM_RUST=false` keeps every
  call on the Python path, where the tests' network guard sees each connection.

Nothing here runs at import time: `import_litellm()` is called only when a `kind: litellm` backend is
configured, so a gateway with only vLLM backends never loads litellm (a test checks `sys.modules`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import resource
import time
from pathlib import Path
from types import ModuleType

__all__ = ["CL100K_SHA256", "cl100k_file", "import_litellm", "litellm_dir", "offline_environment"]

log = logging.getLogger("gateway.upstream.providers")

# tiktoken's own expected hash for cl100k_base (tiktoken_ext/openai_public.py), which litellm bundles under
# tiktoken's cache name: sha1 of the file's URL.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_CACHE_NAME = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
_TOKENIZERS = ("litellm_core_utils", "tokenizers")

_verified: dict[Path, bool] = {}


def litellm_dir() -> Path | None:
    """The installed litellm package's directory, found without importing it (None: not installed)."""
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cl100k_file() -> Path | None:
    """litellm's bundled copy of tiktoken's cl100k_base, if installed and intact (checked once)."""
    root = litellm_dir()
    if root is None:
        return None
    path = root.joinpath(*_TOKENIZERS, _CL100K_CACHE_NAME)
    ok = _verified.get(path)
    if ok is None:
        try:
            ok = hashlib.sha256(path.read_bytes()).hexdigest() == CL100K_SHA256
        except OSError:
            ok = False
        if not ok:
            log.warning("litellm's bundled cl100k_base is missing or altered (%s); not using it", path)
        _verified[path] = ok
    return path if ok else None


def offline_environment() -> dict[str, str]:
    """The environment settings that keep litellm and its dependencies off the network."""
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_RUST": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    tokens = cl100k_file()
    if tokens is not None:
        env["TIKTOKEN_CACHE_DIR"] = str(tokens.parent)
    return env


def import_litellm() -> ModuleType:
    """Import litellm offline and quiet: no price-map fetch, no `.env`, no callbacks, no retries.

    Settings are forced, not defaulted: an environment asking litellm to fetch or phone home does not
    get to, since the gateway promises no network beyond its backends.
    """
    env = offline_environment()
    if "TIKTOKEN_CACHE_DIR" not in env:
        # litellm would point tiktoken at this copy anyway, and tiktoken would download a missing one.
        raise RuntimeError("litellm's bundled cl100k_base tokenizer file is missing or altered; reinstall litellm")
    os.environ.update(env)
    started = time.perf_counter()
    rss_before = _max_rss_mb()
    import litellm

    # No logging callbacks or telemetry of litellm's: metering, billing and traces are the gateway's.
    for name in ("callbacks", "success_callback", "failure_callback", "input_callback", "service_callback"):
        setattr(litellm, name, [])
    litellm.suppress_debug_info = True
    litellm.turn_off_message_logging = True
    litellm.drop_params = False
    litellm.num_retries = 0
    # litellm logs every call at INFO, with a handler of its own; the gateway logs what matters itself.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Load the tokenizer litellm uses on its first call now, at start-up, from the verified local copy.
    _ = litellm.encoding
    log.info(
        "litellm %s loaded offline in %.0f ms (peak RSS +%.0f MB)",
        importlib.metadata.version("litellm"),
        (time.perf_counter() - started) * 1000,
        _max_rss_mb() - rss_before,
    )
    module: ModuleType = litellm
    return module


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
