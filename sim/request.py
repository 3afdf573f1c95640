"""One inference request and its progress, shared by the simulator and the live engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

NAN = math.nan


@dataclass(slots=True, eq=False)
class Request:
    """A request as the schedulers see it.

    Token bookkeeping follows a real engine: the prefill pass computes the prompt's KV cache and
    produces the first output token; each decode step feeds the newest token (adding it to the
    cache) and produces the next one. So while a request runs, its cache holds
    `prompt_tokens + generated - 1` tokens.
    """

    id: int
    arrived_at: float
    prompt_tokens: int
    output_tokens: int
    prompt_key: int = -1  # equal keys mean identical prompts (response cache); -1: unique
    prefix_id: int = -1  # requests sharing a prefix id share its first prefix_tokens (prefix cache)
    prefix_tokens: int = 0

    generated: int = 0  # output tokens produced so far
    prefilled: int = 0  # tokens of the current (re)prefill already computed (chunked prefill)
    scheduled_at: float = NAN  # first time the request entered a forward pass
    first_token_at: float = NAN
    finished_at: float = NAN
    preemptions: int = 0
    prefix_cached_tokens: int = 0  # of its (last) prefill, found in the prefix cache and not computed
    worker: int = -1
    cache_hit: bool = False
    rejected: str = ""  # why it was refused, if it was
    finish_step: int = 0  # continuous scheduler: decode step at which it finishes

    @property
    def cached_tokens(self) -> int:
        """Tokens in the KV cache while the request is decoding."""
        return self.prompt_tokens + self.generated - 1

    @property
    def prefill_need(self) -> int:
        """Tokens a (re)prefill must process: the prompt, plus any tokens generated before a
        recompute-style preemption threw the cache away."""
        return self.prompt_tokens + self.generated

    @property
    def done(self) -> bool:
        return self.generated >= self.output_tokens
