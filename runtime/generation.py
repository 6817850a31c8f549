"""The generation loop both engines share: chunked prefill, sampling, stop strings / EOS, streaming
text, timings and memory. An engine is anything with ``empty_state()`` and
``run(tokens, state) -> (logits [B, V] of the last token, state)`` (state updated in place).
"""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

import numpy as np

from .sampling import Sampler


class large_allocations_unmapped_when_freed:
    """Within this context, glibc gives every allocation above 128 KiB its own mapping, returned to
    the system when freed; after it, large blocks come from the heap and are reused.

    A loader's large temporaries (dequantized parts, joined and transposed matrices) are freed
    once: left to glibc's adaptive threshold they land in the heap and stay resident. Compute
    reuses its temporaries every token: mapping each afresh costs page faults (prefill 417 -> 222
    tok/s when the low threshold stayed). Measured on the shipped model's q8_0 GGUF (docs/BENCHMARKS.md).
    Elsewhere than glibc this does nothing."""

    LOW, HIGH = 128 * 1024, 32 * 1024 * 1024  # glibc's initial threshold and its adaptive maximum
    M_MMAP_THRESHOLD = -3

    def __enter__(self):
        self._set(self.LOW)

    def __exit__(self, *exc):
        self._set(self.HIGH)

    def _set(self, value: int):
        import ctypes
        import ctypes.util

        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(self.M_MMAP_THRESHOLD, value)
        except (OSError, AttributeError):
            pass


def peak_rss_mb() -> float:
    """This process's peak resident memory so far. On Linux its address space's high-water mark
    (VmHWM): ``getrusage``'s ru_maxrss survives exec, so a process started by a large parent
    would report at least the parent's memory at the fork (a benchmark worker spawned by a 400 MB
    parent read 435 MB whatever it ran)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux and BSD


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


@dataclass
class Stats:
    """Figures of one call: prefill of the new input, then decoding."""
    prompt_tokens: int = 0
    new_tokens: int = 0
    context_tokens: int = 0  # position after the call
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    state_bytes: int = 0
    peak_rss_mb: float = 0.0
    stop_reason: str | None = None  # "length", "eos", "stop_string"

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_seconds if self.prompt_tokens and self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        # the first new token comes from the prefill's logits; each later one costs one step
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


class TextStream:
    """Token ids in, new text out, without re-decoding everything: a token is shown once the text
    it ends decodes to whole characters (byte-level BPE splits some characters over tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        rest = self.tokenizer.decode(self.ids[self.prefix :])[len(before) :]
        self.prefix = self.read = len(self.ids)
        return rest


class StopStrings:
    """Finds the first stop string in the generated text; holds back a tail that might still
    become one, so a streamed stop string is never shown."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.shown = 0

    def add(self, piece: str) -> tuple[str, bool]:
        """(text now safe to show, whether a stop string was hit)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._show(len(self.text)), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._show(len(self.text) - hold), False

    def finish(self) -> str:
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        piece = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece


# tokens per prefill block, unless the engine says (``engine.prefill_chunk``: the compiled and ONNX
# engines take 256): the numpy engine's block step costs O(T (W + T)), and on 2 cores it was fastest
# at 128 (230 vs 171 tok/s at 512; docs/BENCHMARKS.md), with less memory
PREFILL_CHUNK = 128


def prefill_chunk(engine) -> int:
    return getattr(engine, "prefill_chunk", PREFILL_CHUNK)


def prefill(engine, tokens, state, chunk_size: int | None = None, progress: bool = False):
    """Feed ``tokens`` in chunks (the engine's size unless given; a progress bar on long inputs);
    returns the last logits [V]."""
    chunk_size = prefill_chunk(engine) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"prefill chunk size must be >= 1; got {chunk_size}")
    bar = None
    if progress and len(tokens) > chunk_size:
        from tqdm import tqdm

        bar = tqdm(total=len(tokens), unit="tok", desc="prefill", leave=False)
    logits = None
    try:
        for start in range(0, len(tokens), chunk_size):
            chunk = tokens[start : start + chunk_size]
            logits, state = engine.run(chunk, state)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return logits[0]


def decode_loop(engine, state, logits, *, pending=(), tokenizer, max_new_tokens: int, sampler: Sampler, history: list,
                stop_strings=(), stop_token_ids=(), on_text=None, penalty_window: int = 1024):
    """Sample up to ``max_new_tokens`` from ``logits`` on; returns (token ids, text, stop reason,
    pending token ids not yet fed to the state, last logits). ``history`` (ids so far) is extended.
    ``pending``: tokens sampled by an earlier call and not yet fed; they go in first. The last
    sampled token is left pending, so a later call can continue exactly."""
    stream, stops = TextStream(tokenizer), StopStrings(stop_strings)
    eos = set(stop_token_ids)
    tokens, pending, reason = [], list(pending), "length"
    for _ in range(max_new_tokens):
        if pending:
            logits, state = engine.run(pending, state)
            logits = logits[0]
            pending = []
        token = sampler(logits, history[-penalty_window:])
        tokens.append(token)
        history.append(token)
        pending = [token]
        if token in eos:
            reason = "eos"
            break
        shown, hit = stops.add(stream.push(token))
        if shown and on_text is not None:
            on_text(shown)
        if hit:
            reason = "stop_string"
            break
    if reason != "stop_string":
        shown, hit = stops.add(stream.flush())
        tail = shown + ("" if hit else stops.finish())
        if hit:
            reason = "stop_string"
        if tail and on_text is not None:
            on_text(tail)
    return tokens, stops.text, reason, pending, logits


def greedy_tokens(engine, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (no stop): for parity checks."""
    state = engine.empty_state()
    logits, state = engine.run(prompt_ids, state)
    out = []
    for _ in range(max_new_tokens):
        out.append(int(np.argmax(logits[0])))
        logits, state = engine.run(out[-1:], state)
    return out
