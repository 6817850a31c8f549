"""The LoLCATs hybrid attention in PyTorch: softmax over a sliding window (and sink tokens) plus
linear attention on older keys.

The math and its options (feature maps before or after RoPE, a learned decay, sink tokens) are
defined in :mod:`edge_lolcats.arch.hybrid`, which also holds the block and decode steps on the
fixed state that every backend runs. This module adds the forms for training and prefill, which
share one signature and return ``(output, state)``:

- :func:`hybrid_attention_reference` - quadratic, dense masks over absolute positions, obviously
  correct. For tests.
- :func:`hybrid_attention_chunked` - chunked parallel form, O(N*(C+W) + N*F*D) time and O(N)
  memory, exact decay inside and across chunks. For training and prefill.
- :func:`hybrid_attention_recurrent` - a loop of :func:`hybrid_attention_step` (the arch decode step
  on torch tensors) on a fixed-size state.

Shapes: q [B, H, N, D]; k, v [B, Hkv, N, D] with H a multiple of Hkv; feature weights [H, D, F];
window_factor [H]. Options, the same in every form: ``scale`` (1/sqrt(D) unless the model says
otherwise), ``softcap`` (Gemma 2), ``rope`` (the layer's RoPE inverse frequencies [R/2]: q and k
are given before RoPE, the window rotates them, the feature maps do not; None: q and k are used as
given), ``log_decay`` [H] (log lam, <= 0; None: no decay), ``sink_tokens``. Everything
accumulates in float32 (float64 if the inputs are float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from edge_lolcats.arch import hybrid
from edge_lolcats.arch.ops import TorchOps
from edge_lolcats.arch.state import StateLayout

# sigmoid(-2.1972) = 0.1: the window starts with a small weight next to the linear part (LoLCATs).
WINDOW_FACTOR_INIT = -2.1972
FEATURE_MAP_EPS = hybrid.FEATURE_MAP_EPS


@dataclass
class HybridState:
    """Fixed-size decode state of one hybrid attention layer (arch.state, arch.hybrid)."""

    kv: torch.Tensor  # [B, H, 2F, D]
    z: torch.Tensor  # [B, H, 2F]
    k_window: torch.Tensor  # [B, Hkv, W, D], after RoPE
    v_window: torch.Tensor  # [B, Hkv, W, D]
    k_sink: torch.Tensor  # [B, Hkv, n_s, D], after RoPE at their text positions (n_s may be 0)
    v_sink: torch.Tensor  # [B, Hkv, n_s, D]
    position: int  # number of tokens seen

    @property
    def window_size(self) -> int:
        return self.k_window.shape[2]

    @property
    def sink_tokens(self) -> int:
        return self.k_sink.shape[2]

    @property
    def parts(self) -> tuple:
        """The state's tensors in layout order (sinks only if there are any)."""
        base = (self.kv, self.z, self.k_window, self.v_window)
        return base + ((self.k_sink, self.v_sink) if self.sink_tokens else ())

    @classmethod
    def from_parts(cls, parts, position: int) -> "HybridState":
        parts = list(parts)
        if len(parts) == 4:
            b, hkv, _, d = parts[2].shape
            none = parts[2].new_zeros(b, hkv, 0, d)
            parts += [none, none]
        return cls(*parts, position)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)

    def clone(self) -> "HybridState":
        return HybridState(*(getattr(self, f.name).clone() for f in fields(self)[:6]), self.position)

    def to(self, *args, **kwargs) -> "HybridState":
        return HybridState(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)[:6]), self.position)


def empty_state(batch: int, heads: int, head_dim: int, feature_dim: int, window_size: int, *, kv_heads: int | None = None,
                sink_tokens: int = 0, dtype=torch.float32, device=None) -> HybridState:
    """The state before any token: zero sums, empty window and sinks (shapes: arch.state)."""
    layout = StateLayout(1, heads, head_dim, feature_dim, window_size, kv_heads=kv_heads or heads,
                         sink_tokens=sink_tokens)
    zeros = {p: torch.zeros(batch, *s, dtype=dtype, device=device) for p, s in layout.part_shapes().items()}
    return HybridState.from_parts(zeros.values(), 0)


def feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map. x [B, H, N, D], weight [H, D, F] -> [B, H, N, 2F], positive."""
    return hybrid.feature_map(TorchOps(x.device), x, weight.to(x.dtype))


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


def _rotate(x, rope, positions):
    return hybrid.rotate(TorchOps(x.device), x, rope.to(x.device), positions)


def _check(q, k, v, fq_weight, fk_weight, window_factor, window_size, log_decay=None, sink_tokens=0):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    heads, head_dim = q.shape[1], q.shape[3]
    if heads % k.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[1]} key/value heads")
    for name, w in (("fq_weight", fq_weight), ("fk_weight", fk_weight)):
        if w.dim() != 3 or w.shape[0] != heads or w.shape[1] != head_dim:
            raise ValueError(f"{name} must be [H={heads}, D={head_dim}, F]; got {tuple(w.shape)}")
    if window_factor.shape != (heads,):
        raise ValueError(f"window_factor must be [H={heads}]; got {tuple(window_factor.shape)}")
    if log_decay is not None and log_decay.shape != (heads,):
        raise ValueError(f"log_decay must be [H={heads}]; got {tuple(log_decay.shape)}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1; got {window_size}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0; got {sink_tokens}")


@dataclass
class _Keys:
    """Every key the parallel forms look at, in time order: the initial state's ring (``prefix``
    of them), then the new ones. Keys [B, Hkv, E, D]: ``k_soft`` as the softmax reads them (after
    RoPE), ``k_feat`` as the feature maps read them; ``positions`` [E] absolute."""

    q_soft: torch.Tensor  # [B, H, E, D]: zero queries in front of the new ones (their outputs are dropped)
    q_feat: torch.Tensor
    k_soft: torch.Tensor
    k_feat: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    prefix: int
    kv0: torch.Tensor | None
    z0: torch.Tensor | None
    k_sink: torch.Tensor | None  # [B, Hkv, n_s, D] after RoPE at positions 0..n_s-1 (zeros where unseen)
    v_sink: torch.Tensor | None


def _keys(q, k, v, window_size, initial_state, rope, sink_tokens) -> _Keys:
    ct = _compute_dtype(q)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    b, h, n, d = q.shape
    t0 = initial_state.position if initial_state is not None else 0
    pos = torch.arange(t0, t0 + n, device=q.device)
    q_soft = q if rope is None else _rotate(q, rope, pos)
    k_soft = k if rope is None else _rotate(k, rope, pos)
    k_feat, q_feat, positions = k, q, pos
    kv0 = z0 = None
    k_sink = v_sink = None
    p = 0
    if initial_state is not None:
        if initial_state.window_size != window_size:
            raise ValueError(f"state window {initial_state.window_size} != window_size {window_size}")
        if initial_state.sink_tokens != sink_tokens:
            raise ValueError(f"state has {initial_state.sink_tokens} sink tokens, the call {sink_tokens}")
        p = min(t0, window_size)
        hist = torch.arange(t0 - p, t0, device=q.device)
        slots = hist % window_size  # time order
        k_hist = initial_state.k_window.to(ct)[:, :, slots]
        v_hist = initial_state.v_window.to(ct)[:, :, slots]
        k_hist_feat = k_hist if rope is None else _rotate(k_hist, rope, -hist)  # back to before RoPE
        zeros = q.new_zeros(b, h, p, d)
        q_soft, q_feat = torch.cat([zeros, q_soft], 2), torch.cat([zeros, q], 2)
        k_soft, k_feat = torch.cat([k_hist, k_soft], 2), torch.cat([k_hist_feat, k], 2)
        v = torch.cat([v_hist, v], 2)
        positions = torch.cat([hist, pos])
        kv0, z0 = initial_state.kv.to(ct), initial_state.z.to(ct)
    if sink_tokens:
        # sink s: from the state if it came before this call, else the new key at s - t0
        new = k_soft[:, :, p : p + max(0, min(sink_tokens - t0, n))]
        new_v = v[:, :, p : p + new.shape[2]]
        old_k = initial_state.k_sink.to(ct)[:, :, : min(t0, sink_tokens)] if initial_state is not None else new[:, :, :0]
        old_v = initial_state.v_sink.to(ct)[:, :, : old_k.shape[2]] if initial_state is not None else new_v[:, :, :0]
        missing = sink_tokens - old_k.shape[2] - new.shape[2]
        pad = k.new_zeros(b, k.shape[1], missing, d)
        k_sink, v_sink = torch.cat([old_k, new, pad], 2), torch.cat([old_v, new_v, pad], 2)
    return _Keys(q_soft, q_feat, k_soft, k_feat, v, positions, p, kv0, z0, k_sink, v_sink)


def _sink_scores(keys: _Keys, rope, window_size, sink_tokens, scale, softcap):
    """[B, H, E, n_s] scores of every query against the sinks, -inf where a sink is not (yet) in
    the softmax set, i.e. still in the query's window. Queries meet the sinks at positions just
    before their window: the query is rotated to min(t, W + n_s - 1) and sink s sits at s."""
    h = keys.q_soft.shape[1]
    t = keys.positions
    q = keys.q_soft if rope is None else _rotate(keys.q_feat, rope, torch.clamp(t, max=window_size + sink_tokens - 1))
    s = window_scores(q, repeat_kv_heads(keys.k_sink, h), scale, softcap)
    active = torch.arange(sink_tokens, device=t.device)[None, :] <= (t[:, None] - window_size)
    return s.masked_fill(~active, float("-inf"))


def _final_state(keys: _Keys, phi_k, window_size, sink_tokens, log_decay) -> HybridState:
    """State after every key: decayed sums over keys that left the window (sinks excepted), the
    ring of the rest (KV heads), the sinks."""
    e = keys.positions.shape[0]
    end = int(keys.positions[-1]) + 1  # tokens seen after the call
    n_old = max(0, e - window_size)
    weight = (keys.positions[:n_old] >= sink_tokens).to(phi_k.dtype)[:, None]
    if log_decay is not None:
        lag = (end - 1 - window_size - keys.positions[:n_old]).to(phi_k.dtype)
        weight = weight[None] * torch.exp(lag[None, :, None] * log_decay.to(phi_k.dtype)[:, None, None])
    phi_old = phi_k[:, :, :n_old] * weight
    h = phi_k.shape[1]
    kv = torch.einsum("bhnf,bhnd->bhfd", phi_old, repeat_kv_heads(keys.v[:, :, :n_old], h))
    z = phi_old.sum(2)
    if keys.kv0 is not None:
        t0 = end - (e - keys.prefix)
        carry = 1.0 if log_decay is None else torch.exp(log_decay.to(phi_k.dtype) * (end - t0))
        carry = torch.as_tensor(carry, dtype=phi_k.dtype)
        kv, z = kv + keys.kv0 * carry.reshape(-1, 1, 1), z + keys.z0 * carry.reshape(-1, 1)
    b, hkv, _, d = keys.k_soft.shape
    k_window = keys.k_soft.new_zeros(b, hkv, window_size, d)
    v_window = keys.v.new_zeros(b, hkv, window_size, d)
    slots = keys.positions[n_old:] % window_size
    k_window[:, :, slots] = keys.k_soft[:, :, n_old:]
    v_window[:, :, slots] = keys.v[:, :, n_old:]
    if sink_tokens:
        k_sink, v_sink = keys.k_sink, keys.v_sink
    else:
        k_sink = v_sink = keys.k_soft.new_zeros(b, hkv, 0, d)
    return HybridState(kv, z, k_window, v_window, k_sink, v_sink, end)


def _no_tokens(q, k, v, fq_weight, window_size, initial_state, output_final_state, sink_tokens):
    """The answer for N = 0: no output, the state unchanged (or empty)."""
    b, h, _, d = q.shape
    if not output_final_state:
        state = None
    elif initial_state is not None:
        state = initial_state.clone()
    else:
        state = empty_state(b, h, d, fq_weight.shape[-1], window_size, kv_heads=k.shape[1], sink_tokens=sink_tokens,
                            dtype=_compute_dtype(q), device=q.device)
    return v.new_zeros(b, h, 0, d), state


def hybrid_attention_reference(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64,
                               chunk_size=None, initial_state=None, output_final_state=False, scale=None,
                               softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """Quadratic form: dense [E, E] matrices over absolute positions, straight from the formula in
    :mod:`edge_lolcats.arch.hybrid`. The specification; tests only. ``chunk_size`` is ignored."""
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size, log_decay, sink_tokens)
    if q.shape[2] == 0:
        return _no_tokens(q, k, v, fq_weight, window_size, initial_state, output_final_state, sink_tokens)
    out_dtype, h, W = v.dtype, q.shape[1], window_size
    keys = _keys(q, k, v, W, initial_state, rope, sink_tokens)
    ct = keys.q_soft.dtype
    t = keys.positions[:, None]  # query positions [E, 1]
    j = keys.positions[None, :]  # key positions [1, E]
    in_window = (j <= t) & (j > t - W)
    linear = (j <= t - W) & (j >= sink_tokens)
    v_rep = repeat_kv_heads(keys.v, h)

    scores = window_scores(keys.q_soft, repeat_kv_heads(keys.k_soft, h), scale, softcap).masked_fill(~in_window, float("-inf"))
    values = v_rep
    if sink_tokens:
        scores = torch.cat([scores, _sink_scores(keys, rope, W, sink_tokens, scale, softcap)], -1)
        values = torch.cat([v_rep, repeat_kv_heads(keys.v_sink, h)], 2)
    a_soft = torch.exp(scores - scores.amax(-1, keepdim=True))
    phi_q, phi_k = feature_map(keys.q_feat, fq_weight), feature_map(repeat_kv_heads(keys.k_feat, h), fk_weight)
    a_lin = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~linear, 0.0)
    state_q = phi_q
    if log_decay is not None:
        ld = log_decay.to(ct)[:, None, None]
        a_lin = a_lin * torch.exp((t - W - j).clamp(min=0).to(ct) * ld)
        if keys.kv0 is not None:  # the state's sums are weighted for position t0
            t0 = keys.positions[keys.prefix]
            state_q = phi_q * torch.exp((t - t0 + 1).clamp(min=0).to(ct) * ld)  # prefix rows: dropped
    factor = torch.sigmoid(window_factor.to(ct))[None, :, None, None]
    num = factor * (a_soft @ values) + a_lin @ v_rep
    den = factor * a_soft.sum(-1, keepdim=True) + a_lin.sum(-1, keepdim=True)
    if keys.kv0 is not None:  # history older than the initial window
        num = num + state_q @ keys.kv0
        den = den + state_q @ keys.z0.unsqueeze(-1)
    out = (num / den)[:, :, keys.prefix:]
    state = _final_state(keys, phi_k, W, sink_tokens, log_decay) if output_final_state else None
    return out.to(out_dtype), state


def hybrid_attention_chunked(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64,
                             chunk_size=64, initial_state=None, output_final_state=False, scale=None,
                             softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """Chunked parallel form: O(N*(C+W)*D + N*F*D) time, O(N*(C+W)) memory for chunk size C.

    Queries are cut into chunks of C. Chunk c (extended positions cC .. cC+C-1) sees, densely, the
    key block cC-W+1 .. cC+C-1: every key that is in some query's window, plus the keys that leave
    the window inside the chunk (those get linear scores under a triangular mask, decayed by
    lam^(a-1-e)). Keys before that block are older than every query's window: their contribution is
    a per-chunk prefix state P_c, referenced to the chunk's first query (P_{c+1} = lam^C P_c + block
    sum c, written as one [nc, nc] matrix of powers of lam), read by query a of the chunk as lam^a P_c.
    """
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size, log_decay, sink_tokens)
    if q.shape[2] == 0:
        return _no_tokens(q, k, v, fq_weight, window_size, initial_state, output_final_state, sink_tokens)
    out_dtype, h = v.dtype, q.shape[1]
    C, W = chunk_size, window_size
    if C < 1:
        raise ValueError(f"chunk_size must be >= 1; got {C}")
    keys = _keys(q, k, v, W, initial_state, rope, sink_tokens)
    ct = keys.q_soft.dtype
    b, _, n, d = keys.q_soft.shape
    phi_q = feature_map(keys.q_feat, fq_weight)
    phi_k = feature_map(repeat_kv_heads(keys.k_feat, h), fk_weight)
    if sink_tokens:  # sinks never enter the linear sums
        phi_k = phi_k * (keys.positions >= sink_tokens).to(ct)[:, None]
    nf = phi_q.shape[-1]
    k_rep, v_rep = repeat_kv_heads(keys.k_soft, h), repeat_kv_heads(keys.v, h)

    nc = -(-n // C)  # number of query chunks
    n_pad = nc * C
    L = C + W - 1  # key block length
    # Front pad of W-1 puts key block c at padded index c*C; back pad makes every block whole.
    # Zero phi_k on padding keeps it out of the linear sums; the window mask keeps it out of softmax.
    back = n_pad - n

    def blocks(x):  # [B, H, n, X] -> [B, H, nc, L, X]
        x = F.pad(x, (0, 0, W - 1, back))
        return x.unfold(2, L, C).transpose(-1, -2)

    qc = F.pad(keys.q_soft, (0, 0, 0, back)).view(b, h, nc, C, d)  # [B, H, nc, C, D]
    phi_qc = F.pad(phi_q, (0, 0, 0, back)).view(b, h, nc, C, nf)  # [B, H, nc, C, 2F]
    kb, vb, phi_kb = blocks(k_rep), blocks(v_rep), blocks(phi_k)  # [B, H, nc, L, *]

    a = torch.arange(C, device=q.device)[:, None]  # query offset in chunk
    e = torch.arange(L, device=q.device)[None, :]  # key offset in block: key = cC - W + 1 + e
    c = torch.arange(nc, device=q.device)[:, None, None]
    first = int(keys.positions[0])  # absolute position of extended index 0
    key_pos = first + c * C - (W - 1) + e  # [nc, 1, L]
    in_window = (e >= a) & (e <= a + W - 1) & (key_pos >= 0)  # [nc, C, L]
    is_older = e < a  # [C, L]; padding keys have phi_k = 0

    scores = window_scores(qc, kb, scale, softcap).masked_fill(~in_window, float("-inf"))  # [B, H, nc, C, L]
    if sink_tokens:
        s_scores = F.pad(_sink_scores(keys, rope, W, sink_tokens, scale, softcap), (0, 0, 0, back),
                         value=float("-inf")).view(b, h, nc, C, sink_tokens)
        m = torch.maximum(scores.amax(-1, keepdim=True), s_scores.amax(-1, keepdim=True))
        a_sink = torch.exp(s_scores - m)
    else:
        m = scores.amax(-1, keepdim=True)
    a_win = torch.exp(scores - m)
    a_lin = (phi_qc @ phi_kb.transpose(-1, -2)).masked_fill(~is_older, 0.0)

    # Keys before block c: padded indices [0, cC) = whole padded blocks 0 .. c-1 of size C.
    phi_kp = F.pad(phi_k, (0, 0, W - 1, 0))[:, :, : (nc - 1) * C].reshape(b, h, nc - 1, C, nf)
    vp = F.pad(v_rep, (0, 0, W - 1, 0))[:, :, : (nc - 1) * C].reshape(b, h, nc - 1, C, d)
    if log_decay is None:
        block_kv = torch.einsum("bhcnf,bhcnd->bhcfd", phi_kp, vp)
        block_z = phi_kp.sum(3)
        prefix_kv = F.pad(block_kv.cumsum(2), (0, 0, 0, 0, 1, 0))  # [B, H, nc, 2F, D], exclusive
        prefix_z = F.pad(block_z.cumsum(2), (0, 0, 1, 0))  # [B, H, nc, 2F]
        state_carry = None
        query_decay = None
    else:
        ld = log_decay.to(ct)
        r = torch.arange(C, device=q.device)
        phi_kp = phi_kp * torch.exp((C - 1 - r).to(ct)[None, :, None] * ld[:, None, None])[:, None]  # lam^(C-1-r)
        block_kv = torch.einsum("bhcnf,bhcnd->bhcfd", phi_kp, vp)
        block_z = phi_kp.sum(3)
        # P_c = sum_{c' < c} lam^(C (c - 1 - c')) block_c'
        ci = torch.arange(nc, device=q.device)
        lag = (ci[:, None] - 1 - ci[None, : nc - 1])  # [nc, nc - 1]
        powers = torch.exp(lag.clamp(min=0).to(ct)[None] * C * ld[:, None, None]) * (lag >= 0).to(ct)  # [H, nc, nc-1]
        prefix_kv = torch.einsum("hcx,bhxfd->bhcfd", powers, block_kv)
        prefix_z = torch.einsum("hcx,bhxf->bhcf", powers, block_z)
        a_lin = a_lin * torch.exp((a - 1 - e).clamp(min=0).to(ct) * ld[:, None, None])[None, :, None]
        query_decay = torch.exp(a.to(ct) * ld[:, None, None])[None, :, None]  # [1, H, 1, C, 1]: lam^a
        # the initial state is weighted for position t0: query (c, a) reads it with lam^(first + cC + a - t0 + 1),
        # one exponent per row (>= 0 for every kept row; the state's prefix rows are dropped, clamped)
        t0 = int(keys.positions[keys.prefix])
        lag = (first + ci[:, None] * C + torch.arange(C, device=q.device)[None, :] - t0 + 1).clamp(min=0)
        state_carry = torch.exp(lag.to(ct)[None] * ld[:, None, None])[None, :, :, :, None]  # [1, H, nc, C, 1]
    phi_read = phi_qc if query_decay is None else phi_qc * query_decay
    state_num = state_den = 0.0
    if keys.kv0 is not None:
        if state_carry is None:
            prefix_kv = prefix_kv + keys.kv0[:, :, None]
            prefix_z = prefix_z + keys.z0[:, :, None]
        else:
            phi_state = phi_qc * state_carry
            state_num = phi_state @ keys.kv0[:, :, None]
            state_den = phi_state @ keys.z0[:, :, None, :, None]

    factor = torch.sigmoid(window_factor.to(ct))[None, :, None, None, None]
    num = factor * (a_win @ vb) + a_lin @ vb + phi_read @ prefix_kv + state_num
    den = (factor * a_win.sum(-1, keepdim=True) + a_lin.sum(-1, keepdim=True)
           + (phi_read @ prefix_z.unsqueeze(-1)) + state_den)
    if sink_tokens:
        num = num + factor * (a_sink @ repeat_kv_heads(keys.v_sink, h)[:, :, None])
        den = den + factor * a_sink.sum(-1, keepdim=True)
    out = (num / den).reshape(b, h, n_pad, d)[:, :, keys.prefix:n]
    state = _final_state(keys, phi_k, W, sink_tokens, log_decay) if output_final_state else None
    return out.to(out_dtype), state


def hybrid_attention_step(q, k, v, fq_weight, fk_weight, window_factor, state: HybridState, *, scale=None,
                          softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """One decode step on the fixed state (:func:`edge_lolcats.arch.hybrid.decode_step` on torch
    tensors). q [B, H, 1, D], k, v [B, Hkv, 1, D]. Pure: returns (output [B, H, 1, D], new state)."""
    if state.sink_tokens != sink_tokens:
        raise ValueError(f"state has {state.sink_tokens} sink tokens, the call {sink_tokens}")
    ct = state.kv.dtype
    xp = TorchOps(q.device)
    out, parts = hybrid.decode_step(
        xp, q.to(ct), k.to(ct), v.to(ct), fq_weight.to(ct), fk_weight.to(ct), window_factor.to(ct),
        None if log_decay is None else log_decay.to(ct), state.parts, state.position,
        scale=scale if scale is not None else 1 / math.sqrt(q.shape[-1]), softcap=softcap,
        rope=None if rope is None else rope.to(q.device), sink_tokens=sink_tokens)
    return out.to(v.dtype), HybridState.from_parts(parts, state.position + 1)


def hybrid_attention_recurrent(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64,
                               chunk_size=None, initial_state=None, output_final_state=False, scale=None,
                               softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """Recurrent form: token by token with :func:`hybrid_attention_step`. ``chunk_size`` is ignored."""
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size, log_decay, sink_tokens)
    b, h, n, d = q.shape
    if initial_state is None:
        initial_state = empty_state(b, h, d, fq_weight.shape[-1], window_size, kv_heads=k.shape[1],
                                    sink_tokens=sink_tokens, dtype=_compute_dtype(q), device=q.device)
    elif initial_state.window_size != window_size:
        raise ValueError(f"state window {initial_state.window_size} != window_size {window_size}")
    state, outs = initial_state, []
    for i in range(n):
        o, state = hybrid_attention_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1],
                                         fq_weight, fk_weight, window_factor, state, scale=scale, softcap=softcap,
                                         rope=rope, log_decay=log_decay, sink_tokens=sink_tokens)
        outs.append(o)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d).to(v.dtype)
    return out, (state if output_final_state else None)


FORMS = {
    "reference": hybrid_attention_reference,
    "chunked": hybrid_attention_chunked,
    "recurrent": hybrid_attention_recurrent,
}
