"""The hybrid attention's recurrence, written once over an array namespace (``xp``, see .ops): its
options, and the block and decode steps on the fixed state that the PyTorch model (decode), both
ONNX graphs and the numpy runtime run. The parallel forms for training and prefill (quadratic
reference, chunked) are in :mod:`edge_lolcats.nn.hybrid_attention`; tests hold all of them to one
float64 reference.

For query i at position t, window W, ``n_s`` sink tokens, a = sigmoid(window_factor[h]) and the
layer's decay 0 < lam[h] <= 1::

    window keys j in (t-W, t]:            s_tj = scale * R(t) q_t . R(j) k_j          (soft-capped)
    sink keys s < n_s that left it:       s_ts = scale * R(t) q_t . R(p_s) k_s,
                                          p_s = s + max(0, t - W - n_s + 1)
    linear keys n_s <= j <= t-W:          l_tj = lam^(t-W-j) phi_q(q_t) . phi_k(k_j)
    o_t = (a * sum_soft exp(s - m) v + sum_lin l v) / (a * sum_soft exp(s - m) + sum_lin l)

R(p) is the layer's RoPE at position p. Options (:class:`Recurrence`, recorded in every checkpoint
and export):

- ``feature_maps``: ``pre_rope`` applies phi to q and k before RoPE, so the linear branch depends on
  no position at all (translation-invariant); the window and sinks keep RoPE. ``post_rope`` (the
  first models') applies phi to the rotated q and k, as given by the caller.
- ``decay``: a learned lam per head on S and z (1 without it).
- ``sink_tokens``: the first n_s tokens stay in the softmax set for ever and never enter S and z.
  As in StreamingLLM they sit just before the window (p_s), never at their text positions once the
  window has passed them, so no query meets a relative distance beyond W + n_s - 1. With
  ``post_rope`` the caller's keys are already rotated: sinks keep their text positions.

State (arch.state): S = kv [B, H, 2F, D] and z [B, H, 2F], both weighted lam^(t-1-W-j) after t
tokens; the ring of the last W keys and values per KV head [B, Hkv, W, D] (position p in slot
p % W); the sinks [B, Hkv, n_s, D]. Stored keys are always as the softmax reads them (after RoPE);
a key leaving the ring is rotated back by R(-p) before phi_k sees it (``pre_rope``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import block

PRE_ROPE, POST_ROPE = "pre_rope", "post_rope"
FEATURE_MAP_EPS = 1e-12


@dataclass(frozen=True)
class Recurrence:
    """How a hybrid layer's linear branch and softmax set are built (see the module docstring).
    The defaults are the first models' (version-1 checkpoints and exports carry none of these)."""

    feature_maps: str = POST_ROPE
    decay: bool = False
    sink_tokens: int = 0

    def __post_init__(self):
        if self.feature_maps not in (PRE_ROPE, POST_ROPE):
            raise ValueError(f"feature_maps must be {PRE_ROPE!r} or {POST_ROPE!r}; got {self.feature_maps!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0; got {self.sink_tokens!r}")

    @classmethod
    def of(cls, lolcats: dict) -> "Recurrence":
        return cls(lolcats.get("feature_maps", POST_ROPE), bool(lolcats.get("decay", False)),
                   int(lolcats.get("sink_tokens", 0)))

    def to_dict(self) -> dict:
        return asdict(self)


# what `linearize` builds unless told otherwise
DEFAULT = Recurrence(PRE_ROPE, decay=True, sink_tokens=4)


def feature_map(xp, x, weight):
    """Hedgehog: x [B, H, N, D], weight [H, D, F] -> [B, H, N, 2F], softmax of +xW and -xW, positive."""
    proj = x @ weight
    return xp.maximum(xp.concat([xp.softmax(proj, -1), xp.softmax(-proj, -1)], -1), FEATURE_MAP_EPS)


def rope_tables(xp, inv_freq, positions, like):
    """cos, sin [T, R] at ``positions`` [T] (any integers, negative ones too). For float32 ``like``
    the model's float32 angles; for float64 (tests) exact ones, so that R(a) R(b) = R(a + b)."""
    if like.dtype.itemsize == 8:
        angles = xp.as_float(positions, like)[:, None] * xp.as_float(inv_freq, like)[None, :]
    else:
        angles = xp.outer(positions, inv_freq)
    emb = xp.concat([angles, angles], -1)
    return xp.cos(emb), xp.sin(emb)


def rotate(xp, x, inv_freq, positions):
    """RoPE of x [B, Hx, T, D] at ``positions`` [T]."""
    return block.apply_rope(xp, x, *rope_tables(xp, inv_freq, positions, x))


def grouped(a, b):
    """a [B, H, T, X] @ b [B, Hkv, X, Y] -> [B, H, T, Y], query head h reading KV head h // (H / Hkv)
    (as repeating b's heads would, without the copy)."""
    bsz, h, t, x = a.shape
    hkv = b.shape[1]
    if h == hkv:
        return a @ b
    return (a.reshape(bsz, hkv, (h // hkv) * t, x) @ b).reshape(bsz, h, t, b.shape[-1])


def _scores(xp, q, k, scale, softcap):
    """scale * q . k over grouped KV heads: q [B, H, T, D], k [B, Hkv, N, D] -> [B, H, T, N]."""
    s = grouped(q, xp.swap_last(k)) * scale
    return s if not softcap else xp.tanh(s / softcap) * softcap


def block_step(xp, q, k, v, fq_weight, fk_weight, window_factor, log_decay, state, position, *, scale,
               softcap=None, rope=None, sink_tokens=0, linear=True):
    """T new tokens (T >= 1) on the fixed state, as a pure function: prefill blocks and exports.

    q [B, H, T, D]; k, v [B, Hkv, T, D], before RoPE when ``rope`` (the layer's inverse frequencies)
    is given, else as the softmax reads them. ``log_decay`` [H] is log(lam) (None: no decay).
    ``state``: (kv, z, k_window, v_window[, k_sink, v_sink]) as in arch.state; ``position``: tokens
    seen before (an int, or a 0-d integer tensor when traced). The ring is laid out in time order
    in front of the new keys: extended index e holds position ``position - W + e``; query i sees
    window keys e in (i, i + W] and linear keys e <= i. Returns (out [B, H, T, D], new state).

    ``linear=False`` drops the linear branch (kv and z pass through untouched; the feature maps are
    not read): softmax over the sinks and the window alone, StreamingLLM's cache, which evaluation
    runs on the teacher's weights as the fixed-memory baseline.
    """
    kv, z, k_window, v_window, *sinks = state
    h, t, w = q.shape[1], q.shape[2], k_window.shape[2]
    n_s = sink_tokens
    new_pos = xp.arange(t) + position
    q_rot = q if rope is None else rotate(xp, q, rope, new_pos)
    k_rot = k if rope is None else rotate(xp, k, rope, new_pos)
    ring = (xp.arange(w) + position) % w  # slot of extended index e < W
    k_old = xp.take(k_window, ring, 2)
    k_ext = xp.concat([k_old, k_rot], 2)  # [B, Hkv, W + T, D], as the softmax reads them
    v_ext = xp.concat([xp.take(v_window, ring, 2), v], 2)
    e = xp.arange(w + t)
    key_pos = e + (position - w)
    real = key_pos >= 0
    i = xp.arange(t)[:, None]
    in_window = (e[None, :] > i) & (e[None, :] <= i + w) & real[None, :]  # [T, W + T]
    older = (e[None, :] <= i) & real[None, :] & (key_pos >= n_s)[None, :]

    scores = xp.where(in_window, _scores(xp, q_rot, k_ext, scale, softcap), -float("inf"))
    if n_s:
        k_sink, v_sink = _write_sinks(xp, sinks, k_rot, v, position, t)
        q_sink = q_rot if rope is None else rotate(xp, q, rope, xp.minimum(new_pos, w + n_s - 1))
        s_idx = xp.arange(n_s)
        active = s_idx[None, :] <= (new_pos[:, None] - w)  # [T, n_s]: sinks the window has passed
        s_scores = xp.where(active, _scores(xp, q_sink, k_sink, scale, softcap), -float("inf"))
        scores = xp.concat([scores, s_scores], -1)
        v_soft = xp.concat([v_ext, v_sink], 2)
    else:
        v_soft = v_ext
    a_soft = xp.exp(scores - xp.amax(scores, -1))
    keep = t + (xp.arange(w) - position - t) % w  # the newest W keys back into their ring slots
    ring_and_sinks = (xp.take(k_ext, keep, 2), xp.take(v_ext, keep, 2)) + ((k_sink, v_sink) if n_s else ())
    if not linear:
        out = grouped(a_soft, v_soft) / xp.sum(a_soft, -1)
        return out, (kv, z) + ring_and_sinks
    factor = xp.sigmoid(window_factor)[:, None, None]  # [H, 1, 1]

    # the feature maps read the ring's keys back before RoPE (pre_rope), the new ones as given
    k_ext_pre = k_ext if rope is None else xp.concat([rotate(xp, k_old, rope, -(xp.arange(w) + (position - w))), k], 2)
    phi_q = feature_map(xp, q, fq_weight)  # [B, H, T, 2F]
    phi_k = feature_map(xp, xp.repeat_heads(k_ext_pre, h), fk_weight)  # [B, H, W + T, 2F]
    a_lin = xp.where(older, phi_q @ xp.swap_last(phi_k), 0.0)
    state_q = phi_q
    if log_decay is not None:  # weight lam^(i - e) on extended key e, lam^(i + 1) on the state
        lag = xp.as_float(xp.maximum(i - e[None, :], 0), log_decay)  # [T, W + T]
        a_lin = a_lin * xp.exp(lag[None] * log_decay[:, None, None])
        state_q = phi_q * xp.exp(xp.as_float(i + 1, log_decay)[None] * log_decay[:, None, None])
    num = factor * grouped(a_soft, v_soft) + grouped(a_lin, v_ext) + state_q @ kv
    den = factor * xp.sum(a_soft, -1) + xp.sum(a_lin, -1) + state_q @ z[..., None]
    out = num / den

    # keys leaving the window in this block: extended e < T, weighted lam^(T - 1 - e) in the new sums
    leave = xp.as_float(real & (e < t) & (key_pos >= n_s), phi_k)[:, None]  # [W + T, 1]
    if log_decay is not None:
        leave = leave * xp.exp(xp.as_float(xp.maximum(t - 1 - e, 0), log_decay)[None, :, None]
                               * log_decay[:, None, None])  # [H, W + T, 1]
        carry = xp.exp(log_decay * t)[:, None]  # [H, 1]
        kv, z = kv * carry[..., None], z * carry
    phi_leave = phi_k * leave
    kv = kv + grouped(xp.swap_last(phi_leave), v_ext)
    z = z + xp.sum(xp.swap_last(phi_leave), -1)[..., 0]
    return out, (kv, z) + ring_and_sinks


def _write_sinks(xp, sinks, k_rot, v, position, t):
    """The sink store after a block of T tokens from ``position``: token p < n_s goes to slot p."""
    k_sink, v_sink = sinks
    n_s = k_sink.shape[2]
    src = xp.arange(n_s) - position  # the block's token that slot s receives, if 0 <= src < T
    hit = ((src >= 0) & (src < t))[:, None]  # [n_s, 1]
    src = xp.minimum(xp.maximum(src, 0), t - 1)
    return xp.where(hit, xp.take(k_rot, src, 2), k_sink), xp.where(hit, xp.take(v, src, 2), v_sink)


def decode_step(xp, q, k, v, fq_weight, fk_weight, window_factor, log_decay, state, position, *, scale,
                softcap=None, rope=None, sink_tokens=0):
    """One new token: :func:`block_step` at T = 1, arranged for decode (the decode graph, the
    runtime's and the PyTorch model's token steps). The key at ``position - W`` (ring slot
    ``position % W``) leaves the window: rotated back, featurised and folded into S and z (unless
    it is a sink); its slot takes the new key; the query reads the filled slots in slot order (the
    sums need no sorting). numpy updates every array of the state in place (``xp.decay_add``,
    ``xp.write_slot``) and returns them; torch returns new tensors. Same arguments and result as
    :func:`block_step`.
    """
    kv, z, k_window, v_window, *sinks = state
    h, w = q.shape[1], k_window.shape[2]
    n_s = sink_tokens
    here = xp.arange(1) + position  # [1]
    q_rot, k_rot = q, k
    slot = position % w
    k_leave = xp.read_slot(k_window, slot)  # [B, Hkv, 1, D], position - W
    v_leave = xp.read_slot(v_window, slot)
    if rope is not None:  # one table for the three rotations: this position, back from position - W, the sinks'
        cos, sin = rope_tables(xp, rope, xp.concat([here, w - here, xp.minimum(here, w + n_s - 1)], 0), q)
        at = lambda x, i: block.apply_rope(xp, x, cos[i : i + 1], sin[i : i + 1])  # noqa: E731
        q_rot, k_rot, k_leave = at(q, 0), at(k, 0), at(k_leave, 1)
    enters = xp.as_float(position - w >= n_s, kv)  # 0 before W + n_s tokens: nothing or a sink leaves
    phi_leave = feature_map(xp, xp.repeat_heads(k_leave, h), fk_weight) * enters  # [B, H, 1, 2F]
    lam = None if log_decay is None else xp.exp(log_decay)
    # one key: an outer product, as a broadcast product (numpy's matmul over a length-1 axis is 3x slower)
    update = xp.swap_last(phi_leave) * xp.repeat_heads(v_leave, h)  # [B, H, 2F, 1] * [B, H, 1, D]
    kv = xp.decay_add(kv, None if lam is None else lam[:, None, None], update)
    z = xp.decay_add(z, None if lam is None else lam[:, None], phi_leave[:, :, 0])
    k_window = xp.write_slot(k_window, slot, k_rot)
    v_window = xp.write_slot(v_window, slot, v)

    filled = xp.arange(w) <= position
    scores = xp.where(filled, _scores(xp, q_rot, k_window, scale, softcap), -float("inf"))
    values = v_window
    if n_s:
        k_sink = xp.write_slot(sinks[0], position, k_rot)  # no-op once position >= n_s
        v_sink = xp.write_slot(sinks[1], position, v)
        q_sink = q_rot if rope is None else at(q, 2)
        active = xp.arange(n_s) <= position - w
        s_scores = xp.where(active, _scores(xp, q_sink, k_sink, scale, softcap), -float("inf"))
        scores = xp.concat([scores, s_scores], -1)
        values = xp.concat([v_window, v_sink], 2)
    a_soft = xp.exp(scores - xp.amax(scores, -1))
    factor = xp.sigmoid(window_factor)[:, None, None]
    phi_q = feature_map(xp, q, fq_weight)
    num = factor * grouped(a_soft, values) + phi_q @ kv
    den = factor * xp.sum(a_soft, -1) + phi_q @ z[..., None]
    new = (kv, z, k_window, v_window)
    return num / den, (new + (k_sink, v_sink) if n_s else new)
