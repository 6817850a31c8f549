"""numpy engine over a ``lolcats`` GGUF export. No torch.

Weights are dequantized to float32 once at load (memory-mapped file, then one float32 copy); the
decoder runs block by block on the fixed state with :func:`hybrid_numpy.block_step`. Same call
shape as the ONNX engine: ``run(tokens, state) -> (logits of the last token [B, V], new state)``.
"""
from __future__ import annotations

import numpy as np

from ..converters import gguf_names as names
from ..gguf_io import ModelFileError, read_gguf
from ..tokenizer import Tokenizer
from .hybrid_numpy import block_step
from .state import State, empty_state


class GGUFEngine:
    def __init__(self, path: str):
        gguf = read_gguf(path)
        if gguf.architecture != names.LOLCATS_ARCH:
            raise ModelFileError(f"{path}: architecture {gguf.architecture!r}; the runtime runs "
                                 f"{names.LOLCATS_ARCH!r} files (export a linearized model)")
        key = gguf.arch_key
        try:
            self.layers = int(key("block_count"))
            self.heads = int(key("attention.head_count"))
            self.kv_heads = int(key("attention.head_count_kv", self.heads))
            self.hidden = int(key("embedding_length"))
            self.head_dim = int(key("attention.key_length") or self.hidden // self.heads)
            self.window_size = int(key("attention.window_size"))
            self.feature_dim = int(key("attention.feature_dim"))
            self.eps = float(key("attention.layer_norm_rms_epsilon", 1e-5))
            theta = float(key("rope.freq_base", 10000.0))
        except TypeError:
            raise ModelFileError(f"{path}: missing {names.LOLCATS_ARCH} metadata") from None
        if key("rope.qk_permuted"):
            raise ModelFileError(f"{path}: q/k rows permuted for llama.cpp; this runtime expects them unpermuted")
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        self.path = path
        t = gguf.tensor
        self.embed = t("token_embd.weight")
        self.output = t("output.weight") if "output.weight" in gguf.tensors else self.embed
        self.norm = t("output_norm.weight")
        self.blocks = []
        for i in range(self.layers):
            p = f"blk.{i}."
            block = {n: t(p + n + ".weight") for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                      "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                                                      "attn_fmap_q", "attn_fmap_k", "attn_window_factor")}
            for n in ("attn_q", "attn_k", "attn_v"):
                block[n + ".bias"] = t(p + n + ".bias") if p + n + ".bias" in gguf.tensors else None
            expect = {"attn_q": (self.heads * self.head_dim, self.hidden),
                      "attn_k": (self.kv_heads * self.head_dim, self.hidden),
                      "attn_fmap_q": (self.heads, self.head_dim, self.feature_dim),
                      "attn_window_factor": (self.heads,)}
            for n, shape in expect.items():
                if block[n].shape != shape:
                    raise ModelFileError(f"{path}: {p}{n} has shape {block[n].shape}, expected {shape}")
            self.blocks.append(block)

    def empty_state(self, batch: int = 1) -> State:
        return empty_state(self.layers, self.heads, self.head_dim, self.feature_dim, self.window_size, batch)

    def _rms(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def run(self, tokens, state: State):
        """Feed ``tokens`` ([T] or [B, T]) after ``state``: (logits [B, V] of the last token, new state)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, t = ids.shape
        x = self.embed[ids]  # [B, T, hidden]
        angles = (state.position + np.arange(t))[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([angles, angles], -1)
        cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)  # [T, D]
        half = self.head_dim // 2

        def rope(a):  # [B, H, T, D], half-split layout
            rotated = np.concatenate([-a[..., half:], a[..., :half]], -1)
            return a * cos + rotated * sin

        new = {}
        for i, blk in enumerate(self.blocks):
            h = self._rms(x, blk["attn_norm"])
            q, k, v = h @ blk["attn_q"].T, h @ blk["attn_k"].T, h @ blk["attn_v"].T
            if blk["attn_q.bias"] is not None:
                q, k, v = q + blk["attn_q.bias"], k + blk["attn_k.bias"], v + blk["attn_v.bias"]
            q = rope(q.reshape(b, t, self.heads, self.head_dim).transpose(0, 2, 1, 3))
            k = rope(k.reshape(b, t, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3))
            v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
            s = [state.tensors[f"state.{i}.{p}"] for p in ("kv", "z", "k_window", "v_window")]
            out, *s = block_step(q, k, v, blk["attn_fmap_q"], blk["attn_fmap_k"], blk["attn_window_factor"], *s,
                                 state.position)
            new.update({f"state.{i}.{p}": a for p, a in zip(("kv", "z", "k_window", "v_window"), s)})
            x = x + out.transpose(0, 2, 1, 3).reshape(b, t, -1) @ blk["attn_output"].T
            h = self._rms(x, blk["ffn_norm"])
            gate = h @ blk["ffn_gate"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ blk["ffn_up"].T)) @ blk["ffn_down"].T
        logits = self._rms(x[:, -1], self.norm) @ self.output.T
        return logits, State(new, state.position + t)
