"""Triton kernels for the hybrid attention: forward, backward and the decode step.

The math is the one in :mod:`edge_lolcats.arch.hybrid` (read its docstring first), every
recurrence option included; these kernels compute exactly that, in blocks, and are tested against
the quadratic reference of :mod:`edge_lolcats.nn.hybrid_attention`.

Layout. The wrapper lays out what the kernels see with the PyTorch forms' own front: q, k as the
softmax reads them (after RoPE) and, separately, phi_q, phi_k of q, k as the feature maps read them
(before RoPE with ``pre_rope``; zero for sink positions, which never enter the linear sums); the
sinks' keys and values and each query's rotation for them (``q_sink``). Grouped kv heads are
repeated up to H, and everything becomes contiguous [B*H, N, X]. Feature maps and RoPE run in
PyTorch (autograd included); the kernels take phi_q, phi_k as inputs and return their gradients.
Queries and keys are cut into blocks of C (the chunk size). With the decay, a linear weight is
lam^(i-W-j) and the states below are decayed sums (S_{c+1} = lam^C S_c + block sum c); the
gradient of log(lam) gathers the lags times the linear terms (per query, in the dq kernel) and the
states' own lags (in the wrapper, from each state's gradient share and its lag-weighted sums).
Sinks join the window's online softmax (their max index is N + s).

Forward:
1. ``_chunk_sums`` (one program per block, in parallel): phi_k^T v and sum phi_k of each block;
   a cumulative sum (torch) turns them into the states before each block,
   S_c = sum_{j < cC} phi_k(k_j) v_j^T and z_c, [B*H, NC + 1, 2F, D] in float32: linear in N.
2. ``_hybrid_fwd``: one program per query block qb. Its queries see keys >= (qb - LOOKBACK) * C
   densely (LOOKBACK = ceil((W - 1) / C) blocks back, enough to hold every window) with a window
   mask (softmax part, online max) and an "older" mask (linear part), and everything before
   through S and z of block qb - LOOKBACK. It saves, per query, the window max m, the position of
   that max, and the normalizer den. No N x N matrix exists at any point.

Backward, with g = dL/do, G = g / den and delta = (g . o) / den:
    dp_ij = a (G_i . v_j - delta_i)       (window weights p_ij = exp(s_ij - m_i))
    dl_ij = G_i . v_j - delta_i           (linear weights, older keys)
    ds_ij = p_ij dp_ij + [j = argmax_i] dm_i,  dm_i = -sum_j p_ij dp_ij
The max m_i is part of the function (the window weight is a * exp(-m_i) relative to the linear
part), so its gradient goes to the key that attained it, as torch.amax's does.
da (per head) = -sum_i dm_i / a.
3. ``_hybrid_bwd_dq``: per query block, dq, dphi_q (dense part + S_pre^T G - delta z_pre), dm,
   delta, and the block's share phi_q^T G (and -phi_q^T delta) of the gradient of the state it
   read; a cumulative sum over blocks (torch) turns the shares into dS_c, the gradient reaching
   block c's keys through every later state.
4. ``_hybrid_bwd_dkv``: per key block, over the LOOKBACK + 1 query blocks that see it densely,
   dk, dv, dphi_k, plus the state part phi_k dS and v dS^T + dz.

Decode: ``_decode_step`` does one token on the recurrent state (feature maps included), in place.

Precision: products run on the inputs' dtype (bfloat16 or float32; float32 as IEEE, not TF32),
accumulation is float32, and everything the backward needs is saved in float32.
Under TRITON_INTERPRET=1 (tests without a GPU) every product runs in float32: the interpreter
multiplies the raw bits of bfloat16 blocks in tl.dot (see FACTS.md).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from edge_lolcats.nn.hybrid_attention import (FEATURE_MAP_EPS, HybridState, _check, _final_state, _keys, _no_tokens,
                                              _rotate, empty_state, repeat_kv_heads)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = tl.constexpr(FEATURE_MAP_EPS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    """a @ b with operands in DT and a float32 result (IEEE for float32: no TF32 rounding)."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _rows(ptr, bh, rows, N, X, offs_x):
    """Rows ``rows`` of program bh's [N, X] slab of a contiguous [B*H, N, X] tensor; 0 past N or X."""
    return tl.load(ptr + bh * N * X + rows[:, None] * X + offs_x[None, :],
                   mask=(rows[:, None] < N) & (offs_x[None, :] < X), other=0.0)


@triton.jit
def _masks(offs_m, offs_n, N, W: tl.constexpr):
    """[queries, keys]: keys in each query's window (softmax part), and older keys (linear part)."""
    n_ok = offs_n[None, :] < N
    in_window = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - W) & n_ok
    older = (offs_n[None, :] <= offs_m[:, None] - W) & n_ok
    return in_window, older


@triton.jit
def _chunk_sums(phi_k, v, log_decay, sums, z_sums, lag_sums, lag_z_sums, N, NC, H, D, NF, C: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, DT: tl.constexpr, DECAY: tl.constexpr):
    """sums[bh, c + 1] = sum over block c of lam^(C-1-r) phi_k v^T (r: the row in the block; lam = 1
    without DECAY); with DECAY also the same sums weighted by (C-1-r), for the decay's gradient. A
    scan over c (torch) then gives the states."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    rows = c * C + tl.arange(0, C)
    phi = _rows(phi_k, bh, rows, N, NF, offs_f).to(tl.float32)
    vb = _rows(v, bh, rows, N, D, offs_d)
    at = bh * (NC + 1) + c + 1
    fd = offs_f[:, None] * D + offs_d[None, :]
    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    if DECAY:
        lag = (C - 1 - tl.arange(0, C)).to(tl.float32)
        w = tl.exp(lag * tl.load(log_decay + bh % H))
        phi_w = phi * w[:, None]
        tl.store(lag_sums + at * NF * D + fd, _dot(tl.trans(phi_w * lag[:, None]), vb, DT), mask=fd_mask)
        tl.store(lag_z_sums + at * NF + offs_f, tl.sum(phi_w * lag[:, None], axis=0), mask=offs_f < NF)
        phi = phi_w
    tl.store(sums + at * NF * D + fd, _dot(tl.trans(phi), vb, DT), mask=fd_mask)
    tl.store(z_sums + at * NF + offs_f, tl.sum(phi, axis=0), mask=offs_f < NF)


@triton.jit
def _sink_scores(q_sink, k_sink, bh, offs_m, N, D, S, t_first, scale, offs_d, offs_s, W: tl.constexpr,
                 DT: tl.constexpr):
    """[queries, sinks] scores of the sinks (-inf where a sink is not in the query's softmax set:
    past the S real ones, or still inside the query's window), the queries' sink rows, the keys."""
    qs = _rows(q_sink, bh, offs_m, N, D, offs_d)
    ks = _rows(k_sink, bh, offs_s, S, D, offs_d)
    active = (offs_s[None, :] < S) & (offs_s[None, :] <= t_first + offs_m[:, None] - W)
    return tl.where(active, _dot(qs, tl.trans(ks), DT) * scale, float("-inf")), qs, ks


@triton.jit
def _decay_powers(log_decay, bh, H, lag, DECAY: tl.constexpr):
    """lam^lag (lag >= 0; 1 without DECAY)."""
    if DECAY:
        return tl.exp(tl.maximum(lag, 0).to(tl.float32) * tl.load(log_decay + bh % H))
    else:
        return tl.full(lag.shape, 1.0, tl.float32)


@triton.jit
def _hybrid_fwd(q, k, v, phi_q, phi_k, factor, log_decay, states, z_states, q_sink, k_sink, v_sink,
                out, m_out, idx_out, den_out, N, NC, H, D, NF, S, t_first, scale,
                W: tl.constexpr, LOOKBACK: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_F: tl.constexpr, DT: tl.constexpr, DECAY: tl.constexpr, BLOCK_S: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    a = tl.load(factor + bh % H)
    offs_m = qb * C + tl.arange(0, C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    m_ok = offs_m < N
    qt = _rows(q, bh, offs_m, N, D, offs_d)
    pq = _rows(phi_q, bh, offs_m, N, NF, offs_f)

    m_i = tl.full([C], float("-inf"), dtype=tl.float32)
    idx = tl.zeros([C], dtype=tl.int32)
    l_win = tl.zeros([C], dtype=tl.float32)
    acc_win = tl.zeros([C, BLOCK_D], dtype=tl.float32)
    l_lin = tl.zeros([C], dtype=tl.float32)
    acc_lin = tl.zeros([C, BLOCK_D], dtype=tl.float32)

    kb_start = tl.maximum(qb - LOOKBACK, 0)
    for kb in range(kb_start, qb + 1):
        offs_n = kb * C + tl.arange(0, C)
        kt = _rows(k, bh, offs_n, N, D, offs_d)
        vt = _rows(v, bh, offs_n, N, D, offs_d)
        pk = _rows(phi_k, bh, offs_n, N, NF, offs_f)
        in_window, older = _masks(offs_m, offs_n, N, W)

        s = _dot(qt, tl.trans(kt), DT) * scale
        s = tl.where(in_window, s, float("-inf"))
        blk_max = tl.max(s, axis=1)
        blk_arg = tl.argmax(s, axis=1).to(tl.int32) + kb * C
        idx = tl.where(blk_max > m_i, blk_arg, idx)  # strict: the first maximum wins, as in one pass
        m_new = tl.maximum(m_i, blk_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no window key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_win = l_win * alpha + tl.sum(p, axis=1)
        acc_win = acc_win * alpha[:, None] + _dot(p, vt, DT)
        m_i = m_new

        lag = offs_m[:, None] - W - offs_n[None, :]
        lin = tl.where(older, _dot(pq, tl.trans(pk), DT) * _decay_powers(log_decay, bh, H, lag, DECAY), 0.0)
        l_lin += tl.sum(lin, axis=1)
        acc_lin += _dot(lin, vt, DT)

    if BLOCK_S > 0:  # the sinks: in the same softmax (their max index is N + s)
        offs_s = tl.arange(0, BLOCK_S)
        s, qs, ks = _sink_scores(q_sink, k_sink, bh, offs_m, N, D, S, t_first, scale, offs_d, offs_s, W, DT)
        vs = _rows(v_sink, bh, offs_s, S, D, offs_d)
        blk_max = tl.max(s, axis=1)
        idx = tl.where(blk_max > m_i, tl.argmax(s, axis=1).to(tl.int32) + N, idx)
        m_new = tl.maximum(m_i, blk_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_win = l_win * alpha + tl.sum(p, axis=1)
        acc_win = acc_win * alpha[:, None] + _dot(p, vs, DT)
        m_i = m_new

    # everything before block kb_start, through its state (referenced to key kb_start * C - 1)
    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    s_pre = tl.load(states + (bh * (NC + 1) + kb_start) * NF * D + offs_f[:, None] * D + offs_d[None, :],
                    mask=fd_mask, other=0.0)
    z_pre = tl.load(z_states + (bh * (NC + 1) + kb_start) * NF + offs_f, mask=offs_f < NF, other=0.0)
    read = _decay_powers(log_decay, bh, H, offs_m - W - kb_start * C + 1, DECAY)
    acc_lin += read[:, None] * _dot(pq, s_pre, DT)
    l_lin += read * tl.sum(pq.to(tl.float32) * z_pre[None, :], axis=1)

    den = a * l_win + l_lin
    den = tl.where(m_ok, den, 1.0)
    o = (a * acc_win + acc_lin) / den[:, None]
    tl.store(out + bh * N * D + offs_m[:, None] * D + offs_d[None, :], o.to(out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < D))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(m_out + bh * N + offs_m, m_safe, mask=m_ok)
    tl.store(idx_out + bh * N + offs_m, idx, mask=m_ok)
    tl.store(den_out + bh * N + offs_m, den, mask=m_ok)


@triton.jit
def _hybrid_bwd_dq(q, k, v, phi_q, phi_k, factor, log_decay, states, z_states, q_sink, k_sink, v_sink,
                   out, dout, m_in, idx_in, den_in,
                   dq, dphi_q, dm_out, delta_out, dstates, dz_states, dld_out, dq_sink, dk_sink, dv_sink,
                   N, NC, H, D, NF, S, t_first, scale,
                   W: tl.constexpr, LOOKBACK: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_F: tl.constexpr, DT: tl.constexpr, DECAY: tl.constexpr, BLOCK_S: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    a = tl.load(factor + bh % H)
    offs_m = qb * C + tl.arange(0, C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    m_ok = offs_m < N
    md_mask = m_ok[:, None] & (offs_d[None, :] < D)
    qt = _rows(q, bh, offs_m, N, D, offs_d)
    pq = _rows(phi_q, bh, offs_m, N, NF, offs_f)
    g = _rows(dout, bh, offs_m, N, D, offs_d).to(tl.float32)
    o = _rows(out, bh, offs_m, N, D, offs_d).to(tl.float32)
    m_i = tl.load(m_in + bh * N + offs_m, mask=m_ok, other=0.0)
    idx = tl.load(idx_in + bh * N + offs_m, mask=m_ok, other=-1)
    den = tl.load(den_in + bh * N + offs_m, mask=m_ok, other=1.0)
    gn = g / den[:, None]  # G
    delta = tl.sum(g * o, axis=1) / den

    acc_dq = tl.zeros([C, BLOCK_D], dtype=tl.float32)
    k_arg = tl.zeros([C, BLOCK_D], dtype=tl.float32)
    acc_dphi = tl.zeros([C, BLOCK_F], dtype=tl.float32)
    sum_ds = tl.zeros([C], dtype=tl.float32)
    dld = tl.zeros([C], dtype=tl.float32)  # d loss / d log(lam), per query
    kb_start = tl.maximum(qb - LOOKBACK, 0)
    for kb in range(kb_start, qb + 1):
        offs_n = kb * C + tl.arange(0, C)
        kt = _rows(k, bh, offs_n, N, D, offs_d)
        vt = _rows(v, bh, offs_n, N, D, offs_d)
        pk = _rows(phi_k, bh, offs_n, N, NF, offs_f)
        in_window, older = _masks(offs_m, offs_n, N, W)

        s = _dot(qt, tl.trans(kt), DT) * scale
        p = tl.where(in_window, tl.exp(s - m_i[:, None]), 0.0)
        gv = _dot(gn, tl.trans(vt), DT) - delta[:, None]
        ds = p * (a * gv)
        sum_ds += tl.sum(ds, axis=1)
        acc_dq += _dot(ds, kt, DT)
        at_max = tl.where(offs_n[None, :] == idx[:, None], 1.0, 0.0)
        k_arg += _dot(at_max, kt, tl.float32)  # exact: picks one row of k
        lag = offs_m[:, None] - W - offs_n[None, :]
        dl = tl.where(older, gv * _decay_powers(log_decay, bh, H, lag, DECAY), 0.0)  # d loss / d (phi_q . phi_k)
        acc_dphi += _dot(dl, pk, DT)
        if DECAY:
            dld += tl.sum(dl * _dot(pq, tl.trans(pk), DT) * tl.maximum(lag, 0).to(tl.float32), axis=1)

    if BLOCK_S > 0:
        offs_s = tl.arange(0, BLOCK_S)
        s, qs, ks = _sink_scores(q_sink, k_sink, bh, offs_m, N, D, S, t_first, scale, offs_d, offs_s, W, DT)
        vs = _rows(v_sink, bh, offs_s, S, D, offs_d)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - m_i[:, None]))
        ds = p * (a * (_dot(gn, tl.trans(vs), DT) - delta[:, None]))
        sum_ds += tl.sum(ds, axis=1)
    dm = -sum_ds
    dq_t = scale * (acc_dq + dm[:, None] * k_arg)
    tl.store(dq + bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq_t.to(dq.dtype.element_ty), mask=md_mask)
    if BLOCK_S > 0:
        # the sink scores read q_sink: their gradient goes there, and to the sinks through partial
        # sums per query block (summed by the wrapper); the max's gradient where a sink was the max
        at_sink = tl.where(offs_s[None, :] == (idx[:, None] - N), 1.0, 0.0)
        ds_all = ds + at_sink * dm[:, None]
        dqs = scale * _dot(ds_all, ks, tl.float32)
        tl.store(dq_sink + bh * N * D + offs_m[:, None] * D + offs_d[None, :], dqs, mask=md_mask)
        sd = offs_s[:, None] * D + offs_d[None, :]
        sd_mask = (offs_s[:, None] < S) & (offs_d[None, :] < D)
        qs_ok = tl.where(m_ok[:, None], qs.to(tl.float32), 0.0)
        at = (bh * NC + qb) * BLOCK_S * D
        tl.store(dk_sink + at + sd, scale * _dot(tl.trans(tl.where(m_ok[:, None], ds_all, 0.0)), qs_ok, tl.float32),
                 mask=sd_mask)
        tl.store(dv_sink + at + sd, _dot(tl.trans(tl.where(m_ok[:, None], a * p, 0.0)), gn, tl.float32), mask=sd_mask)

    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    s_pre = tl.load(states + (bh * (NC + 1) + kb_start) * NF * D + offs_f[:, None] * D + offs_d[None, :],
                    mask=fd_mask, other=0.0)
    z_pre = tl.load(z_states + (bh * (NC + 1) + kb_start) * NF + offs_f, mask=offs_f < NF, other=0.0)
    e = offs_m - W - kb_start * C + 1
    read = _decay_powers(log_decay, bh, H, e, DECAY)
    d_read = _dot(gn, tl.trans(s_pre), DT) - delta[:, None] * z_pre[None, :]  # d loss / d phi_q, unscaled
    acc_dphi += read[:, None] * d_read
    tl.store(dphi_q + bh * N * NF + offs_m[:, None] * NF + offs_f[None, :], acc_dphi,
             mask=m_ok[:, None] & (offs_f[None, :] < NF))
    tl.store(dm_out + bh * N + offs_m, dm, mask=m_ok)
    tl.store(delta_out + bh * N + offs_m, delta, mask=m_ok)
    if DECAY:  # the read's own power of lam (the state's inner powers: in the wrapper, from the shares)
        dld += tl.maximum(e, 0).to(tl.float32) * read * tl.sum(pq.to(tl.float32) * d_read, axis=1)
        tl.store(dld_out + bh * N + offs_m, tl.where(m_ok, dld, 0.0), mask=m_ok)
    # this block's share of the gradient of the state it read (state kb_start), stored at qb
    pq_read = tl.where(m_ok[:, None], pq.to(tl.float32) * read[:, None], 0.0)
    at = bh * NC + qb
    tl.store(dstates + at * NF * D + offs_f[:, None] * D + offs_d[None, :], _dot(tl.trans(pq_read), gn, DT),
             mask=fd_mask)
    tl.store(dz_states + at * NF + offs_f, -tl.sum(pq_read * delta[:, None], axis=0), mask=offs_f < NF)


@triton.jit
def _hybrid_bwd_dkv(q, k, v, phi_q, phi_k, factor, log_decay, dout, m_in, idx_in, den_in, dm_in, delta_in,
                    d_later, dz_later, dk, dv, dphi_k,
                    N, NC, H, D, NF, scale,
                    W: tl.constexpr, LOOKBACK: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_F: tl.constexpr, DT: tl.constexpr, DECAY: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    a = tl.load(factor + bh % H)
    offs_n = kb * C + tl.arange(0, C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    n_ok = offs_n < N
    nd_mask = n_ok[:, None] & (offs_d[None, :] < D)
    kt = _rows(k, bh, offs_n, N, D, offs_d)
    vt = _rows(v, bh, offs_n, N, D, offs_d)
    pk = _rows(phi_k, bh, offs_n, N, NF, offs_f)

    acc_dk = tl.zeros([C, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([C, BLOCK_D], dtype=tl.float32)
    acc_dphi = tl.zeros([C, BLOCK_F], dtype=tl.float32)
    qb_end = tl.minimum(kb + LOOKBACK, NC - 1)
    for qb in range(kb, qb_end + 1):
        offs_m = qb * C + tl.arange(0, C)
        m_ok = offs_m < N
        qt = _rows(q, bh, offs_m, N, D, offs_d)
        pq = _rows(phi_q, bh, offs_m, N, NF, offs_f)
        g = _rows(dout, bh, offs_m, N, D, offs_d).to(tl.float32)
        m_i = tl.load(m_in + bh * N + offs_m, mask=m_ok, other=0.0)
        idx = tl.load(idx_in + bh * N + offs_m, mask=m_ok, other=-1)
        den = tl.load(den_in + bh * N + offs_m, mask=m_ok, other=1.0)
        dm = tl.load(dm_in + bh * N + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_in + bh * N + offs_m, mask=m_ok, other=0.0)
        gn = g / den[:, None]
        in_window, older = _masks(offs_m, offs_n, N, W)

        s = _dot(qt, tl.trans(kt), DT) * scale
        p = tl.where(in_window, tl.exp(s - m_i[:, None]), 0.0)
        gv = _dot(gn, tl.trans(vt), DT) - delta[:, None]
        ds = p * (a * gv) + tl.where(offs_n[None, :] == idx[:, None], dm[:, None], 0.0)
        acc_dk += _dot(tl.trans(ds), qt, DT)
        power = _decay_powers(log_decay, bh, H, offs_m[:, None] - W - offs_n[None, :], DECAY)
        lin = tl.where(older, _dot(pq, tl.trans(pk), DT) * power, 0.0)
        acc_dv += _dot(tl.trans(a * p + lin), gn, DT)
        acc_dphi += _dot(tl.trans(tl.where(older, gv * power, 0.0)), pq, DT)

    # through the states: d_later[kb] is the gradient of the sum this block adds to the states after
    # it (the wrapper's decayed suffix sum); key row r enters it weighted lam^(C-1-r)
    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    d_state = tl.load(d_later + (bh * NC + kb) * NF * D + offs_f[:, None] * D + offs_d[None, :], mask=fd_mask, other=0.0)
    d_z = tl.load(dz_later + (bh * NC + kb) * NF + offs_f, mask=offs_f < NF, other=0.0)
    w = _decay_powers(log_decay, bh, H, C - 1 - tl.arange(0, C), DECAY)
    acc_dv += w[:, None] * _dot(pk, d_state, DT)
    acc_dphi += w[:, None] * (_dot(vt, tl.trans(d_state), DT) + d_z[None, :])
    tl.store(dk + bh * N * D + offs_n[:, None] * D + offs_d[None, :], (scale * acc_dk).to(dk.dtype.element_ty),
             mask=nd_mask)
    tl.store(dv + bh * N * D + offs_n[:, None] * D + offs_d[None, :], acc_dv.to(dv.dtype.element_ty),
             mask=nd_mask)
    tl.store(dphi_k + bh * N * NF + offs_n[:, None] * NF + offs_f[None, :], acc_dphi,
             mask=n_ok[:, None] & (offs_f[None, :] < NF))


@triton.jit
def _feature_halves(x, w, h, D, F, offs_d, offs_f):
    """Hedgehog feature map of one vector x [BLOCK_D] with head h's weight: (softmax(xW), softmax(-xW))."""
    wt = tl.load(w + h * D * F + offs_d[:, None] * F + offs_f[None, :],
                 mask=(offs_d[:, None] < D) & (offs_f[None, :] < F), other=0.0).to(tl.float32)
    proj = tl.sum(x[:, None] * wt, axis=0)  # [BLOCK_F]
    f_ok = offs_f < F
    pos = tl.where(f_ok, proj, float("-inf"))
    neg = tl.where(f_ok, -proj, float("-inf"))
    pos = tl.exp(pos - tl.max(pos, axis=0))
    neg = tl.exp(neg - tl.max(neg, axis=0))
    pos = tl.maximum(pos / tl.sum(pos, axis=0), EPS)
    neg = tl.maximum(neg / tl.sum(neg, axis=0), EPS)
    return tl.where(f_ok, pos, 0.0), tl.where(f_ok, neg, 0.0)


@triton.jit
def _decode_step(q, q_feat, k_leave, v_leave, fq, fk, factor, log_decay, enters, kv, z, k_window, v_window,
                 q_sink, k_sink, v_sink, out, position, H, REP, D, F, S, scale, W: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, DECAY: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """One token for one (batch, head) program: the key leaving the window (as the feature maps read
    it) into kv and z (decayed), in place; then softmax over the ring (already holding the new key,
    per KV head: this program reads KV head h // REP) and the sinks, plus the linear part."""
    bh = tl.program_id(0)
    h = bh % H
    kvh = bh // REP  # (batch, KV head) row of the ring and the sinks
    a = tl.load(factor + h)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    offs_w = tl.arange(0, BLOCK_W)
    d_ok = offs_d < D
    qt = tl.load(q + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    qf = tl.load(q_feat + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    kl = tl.load(k_leave + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    vl = tl.load(v_leave + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    wd_mask = (offs_w[:, None] < W) & d_ok[None, :]
    kw = tl.load(k_window + kvh * W * D + offs_w[:, None] * D + offs_d[None, :], mask=wd_mask, other=0.0).to(tl.float32)
    vw = tl.load(v_window + kvh * W * D + offs_w[:, None] * D + offs_d[None, :], mask=wd_mask, other=0.0).to(tl.float32)
    fd_mask = (offs_f[:, None] < F) & d_ok[None, :]
    kv_pos = tl.load(kv + bh * 2 * F * D + offs_f[:, None] * D + offs_d[None, :], mask=fd_mask, other=0.0).to(tl.float32)
    kv_neg = tl.load(kv + bh * 2 * F * D + (F + offs_f[:, None]) * D + offs_d[None, :], mask=fd_mask,
                     other=0.0).to(tl.float32)
    z_pos = tl.load(z + bh * 2 * F + offs_f, mask=offs_f < F, other=0.0).to(tl.float32)
    z_neg = tl.load(z + bh * 2 * F + F + offs_f, mask=offs_f < F, other=0.0).to(tl.float32)

    # the key at position t - W leaves the window of query t: into the (decayed) linear sums
    if DECAY:
        lam = tl.exp(tl.load(log_decay + h))
        kv_pos, kv_neg, z_pos, z_neg = kv_pos * lam, kv_neg * lam, z_pos * lam, z_neg * lam
    lp, ln = _feature_halves(kl, fk, h, D, F, offs_d, offs_f)
    leave = tl.load(enters)
    kv_pos += leave * lp[:, None] * vl[None, :]
    kv_neg += leave * ln[:, None] * vl[None, :]
    z_pos += leave * lp
    z_neg += leave * ln

    valid = (offs_w <= position) & (offs_w < W)
    s = tl.where(valid, tl.sum(kw * qt[None, :], axis=1) * scale, float("-inf"))
    m = tl.max(s, axis=0)
    if BLOCK_S > 0:
        offs_s = tl.arange(0, BLOCK_S)
        sd_mask = (offs_s[:, None] < S) & d_ok[None, :]
        qs = tl.load(q_sink + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        ks = tl.load(k_sink + kvh * S * D + offs_s[:, None] * D + offs_d[None, :], mask=sd_mask, other=0.0).to(tl.float32)
        vs = tl.load(v_sink + kvh * S * D + offs_s[:, None] * D + offs_d[None, :], mask=sd_mask, other=0.0).to(tl.float32)
        ss = tl.where((offs_s < S) & (offs_s <= position - W), tl.sum(ks * qs[None, :], axis=1) * scale, float("-inf"))
        m = tl.maximum(m, tl.max(ss, axis=0))
        ps = tl.exp(ss - m)
    p = tl.exp(s - m)
    qp, qn = _feature_halves(qf, fq, h, D, F, offs_d, offs_f)
    num = (a * tl.sum(p[:, None] * vw, axis=0) + tl.sum(qp[:, None] * kv_pos, axis=0)
           + tl.sum(qn[:, None] * kv_neg, axis=0))
    den = a * tl.sum(p, axis=0) + tl.sum(qp * z_pos, axis=0) + tl.sum(qn * z_neg, axis=0)
    if BLOCK_S > 0:
        num += a * tl.sum(ps[:, None] * vs, axis=0)
        den += a * tl.sum(ps, axis=0)
    tl.store(out + bh * D + offs_d, (num / den).to(out.dtype.element_ty), mask=d_ok)

    tl.store(kv + bh * 2 * F * D + offs_f[:, None] * D + offs_d[None, :], kv_pos.to(kv.dtype.element_ty), mask=fd_mask)
    tl.store(kv + bh * 2 * F * D + (F + offs_f[:, None]) * D + offs_d[None, :], kv_neg.to(kv.dtype.element_ty),
             mask=fd_mask)
    tl.store(z + bh * 2 * F + offs_f, z_pos.to(z.dtype.element_ty), mask=offs_f < F)
    tl.store(z + bh * 2 * F + F + offs_f, z_neg.to(z.dtype.element_ty), mask=offs_f < F)


# ---------------------------------------------------------------------------------------------
# Wrappers


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _launch_options(block_d: int, block_f: int, dtype: torch.dtype) -> dict:
    # the backward holds three [C, 128] float32 accumulators at head size 128: spread them over 8
    # warps; float32 tiles that large overflow shared memory when pipelined, and the key loops are
    # only LOOKBACK + 1 long, so they run unpipelined
    wide = max(block_d, block_f) > 64
    options = {"num_warps": 8 if wide else 4}
    if wide and dtype == torch.float32:
        options["num_stages"] = 1
    return options


def _dot_dtype(dtype: torch.dtype):
    if _interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _launch_shape(chunk_size: int, window_size: int, n: int):
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton kernels need a chunk_size that is a power of two >= 16; got {chunk_size}")
    return -(-n // chunk_size), -(-(window_size - 1) // chunk_size)


def _per_row(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-head [H] tensor as one value per flattened (batch, head) row [B*H]."""
    return x.repeat(rows // x.shape[0])


class HybridAttentionFunction(torch.autograd.Function):
    """out = hybrid attention of (q, k, v, phi_q, phi_k, factor) on [B*H, N, X] tensors, with the
    decay ``log_decay`` [H] (or None) and the sinks (``q_sink`` [B*H, N, D]: each query as it meets
    the sinks; ``k_sink``, ``v_sink`` [B*H, S, D]; or None).

    ``kv0``/``z0`` (an initial state's sums, or None) are constants: no gradient. The chunk states
    are S_c = sum_{j < cC} lam^(cC-1-j) phi_k(k_j) v_j^T (+ the initial state, weighted alike), made
    by a scan over the blocks' sums.
    """

    @staticmethod
    def forward(ctx, q, k, v, phi_q, phi_k, factor, log_decay, q_sink, k_sink, v_sink, kv0, z0, heads: int,
                window_size: int, chunk_size: int, scale: float, t_first: int, prefix: int):
        bh, n, d = q.shape
        nf = phi_q.shape[-1]
        nc, lookback = _launch_shape(chunk_size, window_size, n)
        dev = q.device
        block_d, block_f = _block(d), _block(nf)
        dt = _dot_dtype(q.dtype)
        launch = _launch_options(block_d, block_f, q.dtype)
        decay = log_decay is not None
        ld = log_decay if decay else factor  # a placeholder pointer when there is no decay
        sums = torch.zeros(bh, nc + 1, nf, d, device=dev, dtype=torch.float32)
        z_sums = torch.zeros(bh, nc + 1, nf, device=dev, dtype=torch.float32)
        lag_sums = torch.zeros_like(sums) if decay else sums
        lag_z_sums = torch.zeros_like(z_sums) if decay else z_sums
        _chunk_sums[(nc, bh)](phi_k, v, ld, sums, z_sums, lag_sums, lag_z_sums, n, nc, heads, d, nf, C=chunk_size,
                              BLOCK_D=block_d, BLOCK_F=block_f, DT=dt, DECAY=decay, **launch)
        # the scan: S_0 is the initial state (weighted for key -1: lam^(W - prefix)), S_{c+1} = lam^C S_c + sums_c
        lam_c = torch.exp(_per_row(log_decay, bh) * chunk_size) if decay else None
        first = torch.exp(_per_row(log_decay, bh) * (window_size - prefix)) if decay else None
        states, z_states = sums, z_sums  # in place: sums[:, c + 1] becomes S_{c + 1}
        if kv0 is not None:
            states[:, 0] = kv0 * (first[:, None, None] if decay else 1.0)
            z_states[:, 0] = z0 * (first[:, None] if decay else 1.0)
        if decay:
            for c in range(nc):
                states[:, c + 1] += lam_c[:, None, None] * states[:, c]
                z_states[:, c + 1] += lam_c[:, None] * z_states[:, c]
        else:
            states.cumsum_(1)
            z_states.cumsum_(1)
        sinks = q_sink is not None
        s_count = k_sink.shape[1] if sinks else 0
        block_s = _block(s_count) if sinks else 0
        dummy = q
        out = torch.empty_like(v)
        m = torch.empty(bh, n, device=dev, dtype=torch.float32)
        idx = torch.empty(bh, n, device=dev, dtype=torch.int32)
        den = torch.empty(bh, n, device=dev, dtype=torch.float32)
        _hybrid_fwd[(nc, bh)](q, k, v, phi_q, phi_k, factor, ld, states, z_states,
                              q_sink if sinks else dummy, k_sink if sinks else dummy, v_sink if sinks else dummy,
                              out, m, idx, den, n, nc, heads, d, nf, s_count, t_first, scale,
                              W=window_size, LOOKBACK=lookback, C=chunk_size, BLOCK_D=block_d, BLOCK_F=block_f,
                              DT=dt, DECAY=decay, BLOCK_S=block_s, **launch)
        ctx.save_for_backward(q, k, v, phi_q, phi_k, factor, log_decay, q_sink, k_sink, v_sink, states, z_states,
                              lag_sums, lag_z_sums, out, m, idx, den)
        ctx.config = (heads, window_size, chunk_size, scale, t_first, prefix, kv0 is not None)
        ctx.mark_non_differentiable(states, z_states)
        return out, states, z_states

    @staticmethod
    def backward(ctx, dout, _dstates, _dz_states):
        (q, k, v, phi_q, phi_k, factor, log_decay, q_sink, k_sink, v_sink, states, z_states, lag_sums, lag_z_sums,
         out, m, idx, den) = ctx.saved_tensors
        heads, window_size, chunk_size, scale, t_first, prefix, has_kv0 = ctx.config
        bh, n, d = q.shape
        nf = phi_q.shape[-1]
        nc, lookback = _launch_shape(chunk_size, window_size, n)
        dev = q.device
        dout = dout.contiguous()
        block_d, block_f = _block(d), _block(nf)
        dt = _dot_dtype(q.dtype)
        decay, sinks = log_decay is not None, q_sink is not None
        ld = log_decay if decay else factor
        s_count = k_sink.shape[1] if sinks else 0
        block_s = _block(s_count) if sinks else 0
        common = dict(W=window_size, LOOKBACK=lookback, C=chunk_size, BLOCK_D=block_d, BLOCK_F=block_f, DT=dt,
                      DECAY=decay, **_launch_options(block_d, block_f, q.dtype))
        f32 = dict(device=dev, dtype=torch.float32)
        dq = torch.empty_like(q)
        dphi_q = torch.empty(bh, n, nf, **f32)
        dm = torch.empty(bh, n, **f32)
        delta = torch.empty_like(dm)
        shares = torch.empty(bh, nc, nf, d, **f32)  # query block qb's part of the gradient of the state it read
        z_shares = torch.empty(bh, nc, nf, **f32)
        dld_q = torch.zeros(bh, n, **f32) if decay else dm
        dq_sink = torch.empty(bh, n, d, **f32) if sinks else dm
        dk_sink = torch.zeros(bh, nc, block_s, d, **f32) if sinks else dm
        dv_sink = torch.zeros(bh, nc, block_s, d, **f32) if sinks else dm
        dummy = q
        _hybrid_bwd_dq[(nc, bh)](q, k, v, phi_q, phi_k, factor, ld, states, z_states,
                                 q_sink if sinks else dummy, k_sink if sinks else dummy, v_sink if sinks else dummy,
                                 out, dout, m, idx, den, dq, dphi_q, dm, delta, shares, z_shares, dld_q,
                                 dq_sink, dk_sink, dv_sink, n, nc, heads, d, nf, s_count, t_first, scale,
                                 BLOCK_S=block_s, **common)
        # R_c: the gradient of state c (query block qb reads state max(qb - LOOKBACK, 0)); the keys of
        # block kb reach every later state: d_later[kb] = sum_{c > kb} lam^((c - kb - 1) C) R_c
        r = torch.zeros(bh, nc + 1, nf, d, **f32)
        rz = torch.zeros(bh, nc + 1, nf, **f32)
        r[:, 0] = shares[:, : lookback + 1].sum(1)
        rz[:, 0] = z_shares[:, : lookback + 1].sum(1)
        if nc > lookback + 1:
            r[:, 1 : nc - lookback] = shares[:, lookback + 1 :]
            rz[:, 1 : nc - lookback] = z_shares[:, lookback + 1 :]
        lam_c = torch.exp(_per_row(log_decay, bh) * chunk_size)[:, None] if decay else None
        d_later = torch.zeros(bh, nc + 1, nf, d, **f32)
        dz_later = torch.zeros(bh, nc + 1, nf, **f32)
        for c in range(nc - 1, -1, -1):  # d_later[c] = R_{c+1} + lam^C d_later[c+1]
            carry = lam_c if decay else 1.0
            d_later[:, c] = r[:, c + 1] + (carry[..., None] if decay else carry) * d_later[:, c + 1]
            dz_later[:, c] = rz[:, c + 1] + carry * dz_later[:, c + 1]
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dphi_k = torch.empty(bh, n, nf, **f32)
        _hybrid_bwd_dkv[(nc, bh)](q, k, v, phi_q, phi_k, factor, ld, dout, m, idx, den, dm, delta,
                                  d_later[:, :nc].contiguous(), dz_later[:, :nc].contiguous(), dk, dv, dphi_k,
                                  n, nc, heads, d, nf, scale, **common)
        # da_h = -sum_i dm_i / a_h  (see the module docstring)
        dfactor = -(dm.view(-1, heads, n).sum((0, 2))) / factor
        dlog_decay = None
        if decay:
            # d state c / d log(lam) = T_c = sum_j (cC-1-j) lam^(cC-1-j) phi v^T (the initial state's lag:
            # cC + W - prefix), by the same scan: T_{c+1} = lam^C (T_c + C S_c) + lag_sums_c
            t = (window_size - prefix) * states[:, 0] if has_kv0 else torch.zeros_like(states[:, 0])
            tz = (window_size - prefix) * z_states[:, 0] if has_kv0 else torch.zeros_like(z_states[:, 0])
            inner = (r[:, 0] * t).sum((1, 2)) + (rz[:, 0] * tz).sum(1)
            for c in range(nc - 1):
                t = lam_c[..., None] * (t + chunk_size * states[:, c]) + lag_sums[:, c + 1]
                tz = lam_c * (tz + chunk_size * z_states[:, c]) + lag_z_sums[:, c + 1]
                inner = inner + (r[:, c + 1] * t).sum((1, 2)) + (rz[:, c + 1] * tz).sum(1)
            dlog_decay = (dld_q.sum(1) + inner).view(-1, heads).sum(0)
        grads_sink = (None, None, None)
        if sinks:
            grads_sink = (dq_sink.to(q_sink.dtype), dk_sink.sum(1)[:, :s_count].to(k_sink.dtype),
                          dv_sink.sum(1)[:, :s_count].to(v_sink.dtype))
        return (dq, dk, dv, dphi_q.to(phi_q.dtype), dphi_k.to(phi_k.dtype), dfactor.to(factor.dtype),
                dlog_decay, *grads_sink, None, None, None, None, None, None, None, None)


def _kernel_dtype(q, k, v) -> torch.dtype:
    """The dtype the products run in: autocast's on CUDA under autocast (training: RoPE leaves q and
    k in float32 while v is bfloat16), else the common dtype of q, k, v."""
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take q, k, v in {', '.join(map(str, SUPPORTED_DTYPES))}; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    return dtype


def _feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`edge_lolcats.nn.hybrid_attention.feature_map` with the projection in x's dtype (a
    bfloat16 product runs on tensor cores; in float32 it was a third of a training step's attention
    time) and the softmax in float32; returned in x's dtype for the kernels."""
    proj = torch.einsum("bhnd,hdf->bhnf", x, weight.to(x.dtype)).float()
    phi = torch.stack([proj, -proj], dim=-2).softmax(-1).clamp(min=FEATURE_MAP_EPS)  # [..., 2, F]
    return phi.flatten(-2).to(x.dtype)


def _scale(scale: float | None, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _no_softcap(softcap):
    # soft-capped scores (Gemma 2) run on the PyTorch forms; HybridAttention never sends them here
    if softcap:
        raise NotImplementedError("the Triton kernels do not soft-cap scores; use the chunked PyTorch form")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def hybrid_attention_triton(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64, chunk_size=64,
                            initial_state: HybridState | None = None, output_final_state=False, scale=None,
                            softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """The chunked hybrid attention on Triton kernels: same signature and result as
    :func:`edge_lolcats.nn.hybrid_attention.hybrid_attention_chunked`, every recurrence option
    included, differentiable in q, k, v, both feature-map weights, window_factor and log_decay. An
    initial state's sums (kv, z) enter as constants (no gradient); its ring and sinks are
    differentiable, as in the PyTorch forms.

    What the kernels see is laid out here with the PyTorch forms' own front (``_keys``): keys and
    queries as the softmax reads them (after RoPE) and as the feature maps read them, the initial
    state's ring in front, the sinks and each query's rotation for them; feature maps and RoPE run
    in PyTorch (autograd included). q, k, v in float32, bfloat16 or float16 (see
    :func:`_kernel_dtype`); the output is in that dtype, the final state float32.
    """
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size, log_decay, sink_tokens)
    _no_softcap(softcap)
    dtype = _kernel_dtype(q, k, v)
    if q.shape[2] == 0:
        return _no_tokens(q, k, v, fq_weight, window_size, initial_state, output_final_state, sink_tokens)
    b, h, _, d = q.shape
    keys = _keys(q, k, v, window_size, initial_state, rope, sink_tokens)
    n = keys.q_soft.shape[2]
    phi_q = _feature_map(keys.q_feat.to(dtype), fq_weight)
    phi_k = _feature_map(repeat_kv_heads(keys.k_feat, h).to(dtype), fk_weight)
    sink_args = (None, None, None)
    if sink_tokens:
        phi_k = phi_k * (keys.positions >= sink_tokens).to(phi_k.dtype)[:, None]  # sinks never enter the linear sums
        q_sink = keys.q_soft if rope is None else _rotate(keys.q_feat, rope, keys.positions.clamp(
            max=window_size + sink_tokens - 1))
        sink_args = (_flat(q_sink.to(dtype)), _flat(repeat_kv_heads(keys.k_sink, h).to(dtype)),
                     _flat(repeat_kv_heads(keys.v_sink, h).to(dtype)))
    kv0 = z0 = None
    if keys.kv0 is not None:
        kv0 = _flat(keys.kv0.detach().float())
        z0 = keys.z0.detach().float().reshape(b * h, -1).contiguous()
    factor = torch.sigmoid(window_factor.float())
    out, _, _ = HybridAttentionFunction.apply(
        _flat(keys.q_soft.to(dtype)), _flat(repeat_kv_heads(keys.k_soft, h).to(dtype)),
        _flat(repeat_kv_heads(keys.v, h).to(dtype)), _flat(phi_q), _flat(phi_k), factor,
        None if log_decay is None else log_decay.float(), *sink_args, kv0, z0, h, window_size, chunk_size,
        _scale(scale, d), int(keys.positions[0]), keys.prefix)
    out = out.view(b, h, n, d)[:, :, keys.prefix:]
    state = None
    if output_final_state:
        with torch.no_grad():
            state = _final_state(keys, phi_k.float(), window_size, sink_tokens, log_decay).to(torch.float32)
    return out, state


def hybrid_attention_step_triton(q, k, v, fq_weight, fk_weight, window_factor, state: HybridState, *, scale=None,
                                 softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """One decode step on a fused kernel: same contract as
    :func:`edge_lolcats.nn.hybrid_attention.hybrid_attention_step` (pure: the input state is kept).
    The ring and sink writes, RoPE and the rotation back of the leaving key are a few small tensor
    ops here; the kernel does the feature maps, the decayed state update and both softmax parts."""
    b, h, one, d = q.shape
    if one != 1:
        raise ValueError(f"a decode step takes one token; got q {tuple(q.shape)}")
    if state.sink_tokens != sink_tokens:
        raise ValueError(f"state has {state.sink_tokens} sink tokens, the call {sink_tokens}")
    _no_softcap(softcap)
    hkv, w, f, t = k.shape[1], state.window_size, fq_weight.shape[-1], state.position
    f32 = torch.float32
    here = torch.tensor([t], device=q.device)
    q_soft = q if rope is None else _rotate(q, rope, here)
    k_soft = k if rope is None else _rotate(k, rope, here)
    slot = t % w
    k_leave = state.k_window[:, :, slot : slot + 1]  # position t - W (rotated), leaving the window
    v_leave = state.v_window[:, :, slot : slot + 1]
    if rope is not None:
        k_leave = _rotate(k_leave, rope, w - here)  # back to before RoPE
    new = state.clone()
    new.kv, new.z = new.kv.to(f32).contiguous(), new.z.to(f32).contiguous()
    new.k_window[:, :, slot] = k_soft[:, :, 0].to(new.k_window.dtype)
    new.v_window[:, :, slot] = v[:, :, 0].to(new.v_window.dtype)
    if t < sink_tokens:
        new.k_sink[:, :, t] = k_soft[:, :, 0].to(new.k_sink.dtype)
        new.v_sink[:, :, t] = v[:, :, 0].to(new.v_sink.dtype)
    q_sink = q_soft
    if sink_tokens and rope is not None:
        q_sink = _rotate(q, rope, here.clamp(max=w + sink_tokens - 1))
    rows = lambda x: repeat_kv_heads(x, h).to(f32).contiguous()  # noqa: E731  [B, H, 1, D] per query head
    enters = torch.tensor([1.0 if t - w >= sink_tokens else 0.0], device=q.device)
    out = torch.empty(b, h, 1, d, device=q.device, dtype=v.dtype)
    ld = log_decay.float().contiguous() if log_decay is not None else enters
    _decode_step[(b * h,)](q_soft.to(f32).contiguous(), q.to(f32).contiguous(), rows(k_leave), rows(v_leave),
                           fq_weight.contiguous(), fk_weight.contiguous(),
                           torch.sigmoid(window_factor.float()).contiguous(), ld, enters, new.kv, new.z,
                           new.k_window.to(f32).contiguous(), new.v_window.to(f32).contiguous(), q_sink.to(f32).contiguous(),
                           new.k_sink.to(f32).contiguous(), new.v_sink.to(f32).contiguous(), out, t, h, h // hkv, d, f,
                           sink_tokens, _scale(scale, d), W=w, BLOCK_W=_block(w), BLOCK_D=_block(d), BLOCK_F=_block(f),
                           DECAY=log_decay is not None, BLOCK_S=_block(sink_tokens) if sink_tokens else 0)
    new.position = t + 1
    return out, new
