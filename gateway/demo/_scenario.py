"""What the demo shows, in numbers: two tenants, an engine small enough to fill, and a load that fills it.

The simulator runs `SIM_CONCURRENCY` requests at once and the gateway lets that many through; the rest
wait in the gateway's fair queue, where the weights decide. A load request asks for `LOAD_MAX_TOKENS`
tokens, about half a second on the simulator (20 ms to the first token, then 10 ms a token), so the
engine serves about 8 requests a second in all. Under `--load`:

- team-a (weight 3) keeps `STEADY_IN_FLIGHT` requests open: always waiting, entitled to 3/4 (~6/s);
- team-b (weight 1) sends `NOISY_RATE` requests a second whatever the answers: entitled to 1/4 (~2/s).
  Its rpm (3/s) admits more than that share, so it stays backlogged and the shares follow the weights;
  what its queue cannot hold is refused at once (429 `queue_full`). A refusal reserves nothing, so its rpm
  is spent only by what it is served; `gateway tenants update team-b --rpm 60` shows rpm 429s as well.

The tenants are created over the admin API, not declared in the config, so `gateway tenants update`
and the console can change them while the demo runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOAD_MAX_TOKENS",
    "MODEL",
    "NOISY",
    "NOISY_RATE",
    "SIM_CONCURRENCY",
    "STEADY",
    "STEADY_IN_FLIGHT",
    "TENANTS",
    "DemoTenant",
]

MODEL = "demo-model"
SIM_CONCURRENCY = 4
LOAD_MAX_TOKENS = 48


@dataclass(frozen=True, slots=True)
class DemoTenant:
    id: str
    name: str
    weight: int
    limits: dict[str, int]
    budget: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        """The `POST /admin/tenants` body that creates it."""
        body: dict[str, Any] = {"id": self.id, "name": self.name, "weight": self.weight, "limits": self.limits}
        if self.budget is not None:
            body["budget"] = self.budget
        return body

    def describe(self) -> str:
        parts = [f"weight {self.weight}"] + [f"{name} {value}" for name, value in self.limits.items()]
        if self.budget is not None:
            parts.append(f"budget ${self.budget['amount']:g}/{self.budget['period']}")
        return ", ".join(parts)


STEADY = DemoTenant(
    "team-a",
    "Team A",
    weight=3,
    limits={"rpm": 1200, "tpm": 200_000},
    budget={"amount": 10, "period": "month"},
)
NOISY = DemoTenant("team-b", "Team B", weight=1, limits={"rpm": 180, "tpm": 100_000, "max_queue_depth": 8})
TENANTS = (STEADY, NOISY)

STEADY_IN_FLIGHT = 8
NOISY_RATE = 16.0
