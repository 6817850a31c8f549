"""Generation in PyTorch: chunked prefill, then one recurrent step per token.

For a linearized model the state has a fixed size, so memory does not grow with the number of
tokens; for a softmax model the same loop keeps a growing KV cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .model import ModelState, forward


@dataclass
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None

    def validate(self):
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0; got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; got {self.top_k}")
        return self


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    prefill_seconds: float
    decode_seconds: float
    state: ModelState | None = field(repr=False, default=None)
    stop_reason: str = "length"

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        # The first new token comes from the prefill's logits; each later one costs a step.
        steps = max(0, len(self.token_ids) - 1)
        return steps / self.decode_seconds if steps and self.decode_seconds > 0 else None


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token id from logits [V]."""
    if config.greedy:
        return int(logits.argmax())
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def prefill(model, prompt_ids: list[int], state: ModelState | None = None, chunk_size: int = 1024,
            progress=None):
    """Feed the prompt in chunks; returns (logits of the last token [V], state)."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    logits = None
    for start in range(0, len(prompt_ids), chunk_size):
        chunk = torch.tensor([prompt_ids[start : start + chunk_size]])
        logits, state = forward(model, chunk, state, last_logits_only=True)
        if progress is not None:
            progress(chunk.shape[1])
    return logits[0, -1], state


@torch.inference_mode()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
             stop_token_ids=(), state: ModelState | None = None, prefill_chunk_size: int = 1024,
             on_token=None) -> GenerationResult:
    """Continue ``prompt_ids``. ``on_token(token_id)`` is called for each new token (streaming)."""
    sampling = (sampling or SamplingConfig()).validate()
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    t0 = time.perf_counter()
    logits, state = prefill(model, prompt_ids, state, prefill_chunk_size)
    t1 = time.perf_counter()
    tokens, reason = [], "length"
    stop = set(stop_token_ids)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop:
            reason = "stop"
            break
        if i + 1 < max_new_tokens:
            logits, state = forward(model, torch.tensor([[token]]), state)
            logits = logits[0, -1]
    t2 = time.perf_counter()
    return GenerationResult(list(prompt_ids), tokens, t1 - t0, t2 - t1, state, reason)
