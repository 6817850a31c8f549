"""The hybrid attention's block step in numpy, for the torch-free runtime.

A line-by-line mirror of :func:`edge_lolcats.nn.hybrid_attention.hybrid_attention_block_step` (read
that docstring for the math and the state layout); tests compare the two on random inputs and both
with the quadratic reference.
"""
from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def feature_map(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [B, H, N, D], weight [H, D, F] -> [B, H, N, 2F] (Hedgehog: softmax of +xW and -xW)."""
    proj = np.matmul(x, weight[None])  # [B, H, N, F]
    return np.maximum(np.concatenate([softmax(proj.copy()), softmax(-proj)], axis=-1), 1e-12)


def repeat_kv_heads(x: np.ndarray, heads: int) -> np.ndarray:
    return x if x.shape[1] == heads else np.repeat(x, heads // x.shape[1], axis=1)


def window_scores(q, k, scale: float | None, softcap: float | None):
    """scale * q.k^T (1/sqrt(D) by default), soft-capped if asked."""
    s = np.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(scale if scale is not None else 1 / np.sqrt(q.shape[-1]))
    return s if not softcap else np.tanh(s / np.float32(softcap)) * np.float32(softcap)


def block_step(q, k, v, fq_weight, fk_weight, window_factor, kv, z, k_window, v_window, position: int, *,
               scale=None, softcap=None):
    """T new tokens on the fixed state; returns (out [B, H, T, D], kv, z, k_window, v_window)."""
    b, h, t, d = q.shape
    w = k_window.shape[2]
    k, v = repeat_kv_heads(k, h), repeat_kv_heads(v, h)
    ring = (np.arange(w) + position) % w
    k_ext = np.concatenate([k_window[:, :, ring], k], axis=2)  # [B, H, W + T, D]
    v_ext = np.concatenate([v_window[:, :, ring], v], axis=2)
    e = np.arange(w + t)
    real = (position - w + e) >= 0
    i = np.arange(t)[:, None]
    in_window = (e[None, :] > i) & (e[None, :] <= i + w) & real[None, :]
    is_older = (e[None, :] <= i) & real[None, :]

    phi_q = feature_map(q, fq_weight)
    phi_k = feature_map(k_ext, fk_weight)
    scores = window_scores(q, k_ext, scale, softcap)
    scores = np.where(in_window, scores, -np.inf)
    a_win = np.exp(scores - scores.max(-1, keepdims=True))
    a_lin = np.where(is_older, np.matmul(phi_q, phi_k.transpose(0, 1, 3, 2)), 0.0)
    factor = (1 / (1 + np.exp(-window_factor)))[None, :, None, None]
    num = factor * np.matmul(a_win, v_ext) + np.matmul(a_lin, v_ext) + np.matmul(phi_q, kv)
    den = factor * a_win.sum(-1, keepdims=True) + a_lin.sum(-1, keepdims=True) + np.matmul(phi_q, z[..., None])
    out = (num / den).astype(np.float32)

    leaving = (real & (e < t)).astype(phi_k.dtype)[None, None, :, None]
    phi_leave = phi_k * leaving
    kv = kv + np.matmul(phi_leave.transpose(0, 1, 3, 2), v_ext)
    z = z + phi_leave.sum(2)
    slot_to_ext = t + (np.arange(w) - position - t) % w
    return out, kv.astype(np.float32), z.astype(np.float32), k_ext[:, :, slot_to_ext], v_ext[:, :, slot_to_ext]


def decode_step(q, k, v, fq_weight, fk_weight, window_factor, kv, z, k_window, v_window, position: int, *,
                scale=None, softcap=None):
    """One new token (T = 1) on the fixed state, updating the state arrays in place.

    The same math as :func:`block_step` at T = 1, arranged for decode speed: the key at position
    ``position - W`` (ring slot ``position % W``) leaves the window, so it is folded into the linear
    state and its slot takes the new key; then the window is the whole ring (the slots filled so
    far). q [B, H, 1, D], k and v [B, Hkv, 1, D]; returns out [B, H, 1, D]. The ring holds all H
    heads (kv heads repeated), as in :func:`block_step`.
    """
    b, h, _, d = q.shape
    w = k_window.shape[2]
    slot = position % w
    if position >= w:
        phi_old = feature_map(k_window[:, :, slot : slot + 1], fk_weight)[:, :, 0]  # [B, H, 2F]
        kv += phi_old[..., :, None] * v_window[:, :, slot, None, :]
        z += phi_old
    k_window[:, :, slot] = repeat_kv_heads(k, h)[:, :, 0]
    v_window[:, :, slot] = repeat_kv_heads(v, h)[:, :, 0]
    filled = min(position + 1, w)
    keys, values = k_window[:, :, :filled], v_window[:, :, :filled]  # slot order: the sum needs no sorting
    scores = window_scores(q, keys, scale, softcap)  # [B, H, 1, filled]
    a_win = np.exp(scores - scores.max(-1, keepdims=True))
    phi_q = feature_map(q, fq_weight)  # [B, H, 1, 2F]
    factor = (1 / (1 + np.exp(-window_factor)))[None, :, None, None]
    num = factor * np.matmul(a_win, values) + np.matmul(phi_q, kv)
    den = factor * a_win.sum(-1, keepdims=True) + np.matmul(phi_q, z[..., None])
    return (num / den).astype(np.float32)
