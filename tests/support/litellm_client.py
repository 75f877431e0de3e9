"""litellm used as a *client* of the gateway (`litellm.completion` with the gateway as `api_base`), run as a
script by tests/test_compat.py in the providers venv. Prints one JSON line of what it saw.

Usage: python -m tests.support.litellm_client BASE_URL KEY LIMITED_KEY
"""

from __future__ import annotations

import json
import sys

from gateway.upstream.providers import import_litellm


def main() -> None:
    base_url, key, limited = sys.argv[1:4]
    litellm = import_litellm()  # offline: no price-map fetch, no telemetry
    messages = [{"role": "user", "content": "hello from litellm"}]
    out: dict[str, object] = {}
    reply = litellm.completion(
        model="openai/chat-model", api_base=base_url, api_key=key, messages=messages, max_tokens=5
    )
    out["content"] = reply.choices[0].message.content
    out["usage"] = reply.usage.completion_tokens
    chunks = litellm.completion(
        model="openai/chat-model", api_base=base_url, api_key=key, messages=messages, max_tokens=5, stream=True
    )
    out["stream"] = "".join(c.choices[0].delta.content or "" for c in chunks)
    try:
        litellm.completion(model="openai/chat-model", api_base=base_url, api_key="sk-gw-" + "0" * 43, messages=messages)
    except litellm.AuthenticationError as exc:
        out["bad_key"] = f"{type(exc).__name__} {exc.status_code}"
    try:
        litellm.completion(
            model="openai/chat-model", api_base=base_url, api_key=limited, messages=messages, max_retries=0
        )
    except litellm.RateLimitError as exc:
        out["limited"] = f"{type(exc).__name__} {exc.status_code}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
