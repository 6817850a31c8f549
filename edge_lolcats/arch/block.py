"""The decoder, written once for every family and every backend.

Each function takes an array namespace ``xp`` first (:data:`edge_lolcats.arch.ops.NUMPY`, or
``TorchOps`` in :mod:`edge_lolcats.arch.ops`), so the same lines run on torch tensors (the PyTorch
model, training, the ONNX graphs traced from it) and on numpy arrays (the torch-free runtime).
What a family changes is a field of :class:`~edge_lolcats.arch.args.ModelArgs`, never a branch
on the family's name. What a backend changes is how it stores weights (``xp.linear``) and how
a layer attends (the ``attend`` callback, which owns that layer's state).

Our parameter names (state dicts, checkpoints; GGUF names in converters/gguf_names.py)::

    model.embed_tokens.weight                 model.norm.weight        lm_head.weight (unless tied)
    model.layers.N.attn_norm.weight           before attention
    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}
    model.layers.N.self_attn.{q,k}_norm.weight           (qk_norm)
    model.layers.N.attn_post_norm.weight      on the attention output (sandwich_norms)
    model.layers.N.ffn_norm.weight            before the MLP
    model.layers.N.mlp.{gate,up,down}_proj.{weight,bias}
    model.layers.N.ffn_post_norm.weight       on the MLP output (sandwich_norms)

A layer ``w`` is any object with those attributes (``w.self_attn.q_proj`` ...), whatever
``xp.linear`` and ``xp.norm`` accept.
"""
from __future__ import annotations

from .args import ModelArgs


def rms_norm(xp, x, weight, args: ModelArgs):
    """x / rms(x) * (norm_offset + w), over the last axis."""
    return x * xp.rsqrt(xp.mean(x * x, -1) + args.norm_eps) * (xp.norm_weight(weight) + args.norm_offset)


def softcap(xp, x, cap: float | None):
    return x if not cap else xp.tanh(x / cap) * cap


def rope_tables(xp, inv_freq, positions):
    """cos, sin [T, rot] for positions [T] (half-split layout: each frequency twice)."""
    angles = xp.outer(positions, inv_freq)  # [T, rot / 2]
    emb = xp.concat([angles, angles], -1)
    return xp.cos(emb), xp.sin(emb)


def apply_rope(xp, x, cos, sin):
    """Rotate the first ``rot`` dims of x [B, H, T, D] (transformers' rotate_half); the rest pass."""
    rot = cos.shape[-1]
    half = rot // 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = xp.concat([-x_rot[..., half:], x_rot[..., :half]], -1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else xp.concat([out, x_pass], -1)


class Rotation:
    """A layer type's RoPE at the block's positions: ``rotate(x)`` rotates q or k [B, H, T, D];
    ``inv_freq`` is there for attentions that rotate at other positions themselves (arch.hybrid)."""

    def __init__(self, xp, inv_freq, positions, apply=None):
        self.xp, self.inv_freq, self.positions = xp, inv_freq, positions
        self.cos, self.sin = rope_tables(xp, inv_freq, positions)
        self.apply = apply  # a faster equivalent of apply_rope at these positions, if the caller has one

    def __call__(self, x):
        return self.apply(x) if self.apply is not None else apply_rope(self.xp, x, self.cos, self.sin)


def rotations(xp, args: ModelArgs, positions) -> dict:
    """{layer type: :class:`Rotation`} at ``positions`` [T] (each layer type may have its own base)."""
    return {kind: Rotation(xp, xp.asarray(args.rope[kind].inv_freq()), positions) for kind in set(args.layer_types)}


def embed(xp, args: ModelArgs, table, ids):
    x = xp.embedding(table, ids)  # [B, T, hidden]
    return x if args.embedding_scale == 1.0 else x * xp.scalar_like(x, args.embedding_scale)


def project_qkv(xp, args: ModelArgs, w, x):
    """The attention's inputs: q [B, H, T, D], k and v [B, Hkv, T, D], normed (qk_norm), before RoPE."""
    attn = w.self_attn
    q, k, v = xp.linears(attn, ("q_proj", "k_proj", "v_proj"), rms_norm(xp, x, w.attn_norm, args))
    q = xp.split_heads(q, args.num_heads, args.head_dim)
    k = xp.split_heads(k, args.num_kv_heads, args.head_dim)
    v = xp.split_heads(v, args.num_kv_heads, args.head_dim)
    if args.qk_norm:
        q, k = rms_norm(xp, q, attn.q_norm, args), rms_norm(xp, k, attn.k_norm, args)
    return q, k, v


def finish_layer(xp, args: ModelArgs, w, x, attn_out):
    """Everything after attention: o_proj, residual, MLP, residual. attn_out [B, H, T, D]."""
    a = xp.linear(w.self_attn.o_proj, xp.merge_heads(attn_out))
    if args.sandwich_norms:
        a = rms_norm(xp, a, w.attn_post_norm, args)
    x = x + a
    gate, up = xp.linears(w.mlp, ("gate_proj", "up_proj"), rms_norm(xp, x, w.ffn_norm, args))
    m = xp.linear(w.mlp.down_proj, xp.activation(args.activation, gate) * up)
    if args.sandwich_norms:
        m = rms_norm(xp, m, w.ffn_post_norm, args)
    return x + m


def layer(xp, args: ModelArgs, w, x, rotate, attend):
    """One decoder layer. ``attend(q, k, v, rotate) -> [B, H, T, D]`` is the backend's attention
    with its state (softmax, hybrid, a teacher target): the block only says where it sits. q and k
    come before RoPE; ``rotate`` (a :class:`Rotation`) applies it: a softmax attention rotates
    both at once, a hybrid one with its feature maps before RoPE keeps them as they are."""
    q, k, v = project_qkv(xp, args, w, x)
    return finish_layer(xp, args, w, x, attend(q, k, v, rotate))


def logits(xp, args: ModelArgs, norm, head, x):
    """Final norm, vocabulary projection (``head``: lm_head, or the embedding when tied), soft-cap."""
    return softcap(xp, xp.linear(head, rms_norm(xp, x, norm, args)), args.final_softcap)
