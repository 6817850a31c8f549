"""Triton kernels for the hybrid attention: forward, backward and the decode step.

The math is the one in :mod:`edge_lolcats.nn.hybrid_attention` (read its docstring first); these
kernels compute exactly that, in blocks, and are tested against its quadratic reference.

Layout. Grouped kv heads are repeated up to H in the wrapper, and q, k, v, phi_q, phi_k become
contiguous [B*H, N, X]. The feature maps phi = feature_map(x, weight) are computed by PyTorch
(a small matmul and a softmax, autograd included); the kernels take phi_q, phi_k as inputs and
return their gradients. Queries and keys are cut into blocks of C (the chunk size).

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

from edge_lolcats.nn.hybrid_attention import FEATURE_MAP_EPS, HybridState, _check, _no_tokens, empty_state, repeat_kv_heads

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
def _chunk_sums(phi_k, v, sums, z_sums, N, NC, D, NF, C: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_F: tl.constexpr, DT: tl.constexpr):
    """sums[bh, c + 1] = phi_k[block c]^T v[block c]; a cumulative sum over c then gives the states."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    rows = c * C + tl.arange(0, C)
    phi = _rows(phi_k, bh, rows, N, NF, offs_f)
    vb = _rows(v, bh, rows, N, D, offs_d)
    s = _dot(tl.trans(phi), vb, DT)
    z = tl.sum(phi.to(tl.float32), axis=0)
    at = bh * (NC + 1) + c + 1
    tl.store(sums + at * NF * D + offs_f[:, None] * D + offs_d[None, :], s,
             mask=(offs_f[:, None] < NF) & (offs_d[None, :] < D))
    tl.store(z_sums + at * NF + offs_f, z, mask=offs_f < NF)


@triton.jit
def _hybrid_fwd(q, k, v, phi_q, phi_k, factor, states, z_states, out, m_out, idx_out, den_out,
                N, NC, H, D, NF, scale,
                W: tl.constexpr, LOOKBACK: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_F: tl.constexpr, DT: tl.constexpr):
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

        lin = tl.where(older, _dot(pq, tl.trans(pk), DT), 0.0)
        l_lin += tl.sum(lin, axis=1)
        acc_lin += _dot(lin, vt, DT)

    # everything before block kb_start, through its state
    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    s_pre = tl.load(states + (bh * (NC + 1) + kb_start) * NF * D + offs_f[:, None] * D + offs_d[None, :],
                    mask=fd_mask, other=0.0)
    z_pre = tl.load(z_states + (bh * (NC + 1) + kb_start) * NF + offs_f, mask=offs_f < NF, other=0.0)
    acc_lin += _dot(pq, s_pre, DT)
    l_lin += tl.sum(pq.to(tl.float32) * z_pre[None, :], axis=1)

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
def _hybrid_bwd_dq(q, k, v, phi_q, phi_k, factor, states, z_states, out, dout, m_in, idx_in, den_in,
                   dq, dphi_q, dm_out, delta_out, dstates, dz_states,
                   N, NC, H, D, NF, scale,
                   W: tl.constexpr, LOOKBACK: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_F: tl.constexpr, DT: tl.constexpr):
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
        acc_dphi += _dot(tl.where(older, gv, 0.0), pk, DT)

    dm = -sum_ds
    dq_t = scale * (acc_dq + dm[:, None] * k_arg)
    tl.store(dq + bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq_t.to(dq.dtype.element_ty), mask=md_mask)

    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    s_pre = tl.load(states + (bh * (NC + 1) + kb_start) * NF * D + offs_f[:, None] * D + offs_d[None, :],
                    mask=fd_mask, other=0.0)
    z_pre = tl.load(z_states + (bh * (NC + 1) + kb_start) * NF + offs_f, mask=offs_f < NF, other=0.0)
    acc_dphi += _dot(gn, tl.trans(s_pre), DT) - delta[:, None] * z_pre[None, :]
    tl.store(dphi_q + bh * N * NF + offs_m[:, None] * NF + offs_f[None, :], acc_dphi,
             mask=m_ok[:, None] & (offs_f[None, :] < NF))
    tl.store(dm_out + bh * N + offs_m, dm, mask=m_ok)
    tl.store(delta_out + bh * N + offs_m, delta, mask=m_ok)
    # this block's part of the gradient of every state it read, stored at NC - 1 - qb so that a
    # cumulative sum gives the suffix sums dS (see _hybrid_bwd_dkv)
    at = bh * NC + NC - 1 - qb
    tl.store(dstates + at * NF * D + offs_f[:, None] * D + offs_d[None, :], _dot(tl.trans(pq), gn, DT),
             mask=fd_mask)
    tl.store(dz_states + at * NF + offs_f, -tl.sum(pq.to(tl.float32) * delta[:, None], axis=0), mask=offs_f < NF)


@triton.jit
def _hybrid_bwd_dkv(q, k, v, phi_q, phi_k, factor, dout, m_in, idx_in, den_in, dm_in, delta_in,
                    dstates, dz_states, dk, dv, dphi_k,
                    N, NC, H, D, NF, scale,
                    W: tl.constexpr, LOOKBACK: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_F: tl.constexpr, DT: tl.constexpr):
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
        lin = tl.where(older, _dot(pq, tl.trans(pk), DT), 0.0)
        acc_dv += _dot(tl.trans(a * p + lin), gn, DT)
        acc_dphi += _dot(tl.trans(tl.where(older, gv, 0.0)), pq, DT)

    # dS for block kb: the query blocks qb >= kb + LOOKBACK + 1 read it through their state;
    # dstates[r] holds the sum over qb >= NC - 1 - r
    r = NC - 2 - kb - LOOKBACK
    keep = tl.where(r >= 0, 1.0, 0.0)  # no such query block: no state gradient
    r = tl.maximum(r, 0)
    fd_mask = (offs_f[:, None] < NF) & (offs_d[None, :] < D)
    d_state = keep * tl.load(dstates + (bh * NC + r) * NF * D + offs_f[:, None] * D + offs_d[None, :],
                             mask=fd_mask, other=0.0)
    d_z = keep * tl.load(dz_states + (bh * NC + r) * NF + offs_f, mask=offs_f < NF, other=0.0)
    acc_dv += _dot(pk, d_state, DT)
    acc_dphi += _dot(vt, tl.trans(d_state), DT) + d_z[None, :]
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
def _decode_step(q, k, v, fq, fk, factor, kv, z, k_window, v_window, out, position,
                 H, D, F, scale, W: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_F: tl.constexpr):
    """One token for one (batch, head) program; updates kv, z and the ring slot in place."""
    bh = tl.program_id(0)
    h = bh % H
    a = tl.load(factor + h)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    offs_w = tl.arange(0, BLOCK_W)
    d_ok = offs_d < D
    slot = position % W
    qt = tl.load(q + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    kt = tl.load(k + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    vt = tl.load(v + bh * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    wd_mask = (offs_w[:, None] < W) & d_ok[None, :]
    kw = tl.load(k_window + bh * W * D + offs_w[:, None] * D + offs_d[None, :], mask=wd_mask, other=0.0).to(tl.float32)
    vw = tl.load(v_window + bh * W * D + offs_w[:, None] * D + offs_d[None, :], mask=wd_mask, other=0.0).to(tl.float32)
    fd_mask = (offs_f[:, None] < F) & d_ok[None, :]
    kv_pos = tl.load(kv + bh * 2 * F * D + offs_f[:, None] * D + offs_d[None, :], mask=fd_mask, other=0.0).to(tl.float32)
    kv_neg = tl.load(kv + bh * 2 * F * D + (F + offs_f[:, None]) * D + offs_d[None, :], mask=fd_mask,
                     other=0.0).to(tl.float32)
    z_pos = tl.load(z + bh * 2 * F + offs_f, mask=offs_f < F, other=0.0).to(tl.float32)
    z_neg = tl.load(z + bh * 2 * F + F + offs_f, mask=offs_f < F, other=0.0).to(tl.float32)

    # the key at position t - W leaves the window of query t: into the linear sums
    at_slot = offs_w == slot
    k_leave = tl.sum(tl.where(at_slot[:, None], kw, 0.0), axis=0)
    v_leave = tl.sum(tl.where(at_slot[:, None], vw, 0.0), axis=0)
    lp, ln = _feature_halves(k_leave, fk, h, D, F, offs_d, offs_f)
    leave = tl.where(position >= W, 1.0, 0.0)
    kv_pos += leave * lp[:, None] * v_leave[None, :]
    kv_neg += leave * ln[:, None] * v_leave[None, :]
    z_pos += leave * lp
    z_neg += leave * ln
    kw = tl.where(at_slot[:, None], kt[None, :], kw)
    vw = tl.where(at_slot[:, None], vt[None, :], vw)

    valid = (offs_w <= position) & (offs_w < W)
    s = tl.where(valid, tl.sum(kw * qt[None, :], axis=1) * scale, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=0))
    qp, qn = _feature_halves(qt, fq, h, D, F, offs_d, offs_f)
    num = (a * tl.sum(p[:, None] * vw, axis=0) + tl.sum(qp[:, None] * kv_pos, axis=0)
           + tl.sum(qn[:, None] * kv_neg, axis=0))
    den = a * tl.sum(p, axis=0) + tl.sum(qp * z_pos, axis=0) + tl.sum(qn * z_neg, axis=0)
    tl.store(out + bh * D + offs_d, (num / den).to(out.dtype.element_ty), mask=d_ok)

    tl.store(kv + bh * 2 * F * D + offs_f[:, None] * D + offs_d[None, :], kv_pos.to(kv.dtype.element_ty), mask=fd_mask)
    tl.store(kv + bh * 2 * F * D + (F + offs_f[:, None]) * D + offs_d[None, :], kv_neg.to(kv.dtype.element_ty),
             mask=fd_mask)
    tl.store(z + bh * 2 * F + offs_f, z_pos.to(z.dtype.element_ty), mask=offs_f < F)
    tl.store(z + bh * 2 * F + F + offs_f, z_neg.to(z.dtype.element_ty), mask=offs_f < F)
    tl.store(k_window + bh * W * D + slot * D + offs_d, kt.to(k_window.dtype.element_ty), mask=d_ok)
    tl.store(v_window + bh * W * D + slot * D + offs_d, vt.to(v_window.dtype.element_ty), mask=d_ok)


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


class HybridAttentionFunction(torch.autograd.Function):
    """out = hybrid attention of (q, k, v, phi_q, phi_k, factor) on [B*H, N, X] tensors.

    ``kv0``/``z0`` (an initial state's sums, or None) enter the forward only: they get no gradient.
    Returns (out, states, z_states); the chunk states serve the final state and carry no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, phi_q, phi_k, factor, kv0, z0, heads: int, window_size: int, chunk_size: int,
                scale: float):
        bh, n, d = q.shape
        nf = phi_q.shape[-1]
        nc, lookback = _launch_shape(chunk_size, window_size, n)
        dev = q.device
        block_d, block_f = _block(d), _block(nf)
        dt = _dot_dtype(q.dtype)
        launch = _launch_options(block_d, block_f, q.dtype)
        # states[:, c] = the linear state before block c (c = 0 .. nc): per-block sums, then a cumsum
        states = torch.empty(bh, nc + 1, nf, d, device=dev, dtype=torch.float32)
        z_states = torch.empty(bh, nc + 1, nf, device=dev, dtype=torch.float32)
        states[:, 0] = kv0 if kv0 is not None else 0.0
        z_states[:, 0] = z0 if z0 is not None else 0.0
        _chunk_sums[(nc, bh)](phi_k, v, states, z_states, n, nc, d, nf, C=chunk_size, BLOCK_D=block_d,
                              BLOCK_F=block_f, DT=dt, **launch)
        states.cumsum_(1)
        z_states.cumsum_(1)
        out = torch.empty_like(v)
        m = torch.empty(bh, n, device=dev, dtype=torch.float32)
        idx = torch.empty(bh, n, device=dev, dtype=torch.int32)
        den = torch.empty(bh, n, device=dev, dtype=torch.float32)
        _hybrid_fwd[(nc, bh)](q, k, v, phi_q, phi_k, factor, states, z_states, out, m, idx, den,
                              n, nc, heads, d, nf, scale, W=window_size, LOOKBACK=lookback, C=chunk_size,
                              BLOCK_D=block_d, BLOCK_F=block_f, DT=dt, **launch)
        ctx.save_for_backward(q, k, v, phi_q, phi_k, factor, states, z_states, out, m, idx, den)
        ctx.config = (heads, window_size, chunk_size, scale)
        ctx.mark_non_differentiable(states, z_states)
        return out, states, z_states

    @staticmethod
    def backward(ctx, dout, _dstates, _dz_states):
        q, k, v, phi_q, phi_k, factor, states, z_states, out, m, idx, den = ctx.saved_tensors
        heads, window_size, chunk_size, scale = ctx.config
        bh, n, d = q.shape
        nf = phi_q.shape[-1]
        nc, lookback = _launch_shape(chunk_size, window_size, n)
        dout = dout.contiguous()
        block_d, block_f = _block(d), _block(nf)
        dt = _dot_dtype(q.dtype)
        common = dict(W=window_size, LOOKBACK=lookback, C=chunk_size, BLOCK_D=block_d, BLOCK_F=block_f, DT=dt,
                      **_launch_options(block_d, block_f, q.dtype))
        dq = torch.empty_like(q)
        dphi_q = torch.empty(bh, n, nf, device=q.device, dtype=torch.float32)
        dm = torch.empty(bh, n, device=q.device, dtype=torch.float32)
        delta = torch.empty_like(dm)
        dstates = torch.empty(bh, nc, nf, d, device=q.device, dtype=torch.float32)
        dz_states = torch.empty(bh, nc, nf, device=q.device, dtype=torch.float32)
        _hybrid_bwd_dq[(nc, bh)](q, k, v, phi_q, phi_k, factor, states, z_states, out, dout, m, idx, den,
                                 dq, dphi_q, dm, delta, dstates, dz_states, n, nc, heads, d, nf, scale, **common)
        dstates.cumsum_(1)  # suffix sums over query blocks, stored in reverse (see _hybrid_bwd_dkv)
        dz_states.cumsum_(1)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dphi_k = torch.empty(bh, n, nf, device=q.device, dtype=torch.float32)
        _hybrid_bwd_dkv[(nc, bh)](q, k, v, phi_q, phi_k, factor, dout, m, idx, den, dm, delta, dstates,
                                  dz_states, dk, dv, dphi_k, n, nc, heads, d, nf, scale, **common)
        # da_h = -sum_i dm_i / a_h  (see the module docstring)
        dfactor = -(dm.view(-1, heads, n).sum((0, 2))) / factor
        return (dq, dk, dv, dphi_q.to(phi_q.dtype), dphi_k.to(phi_k.dtype), dfactor.to(factor.dtype),
                None, None, None, None, None, None)


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


def _first_recurrence_only(rope, log_decay, sink_tokens):
    # TODO(issue 14): feature maps before RoPE, decay and sinks in the kernels; until then the
    # PyTorch forms run them (HybridAttention sends only the first recurrence here)
    if rope is not None or log_decay is not None or sink_tokens:
        raise NotImplementedError("the Triton kernels run the first models' recurrence only (feature maps after "
                                  "RoPE, no decay, no sinks); use the chunked PyTorch form")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def hybrid_attention_triton(q, k, v, fq_weight, fk_weight, window_factor, *, window_size=64, chunk_size=64,
                            initial_state: HybridState | None = None, output_final_state=False, scale=None,
                            softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """The chunked hybrid attention on Triton kernels: same signature and result as
    :func:`edge_lolcats.nn.hybrid_attention.hybrid_attention_chunked`, differentiable in q, k, v, both
    feature-map weights and window_factor (an initial state enters as a constant).

    q, k, v in float32, bfloat16 or float16 (see :func:`_kernel_dtype`); the output is in that
    dtype, the final state float32.
    """
    _check(q, k, v, fq_weight, fk_weight, window_factor, window_size)
    _no_softcap(softcap)
    _first_recurrence_only(rope, log_decay, sink_tokens)
    dtype = _kernel_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.shape[2] == 0:
        return _no_tokens(q, k, v, fq_weight, window_size, initial_state, output_final_state, 0)
    b, h, n_new, d = q.shape
    kv_heads = k.shape[1]
    start = initial_state.position if initial_state is not None else 0
    k, v = repeat_kv_heads(k, h), repeat_kv_heads(v, h)
    kv0 = z0 = None
    prefix = 0
    if initial_state is not None:
        if initial_state.window_size != window_size:
            raise ValueError(f"state window {initial_state.window_size} != window_size {window_size}")
        # as in the PyTorch forms: the state's window keys go back in front, under dummy queries
        prefix = min(start, window_size)
        slots = torch.arange(start - prefix, start, device=q.device) % window_size
        k = torch.cat([repeat_kv_heads(initial_state.k_window[:, :, slots].to(k.dtype), h), k], dim=2)
        v = torch.cat([repeat_kv_heads(initial_state.v_window[:, :, slots].to(v.dtype), h), v], dim=2)
        q = torch.cat([q.new_zeros(b, h, prefix, d), q], dim=2)
        kv0 = _flat(initial_state.kv.detach().float())
        z0 = initial_state.z.detach().float().reshape(b * h, -1).contiguous()
    n = q.shape[2]
    phi_q, phi_k = _feature_map(q, fq_weight), _feature_map(k, fk_weight)
    factor = torch.sigmoid(window_factor.float())
    out, states, z_states = HybridAttentionFunction.apply(
        _flat(q), _flat(k), _flat(v), _flat(phi_q), _flat(phi_k), factor, kv0, z0, h, window_size, chunk_size,
        _scale(scale, d))
    out = out.view(b, h, n, d)[:, :, prefix:]
    state = None
    if output_final_state:
        with torch.no_grad():
            state = _final_state_from_chunks(states, z_states, phi_k, k, v, b, h, kv_heads, window_size,
                                             chunk_size, start - prefix + n)
    return out, state


def _final_state_from_chunks(states, z_states, phi_k, k, v, b, h, kv_heads, window_size, chunk_size, end):
    """Sums over the keys that left the window (a chunk state plus < C keys), ring of the rest
    (per KV head: k and v arrive repeated to H heads, head g * H / Hkv is KV head g)."""
    n, d = k.shape[2], k.shape[3]
    n_old = max(0, n - window_size)
    c = n_old // chunk_size
    nf = phi_k.shape[-1]
    state = empty_state(b, h, d, nf // 2, window_size, kv_heads=kv_heads, device=k.device)  # arch.state's shapes
    state.kv += states[:, c].view(b, h, nf, d)
    state.z += z_states[:, c].view(b, h, nf)
    rest = slice(c * chunk_size, n_old)
    state.kv += torch.einsum("bhnf,bhnd->bhfd", phi_k[:, :, rest].float(), v[:, :, rest].float())
    state.z += phi_k[:, :, rest].float().sum(2)
    slots = torch.arange(end - (n - n_old), end, device=k.device) % window_size
    rep = h // kv_heads
    state.k_window[:, :, slots] = k[:, ::rep, n_old:].float()
    state.v_window[:, :, slots] = v[:, ::rep, n_old:].float()
    state.position = end
    return state


def hybrid_attention_step_triton(q, k, v, fq_weight, fk_weight, window_factor, state: HybridState, *, scale=None,
                                 softcap=None, rope=None, log_decay=None, sink_tokens=0):
    """One decode step on a fused kernel: same contract as
    :func:`edge_lolcats.nn.hybrid_attention.hybrid_attention_step` (pure: the input state is kept).
    The kernel keeps a ring per query head: the state's ring (per KV head) is repeated for it and
    every H / Hkv-th head is kept after."""
    b, h, one, d = q.shape
    if one != 1:
        raise ValueError(f"a decode step takes one token; got q {tuple(q.shape)}")
    _no_softcap(softcap)
    _first_recurrence_only(rope, log_decay, sink_tokens)
    rep = h // k.shape[1]
    k, v = repeat_kv_heads(k, h), repeat_kv_heads(v, h)
    new = state.clone()
    new.k_window, new.v_window = repeat_kv_heads(new.k_window, h), repeat_kv_heads(new.v_window, h)
    for name in ("kv", "z", "k_window", "v_window"):
        if not getattr(new, name).is_contiguous():
            setattr(new, name, getattr(new, name).contiguous())
    w, f = state.window_size, fq_weight.shape[-1]
    out = torch.empty(b, h, 1, d, device=q.device, dtype=v.dtype)
    _decode_step[(b * h,)](q.contiguous(), k.contiguous(), v.contiguous(), fq_weight.contiguous(),
                           fk_weight.contiguous(), torch.sigmoid(window_factor.float()).contiguous(),
                           new.kv, new.z, new.k_window, new.v_window, out, state.position,
                           h, d, f, _scale(scale, d), W=w, BLOCK_W=_block(w), BLOCK_D=_block(d),
                           BLOCK_F=_block(f))
    new.k_window, new.v_window = new.k_window[:, ::rep].contiguous(), new.v_window[:, ::rep].contiguous()
    new.position = state.position + 1
    return out, new
