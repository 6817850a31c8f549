"""The runtime's Python API: load a GGUF file or an ONNX folder in one call, generate (streaming or
not), chat with the model's template, save and restore the state. No torch.

    from edge_lolcats.runtime import load

    model = load("smol.q8_0.gguf")            # or an ONNX export folder
    print(model.generate("The capital of France is", max_new_tokens=16))
    reply = model.chat([{"role": "user", "content": "Name three colors."}], on_text=print)

    session = model.session()                 # a conversation that keeps its fixed-size state
    session.feed(open("book.txt").read())     # chunked prefill, any length
    answer = session.generate(max_new_tokens=64, stop=["\\n\\n"])
    session.save("book.state")                # a few MB, whatever the length of the book
    later = model.restore("book.state")       # continues exactly where `session` stopped
    print(session.stats.decode_tokens_per_s, session.stats.peak_rss_mb)
"""
from __future__ import annotations

import os
import time

import numpy as np

from edge_lolcats.arch.ops import ACTIVATIONS
from edge_lolcats.formats.gguf_io import ModelFileError
from .generation import Stats, current_rss_mb, decode_loop, peak_rss_mb, prefill
from .sampling import Sampler, Sampling
from .state import StateFileError, load_state_file, save_state_file


HISTORY_TOKENS = 4096  # recent ids a session keeps (and saves) for the repetition penalty


# how a GGUF file runs: compiled code over the stored weights (the default), or the numpy reference
# with its weights dequantized to float32 ("numpy") or q8_0 kept as stored ("numpy-stored", slow)
GGUF_ENGINES = ("compiled", "numpy", "numpy-stored")


def open_engine(path: str, threads: int | None = None, gguf_engine: str = "compiled", activations: str = "q8_0"):
    """The engine for ``path``: a ``.gguf`` file (``gguf_engine``, one of :data:`GGUF_ENGINES`)
    or an ONNX export folder (onnxruntime). ``threads``: compute threads (default: all cores).
    ``activations``: how a GGUF file's products with q8_0 / q4_0 weights take their input, "q8_0"
    (quantized, the model definition's, as llama.cpp) or "float32" (an ONNX export fixes this when
    it is exported)."""
    if gguf_engine not in GGUF_ENGINES:
        raise ValueError(f"gguf_engine must be one of {', '.join(GGUF_ENGINES)}; got {gguf_engine!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}")
    if os.path.isdir(path):
        if activations != "q8_0":
            raise ValueError(f"{path}: an ONNX export's activations are fixed when it is exported "
                             f"(MatMulNBits' accuracy level); --activations is for GGUF files")
        from .onnx_engine import OnnxEngine

        return OnnxEngine(path, threads=threads)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file or folder (expected a lolcats .gguf file or an ONNX export folder)")
    if gguf_engine == "compiled":
        try:
            from .compiled_engine import CompiledEngine
        except ImportError as e:  # numba missing or broken on this platform: the reference still runs
            import sys

            print(f"warning: the compiled engine is unavailable ({e}); running the numpy engine (much slower)",
                  file=sys.stderr)
        else:
            return CompiledEngine(path, threads=threads, activations=activations)
    from .numpy_engine import GGUFEngine

    return GGUFEngine(path, weights="stored" if gguf_engine == "numpy-stored" else "float32", activations=activations)


class Model:
    """A linearized model on one of the runtime's engines, with its tokenizer and chat template."""

    def __init__(self, engine, path: str):
        self.engine, self.path = engine, path
        self.tokenizer = engine.tokenizer

    @property
    def state_bytes(self) -> int:
        """Bytes of the recurrent state: the same at any context length."""
        return self.engine.state_bytes

    def session(self) -> "Session":
        return Session(self)

    def generate(self, prompt: str, max_new_tokens: int = 128, *, on_text=None, **options) -> str:
        """Continue ``prompt`` (plain text); ``on_text(piece)`` streams. Options as in
        :meth:`Session.generate`. Returns the new text."""
        session = self.session()
        session.feed(prompt)
        return session.generate(max_new_tokens, on_text=on_text, **options)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, *, on_text=None, **options) -> str:
        """Answer a conversation (``[{"role": "user", "content": ...}, ...]``) with the model's chat
        template; stops at the end-of-turn token."""
        session = self.session()
        session.feed(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return session.generate(max_new_tokens, on_text=on_text, **options)

    def restore(self, path: str) -> "Session":
        """A session resumed from a state file written by :meth:`Session.save` on this model."""
        return Session.load(self, path)


class Session:
    """A fixed-size recurrent state plus what is needed to continue it exactly: the tokens sampled
    but not yet fed, the last logits, the sampler's random state and the recent token ids."""

    def __init__(self, model: Model):
        self.model, self.engine = model, model.engine
        self.state = self.engine.empty_state()
        self.logits = None  # next-token logits after everything fed so far
        self.pending: list[int] = []  # sampled, not yet run through the model
        self.history: list[int] = []  # recent token ids (for the repetition penalty)
        self.rng_state = None
        self.stats = Stats(state_bytes=self.engine.state_bytes)

    @property
    def position(self) -> int:
        """Tokens in the context so far (including a pending one)."""
        return self.state.position + len(self.pending)

    def feed(self, text_or_ids, *, chunk_size: int | None = None, progress: bool = False) -> "Session":
        """Add text (or token ids) to the context: chunked prefill (the engine's chunk size unless
        given), no length limit."""
        if isinstance(text_or_ids, str):
            if not text_or_ids:
                raise ValueError("empty prompt")
            # in pieces, as int32: memory stays flat however long the text (see encode_long)
            ids = self.model.tokenizer.encode_long(text_or_ids, add_special_tokens=self.position == 0)
        else:
            ids = np.asarray(text_or_ids)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError("token ids must be a flat sequence of integers")
        if not ids.size:
            raise ValueError("empty prompt")
        vocab = self.model.tokenizer.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        ids = np.concatenate([np.asarray(self.pending, np.int64), ids.astype(np.int64)])
        t0 = time.perf_counter()
        self.logits = prefill(self.engine, ids, self.state, chunk_size, progress)
        self.pending = []
        self.history = (self.history + ids[-HISTORY_TOKENS:].tolist())[-HISTORY_TOKENS:]
        self.stats = Stats(prompt_tokens=len(ids), prefill_seconds=time.perf_counter() - t0,
                           context_tokens=self.position, state_bytes=self.engine.state_bytes,
                           peak_rss_mb=peak_rss_mb())
        return self

    def generate(self, max_new_tokens: int = 128, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, stop=(), on_text=None,
                 stop_at_eos: bool = True) -> str:
        """Sample up to ``max_new_tokens`` after the context; returns the new text (without the stop
        string or end-of-sequence token). ``temperature`` 0 is greedy. ``stop``: strings that end the
        generation. ``on_text(piece)`` gets the text as it is produced."""
        if self.logits is None and not self.pending:
            raise ValueError("nothing to continue: feed a prompt first")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
        sampler = Sampler(Sampling(temperature, top_k, top_p, repetition_penalty, seed))
        if seed is None and self.rng_state is not None:  # a resumed session continues its random stream
            sampler.rng.bit_generator.state = self.rng_state
        prompt_tokens, prefill_seconds = self.stats.prompt_tokens, self.stats.prefill_seconds
        t0 = time.perf_counter()
        stop_ids = self.model.tokenizer.eos_token_ids if stop_at_eos else ()
        tokens, text, reason, self.pending, self.logits = decode_loop(
            self.engine, self.state, self.logits, pending=self.pending, tokenizer=self.model.tokenizer, max_new_tokens=max_new_tokens,
            sampler=sampler, history=self.history, stop_strings=list(stop), stop_token_ids=stop_ids, on_text=on_text)
        self.history = self.history[-HISTORY_TOKENS:]
        self.rng_state = sampler.rng.bit_generator.state
        self.stats = Stats(prompt_tokens=prompt_tokens, prefill_seconds=prefill_seconds, new_tokens=len(tokens),
                           decode_seconds=time.perf_counter() - t0, context_tokens=self.position,
                           state_bytes=self.engine.state_bytes, peak_rss_mb=peak_rss_mb(), stop_reason=reason)
        self.last_token_ids = tokens
        return text

    def chat(self, content: str, max_new_tokens: int = 256, *, on_text=None, **options) -> str:
        """One user turn of a conversation this session holds (resumed from a state file, too):
        feeds :meth:`turn_text` and answers; stops at the end-of-turn token."""
        self.feed(self.turn_text(content))
        return self.generate(max_new_tokens, on_text=on_text, **options)

    def turn_text(self, content: str) -> str:
        """The chat template's text for a new user turn here. First turn: the whole template (its
        system prompt included). Later: only what the template puts after the previous answer, so
        the context reads as the template would render the whole conversation."""
        tok = self.model.tokenizer
        user = {"role": "user", "content": content}
        if self.position == 0:
            return tok.apply_chat_template([user], add_generation_prompt=True)
        # a stand-in conversation shows what the template writes between an answer and the next turn
        answer = "\x00answer\x00"
        text = tok.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": answer}, user],
                                       add_generation_prompt=True)
        after = text[text.index(answer) + len(answer):]
        if self.pending and self.pending[-1] in tok.eos_token_ids:  # the answer's end-of-turn is already in
            eos_text = tok.decode([self.pending[-1]], skip_special_tokens=False)
            if after.startswith(eos_text):
                after = after[len(eos_text):]
        return after

    # --- saving and restoring -----------------------------------------------------------------

    def identity(self) -> dict:
        e = self.engine
        return {"model_fingerprint": e.fingerprint, "engine": e.format, "weights": e.weights}

    def save(self, path: str) -> int:
        """Write the session to ``path`` (atomically); returns its size in bytes."""
        if self.engine.fingerprint is None:
            raise StateFileError(f"{self.model.path}: the export has no model fingerprint; re-export it to save states")
        arrays = {"history": np.asarray(self.history, np.int32)}
        if self.logits is not None:
            arrays["logits"] = np.asarray(self.logits, np.float32)
        rng = None if self.rng_state is None else {k: v for k, v in self.rng_state.items()}
        return save_state_file(path, self.state, {**self.identity(), "pending": self.pending, "rng": rng}, arrays)

    @classmethod
    def load(cls, model: Model, path: str) -> "Session":
        session = cls(model)
        state, header, arrays = load_state_file(path, session.state)
        mine = model.engine.fingerprint
        if header.get("model_fingerprint") != mine or mine is None:
            raise StateFileError(f"{path}: saved from model {header.get('model_fingerprint')}, "
                                 f"this is model {mine} ({model.path}); a state only resumes on its own model")
        session.state = state
        session.pending = [int(t) for t in header.get("pending", [])]
        session.history = arrays.get("history", np.zeros(0, np.int32)).tolist()
        session.logits = arrays.get("logits")
        session.rng_state = header.get("rng")
        session.saved_with = {k: header.get(k) for k in ("engine", "weights")}
        return session


def load(path: str, threads: int | None = None, gguf_engine: str = "compiled", activations: str = "q8_0") -> Model:
    """Load a lolcats GGUF file (the compiled engine unless ``gguf_engine`` says otherwise, see
    :func:`open_engine`) or an ONNX export folder (onnxruntime)."""
    return Model(open_engine(path, threads=threads, gguf_engine=gguf_engine, activations=activations), path)


__all__ = ["load", "Model", "Session", "Stats", "current_rss_mb", "ModelFileError", "StateFileError"]
