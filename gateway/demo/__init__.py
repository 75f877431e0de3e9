"""`gateway demo`: the simulator, the gateway and two demo tenants in one command; `--load` puts them to work.

`_run` is the order of things; `_scenario` the tenants, the engine's size and the load, with the
arithmetic that makes them show weighted fair sharing and 429s; `_ports` and `_sim` the ports and the
simulator child; `_banner` what is printed; `_load` the load and its live summary.
"""

from gateway.demo._run import DEFAULT_PORT, DemoOptions, run_demo

__all__ = ["DEFAULT_PORT", "DemoOptions", "run_demo"]
