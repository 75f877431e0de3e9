"""What one request makes the engine process: the prompt tokens it reads, and the most it can generate.

Admission reserves tokens (tpm, in-flight tokens, the budget, the fair queue's charge) before a request
runs and corrects them with the backend's usage when it ends. `resolve_demand` says what to reserve, read
the way vLLM's OpenAI server reads the request (`ChatCompletionRequest`, `CompletionRequest` and
`ResponsesRequest` in vllm/entrypoints/openai/*/protocol.py and `get_max_tokens` in
vllm/entrypoints/utils.py, as of vLLM's 2026 main branch; `best_of` as vLLM 0.10 had it):

Output limit of one sequence
- chat: `max_completion_tokens` when set, else `max_tokens`, whatever their values. vLLM honours an
  explicit limit or refuses the request (400 when the prompt plus the limit exceed the context); it never
  lowers it. A limit that alone reaches the model's `context_length` is refused here.
- completions: `max_tokens`; 16 when the field is left out, none when it is `null`. With `echo`,
  `max_tokens: 0` returns the prompt and generates one token.
- responses: `max_output_tokens`, which vLLM lowers to what the prompt leaves of the context.
- embeddings: nothing is generated.
- no limit: vLLM generates up to the end of the context. The model's `max_output_tokens` (else
  `limits.default_max_tokens`) is reserved instead, at most what the prompt leaves of `context_length`:
  the server stops there (vLLM's generation config), or the gateway makes it (see Injection).

What multiplies it
- `n`: n sequences per prompt, each up to the limit. The prompt is read once: they share its prefill and
  vLLM reports it once.
- `best_of`: vLLM's V0 engine generated best_of sequences and returned the n best, so max(n, best_of)
  are reserved; vLLM's V1 engine ignores the field, and the excess comes back when the request ends.
- `use_beam_search`: n beams (best_of in V0), each decoded for exactly the limit: beam search keeps the
  best beams going after one of them ends.
- completions `prompt` as a list of strings or of token-id lists: a batch. Every prompt is its own engine
  request with its own n sequences and its own share of the context. Embeddings `input` as a list: every
  input is read.

What changes nothing here: `echo` on chat (the answer repeats the last message; nothing more is generated)
and on completions (the prompt comes back as text, not as generated tokens); `prompt_logprobs` (the same
prompt tokens, computed without the prefix cache); `logprobs`, `top_logprobs`, `min_tokens`, `ignore_eos`
(the bound is the same limit); `stream`. `truncate_prompt_tokens` makes vLLM read less, but other backends
ignore it, so prompts are not reserved lower for it. A response that calls vLLM's built-in tools runs one
generation per call, each bounded by the same limit; admission sees the first.

Injection: with `inject_max_tokens`, a request that sets no limit is sent with the default written in
(`Demand.inject`), so the engine stops there. An engine answers 400 to a prompt plus limit beyond its
context, and the prompt's length here is an estimate: the default is written only when the prompt could be
twice its estimate and still leave room for it. A longer prompt goes without, and the engine may then run
to the end of its context, which is what is reserved.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.admission.tokens import TokenCounter, prompt_tokens
from gateway.config import LimitsConfig, ModelConfig
from gateway.errors import BadRequestError
from gateway.requests import INPUT_FIELD, OUTPUT_CAP_FACTOR, ParsedRequest, check_output_total

__all__ = ["INJECT_MARGIN", "Demand", "resolve_demand"]

#: The default is injected only if the prompt could be this many times its estimate and still fit with it.
INJECT_MARGIN = 2
# Where each endpoint reads its output limit; the field a default is injected as.
_INJECT_FIELD = {"chat": "max_completion_tokens", "completions": "max_tokens", "responses": "max_output_tokens"}


class Demand(NamedTuple):
    """What the engine will process for one request, at most: reserve it at admission, settle the usage.

    Immutable like a frozen dataclass, and several times cheaper to build, once per request."""

    prompt_tokens: int
    """Estimated tokens of every prompt the engine reads (a batch: their sum), each read once."""
    output_tokens: int
    """The most the engine can generate: every sequence of every prompt at its limit."""
    prompts: int
    """Prompts the engine reads: a completions batch's, an embeddings request's inputs; 1 otherwise."""
    sequences: int
    """Sequences generated per prompt (`n`, `best_of`, beams); 0 for embeddings."""
    max_tokens_per_sequence: int
    """The largest limit of one sequence (a batch's prompts may leave different room in the context)."""
    inject: dict[str, int] | None
    """Fields to set in the body sent to the backend so the engine stops at the default; None: send as is."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def resolve_demand(request: ParsedRequest, model: ModelConfig, limits: LimitsConfig, counter: TokenCounter) -> Demand:
    """The demand of a request `parse_request` accepted, sent to `model`.

    Raises `BadRequestError` (400, naming the field) for a limit the engine would refuse whatever the
    prompt, and for a request whose sequences together could generate more than the gateway allows.
    """
    endpoint = request.endpoint
    if endpoint == "embeddings":
        # Nothing is generated, so no input's own length matters: one estimate over all of them.
        return Demand(prompt_tokens(endpoint, request.body, counter), 0, request.prompts, 0, 0, None)
    lengths = _prompt_lengths(request, counter)
    prompt = sum(lengths)
    sequences = 1 if endpoint == "responses" else max(request.n, request.best_of or 1)
    context = model.context_length
    limit = request.max_tokens
    inject: dict[str, int] | None = None
    to_context = False  # only the context bounds the output
    if limit is not None:
        if request.echo and limit == 0:
            limit = 1  # vLLM generates one token and returns the prompt alone
        if context is not None and endpoint == "responses":
            per_prompt = [min(limit, _room(context, length)) for length in lengths]
        elif context is not None and limit >= context:
            param = request.max_tokens_param or "max_tokens"
            raise BadRequestError(
                f"'{param}' is {limit}, but model {model.name} holds {context} tokens, prompt included.",
                param=param,
            )
        else:
            per_prompt = [limit] * len(lengths)
    else:
        default = model.max_output_tokens or limits.default_max_tokens
        if context is None:
            per_prompt = [default] * len(lengths)
        elif model.inject_max_tokens and all(INJECT_MARGIN * length + default <= context for length in lengths):
            per_prompt = [default] * len(lengths)
            inject = {_INJECT_FIELD[endpoint]: default}
        elif model.inject_max_tokens:
            # Too long a prompt to inject safely: only the context bounds what the engine generates.
            per_prompt = [_room(context, length) for length in lengths]
            to_context = True
        else:
            per_prompt = [min(default, _room(context, length)) for length in lengths]
    most = max(per_prompt)
    if len(lengths) * sequences * most > limits.max_tokens_cap * OUTPUT_CAP_FACTOR:
        if limit is not None:
            label = request.max_tokens_param or "max_tokens"
        elif to_context:
            label = f"what the prompt leaves of {model.name}'s context"
        else:
            label = f"{model.name}'s default output limit"
        sequences_param = "n" if sequences == request.n else "best_of"
        field = INPUT_FIELD[endpoint]
        check_output_total(most, label, sequences, sequences_param, len(lengths), field, limits.max_tokens_cap)
    return Demand(prompt, sequences * sum(per_prompt), len(lengths), sequences, most, inject)


def _room(context: int, prompt: int) -> int:
    """What the prompt leaves of the context: the most one sequence can generate (at least 1)."""
    return max(1, context - prompt)


def _prompt_lengths(request: ParsedRequest, counter: TokenCounter) -> list[int]:
    """Each prompt's estimated tokens: one for a single prompt, one per prompt of a completions batch (each
    has its own room in the context)."""
    if request.prompts == 1:
        return [prompt_tokens(request.endpoint, request.body, counter)]
    # parse_request let a batch through only as strings or non-empty token-id lists.
    batch = request.body[INPUT_FIELD[request.endpoint]]
    return [max(1, counter.count(item)) if isinstance(item, str) else len(item) for item in batch]
