"""The PyTorch model: plain modules built from a :class:`~edge_lolcats.arch.ModelArgs`, run by the
one decoder definition in :mod:`edge_lolcats.arch.block` (gpt-fast style: the state is an explicit
input and output of :func:`forward`).

Linearizing swaps each layer's ``self_attn`` for :class:`HybridAttention`, which keeps the
projections (and QK-norms) and adds the feature maps and window factors. Layer states: a
fixed-size :class:`HybridState` for hybrid layers, a growing :class:`KVCache` for softmax layers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_lolcats.arch import ModelArgs, block, hybrid
from edge_lolcats.arch.hybrid import DEFAULT as DEFAULT_RECURRENCE
from edge_lolcats.arch.hybrid import PRE_ROPE, Recurrence
from edge_lolcats.arch.ops import TorchOps
from edge_lolcats.arch.state import HYBRID, StateLayout
from .hybrid_attention import FORMS, WINDOW_FACTOR_INIT, HybridState, hybrid_attention_step, repeat_kv_heads

# Forces one form everywhere (for debugging): reference, chunked, recurrent or triton.
ATTENTION_FORM_ENV = "EDGE_LOLCATS_ATTENTION"
# PyTorch forms; "triton" (kernels/) is imported on first use, so CPU-only code never loads Triton.
ATTENTION_FORMS = (*FORMS, "triton")
# Softmax attention under a fixed key budget, run on the teacher's weights for comparison.
FIXED_MEMORY_BASELINES = ("window", "sink")


# --- the base model -------------------------------------------------------------------------------


class Norm(nn.Module):
    """An RMSNorm's weight; the math is :func:`edge_lolcats.arch.block.rms_norm`."""

    def __init__(self, dim: int, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # the identity at init


class Attention(nn.Module):
    """A softmax attention layer's weights (the base model's)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        h = args.hidden_size
        self.q_proj = nn.Linear(h, args.q_size, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.kv_size, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.q_size, h, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = Norm(args.head_dim, args.norm_offset)
            self.k_norm = Norm(args.head_dim, args.norm_offset)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, m = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, m, bias=args.mlp_bias)
        self.down_proj = nn.Linear(m, h, bias=args.mlp_bias)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = Norm(args.hidden_size, args.norm_offset)
        self.self_attn = Attention(args)
        self.ffn_norm = Norm(args.hidden_size, args.norm_offset)
        self.mlp = MLP(args)
        if args.sandwich_norms:
            self.attn_post_norm = Norm(args.hidden_size, args.norm_offset)
            self.ffn_post_norm = Norm(args.hidden_size, args.norm_offset)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = Norm(args.hidden_size, args.norm_offset)


class Transformer(nn.Module):
    """A decoder-only LM of any supported family. ``lolcats`` is None until :func:`linearize`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.lolcats: dict | None = None

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


# --- attention ------------------------------------------------------------------------------------


def softmax_attention(q, k, v, *, scale: float, softcap: float | None = None, mask: torch.Tensor | None = None):
    """Softmax attention, causal (``mask`` None, N == T) or under a [N, T] bool mask.
    q [B, H, N, D], k and v [B, Hkv, T, D]; scores are ``scale * q.k``, soft-capped if asked."""
    heads = q.shape[1]
    k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], None, q.device)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    weights = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).to(v.dtype)
    return weights @ v


def causal_mask(n: int, t: int, window: int | None, device) -> torch.Tensor:
    """[N, T] bool: query i (absolute position t - n + i) sees key j <= it, and with a ``window``
    only the ``window`` newest of those (itself included), as transformers' sliding window."""
    i = torch.arange(t - n, t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    visible = j <= i
    return visible if window is None else visible & (j > i - window)


class FeatureMap(nn.Module):
    """Learnable Hedgehog feature map weights [H, D, F], identity on each head at init."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(heads, 1, 1))

    def extra_repr(self):
        return "heads={}, head_dim={}, feature_dim={}".format(*self.weight.shape)


class _LinearizedLayer(nn.Module):
    """What every layer linearization puts in place of a softmax layer keeps: the base's projections
    (and QK-norms), its score scale and soft-cap, its own sliding window, and its softmax as the
    teacher."""

    def __init__(self, base: Attention, args: ModelArgs, layer: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        if args.qk_norm:
            self.q_norm, self.k_norm = base.q_norm, base.k_norm
        self.layer_idx = layer
        self.heads, self.kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale, self.softcap = args.attention_scale, args.attn_softcap
        self.base_window = args.window_of(layer)  # the base layer's own sliding window, if any

    def teacher(self, q, k, v):
        """The base layer's softmax attention (its own sliding window, if it has one)."""
        mask = None if self.base_window is None else causal_mask(q.shape[2], k.shape[2], self.base_window, q.device)
        return softmax_attention(q, k, v, scale=self.scale, softcap=self.softcap, mask=mask)


class HybridAttention(_LinearizedLayer):
    """Sliding-window softmax (and sink tokens) + linear attention in place of a softmax attention
    layer; its recurrence options are an :class:`~edge_lolcats.arch.hybrid.Recurrence`."""

    def __init__(self, base: Attention, args: ModelArgs, layer: int, *, window_size: int = 64,
                 feature_dim: int = 64, chunk_size: int = 64, recurrence: Recurrence = Recurrence()):
        super().__init__(base, args, layer)
        self.window_size, self.feature_dim, self.chunk_size = window_size, feature_dim, chunk_size
        self.recurrence = recurrence
        device = self.q_proj.weight.device
        self.feature_map_q = FeatureMap(self.heads, self.head_dim, feature_dim).to(device)
        self.feature_map_k = FeatureMap(self.heads, self.head_dim, feature_dim).to(device)
        self.window_factor = nn.Parameter(torch.full((self.heads,), WINDOW_FACTOR_INIT, device=device))
        if recurrence.decay:
            # lam = exp(-exp(decay_log_rate)): 1 - lam ~ 1/timescale. Heads start spread over timescales
            # of 256 .. 8K tokens past the window (RetNet's spread), and learn their own.
            timescales = torch.logspace(math.log10(256), math.log10(8192), self.heads)
            self.decay_log_rate = nn.Parameter(-torch.log(timescales).to(device))
        self.form = "chunked"
        self.baseline_sinks, self.baseline_recent = 4, None  # the "sink" baseline form's cache

    @property
    def log_decay(self) -> torch.Tensor | None:
        """log(lam) per head, or None without decay."""
        return -torch.exp(self.decay_log_rate) if self.recurrence.decay else None

    @property
    def weights(self) -> tuple:
        return self.feature_map_q.weight, self.feature_map_k.weight, self.window_factor

    def attend(self, q, k, v, rotate, state: HybridState | None = None, output_state: bool = False):
        """Per-head attention output [B, H, N, D] (before o_proj), and the new state if asked.
        q, k come before RoPE; ``rotate`` (arch.block.Rotation) is RoPE at their positions."""
        if self.form == "softmax":
            return self.teacher_with_cache(rotate(q), rotate(k), v, state, output_state)
        if self.form in FIXED_MEMORY_BASELINES:
            return self.fixed_memory_baseline(q, k, v, rotate, state)
        rec = self.recurrence
        if rec.feature_maps == PRE_ROPE:
            rope = rotate.inv_freq
        else:  # the feature maps see q and k after RoPE, as the caller rotates them
            q, k, rope = rotate(q), rotate(k), None
        options = dict(scale=self.scale, softcap=self.softcap, rope=rope, log_decay=self.log_decay,
                       sink_tokens=rec.sink_tokens)
        name = self.resolved_form(q)
        if state is not None and q.shape[2] == 1:
            if name == "triton":
                from edge_lolcats.kernels.hybrid_attention import hybrid_attention_step_triton
                return hybrid_attention_step_triton(q, k, v, *self.weights, state, **options)
            return hybrid_attention_step(q, k, v, *self.weights, state, **options)
        if name == "triton":
            from edge_lolcats.kernels.hybrid_attention import hybrid_attention_triton as form
        else:
            form = FORMS[name]
        return form(q, k, v, *self.weights, window_size=self.window_size, chunk_size=self.chunk_size,
                    initial_state=state, output_final_state=output_state, **options)

    def resolved_form(self, q) -> str:
        """The form that runs: the environment override, else this layer's; chunked on CUDA runs
        on the Triton kernels (same math, fused; not for soft-capped scores), chunked on the CPU
        on PyTorch."""
        name = os.environ.get(ATTENTION_FORM_ENV) or self.form
        if name not in ATTENTION_FORMS:
            raise ValueError(f"{ATTENTION_FORM_ENV}={name!r}: choose from {', '.join(ATTENTION_FORMS)}")
        if name == "chunked" and q.is_cuda and self.softcap is None:
            return "triton"
        return name

    def teacher_with_cache(self, q, k, v, cache: "KVCache | None", output_state: bool):
        """The teacher (softmax over every key, after RoPE) on a growing KV cache, for evaluating it
        in blocks over long texts."""
        if cache is None and not output_state:
            return self.teacher(q, k, v), None
        return cached_softmax_attention(q, k, v, cache, window=self.base_window, scale=self.scale, softcap=self.softcap)

    def fixed_memory_baseline(self, q, k, v, rotate, state: HybridState | None):
        """The teacher's weights under a fixed key budget: softmax over the last W keys ("window") or
        over ``baseline_sinks`` sinks + the ``baseline_recent`` newest keys ("sink": StreamingLLM,
        sinks at positions just before the window). The hybrid attention without its linear branch
        (:func:`edge_lolcats.arch.hybrid.block_step`, ``linear=False``), on its own fixed state."""
        sinks, recent = (0, self.window_size) if self.form == "window" else (self.baseline_sinks, self.baseline_recent)
        if state is None:
            b, _, _, d = q.shape
            zeros = lambda n, heads: q.new_zeros(b, heads, n, d)  # noqa: E731
            state = HybridState(zeros(0, self.heads), q.new_zeros(b, self.heads, 0), zeros(recent, self.kv_heads),
                                zeros(recent, self.kv_heads), zeros(sinks, self.kv_heads), zeros(sinks, self.kv_heads), 0)
        out, parts = hybrid.block_step(TorchOps(q.device), q, k, v, None, None, None, None, state.parts,
                                       state.position, scale=self.scale, softcap=self.softcap, rope=rotate.inv_freq,
                                       sink_tokens=sinks, linear=False)
        return out, HybridState.from_parts(parts, state.position + q.shape[2])


@dataclass
class RingState:
    """A kept window layer's state: its last W keys and values [B, Hkv, W, D] (arch.state)."""

    k_ring: torch.Tensor
    v_ring: torch.Tensor
    position: int

    @property
    def nbytes(self) -> int:
        return 2 * self.k_ring.numel() * self.k_ring.element_size()

    def clone(self) -> "RingState":
        return RingState(self.k_ring.clone(), self.v_ring.clone(), self.position)


class WindowAttention(_LinearizedLayer):
    """A layer that is sliding-window softmax in the base model, left as it is by linearization:
    the same projections and math, with its state a fixed ring of its own window
    (:func:`edge_lolcats.arch.window.window_ring_step`)."""

    def attend(self, q, k, v, rotate, state: RingState | None = None, output_state: bool = False):
        q, k = rotate(q), rotate(k)
        if state is None and not output_state:
            return self.teacher(q, k, v), None
        from edge_lolcats.arch.window import window_ring_step

        if state is None:
            b = q.shape[0]
            zeros = q.new_zeros(b, self.kv_heads, self.base_window, self.head_dim)
            state = RingState(zeros, zeros.clone(), 0)
        out, k_ring, v_ring = window_ring_step(TorchOps(q.device), q, k.to(q.dtype), v.to(q.dtype), state.k_ring,
                                               state.v_ring, state.position, scale=self.scale, softcap=self.softcap)
        return out, RingState(k_ring, v_ring, state.position + q.shape[2])


def sink_cache_budget(model, sink_tokens: int = 4) -> int:
    """Recent tokens a sink + window KV cache (float32) may keep to match a hybrid layer's state bytes."""
    args = model.args
    layout = StateLayout.of(args, model.lolcats)
    layer = next((i for i, kind in enumerate(layout.kinds) if kind == HYBRID), 0)
    hybrid = sum(math.prod(s) for s in layout.part_shapes(layer).values())  # float32 numbers
    per_token = 2 * args.num_kv_heads * args.head_dim
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
                self.saved += [(m, "form", m.form), (m, "baseline_sinks", m.baseline_sinks),
                               (m, "baseline_recent", m.baseline_recent)]
                m.form = self.kind
                m.baseline_sinks, m.baseline_recent = self.sink_tokens, self.recent_tokens
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
    layers: list  # HybridState | RingState | KVCache per layer
    position: int

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    @property
    def fixed_size(self) -> bool:
        return all(isinstance(s, (HybridState, RingState)) for s in self.layers)


def is_linearized(model) -> bool:
    return getattr(model, "lolcats", None) is not None and any(
        isinstance(layer.self_attn, (HybridAttention, WindowAttention)) for layer in model.model.layers)


# what linearization does with a layer that is sliding-window softmax in the base model
SLIDING_LAYER_CHOICES = ("keep", "linearize")


def linearize(model: Transformer, *, window_size: int = 64, feature_dim: int = 64, chunk_size: int = 64,
              sliding_layers: str = "keep", recurrence: Recurrence = DEFAULT_RECURRENCE):
    """Swap every full-attention layer for a :class:`HybridAttention` (in place); returns the model.
    ``recurrence``: feature maps before RoPE, a learned decay and 4 sink tokens unless told otherwise
    (``Recurrence()`` is the first models' recurrence).

    Layers that are sliding-window softmax in the base (Gemma's local layers, Mistral) stay softmax
    over their own window on a fixed ring (``sliding_layers="keep"``: exact, and fixed memory
    already) or become hybrid too (``"linearize"``). ``lolcats["layers"]`` records each layer's kind."""
    from edge_lolcats.arch.state import HYBRID, WINDOW

    if any(isinstance(layer.self_attn, (HybridAttention, WindowAttention)) for layer in model.model.layers):
        raise ValueError("model is already linearized")
    for name, value in (("window_size", window_size), ("feature_dim", feature_dim), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if sliding_layers not in SLIDING_LAYER_CHOICES:
        raise ValueError(f"sliding_layers must be one of {', '.join(SLIDING_LAYER_CHOICES)}; got {sliding_layers!r}")
    kinds = []
    for i, layer in enumerate(model.model.layers):
        if sliding_layers == "keep" and model.args.window_of(i) is not None:
            layer.self_attn = WindowAttention(layer.self_attn, model.args, i)
            kinds.append(WINDOW)
        else:
            layer.self_attn = HybridAttention(layer.self_attn, model.args, i, window_size=window_size,
                                              feature_dim=feature_dim, chunk_size=chunk_size, recurrence=recurrence)
            kinds.append(HYBRID)
    model.lolcats = {"window_size": window_size, "feature_dim": feature_dim, "feature_map": "hedgehog",
                     "chunk_size": chunk_size, "version": 2, "sliding_layers": sliding_layers, "layers": kinds,
                     **recurrence.to_dict()}
    return model


def layer_plan(model) -> list:
    """Per layer: "hybrid", "softmax" (full causal), or "softmax-window(W)" (the base's own window)."""
    plan = []
    for i, layer in enumerate(model.model.layers):
        window = model.args.window_of(i)
        if isinstance(layer.self_attn, HybridAttention):
            plan.append("hybrid")
        elif isinstance(layer.self_attn, WindowAttention):
            plan.append(f"softmax-ring({window})")  # the base's window, kept, on a fixed ring
        else:
            plan.append("softmax" if window is None else f"softmax-window({window})")
    return plan


def lolcats_config(model) -> dict | None:
    return getattr(model, "lolcats", None)


def state_layout(model) -> StateLayout | None:
    cfg = lolcats_config(model)
    return StateLayout.of(model.args, cfg) if cfg and is_linearized(model) else None


def state_bytes(model, batch: int = 1) -> int | None:
    """Bytes of the fixed decode state of a linearized model (None for softmax models)."""
    layout = state_layout(model)
    return None if layout is None else batch * layout.bytes_per_sequence


# --- forward with state -------------------------------------------------------------------------


def cached_softmax_attention(q, k, v, cache: KVCache | None, *, window: int | None, scale: float,
                             softcap: float | None):
    """Softmax attention of new q, k, v (after RoPE) after a KV cache (or none), causal within its
    own ``window`` if any: (out, the grown cache). A softmax layer's step, and the teacher's."""
    if cache is not None:
        k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
    mask = causal_mask(q.shape[2], k.shape[2], window, q.device)
    return softmax_attention(q, k, v, scale=scale, softcap=softcap, mask=mask), KVCache(k, v)


def _softmax_layer_attend(attn: Attention, args: ModelArgs, layer: int, cache: KVCache | None, out: list):
    """attend() for a softmax layer: append to its KV cache, attend causally (own window, if any)."""

    def attend(q, k, v, rotate):
        o, new = cached_softmax_attention(rotate(q), rotate(k), v, cache, window=args.window_of(layer),
                                          scale=args.attention_scale, softcap=args.attn_softcap)
        out.append(new)
        return o

    return attend


def forward(model, input_ids: torch.Tensor, state: ModelState | None = None, *, last_logits_only: bool = False,
            with_state: bool = True, return_hidden: bool = False):
    """Run the decoder on ``input_ids`` [B, N] from ``state``: returns (logits, new state).

    Works for softmax models (state holds KV caches) and linearized ones (fixed-size states).
    ``last_logits_only`` returns logits [B, 1, V] and avoids an [N, V] matrix on long prefills;
    ``return_hidden`` returns the final normed hidden states [B, N, hidden] instead of logits.
    """
    args, inner = model.args, model.model
    xp = TorchOps(input_ids.device)
    start = state.position if state is not None else 0
    n = input_ids.shape[1]
    rotate = block.rotations(xp, args, torch.arange(start, start + n, device=input_ids.device))
    x = block.embed(xp, args, inner.embed_tokens, input_ids)
    new_layers = []
    for i, layer in enumerate(inner.layers):
        layer_state = state.layers[i] if state is not None else None
        attn = layer.self_attn
        if isinstance(attn, (HybridAttention, WindowAttention)):
            def attend(q, k, v, rotate, attn=attn, layer_state=layer_state):
                out, new = attn.attend(q, k, v, rotate, layer_state, with_state)
                new_layers.append(new)
                return out
        else:
            attend = _softmax_layer_attend(attn, args, i, layer_state, new_layers)
        x = block.layer(xp, args, layer, x, rotate[args.layer_types[i]], attend)
    if last_logits_only:
        x = x[:, -1:]
    if return_hidden:
        logits = block.rms_norm(xp, x, inner.norm, args)
    else:
        logits = block.logits(xp, args, inner.norm, model.lm_head, x)
    return logits, (ModelState(new_layers, start + n) if with_state else None)
