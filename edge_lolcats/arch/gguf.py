"""llama.cpp's GGUF layout of each family, both ways: reading a model people downloaded and writing
one that llama.cpp runs. What differs between families is data (:class:`Convention`) plus each
family file's ``args_from_gguf`` / ``gguf_keys``; the transforms below mirror each other.

Names and keys come from :mod:`edge_lolcats.converters.gguf_names` (pure data). torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_lolcats.converters import gguf_names as names

from .args import FULL, ArchitectureError, ModelArgs, Rope


@dataclass(frozen=True)
class Convention:
    """How llama.cpp's converter stores a family (convert_hf_to_gguf)."""

    arch: str  # general.architecture
    permute_qk: bool = False  # llama: q/k rows reordered for llama.cpp's interleaved RoPE
    norm_shift: float = 0.0  # Gemma: every RMSNorm weight stored as (1 + w)
    fused: bool = False  # Phi-3: q/k/v in attn_qkv, gate and up in ffn_up
    has_output: bool = True  # Gemma 2 never writes output.weight (its head is tied)


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Half-split RoPE rows (transformers) -> llama.cpp's interleaved order, per head."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


def weights_from_gguf(args: ModelArgs, conv: Convention, tensors: dict) -> dict:
    """{GGUF name: float32 array} -> {our name: array}."""
    out = {}
    for name, a in tensors.items():
        if name in (names.ROPE_FREQS,):
            continue  # read into args.rope
        if conv.fused and f".{names.FUSED_QKV}." in name:
            n, suffix = name.split(".")[1], name.rsplit(".", 1)[1]
            q, kv = args.q_size, args.kv_size
            for part, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, None))):
                out[f"model.layers.{n}.self_attn.{part}.{suffix}"] = a[rows]
            continue
        if conv.fused and ".ffn_up." in name:
            n, suffix = name.split(".")[1], name.rsplit(".", 1)[1]
            half = a.shape[0] // 2
            out[f"model.layers.{n}.mlp.gate_proj.{suffix}"], out[f"model.layers.{n}.mlp.up_proj.{suffix}"] = a[:half], a[half:]
            continue
        if conv.permute_qk and ".attn_q." in name:
            a = unpermute_rows(a, args.num_heads)
        elif conv.permute_qk and ".attn_k." in name:
            a = unpermute_rows(a, args.num_kv_heads)
        if conv.norm_shift and _is_norm(name):
            a = a - np.float32(conv.norm_shift)
        try:
            out[names.from_gguf(name)] = a
        except (KeyError, ValueError):
            raise ArchitectureError(f"unexpected tensor {name!r} for a {conv.arch} file") from None
    return out


def weights_to_gguf(args: ModelArgs, conv: Convention, weights: dict) -> dict:
    """{our name: float32 array} -> {GGUF name: array}: the mirror of :func:`weights_from_gguf`."""
    out, pending = {}, {}
    for name, a in weights.items():
        if not conv.has_output and name == "lm_head.weight":
            continue
        g = names.to_gguf(name)
        if conv.permute_qk and ".attn_q." in g:
            a = permute_rows(a, args.num_heads)
        elif conv.permute_qk and ".attn_k." in g:
            a = permute_rows(a, args.num_kv_heads)
        if conv.norm_shift and _is_norm(g):
            a = a + np.float32(conv.norm_shift)
        if conv.fused and any(f".{p}." in g for p in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")):
            pending[g] = a
            continue
        out[g] = a
    for g in list(pending):  # fused: q, k, v rows into attn_qkv; gate then up rows into ffn_up
        if ".attn_q." in g:
            parts = [pending.pop(g.replace(".attn_q.", f".{p}.")) for p in ("attn_q", "attn_k", "attn_v")]
            out[g.replace(".attn_q.", f".{names.FUSED_QKV}.")] = np.concatenate(parts)
        elif ".ffn_gate." in g:
            out[g.replace(".ffn_gate.", ".ffn_up.")] = np.concatenate([pending.pop(g), pending.pop(g.replace("gate", "up"))])
    rope = args.rope[FULL]
    if rope.kind == "llama3":
        out[names.ROPE_FREQS] = np.asarray(rope.llama3_divisors(), np.float32)
    return out


def base_fields(metadata: dict, arch: str, tensor_names) -> dict:
    """ModelArgs fields every llama.cpp architecture writes the same way."""
    key = lambda k, default=None: metadata.get(k.format(arch=arch), default)  # noqa: E731
    required = (names.KEY_EMBEDDING_LENGTH, names.KEY_BLOCK_COUNT, names.KEY_HEAD_COUNT, names.KEY_FEED_FORWARD_LENGTH)
    missing = [k.format(arch=arch) for k in required if key(k) is None]
    if missing:
        raise ArchitectureError(f"missing metadata {', '.join(missing)}")
    heads, hidden = int(key(names.KEY_HEAD_COUNT)), int(key(names.KEY_EMBEDDING_LENGTH))
    head_dim = int(key(names.KEY_KEY_LENGTH) or hidden // heads)
    rot = int(key(names.KEY_ROPE_DIMENSION_COUNT) or head_dim)
    scaling = key(names.KEY_ROPE_SCALING_TYPE)
    if scaling not in (None, "none", "linear"):
        raise ArchitectureError(f"RoPE scaling {scaling!r} is not supported (none, linear)")
    if any(t.startswith("rope_factors") for t in tensor_names):
        raise ArchitectureError("long-context RoPE factors (LongRoPE, rope_factors_*) are not supported")
    rope = Rope(theta=float(key(names.KEY_ROPE_FREQ_BASE, 10000.0)), dim=rot,
                kind="linear" if scaling == "linear" else "default",
                factor=float(key(names.KEY_ROPE_SCALING_FACTOR, 1.0)))
    eos = metadata.get(names.KEY_EOS_ID)
    tokens = metadata.get(names.KEY_TOKENS) or []
    return dict(
        vocab_size=int(key(names.KEY_VOCAB_SIZE) or len(tokens)), hidden_size=hidden,
        intermediate_size=int(key(names.KEY_FEED_FORWARD_LENGTH)), num_layers=int(key(names.KEY_BLOCK_COUNT)),
        num_heads=heads, num_kv_heads=int(key(names.KEY_HEAD_COUNT_KV, heads)), head_dim=head_dim,
        norm_eps=float(key(names.KEY_RMS_EPS, 1e-5)), rope={FULL: rope},
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(key(names.KEY_CONTEXT_LENGTH, 2048)),
        bos_token_id=metadata.get(names.KEY_BOS_ID), eos_token_ids=() if eos is None else (eos,))


def base_keys(args: ModelArgs, arch: str) -> dict:
    """The keys :func:`base_fields` reads, for a writer (values typed as GGUF stores them)."""
    rope = args.rope[FULL]
    keys = {names.KEY_CONTEXT_LENGTH: ("u32", args.max_position_embeddings),
            names.KEY_EMBEDDING_LENGTH: ("u32", args.hidden_size),
            names.KEY_BLOCK_COUNT: ("u32", args.num_layers),
            names.KEY_FEED_FORWARD_LENGTH: ("u32", args.intermediate_size),
            names.KEY_HEAD_COUNT: ("u32", args.num_heads), names.KEY_HEAD_COUNT_KV: ("u32", args.num_kv_heads),
            names.KEY_KEY_LENGTH: ("u32", args.head_dim), names.KEY_VALUE_LENGTH: ("u32", args.head_dim),
            names.KEY_RMS_EPS: ("f32", args.norm_eps), names.KEY_ROPE_FREQ_BASE: ("f32", rope.theta),
            names.KEY_ROPE_DIMENSION_COUNT: ("u32", rope.dim), names.KEY_VOCAB_SIZE: ("u32", args.vocab_size)}
    if rope.kind == "linear":
        keys[names.KEY_ROPE_SCALING_TYPE] = ("str", "linear")
        keys[names.KEY_ROPE_SCALING_FACTOR] = ("f32", rope.factor)
    return {k.format(arch=arch): v for k, v in keys.items()}


def sliding_layers(metadata: dict, arch: str, n_layers: int, default_period: int) -> tuple:
    """Which layers are local: llama.cpp's ``sliding_window_pattern`` (a period: layer i is global
    when i % period == period - 1; or one bool per layer), else the family's default period."""
    pattern = metadata.get(names.KEY_SLIDING_WINDOW_PATTERN.format(arch=arch), default_period)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise ArchitectureError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple(bool(p) for p in pattern)
    period = int(pattern)
    return tuple(period == 0 or i % period < period - 1 for i in range(n_layers))
