"""Choosing the next token from logits, in numpy: greedy, temperature, top-k, top-p, repetition
penalty, seeded. One sampler for both engines."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    pass


@dataclass
class Sampling:
    """``temperature`` 0 means greedy (argmax); the other filters apply only when sampling, except
    the repetition penalty, which reshapes the logits for greedy decoding too."""
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the context
    seed: int | None = None

    def __post_init__(self):
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise SamplingError(f"{name} must be a finite number; got {value!r}")
            return value

        if number("temperature") < 0:
            raise SamplingError(f"temperature must be >= 0 (0: greedy); got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0: off); got {self.top_k!r}")
        if not 0 < number("top_p") <= 1:
            raise SamplingError(f"top_p must be in (0, 1]; got {self.top_p}")
        if number("repetition_penalty") <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1: off); got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: Sampling | None = None):
        self.config = config or Sampling()
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray, context_ids=()) -> int:
        """One token id from ``logits`` [V]; ``context_ids`` feed the repetition penalty."""
        c = self.config
        logits = np.asarray(logits, dtype=np.float64).copy()
        if c.repetition_penalty != 1 and len(context_ids):
            # as in CTRL / transformers: divide positive logits, multiply negative ones
            seen = np.unique(np.asarray(context_ids, dtype=np.int64))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / c.repetition_penalty, values * c.repetition_penalty)
        if c.greedy:
            return int(logits.argmax())
        logits /= c.temperature
        if c.top_k and c.top_k < logits.size:
            kth = np.partition(logits, -c.top_k)[-c.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if c.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            drop = np.cumsum(sorted_probs) - sorted_probs >= c.top_p
            probs[order[drop]] = 0.0
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
