"""Admission: whether a request may go to a backend now, where, and what it holds while it runs.

controller.py   Admission: quotas, the on_limit policy, backend choice, the fair queue, settlement
fairqueue.py    the fair queue of one backend: priority bands, weighted VTC, bounded waits
limits/         quota state: rpm, tpm, concurrency, budgets (Redis Lua scripts, in-process twin)
tokens.py       prompt token estimates from the text a model reads
"""

from gateway.admission.controller import Admission, Placement, format_reset, rate_headers

__all__ = ["Admission", "Placement", "format_reset", "rate_headers"]
