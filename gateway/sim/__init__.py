"""The vLLM simulator behind `gateway sim`: an OpenAI-compatible server with vLLM's prefix cache,
`cache_salt` validation, timing, queueing and metric names, plus endpoints that let tests inspect it
and inject faults.

    create_sim_app(SimConfig(...))  -> an ASGI app with a lifespan
    gateway.sim.cli.serve(config, host, port)  runs it under uvicorn (httptools, uvloop)
"""

from gateway.sim.app import SimApp, create_sim_app
from gateway.sim.config import SimConfig

__all__ = ["SimApp", "SimConfig", "create_sim_app"]
