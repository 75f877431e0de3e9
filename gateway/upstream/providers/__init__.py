"""Hosted providers (Anthropic, OpenAI, Bedrock, ...) as `kind: litellm` backends, through litellm.

    _offline.py   where litellm's package data lies, the settings that keep it off the network, the import
    _litellm.py   `LitellmPool`: a `kind: litellm` backend behind the `httpclient.Pool` interface
    _prices.py    prices of hosted models from litellm's bundled price map (the config's price wins)

Importing this package imports no litellm: `import_litellm()` does, and the app calls it only when a
`kind: litellm` backend is configured.
"""

from gateway.upstream.providers._litellm import LitellmPool, ProviderResponse
from gateway.upstream.providers._offline import cl100k_file, import_litellm, litellm_dir, offline_environment
from gateway.upstream.providers._prices import bundled_prices

__all__ = [
    "LitellmPool",
    "ProviderResponse",
    "bundled_prices",
    "cl100k_file",
    "import_litellm",
    "litellm_dir",
    "offline_environment",
]
