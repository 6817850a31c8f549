"""A base model's own sliding-window softmax attention on a fixed ring of its last W keys: how a
layer that is already local (Gemma's local layers, Mistral) keeps running unchanged in fixed memory
when linearization leaves it alone. Written once over an array namespace (``xp``, see .ops): the
PyTorch model, the ONNX graphs and the numpy runtime all run this function.

Ring: position p's key and value sit in slot p % W (W the base's window), per KV head, after RoPE
(softmax scores depend on relative positions only, so rotated keys stay valid however long the
context). A block of T tokens at positions P .. P+T-1 lays the ring out in time order in front of
its own keys: extended index e holds position P - W + e. Query i (position P + i) sees e in
(i, i + W] whose position is >= 0: itself and the W - 1 before it, as transformers' sliding window.
"""
from __future__ import annotations


def window_ring_step(xp, q, k, v, k_ring, v_ring, position, *, scale: float, softcap: float | None = None):
    """T new tokens on the ring. q [B, H, T, D]; k, v [B, Hkv, T, D]; k_ring, v_ring [B, Hkv, W, D];
    ``position``: tokens seen before the block (an int, or a 0-d integer tensor when traced).
    Returns (out [B, H, T, D], k_ring, v_ring): pure, the inputs are not changed."""
    heads, t, w = q.shape[1], q.shape[2], k_ring.shape[2]
    ring = (xp.arange(w) + position) % w  # slot of extended index e < W
    k_ext = xp.concat([xp.take(k_ring, ring, 2), k], 2)  # [B, Hkv, W + T, D]
    v_ext = xp.concat([xp.take(v_ring, ring, 2), v], 2)
    e = xp.arange(w + t)
    i = xp.arange(t)[:, None]
    visible = (e[None, :] > i) & (e[None, :] <= i + w) & ((position - w + e) >= 0)[None, :]  # [T, W + T]
    scores = (q @ xp.swap_last(xp.repeat_heads(k_ext, heads))) * scale  # [B, H, T, W + T]
    if softcap:
        scores = xp.tanh(scores / softcap) * softcap
    scores = xp.where(visible, scores, -float("inf"))
    weights = xp.exp(scores - xp.amax(scores, -1))
    out = (weights / xp.sum(weights, -1)) @ xp.repeat_heads(v_ext, heads)
    keep = t + (xp.arange(w) - position - t) % w  # extended index of the key now in each slot
    return out, xp.take(k_ext, keep, 2), xp.take(v_ext, keep, 2)
