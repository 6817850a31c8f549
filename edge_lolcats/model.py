"""A transformers causal LM with its attention layers swapped for the hybrid, and a forward pass
that carries an explicit state.

The weights live in an ordinary transformers model (Llama, Mistral or Qwen2 family); linearizing
swaps each layer's ``self_attn`` for :class:`HybridAttention`, which keeps the q/k/v/o projections
(and biases) and adds the feature maps and window factors. :func:`forward` runs the decoder stack
itself so that every layer's state is an explicit input and output (as in gpt-fast): a fixed-size
:class:`HybridState` for hybrid layers, a growing :class:`KVCache` for softmax layers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hybrid_attention import (
    WINDOW_FACTOR_INIT,
    FORMS,
    HybridState,
    empty_state,
    hybrid_attention_step,
    repeat_kv_heads,
)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
# Forces one form everywhere (for debugging): reference, chunked, recurrent or triton.
ATTENTION_FORM_ENV = "EDGE_LOLCATS_ATTENTION"
# PyTorch forms; "triton" (kernels/) is imported on first use, so CPU-only code never loads Triton.
ATTENTION_FORMS = (*FORMS, "triton")


class FeatureMap(nn.Module):
    """Learnable Hedgehog feature map weights [H, D, F], identity on each head at init."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(heads, 1, 1))

    def extra_repr(self):
        return "heads={}, head_dim={}, feature_dim={}".format(*self.weight.shape)


class HybridAttention(nn.Module):
    """Sliding-window softmax + linear attention in place of a softmax attention layer."""

    def __init__(self, base: nn.Module, *, heads: int, kv_heads: int, head_dim: int,
                 window_size: int = 64, feature_dim: int = 64, chunk_size: int = 64):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.layer_idx = getattr(base, "layer_idx", None)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.window_size, self.feature_dim, self.chunk_size = window_size, feature_dim, chunk_size
        device = self.q_proj.weight.device
        self.feature_map_q = FeatureMap(heads, head_dim, feature_dim).to(device)
        self.feature_map_k = FeatureMap(heads, head_dim, feature_dim).to(device)
        self.window_factor = nn.Parameter(torch.full((heads,), WINDOW_FACTOR_INIT, device=device))
        self.form = "chunked"
        self.sink_tokens, self.recent_tokens = 4, None  # for the "sink" baseline form

    def project(self, hidden_states, position_embeddings):
        """q [B, H, N, D], k and v [B, Hkv, N, D], after RoPE (as the softmax layer computes them)."""
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, state: HybridState | None = None, output_state: bool = False):
        """Per-head attention output [B, H, N, D] (before o_proj), and the new state if asked."""
        if self.form in FIXED_MEMORY_BASELINES or self.form == "softmax":  # teacher and baselines, no state
            return softmax_attention(q, k, v, self.baseline_mask(q.shape[2], q.device)), None
        weights = (self.feature_map_q.weight, self.feature_map_k.weight, self.window_factor)
        name = self.resolved_form(q)
        if state is not None and q.shape[2] == 1:
            if name == "triton":
                from .kernels.hybrid_attention import hybrid_attention_step_triton
                return hybrid_attention_step_triton(q, k, v, *weights, state)
            return hybrid_attention_step(q, k, v, *weights, state)
        if name == "triton":
            from .kernels.hybrid_attention import hybrid_attention_triton as form
        else:
            form = FORMS[name]
        return form(q, k, v, *weights, window_size=self.window_size, chunk_size=self.chunk_size,
                    initial_state=state, output_final_state=output_state)

    def resolved_form(self, q) -> str:
        """The form that runs: the environment override, else this layer's; chunked on CUDA runs
        on the Triton kernels (same math, fused), chunked on the CPU on PyTorch."""
        name = os.environ.get(ATTENTION_FORM_ENV) or self.form
        if name not in ATTENTION_FORMS:
            raise ValueError(f"{ATTENTION_FORM_ENV}={name!r}: choose from {', '.join(ATTENTION_FORMS)}")
        if name == "chunked" and q.is_cuda:
            return "triton"
        return name

    def forward(self, hidden_states, position_embeddings, attention_mask=None, state=None, output_state=False,
                **kwargs):
        # Also called by transformers' own decoder layers (no state): attention_mask is ignored,
        # the hybrid is causal by construction and we do not support padded batches.
        q, k, v = self.project(hidden_states, position_embeddings)
        out, new_state = self.attend(q, k, v, state, output_state)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.o_proj(out.to(hidden_states.dtype)), new_state


    def baseline_mask(self, n: int, device) -> torch.Tensor | None:
        """Which keys each query sees under the current softmax form ([N, N] bool; None: causal)."""
        if self.form == "softmax":
            return None
        i = torch.arange(n, device=device)[:, None]
        j = torch.arange(n, device=device)[None, :]
        if self.form == "window":  # the same window as the hybrid, no linear part
            return (j <= i) & (j > i - self.window_size)
        # "sink": StreamingLLM's cache of the first sink_tokens plus the recent_tokens newest keys
        # (original positions kept, as in a cache that is never re-indexed)
        return (j <= i) & ((j < self.sink_tokens) | (j > i - self.recent_tokens))


# Softmax attention under a fixed key budget, run on the teacher's weights for comparison.
FIXED_MEMORY_BASELINES = ("window", "sink")


def softmax_attention(q, k, v, mask: torch.Tensor | None = None):
    """Softmax attention, causal or under a [N, N] bool mask: q [B, H, N, D], k and v [B, Hkv, N, D]."""
    heads = q.shape[1]
    k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
    scale = 1 / math.sqrt(q.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sink_cache_budget(model, sink_tokens: int = 4) -> int:
    """Recent tokens a sink + window KV cache (float32) may keep to match the hybrid state's bytes."""
    heads, kv_heads, head_dim = attention_dims(model.config)
    cfg = lolcats_config(model)
    hybrid = heads * (2 * cfg["feature_dim"] * head_dim + 2 * cfg["feature_dim"] + 2 * cfg["window_size"] * head_dim)
    per_token = 2 * kv_heads * head_dim
    return max(1, hybrid // per_token - sink_tokens)


class base_attention:
    """Within this context a linearized model runs softmax attention on its teacher's weights (every
    LoRA update switched off): ``kind`` "softmax" is the teacher itself, "window" a sliding window of
    the hybrid's size, "sink" a StreamingLLM cache of ``sink_tokens`` + ``recent_tokens`` keys."""

    def __init__(self, model, kind: str = "softmax", sink_tokens: int = 4, recent_tokens: int | None = None):
        if kind not in ("softmax",) + FIXED_MEMORY_BASELINES:
            raise ValueError(f"unknown attention kind {kind!r}")
        self.model, self.kind = model, kind
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens if recent_tokens is not None else (
            sink_cache_budget(model, sink_tokens) if kind == "sink" else None)

    def __enter__(self):
        from .lora import LoRALinear

        self.saved = []
        for m in self.model.modules():
            if isinstance(m, HybridAttention):
                self.saved.append((m, "form", m.form))
                m.form = self.kind
                m.sink_tokens, m.recent_tokens = self.sink_tokens, self.recent_tokens
            elif isinstance(m, LoRALinear):
                self.saved.append((m, "enabled", m.enabled))
                m.enabled = False
        return self.model

    def __exit__(self, *exc):
        for m, name, value in self.saved:
            setattr(m, name, value)


def teacher_mode(model):
    """The linearized model computing as its softmax teacher (see :class:`base_attention`)."""
    return base_attention(model, "softmax")


def apply_rope(q, k, cos, sin):
    """Rotary embedding in transformers' half-split layout; cos/sin [B, N, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --- state ------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """A softmax layer's growing cache: k and v [B, Hkv, T, D]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class ModelState:
    layers: list  # HybridState | KVCache per layer
    position: int

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    @property
    def fixed_size(self) -> bool:
        return all(isinstance(s, HybridState) for s in self.layers)


def attention_dims(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def is_linearized(model) -> bool:
    return any(isinstance(layer.self_attn, HybridAttention) for layer in model.model.layers)


def linearize(model, *, window_size: int = 64, feature_dim: int = 64, chunk_size: int = 64):
    """Swap every attention layer for a :class:`HybridAttention` (in place); returns the model."""
    family = model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"cannot linearize a {family!r} model; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if is_linearized(model):
        raise ValueError("model is already linearized")
    for name, value in (("window_size", window_size), ("feature_dim", feature_dim), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    heads, kv_heads, head_dim = attention_dims(model.config)
    for layer in model.model.layers:
        layer.self_attn = HybridAttention(layer.self_attn, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                          window_size=window_size, feature_dim=feature_dim, chunk_size=chunk_size)
    model.config.lolcats = {"window_size": window_size, "feature_dim": feature_dim, "feature_map": "hedgehog",
                            "chunk_size": chunk_size, "version": 1}
    return model


def lolcats_config(model) -> dict | None:
    return getattr(model.config, "lolcats", None)


def state_bytes(model, batch: int = 1) -> int | None:
    """Bytes of the fixed decode state of a linearized model (None for softmax models)."""
    cfg = lolcats_config(model)
    if not cfg or not is_linearized(model):
        return None
    return len(model.model.layers) * empty_layer_state(model, batch, device="meta").nbytes


def empty_layer_state(model, batch: int = 1, device=None) -> HybridState:
    """One layer's state before any token (shapes from the model's config; "meta": shapes only)."""
    heads, _, head_dim = attention_dims(model.config)
    cfg = lolcats_config(model)
    return empty_state(batch, heads, head_dim, cfg["feature_dim"], cfg["window_size"], device=device)


# --- forward with state -------------------------------------------------------------------------


def _softmax_layer(attn, hidden_states, position_embeddings, cache: KVCache | None, heads, kv_heads, head_dim):
    b, n, _ = hidden_states.shape
    q = attn.q_proj(hidden_states).view(b, n, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(b, n, kv_heads, head_dim).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(b, n, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rope(q, k, *position_embeddings)
    if cache is not None:
        k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
    t = k.shape[2]
    # query i (absolute t - n + i) sees keys j <= t - n + i
    mask = torch.ones(n, t, dtype=torch.bool, device=q.device).tril(diagonal=t - n)
    out = F.scaled_dot_product_attention(q, repeat_kv_heads(k, heads), repeat_kv_heads(v, heads), attn_mask=mask,
                                         scale=1 / math.sqrt(head_dim))
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    return attn.o_proj(out), KVCache(k, v)


def forward(model, input_ids: torch.Tensor, state: ModelState | None = None, *, last_logits_only: bool = False,
            with_state: bool = True, return_hidden: bool = False):
    """Run the decoder on ``input_ids`` [B, N] from ``state``: returns (logits, new state).

    Works for softmax models (state holds KV caches) and linearized ones (fixed-size states).
    ``last_logits_only`` returns logits [B, 1, V] and avoids an [N, V] matrix on long prefills;
    ``return_hidden`` returns the final normed hidden states [B, N, hidden] instead of logits.
    """
    inner = model.model
    heads, kv_heads, head_dim = attention_dims(model.config)
    start = state.position if state is not None else 0
    n = input_ids.shape[1]
    x = inner.embed_tokens(input_ids)
    position_ids = torch.arange(start, start + n, device=input_ids.device)[None]
    position_embeddings = inner.rotary_emb(x, position_ids)
    new_layers = []
    for i, layer in enumerate(inner.layers):
        layer_state = state.layers[i] if state is not None else None
        h = layer.input_layernorm(x)
        if isinstance(layer.self_attn, HybridAttention):
            a, layer_state = layer.self_attn(h, position_embeddings, state=layer_state, output_state=with_state)
        else:
            a, layer_state = _softmax_layer(layer.self_attn, h, position_embeddings, layer_state,
                                            heads, kv_heads, head_dim)
        x = x + a
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_layers.append(layer_state)
    if last_logits_only:
        x = x[:, -1:]
    x = inner.norm(x)
    logits = x if return_hidden else model.lm_head(x)
    return logits, (ModelState(new_layers, start + n) if with_state else None)
