"""The LoLCATs hybrid attention: softmax over a sliding window plus linear attention on older keys.

This module is the one place where the math lives. Every other backend (the Triton kernels, the
ONNX graph, the numpy runtime) is tested against the three forms defined here, which share one
signature and return ``(output, state)``:

- :func:`hybrid_attention_reference` - quadratic, dense masks, obviously correct. For tests.
- :func:`hybrid_attention_chunked` - chunked parallel form, O(N*W + N*F*D) time and O(N) memory.
  For training and prefill.
- :func:`hybrid_attention_recurrent` - a loop of :func:`hybrid_attention_step` on a fixed-size
  state. The step is what decode runs.

For query i, with window size W, a score scale (1/sqrt(D) unless the model says otherwise: Gemma
uses query_pre_attn_scalar) and a = sigmoid(window_factor[h])::

    window keys j in (i-W, i]:  s_ij = scale * q_i . k_j   (Gemma 2: cap * tanh(s_ij / cap)),
                                m_i = max_j s_ij
    older keys  j <= i-W:       l_ij = phi_q(q_i) . phi_k(k_j)
    o_i = (a * sum_win exp(s_ij - m_i) v_j + sum_old l_ij v_j)
          / (a * sum_win exp(s_ij - m_i)     + sum_old l_ij)

phi(x) = concat(softmax(x W_h), softmax(-x W_h)) over the feature axis (Hedgehog), clamped at 1e-12.
Everything accumulates in float32 (float64 if the inputs are float64).

Shapes: q [B, H, N, D]; k, v [B, Hkv, N, D] with H a multiple of Hkv (grouped KV heads are repeated
up to H before anything else, so every piece of state is per query head); feature weights
[H, D, F]; window_factor [H].

The recurrent state after t tokens (:class:`HybridState`):
    kv [B, H, 2F, D] = sum_{j <= t-1-W} phi_k(k_j) v_j^T
    z  [B, H, 2F]    = sum_{j <= t-1-W} phi_k(k_j)
    k_window, v_window [B, H, W, D]: keys/values of positions t-W .. t-1, position p in slot p % W
    position = t
A step at position t first moves the key in slot t % W (position t-W, which leaves the window of
query t) into kv and z, then writes k_t into that same slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from edge_lolcats.arch.state import StateLayout

# sigmoid(-2.1972) = 0.1: the window starts with a small weight next to the linear part (LoLCATs).
WINDOW_FACTOR_INIT = -2.1972
FEATURE_MAP_EPS = 1e-12


@dataclass
class HybridState:
    """Fixed-size decode state of one hybrid attention layer (see the module docstring)."""

    kv: torch.Tensor  # [B, H, 2F, D]
    z: torch.Tensor  # [B, H, 2F]
    k_window: torch.Tensor  # [B, H, W, D]
    v_window: torch.Tensor  # [B, H, W, D]
    position: int  # number of tokens seen

    @property
    def window_size(self) -> int:
        return self.k_window.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.z, self.k_window, self.v_window))

    def clone(self) -> "HybridState":
        return HybridState(self.kv.clone(), self.z.clone(), self.k_window.clone(), self.v_window.clone(), self.position)

    def to(self, *args, **kwargs) -> "HybridState":
        return HybridState(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)[:4]), self.position)


def empty_state(batch: int, heads: int, head_dim: int, feature_dim: int, window_size: int,
                dtype=torch.float32, device=None) -> HybridState:
    """The state before any token: zero sums and an empty window (shapes: arch.state)."""
    shapes = StateLayout(1, heads, head_dim, feature_dim, window_size).part_shapes()
    return HybridState(**{p: torch.zeros(batch, *s, dtype=dtype, device=device) for p, s in shapes.items()},
                       position=0)


def feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map. x [B, H, N, D], weight [H, D, F] -> [B, H, N, 2F], positive."""
    proj = x @ weight.to(x.dtype)  # [B, H, N, D] @ [H, D, F] (a MatMul in exported graphs, not an Einsum)
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).clamp(min=FEATURE_MAP_EPS)


def repeat_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, H, N, D]: query head h reads kv head h // (H // Hkv), as transformers does."""
    kv_heads = x.shape[1]
    if kv_heads == heads:
        return x
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    return x.repeat_interleave(heads // kv_heads, dim=1)


def window_scores(q, k, scale: float | None, softcap: float | None):
    """The window softmax's scores q.k^T * scale (1/sqrt(D) by default), soft-capped if asked."""
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    return s if not softcap else torch.tanh(s / softcap) * softcap


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q, k, v, fq_weight, fk_weight, window_factor, window_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    heads, head_dim = q.shape[1], q.shape[3]
    for name, w in (("fq_weight", fq_weight), ("fk_weight", fk_weight)):
        if w.dim() != 3 or w.shape[0] != heads or w.shape[1] != head_dim:
            raise ValueError(f"{name} must be [H={heads}, D={head_dim}, F]; got {tuple(w.shape)}")
    if window_factor.shape != (heads,):
        raise ValueError(f"window_factor must be [H={heads}]; got {tuple(window_factor.shape)}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1; got {window_size}")


def _prepare(q, k, v, fq_weight, fk_weight, window_factor, window_size, initial_state):
    """Common front of the parallel forms: upcast, repeat kv heads, and prepend the initial window.

    With an initial state at position t0, the (at most W) keys in its window are put back in front
    of the new keys in time order, with dummy zero queries whose outputs are dropped. The rest of
    the history is the state's kv/z, added to every query's linear part.
    Returns (q, k, v, prefix_len, kv0, z0) in the compute dtype; k and v have H heads.
    """
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size)
    ct = _compute_dtype(q)
    heads = q.shape[1]
    q, k, v = q.to(ct), repeat_kv_heads(k.to(ct), heads), repeat_kv_heads(v.to(ct), heads)
    if initial_state is None:
        return q, k, v, 0, None, None
    if initial_state.window_size != window_size:
        raise ValueError(f"state window {initial_state.window_size} != window_size {window_size}")
    t0 = initial_state.position
    n_hist = min(t0, window_size)
    slots = torch.arange(t0 - n_hist, t0, device=q.device) % window_size  # time order
    k_hist = initial_state.k_window.to(ct)[:, :, slots]
    v_hist = initial_state.v_window.to(ct)[:, :, slots]
    q = torch.cat([q.new_zeros(q.shape[0], heads, n_hist, q.shape[3]), q], dim=2)
    k = torch.cat([k_hist, k], dim=2)
    v = torch.cat([v_hist, v], dim=2)
    return q, k, v, n_hist, initial_state.kv.to(ct), initial_state.z.to(ct)


def _final_state(phi_k, k, v, prefix_len, kv0, z0, window_size, start_position) -> HybridState:
    """State after the (extended) sequence: sums over keys that left the window, ring of the rest."""
    n = k.shape[2]
    n_old = max(0, n - window_size)
    kv = torch.einsum("bhnf,bhnd->bhfd", phi_k[:, :, :n_old], v[:, :, :n_old])
    z = phi_k[:, :, :n_old].sum(2)
    if kv0 is not None:
        kv, z = kv + kv0, z + z0
    b, h, _, d = k.shape
    end = start_position - prefix_len + n  # absolute position after the last token
    k_window = k.new_zeros(b, h, window_size, d)
    v_window = v.new_zeros(b, h, window_size, d)
    slots = torch.arange(end - (n - n_old), end, device=k.device) % window_size
    k_window[:, :, slots] = k[:, :, n_old:]
    v_window[:, :, slots] = v[:, :, n_old:]
    return HybridState(kv, z, k_window, v_window, end)


def _no_tokens(q, v, fq_weight, window_size, initial_state, output_final_state):
    """The answer for N = 0: no output, the state unchanged (or empty)."""
    b, h, _, d = q.shape
    if not output_final_state:
        state = None
    elif initial_state is not None:
        state = initial_state.clone()
    else:
        state = empty_state(b, h, d, fq_weight.shape[-1], window_size, dtype=_compute_dtype(q), device=q.device)
    return v.new_zeros(b, h, 0, d), state


def hybrid_attention_reference(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64,
                               chunk_size=None, initial_state=None, output_final_state=False, scale=None,
                               softcap=None):
    """Quadratic form: dense [N, N] score matrices and masks. The specification; tests only.

    ``chunk_size`` is accepted for a uniform signature and ignored.
    """
    if q.shape[2] == 0:
        _check(q, k, v, fq_weight, fk_weight, window_factor, window_size)
        return _no_tokens(q, v, fq_weight, window_size, initial_state, output_final_state)
    out_dtype = v.dtype
    start = initial_state.position if initial_state is not None else 0
    q, k, v, p, kv0, z0 = _prepare(q, k, v, fq_weight, fk_weight, window_factor, window_size, initial_state)
    n = q.shape[2]
    phi_q, phi_k = feature_map(q, fq_weight), feature_map(k, fk_weight)

    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    in_window = (j <= i) & (j > i - window_size)  # [N, N]
    is_older = j <= i - window_size

    scores = window_scores(q, k, scale, softcap)  # [B, H, N, N]
    scores = scores.masked_fill(~in_window, float("-inf"))
    a_win = torch.exp(scores - scores.amax(-1, keepdim=True))
    a_lin = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~is_older, 0.0)

    factor = torch.sigmoid(window_factor.to(q.dtype))[None, :, None, None]
    num = factor * (a_win @ v) + a_lin @ v
    den = factor * a_win.sum(-1, keepdim=True) + a_lin.sum(-1, keepdim=True)
    if kv0 is not None:  # history older than the initial window
        num = num + phi_q @ kv0
        den = den + (phi_q @ z0.unsqueeze(-1))
    out = (num / den)[:, :, p:]
    state = _final_state(phi_k, k, v, p, kv0, z0, window_size, start) if output_final_state else None
    return out.to(out_dtype), state


def hybrid_attention_chunked(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64,
                             chunk_size=64, initial_state=None, output_final_state=False, scale=None,
                             softcap=None):
    """Chunked parallel form: O(N*(C+W)*D + N*F*D) time, O(N*(C+W)) memory for chunk size C.

    Queries are cut into chunks of C. Chunk c (positions cC .. cC+C-1) sees, densely, the key block
    cC-W+1 .. cC+C-1: every key that is in some query's window, plus the keys that leave the window
    inside the chunk (those get linear scores under a triangular mask). Keys before that block are
    older than every query's window: their contribution is a prefix sum of per-block states.
    """
    if q.shape[2] == 0:
        _check(q, k, v, fq_weight, fk_weight, window_factor, window_size)
        return _no_tokens(q, v, fq_weight, window_size, initial_state, output_final_state)
    out_dtype = v.dtype
    start = initial_state.position if initial_state is not None else 0
    q, k, v, p, kv0, z0 = _prepare(q, k, v, fq_weight, fk_weight, window_factor, window_size, initial_state)
    b, h, n, d = q.shape
    C, W = chunk_size, window_size
    if C < 1:
        raise ValueError(f"chunk_size must be >= 1; got {C}")
    phi_q, phi_k = feature_map(q, fq_weight), feature_map(k, fk_weight)
    nf = phi_q.shape[-1]

    nc = -(-n // C)  # number of query chunks
    n_pad = nc * C
    L = C + W - 1  # key block length
    # Front pad of W-1 puts key block c at padded index c*C; back pad makes every block whole.
    # Zero phi_k on padding keeps it out of the linear sums; the window mask keeps it out of softmax.
    back = n_pad - n

    def blocks(x):  # [B, H, n, X] -> [B, H, nc, L, X]
        x = F.pad(x, (0, 0, W - 1, back))
        return x.unfold(2, L, C).transpose(-1, -2)

    qc = F.pad(q, (0, 0, 0, back)).view(b, h, nc, C, d)  # [B, H, nc, C, D]
    phi_qc = F.pad(phi_q, (0, 0, 0, back)).view(b, h, nc, C, nf)  # [B, H, nc, C, 2F]
    kb, vb, phi_kb = blocks(k), blocks(v), blocks(phi_k)  # [B, H, nc, L, *]

    a = torch.arange(C, device=q.device)[:, None]  # query offset in chunk
    e = torch.arange(L, device=q.device)[None, :]  # key offset in block: key = cC - W + 1 + e
    c = torch.arange(nc, device=q.device)[:, None, None]
    key_pos = c * C - (W - 1) + e  # [nc, 1, L]
    in_window = (e >= a) & (e <= a + W - 1) & (key_pos >= 0)  # [nc, C, L]
    is_older = e < a  # [C, L]; padding keys have phi_k = 0

    scores = window_scores(qc, kb, scale, softcap)  # [B, H, nc, C, L]
    scores = scores.masked_fill(~in_window, float("-inf"))
    a_win = torch.exp(scores - scores.amax(-1, keepdim=True))
    a_lin = (phi_qc @ phi_kb.transpose(-1, -2)).masked_fill(~is_older, 0.0)

    # Keys before block c: padded indices [0, cC) = whole padded blocks 0 .. c-1 of size C.
    phi_kp = F.pad(phi_k, (0, 0, W - 1, 0))[:, :, : (nc - 1) * C]
    vp = F.pad(v, (0, 0, W - 1, 0))[:, :, : (nc - 1) * C]
    block_kv = torch.einsum("bhcnf,bhcnd->bhcfd", phi_kp.reshape(b, h, nc - 1, C, nf), vp.reshape(b, h, nc - 1, C, d))
    block_z = phi_kp.reshape(b, h, nc - 1, C, nf).sum(3)
    prefix_kv = F.pad(block_kv.cumsum(2), (0, 0, 0, 0, 1, 0))  # [B, H, nc, 2F, D], exclusive
    prefix_z = F.pad(block_z.cumsum(2), (0, 0, 1, 0))  # [B, H, nc, 2F]
    if kv0 is not None:
        prefix_kv = prefix_kv + kv0[:, :, None]
        prefix_z = prefix_z + z0[:, :, None]

    factor = torch.sigmoid(window_factor.to(q.dtype))[None, :, None, None, None]
    num = factor * (a_win @ vb) + a_lin @ vb + phi_qc @ prefix_kv
    den = (factor * a_win.sum(-1, keepdim=True) + a_lin.sum(-1, keepdim=True)
           + (phi_qc @ prefix_z.unsqueeze(-1)))
    out = (num / den).reshape(b, h, n_pad, d)[:, :, p:n]
    state = _final_state(phi_k, k, v, p, kv0, z0, window_size, start) if output_final_state else None
    return out.to(out_dtype), state


def hybrid_attention_step(q, k, v, fq_weight, fk_weight, window_factor, state: HybridState, *, scale=None,
                          softcap=None):
    """One decode step on the fixed state. q [B, H, 1, D], k, v [B, Hkv, 1, D].

    Pure: returns (output [B, H, 1, D], new state); the input state is not modified.
    """
    out_dtype = v.dtype
    ct = state.kv.dtype
    heads = q.shape[1]
    q = q.to(ct)
    k, v = repeat_kv_heads(k.to(ct), heads), repeat_kv_heads(v.to(ct), heads)
    W, t = state.window_size, state.position
    slot = t % W
    kv, z = state.kv, state.z
    if t >= W:  # the key at position t-W leaves the window of query t
        phi_leave = feature_map(state.k_window[:, :, slot : slot + 1], fk_weight)  # [B, H, 1, 2F]
        kv = kv + phi_leave.transpose(-1, -2) @ state.v_window[:, :, slot : slot + 1]
        z = z + phi_leave[:, :, 0]
    k_window = state.k_window.clone()
    v_window = state.v_window.clone()
    k_window[:, :, slot] = k[:, :, 0]
    v_window[:, :, slot] = v[:, :, 0]

    valid = torch.arange(W, device=q.device) <= t  # slots filled so far (all of them once t >= W-1)
    scores = window_scores(q, k_window, scale, softcap)  # [B, H, 1, W]
    scores = scores.masked_fill(~valid, float("-inf"))
    a_win = torch.exp(scores - scores.amax(-1, keepdim=True))
    phi_q = feature_map(q, fq_weight)  # [B, H, 1, 2F]
    factor = torch.sigmoid(window_factor.to(ct))[None, :, None, None]
    num = factor * (a_win @ v_window) + phi_q @ kv
    den = factor * a_win.sum(-1, keepdim=True) + phi_q @ z.unsqueeze(-1)
    return (num / den).to(out_dtype), HybridState(kv, z, k_window, v_window, t + 1)


def hybrid_attention_recurrent(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64,
                               chunk_size=None, initial_state=None, output_final_state=False, scale=None,
                               softcap=None):
    """Recurrent form: token by token with :func:`hybrid_attention_step`. ``chunk_size`` is ignored."""
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size)
    b, h, n, d = q.shape
    if initial_state is None:
        ct = _compute_dtype(q)
        initial_state = empty_state(b, h, d, fq_weight.shape[-1], window_size, dtype=ct, device=q.device)
    elif initial_state.window_size != window_size:
        raise ValueError(f"state window {initial_state.window_size} != window_size {window_size}")
    state, outs = initial_state, []
    for i in range(n):
        o, state = hybrid_attention_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1],
                                         fq_weight, fk_weight, window_factor, state, scale=scale, softcap=softcap)
        outs.append(o)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d).to(v.dtype)
    return out, (state if output_final_state else None)


def hybrid_attention_block_step(q, k, v, fq_weight, fk_weight, window_factor, kv, z, k_window, v_window,
                                position, *, scale=None, softcap=None):
    """A block of T new tokens (T >= 1) on the fixed state, as a pure tensor function.

    The graph-friendly form used by exports (ONNX) and mirrored by the numpy runtime: no Python
    control flow depends on the data, ``position`` (tokens seen before the block) is a 0-d int64
    tensor, and the same function serves prefill (T > 1) and decode (T = 1). The W window keys
    are laid out in time order in front of the T new ones; query i then sees, densely, window keys
    at extended index e in (i, i + W] and linear keys at e <= i, all masked to real positions.
    Cost O(T * (W + T)) per block: callers bound T (prefill in blocks), so it stays linear overall.

    q [B, H, T, D]; k, v [B, Hkv, T, D]; kv [B, H, 2F, D]; z [B, H, 2F]; k_window, v_window
    [B, H, W, D] (ring, slot p % W). Returns (out [B, H, T, D], kv, z, k_window, v_window).
    """
    out_dtype = v.dtype
    ct = kv.dtype
    b, h, t, d = q.shape
    w = k_window.shape[2]
    q, k, v = q.to(ct), repeat_kv_heads(k.to(ct), h), repeat_kv_heads(v.to(ct), h)
    position = position.to(torch.int64)
    # window keys in time order: extended index e < W holds absolute position position - W + e
    ring = (torch.arange(w, device=q.device) + position) % w
    k_ext = torch.cat([k_window.index_select(2, ring), k], dim=2)  # [B, H, W + T, D]
    v_ext = torch.cat([v_window.index_select(2, ring), v], dim=2)
    e = torch.arange(w + t, device=q.device)
    real = (position - w + e) >= 0  # [W + T]: slots never written are not keys
    i = torch.arange(t, device=q.device)[:, None]
    in_window = (e[None, :] > i) & (e[None, :] <= i + w) & real[None, :]  # [T, W + T]
    is_older = (e[None, :] <= i) & real[None, :]

    phi_q = feature_map(q, fq_weight)  # [B, H, T, 2F]
    phi_k = feature_map(k_ext, fk_weight)  # [B, H, W + T, 2F]
    scores = window_scores(q, k_ext, scale, softcap)
    scores = scores.masked_fill(~in_window, float("-inf"))
    a_win = torch.exp(scores - scores.amax(-1, keepdim=True))
    a_lin = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~is_older, 0.0)
    factor = torch.sigmoid(window_factor.to(ct))[None, :, None, None]
    num = factor * (a_win @ v_ext) + a_lin @ v_ext + phi_q @ kv
    den = factor * a_win.sum(-1, keepdim=True) + a_lin.sum(-1, keepdim=True) + phi_q @ z.unsqueeze(-1)
    out = (num / den).to(out_dtype)

    # keys leaving the window in this block: extended e < T (absolute position <= position + T - 1 - W)
    leaving = (real & (e < t)).to(ct)[None, None, :, None]  # [1, 1, W + T, 1]
    phi_leave = phi_k * leaving
    kv = kv + phi_leave.transpose(-1, -2) @ v_ext
    z = z + phi_leave.sum(2)
    # the newest W keys (extended T .. T+W-1, positions position+T-W ..) back into ring slots
    slot_to_ext = t + (torch.arange(w, device=q.device) - position - t) % w
    k_window = k_ext.index_select(2, slot_to_ext)
    v_window = v_ext.index_select(2, slot_to_ext)
    return out, kv, z, k_window, v_window



def hybrid_attention_decode_step(q, k, v, fq_weight, fk_weight, window_factor, kv, z, k_window, v_window,
                                 position, *, scale=None, softcap=None):
    """One new token on the fixed state, as a pure tensor function: the decode graph's form.

    :func:`hybrid_attention_step` with the state as separate tensors and ``position`` a 0-d int64
    tensor, so no Python control flow depends on the data (exports trace it into a static graph).
    It does T = 1's work only: the key at ``position - W`` (ring slot ``position % W``) is folded
    into the linear state, the new key takes its slot, and the query reads the ring's filled slots
    (slot order: the sums need no sorting). The block step at T = 1 computes the same, but pays for
    re-ordering the ring and re-featurising all W + 1 keys every token.

    q [B, H, 1, D]; k, v [B, Hkv, 1, D]; state as in :func:`hybrid_attention_block_step`.
    Returns (out [B, H, 1, D], kv, z, k_window, v_window).
    """
    out_dtype = v.dtype
    ct = kv.dtype
    w = k_window.shape[2]
    q = q.to(ct)
    k, v = repeat_kv_heads(k.to(ct), q.shape[1]), repeat_kv_heads(v.to(ct), q.shape[1])
    position = position.to(torch.int64)
    slot = (torch.arange(w, device=q.device) == position % w)[None, None, :, None]  # [1, 1, W, 1]
    k_leave = (k_window * slot).sum(2, keepdim=True)  # [B, H, 1, D]
    v_leave = (v_window * slot).sum(2, keepdim=True)
    phi_leave = feature_map(k_leave, fk_weight) * (position >= w).to(ct)  # nothing leaves before W tokens
    kv = kv + phi_leave.transpose(-1, -2) @ v_leave
    z = z + phi_leave[:, :, 0]
    k_window = torch.where(slot, k, k_window)
    v_window = torch.where(slot, v, v_window)

    filled = torch.arange(w, device=q.device) <= position
    scores = window_scores(q, k_window, scale, softcap)  # [B, H, 1, W]
    scores = scores.masked_fill(~filled, float("-inf"))
    a_win = torch.exp(scores - scores.amax(-1, keepdim=True))
    phi_q = feature_map(q, fq_weight)
    factor = torch.sigmoid(window_factor.to(ct))[None, :, None, None]
    num = factor * (a_win @ v_window) + phi_q @ kv
    den = factor * a_win.sum(-1, keepdim=True) + phi_q @ z.unsqueeze(-1)
    return (num / den).to(out_dtype), kv, z, k_window, v_window

FORMS = {
    "reference": hybrid_attention_reference,
    "chunked": hybrid_attention_chunked,
    "recurrent": hybrid_attention_recurrent,
}
