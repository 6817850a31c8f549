"""The compiled engine's kernels (numba): products over weights as GGUF stores them, and the
hybrid and kept-window attentions over a block of tokens on the fixed state. No torch.

Weights live in four flat buffers, repacked once at load by :mod:`.compiled_engine` (never a
float32 copy of a quantized matrix), and every matrix is one row of a table::

    q8      int8[:]     q8_0 quants, rows in groups of 16: [N / 16, K / 32, 8, 16, 4]: chunk c of a
                        group's block holds, row after row, the row's elements 4c..4c+3
    q4      uint8[:]    q4_0 bytes as GGUF stores them (byte j of a block: element j in its low
                        nibble, j + 16 in its high one), grouped alike: [N / 16, K / 32, 4, 16, 4]
    scales  uint16[:]   one float16 per block of 32 along K, as the file stores it: [N / 16, K / 32, 16]
                        (q8 and q4; widened when read: float32 scales were 8 MB more resident and
                        read per token)
    f32     float32[:]  float32 matrices (f16 files widened), row-major [N, K]
    entry   int64[5]    (kind, offset in the kind's buffer, offset in scales, N, K)

N is padded to a multiple of 16 with zero rows (:func:`.int8_kernels.place_rows` says why 16 rows
and 4 bytes). Reading the GGUF's 34-byte blocks in place is about 10x slower than flat quants
(shared/FACTS.md), hence the repack. A quantized matrix multiplies activations quantized to q8_0
blocks (the model's definition) with the CPU's int8 dot products (:mod:`.int8_kernels`: one
instruction multiplies 4 elements of 16 rows), a group of rows by 4 tokens at a time in a prefill
block; a CPU without them, and float32 activations, take the products in float32 on the same
values, a dequantized group of rows at a time.

The attention kernels transcribe :func:`edge_lolcats.arch.hybrid.decode_step` and
:func:`edge_lolcats.arch.window.window_ring_step` at T = 1 for one sequence, token after token of
a block (the hybrid one batching what does not read S); tests hold them to those (the one
definition), option by option, in blocks of any size.
"""
from __future__ import annotations

import math
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import int8_kernels as i8
from .jit_options import BLOCK, JIT

# numba's on-disk cache keys a function by its own file only, and this module's compiled code inlines
# int8_kernels' intrinsics and jit_options' flags: their digests (sha256, 16 hex digits), held to the
# files by tests/test_compiled_kernels.py. Updating them edits this file, which refreshes the cache.
COMPILED_WITH = {"int8_kernels.py": "5e40fd8b814485e8", "jit_options.py": "e6065198eb9266fd"}

# How long an idle OpenMP thread spins before it sleeps (libgomp's GOMP_SPINCOUNT). A token step is
# ~180 parallel regions; threads that sleep between them (OMP_WAIT_POLICY=PASSIVE) made 2 threads no
# faster than 1 (decode 26.6 vs 26.8 ms on the 2-core Xeon). Where waking a thread is slow, as on
# the 2-core AMD VM whose hypervisor takes its vCPUs away, 2 threads decoded in 28.1 ms at 10,000
# spins, 7.9 ms at libgomp's default 300,000 (prefill 251 -> 443 tok/s). Spinning stalls when another
# process holds a core, but then the engine's ThreadTuner moves to one thread, which does not spin.
# `python -m edge_lolcats.bench.runtime --compiled-threads FILE`; docs/BENCHMARKS.md.
SPIN_COUNT = "300000"


def _start_thread_pool():
    """Start numba's OpenMP pool with :data:`SPIN_COUNT` unless the user set a wait policy, and
    take the setting back out of the environment: libgomp reads it once, when it loads, and the
    processes this one starts (llama.cpp's, in the benchmarks) must not inherit it."""
    from numba.np.ufunc import parallel

    ours = not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)
    if ours:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        parallel._launch_threads()
    finally:
        if ours:
            del os.environ["GOMP_SPINCOUNT"]


_start_thread_pool()

F32, Q8, Q4 = 0, 1, 2
KIND, OFFSET, SCALE_OFFSET, ROWS, COLS = range(5)
FEATURE_MAP_EPS = np.float32(1e-12)  # as arch.hybrid.FEATURE_MAP_EPS
_JIT = JIT


# --- products --------------------------------------------------------------------------------

PREFETCH_BYTES = i8.PREFETCH_BYTES  # how far ahead a decode product asks for the weights (int8_kernels says why)
PARTS = 16  # a product's row groups in this many parts at most, each with its scratch (a part a thread at 16)
GROUP, TILE = i8.GROUP, i8.TILE  # rows interleaved in a quantized matrix; tokens a prefill pass multiplies


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the caches for ``array[index]``'s line (llvm.prefetch: a read, kept in every level). A
    hint: it never faults."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]), "llvm.prefetch.p0")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte)
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, types.intp), codegen


@intrinsic
def _half(typingctx, bits):
    """The float16 whose bits are ``bits`` (uint16), as float32 (exact; vcvtph2ps with F16C)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose bits are ``bits`` (int32)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _low_nibble(typingctx, byte):
    """byte & 15 as float32, in 8-bit integer arithmetic: numba widens ``byte & 15`` to int64, and
    the q4_0 loops then ran on 64-bit lanes (8 to a vector, converted with vcvtqq2ps)."""
    def codegen(context, builder, signature, args):
        return builder.uitofp(builder.and_(args[0], ir.Constant(ir.IntType(8), 15)), ir.FloatType())
    return types.float32(types.uint8), codegen


@intrinsic
def _high_nibble(typingctx, byte):
    """byte >> 4 as float32, in 8-bit integer arithmetic (see :func:`_low_nibble`)."""
    def codegen(context, builder, signature, args):
        return builder.uitofp(builder.lshr(args[0], ir.Constant(ir.IntType(8), 4)), ir.FloatType())
    return types.float32(types.uint8), codegen


EXP_LOW, EXP_HIGH = np.float32(-87.33654), np.float32(88.72283)  # exp's float32 range (normal results)


@njit(inline="always", **_JIT)
def _exp(x):
    """e^x in float32 that vectorises (math.exp is a libm call per element: 2.2 ns against 0.6-0.8
    in a loop, measured): Cephes' expf, x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its degree-7
    polynomial, 2^n from the exponent bits; within 1 ulp of the correctly rounded result, 0 below
    the normal range and inf above."""
    c = min(max(x, EXP_LOW), EXP_HIGH)
    n = math.floor(c * np.float32(1.44269504088896341) + np.float32(0.5))
    r = c - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # ln 2 in two parts
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * r * r + r + np.float32(1.0)
    # 2^n as two powers of two: n runs from -126 to 128, one more than an exponent field holds
    half = np.int32(n) >> np.int32(1)
    y *= _float_of_bits((half + np.int32(127)) << np.int32(23))
    y *= _float_of_bits((np.int32(n) - half + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < EXP_LOW else (np.float32(np.inf) if x > EXP_HIGH else y)


@njit(inline="always", **_JIT)
def _prefetch_row(buffer, start, width):
    """Ask for ``width`` elements of ``buffer`` from ``start`` (one request per 64-byte line)."""
    line = 64 // buffer.itemsize
    for i in range(0, width, line):
        _prefetch(buffer, start + i)


@njit(inline="always", **_JIT)
def _dequantize_row(q8, q4, scales, f32, kind, off, soff, k, r, out):
    """Row r of the matrix into out [K] (float32): in a q8_0 or q4_0 matrix, lane r % 16 of its
    group, 4 elements a chunk."""
    if kind == F32:
        out[:] = f32[off + r * k : off + (r + 1) * k]
        return
    nb = k // BLOCK
    g, lane = r // GROUP, r % GROUP
    for b in range(nb):
        s = _half(scales[soff + (g * nb + b) * GROUP + lane])
        if kind == Q8:
            base = off + (g * nb + b) * i8.group_bytes(False) + 4 * lane
            for c in range(8):
                for e in range(4):
                    out[BLOCK * b + 4 * c + e] = np.float32(q8[base + 64 * c + e]) * s
        else:
            base = off + (g * nb + b) * i8.group_bytes(True) + 4 * lane
            for c in range(4):
                for e in range(4):
                    byte = q4[base + 64 * c + e]
                    out[BLOCK * b + 4 * c + e] = (_low_nibble(byte) - np.float32(8.0)) * s
                    out[BLOCK * b + 16 + 4 * c + e] = (_high_nibble(byte) - np.float32(8.0)) * s


@njit(parallel=True, **_JIT)
def quantize_rows(x):
    """x [T, K] overwritten with its values as products with quantized weights take them
    (arch.ops.quantized_activations), a token per thread. In place: a copy was 1.5 MB more peak
    memory in a prefill block, and every caller's input is dead after its product."""
    t_n, k = x.shape
    nb = k // BLOCK
    for t in prange(t_n):
        xq, dx, sums = np.empty(k, np.int8), np.empty(nb, np.float32), np.empty(nb, np.int32)
        row = x[t]
        i8.quantize_blocks(row, xq, dx, sums)
        for j in range(k):
            row[j] = np.float32(xq[j]) * dx[j >> 5]


@njit(parallel=True, **_JIT)
def linear(q8, q4, scales, f32, entry, x, y, quantize):
    """y [T, N] = x [T, K] @ W.T, W read as stored (never a float32 copy of a quantized matrix).

    With ``quantize`` true, a quantized W (q8_0, q4_0) multiplies x's q8_0 blocks
    (arch.ops.quantize_activations): where the CPU has int8 dot products, group by group of 16
    interleaved rows (:func:`.int8_kernels.place_rows`), 4 tokens a pass over a group's blocks
    (the group's weights stay in L1 for all the block's tokens) and one token with its weights asked
    for ahead. Otherwise, and for float32 activations, in float32 on the quantized values (which
    then overwrite x): each thread dequantizes a group of rows into a small scratch and multiplies
    it by every token, 4 rows x 4 tokens of sums at a time."""
    kind, off, soff, n, k = entry[KIND], entry[OFFSET], entry[SCALE_OFFSET], entry[ROWS], entry[COLS]
    nb = k // BLOCK
    t_n = x.shape[0]
    groups = (n + GROUP - 1) // GROUP
    parts = min(groups, PARTS)
    if quantize and kind != F32 and i8.INT8_DOTS:
        xq, dx, sums = np.empty(t_n * k, np.int8), np.empty(t_n * nb, np.float32), np.empty(t_n * nb, np.int32)
        if t_n == 1:
            i8.quantize_blocks(x[0], xq, dx, sums)
        else:
            for t in prange(t_n):
                i8.quantize_blocks(x[t], xq[t * k : (t + 1) * k], dx[t * nb : (t + 1) * nb], sums[t * nb : (t + 1) * nb])
        size = nb * i8.group_bytes(kind == Q4)  # bytes of a group
        t4 = t_n - t_n % TILE
        out = np.empty((parts, GROUP * TILE), np.float32)  # one allocation per call, a part's row each
        for part in prange(parts):
            o = out[part]
            for g in range(part * groups // parts, (part + 1) * groups // parts):
                at, d_at, r0 = off + g * size, soff + g * nb * GROUP, GROUP * g
                rows = min(GROUP, n - r0)
                for t in range(0, t4, TILE):
                    if kind == Q8:
                        i8.group_times_tile(q8, at, xq, t * k, k, sums, dx, t * nb, scales, d_at, nb, o)
                    else:
                        i8.group_times_tile(q4, at, xq, t * k, k, sums, dx, t * nb, scales, d_at, nb, o)
                    for i in range(TILE):
                        for r in range(rows):
                            y[t + i, r0 + r] = o[GROUP * i + r]
                for t in range(t4, t_n):
                    if kind == Q8:
                        i8.group_times_one(q8, at, xq, t * k, k, sums, dx, t * nb, scales, d_at, nb, o)
                    else:
                        i8.group_times_one(q4, at, xq, t * k, k, sums, dx, t * nb, scales, d_at, nb, o)
                    for r in range(rows):
                        y[t, r0 + r] = o[r]
        return
    if quantize and kind != F32:
        quantize_rows(x)
    if t_n == 1 and kind == F32:
        # one token: each row's dot product straight from the weights. Each row is a slice: with flat
        # index arithmetic (off + r * k + j) LLVM does not vectorise the loop (10x slower, measured).
        # Each weight is read once, so the loads are asked for PREFETCH_BYTES ahead.
        ahead = max(1, PREFETCH_BYTES // (4 * k))  # rows
        x0 = x[0]
        for r in prange(n):
            _prefetch_row(f32, off + min(r + ahead, n - 1) * k, k)
            row = f32[off + r * k : off + (r + 1) * k]
            s = np.float32(0.0)
            for j in range(k):
                s += row[j] * x0[j]
            y[0, r] = s
        return
    # 4 rows x 4 tokens of sums at a time (16 accumulators: each weight and each x element loaded
    # once per 4 products; 2.5x the throughput of one dot product per row and token, measured).
    # Scratch per part, allocated once per call (per group, small allocations were ~1,300 a layer).
    t4 = t_n - t_n % 4
    rows_scratch = np.zeros((parts, GROUP + 3, k), np.float32)  # 3 rows past the group: never stored
    acc_scratch = np.empty((parts, 4, 4), np.float32)
    for part in prange(parts):
        w, acc = rows_scratch[part], acc_scratch[part]  # acc: [row, token]
        for g in range(part * groups // parts, (part + 1) * groups // parts):
            for lane in range(min(GROUP, n - GROUP * g)):
                _dequantize_row(q8, q4, scales, f32, kind, off, soff, k, GROUP * g + lane, w[lane])
            for quad in range(0, min(GROUP, n - GROUP * g), 4):
                r0 = GROUP * g + quad
                rows = min(4, n - r0)
                w0, w1, w2, w3 = w[quad], w[quad + 1], w[quad + 2], w[quad + 3]
                for i in range(0, t4, 4):
                    x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
                    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
                    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
                    for j in range(k):
                        a0, a1, a2, a3 = x0[j], x1[j], x2[j], x3[j]
                        b0, b1, b2, b3 = w0[j], w1[j], w2[j], w3[j]
                        s00 += b0 * a0
                        s01 += b0 * a1
                        s02 += b0 * a2
                        s03 += b0 * a3
                        s10 += b1 * a0
                        s11 += b1 * a1
                        s12 += b1 * a2
                        s13 += b1 * a3
                        s20 += b2 * a0
                        s21 += b2 * a1
                        s22 += b2 * a2
                        s23 += b2 * a3
                        s30 += b3 * a0
                        s31 += b3 * a1
                        s32 += b3 * a2
                        s33 += b3 * a3
                    acc[0, 0], acc[0, 1], acc[0, 2], acc[0, 3] = s00, s01, s02, s03
                    acc[1, 0], acc[1, 1], acc[1, 2], acc[1, 3] = s10, s11, s12, s13
                    acc[2, 0], acc[2, 1], acc[2, 2], acc[2, 3] = s20, s21, s22, s23
                    acc[3, 0], acc[3, 1], acc[3, 2], acc[3, 3] = s30, s31, s32, s33
                    for a in range(rows):
                        for b in range(4):
                            y[i + b, r0 + a] = acc[a, b]
                for i in range(t4, t_n):  # the last T % 4 tokens
                    xi = x[i]
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for j in range(k):
                        s0 += w0[j] * xi[j]
                        s1 += w1[j] * xi[j]
                        s2 += w2[j] * xi[j]
                        s3 += w3[j] * xi[j]
                    acc[0, 0], acc[1, 0], acc[2, 0], acc[3, 0] = s0, s1, s2, s3
                    for a in range(rows):
                        y[i, r0 + a] = acc[a, 0]


@njit(**_JIT)
def embedding_row(q8, q4, scales, f32, entry, token, out):
    """Row ``token`` of a [V, hidden] matrix (the embedding) into out [hidden]."""
    _dequantize_row(q8, q4, scales, f32, entry[KIND], entry[OFFSET], entry[SCALE_OFFSET], entry[COLS], token, out)


# --- pieces of the attention -----------------------------------------------------------------

@njit(inline="always", **_JIT)
def _angle(position, inv_freq):
    """RoPE's angle: in float64, then float32 (as arch.ops.NumpyOps.outer)."""
    return np.float32(np.float64(position) * np.float64(inv_freq))


@njit(inline="always", **_JIT)
def _rope_table(inv_freq, position, cos, sin):
    """cos, sin [R/2] of RoPE at ``position``: a table row gives bit for bit what :func:`_rope` does."""
    for i in range(inv_freq.shape[0]):
        angle = _angle(position, inv_freq[i])
        cos[i], sin[i] = np.float32(math.cos(angle)), np.float32(math.sin(angle))


@njit(inline="always", **_JIT)
def _rotate(x, out, cos, sin):
    """out [D] = x [D] rotated by the table row (cos, sin) [R/2], half-split layout over the first R
    dims, the rest passed."""
    half = cos.shape[0]
    for i in range(half):
        a, b = x[i], x[i + half]
        out[i] = a * cos[i] - b * sin[i]
        out[i + half] = b * cos[i] + a * sin[i]
    for i in range(2 * half, x.shape[0]):
        out[i] = x[i]


@njit(inline="always", **_JIT)
def _rope(x, out, inv_freq, position):
    """out [D] = x [D] rotated to ``position``, without a table (no allocation: it runs per head and
    token in the kept-window and post-RoPE layers)."""
    half = inv_freq.shape[0]
    for i in range(half):
        angle = _angle(position, inv_freq[i])
        c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        a, b = x[i], x[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    for i in range(2 * half, x.shape[0]):
        out[i] = x[i]


@njit(inline="always", **_JIT)
def _two_softmaxes(lin, out):
    """Hedgehog: out [2F] = softmax(lin), softmax(-lin) of lin [F] = x W, floored at
    FEATURE_MAP_EPS (arch.hybrid). Loops over slices from 0: ``out[f + j]`` kept them from vectorising."""
    f = lin.shape[0]
    hi, lo = lin[0], lin[0]
    for j in range(f):
        hi = max(hi, lin[j])
        lo = min(lo, lin[j])
    pos, neg = out[:f], out[f:]
    pos_sum, neg_sum = np.float32(0.0), np.float32(0.0)
    for j in range(f):
        a = _exp(lin[j] - hi)
        pos[j] = a
        pos_sum += a
    for j in range(f):
        b = _exp(lo - lin[j])
        neg[j] = b
        neg_sum += b
    for j in range(f):
        pos[j] = max(pos[j] / pos_sum, FEATURE_MAP_EPS)
    for j in range(f):
        neg[j] = max(neg[j] / neg_sum, FEATURE_MAP_EPS)


@njit(inline="always", **_JIT)
def _dots_4x2(x0, x1, x2, x3, w0, w1):
    """The 8 dot products of 4 rows x and 2 rows w (all [D]): one pass along D, each element loaded
    once for 4 or 2 products, 8 sums that vectorise alike. Returns w0.x0..w0.x3, w1.x0..w1.x3."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    for i in range(x0.shape[0]):
        a, b = w0[i], w1[i]
        s00 += a * x0[i]
        s01 += a * x1[i]
        s02 += a * x2[i]
        s03 += a * x3[i]
        s10 += b * x0[i]
        s11 += b * x1[i]
        s12 += b * x2[i]
        s13 += b * x3[i]
    return s00, s01, s02, s03, s10, s11, s12, s13


@njit(inline="always", **_JIT)
def _feature_maps(x, weight_t, lin, out):
    """out[t] = Hedgehog's feature map of x[t] for every row of x [T, D]; weight_t [F, D] (the
    weight transposed); lin [T, F] a scratch. 4 tokens x 2 features a tile, the last T % 4 tokens
    1 x 8 (a lone token, decode, is not padded to 4), each tile 8 sums along D that vectorise alike,
    so a token's bits do not depend on the block (tested). A token by itself was 420 ns against
    225 batched, by hand."""
    t_n, d = x.shape
    f = weight_t.shape[0]
    t4, f2, f8 = t_n - t_n % 4, f - f % 2, f - f % 8
    for t in range(0, t4, 4):
        x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
        for j in range(0, f2, 2):
            s00, s01, s02, s03, s10, s11, s12, s13 = _dots_4x2(x0, x1, x2, x3, weight_t[j], weight_t[j + 1])
            lin[t, j], lin[t + 1, j], lin[t + 2, j], lin[t + 3, j] = s00, s01, s02, s03
            lin[t, j + 1], lin[t + 1, j + 1], lin[t + 2, j + 1], lin[t + 3, j + 1] = s10, s11, s12, s13
        for j in range(f2, f):  # an odd last feature
            for r in range(t, t + 4):
                lin[r, j] = _feature_sum(weight_t[j], x[r])
    for t in range(t4, t_n):
        x0 = x[t]
        for j in range(0, f8, 8):
            w0, w1, w2, w3, w4, w5, w6, w7 = (weight_t[j], weight_t[j + 1], weight_t[j + 2], weight_t[j + 3],
                                              weight_t[j + 4], weight_t[j + 5], weight_t[j + 6], weight_t[j + 7])
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for i in range(d):
                a = x0[i]
                s0 += w0[i] * a
                s1 += w1[i] * a
                s2 += w2[i] * a
                s3 += w3[i] * a
                s4 += w4[i] * a
                s5 += w5[i] * a
                s6 += w6[i] * a
                s7 += w7[i] * a
            lin[t, j], lin[t, j + 1], lin[t, j + 2], lin[t, j + 3] = s0, s1, s2, s3
            lin[t, j + 4], lin[t, j + 5], lin[t, j + 6], lin[t, j + 7] = s4, s5, s6, s7
        for j in range(f8, f):
            lin[t, j] = _feature_sum(weight_t[j], x0)
    for t in range(t_n):
        _two_softmaxes(lin[t], out[t])


@njit(inline="always", **_JIT)
def _feature_sum(w, x):
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += w[i] * x[i]
    return s


@njit(inline="always", **_JIT)
def _window_scores(queries, keys, t0, nt, nr, out):
    """out[a, r] = queries[t0 + a] . keys[t0 + r] for a < nt, r < nr: 4 tokens x 2 keys a tile,
    summed along D (vectorised); fewer than 4 tokens one dot at a time."""
    if nt < 4:
        for a in range(nt):
            for r in range(nr):
                out[a, r] = _feature_sum(keys[t0 + r], queries[t0 + a])
        return
    x0, x1, x2, x3 = queries[t0], queries[t0 + 1], queries[t0 + 2], queries[t0 + 3]
    for r in range(0, nr - nr % 2, 2):
        s00, s01, s02, s03, s10, s11, s12, s13 = _dots_4x2(x0, x1, x2, x3, keys[t0 + r], keys[t0 + r + 1])
        out[0, r], out[1, r], out[2, r], out[3, r] = s00, s01, s02, s03
        out[0, r + 1], out[1, r + 1], out[2, r + 1], out[3, r + 1] = s10, s11, s12, s13
    if nr % 2:
        r = nr - 1
        for a in range(4):
            out[a, r] = _feature_sum(keys[t0 + r], queries[t0 + a])


@njit(inline="always", **_JIT)
def _score(q, k, scale, softcap):
    s = np.float32(0.0)
    for i in range(q.shape[0]):
        s += q[i] * k[i]
    s *= scale
    if softcap > 0:
        s = np.float32(math.tanh(s / softcap)) * softcap
    return s


_V16 = ir.VectorType(ir.FloatType(), 16)  # the passes' vectors: 16 floats, lowered by every target


def _splat16(builder, x):
    """x (float32) in all 16 lanes."""
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(_V16, ir.Undefined), x, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(_V16, ir.Undefined), ir.Constant(ir.VectorType(i32, 16), [0] * 16))


def _is_matrix(a):
    return isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == types.float32


def _state_pass(vectors: int):
    """The intrinsic of one token's pass over a head's S and z for D = 16 x ``vectors`` (the
    arithmetic of :func:`_state_step`'s loops): numba kept the query's sums over S's rows in memory,
    loading and storing them for every row (with S's row and the leaving value, 5 memory operations
    for 2 fmas); here the sums and the leaving value stay in vector registers for the whole pass,
    so a row is one load, one store and 2 fmas (SmolLM2's D = 64: 0.53 -> 0.25-0.34 us a head and
    token, by hand; the same bits there). Plain LLVM vectors of 16 floats, which every target
    lowers (AVX-512 as they are, AVX2 as pairs)."""
    lanes, v16, f32, i64 = 16, _V16, ir.FloatType(), ir.IntType(64)

    @intrinsic
    def state_pass(typingctx, kv, z, phi_q, phi_k, v, lam, num, den):
        if not (_is_matrix(kv) and all(i8._is_row(a, (types.float32,)) for a in (z, phi_q, phi_k, v, num))):
            return None
        signature = types.float32(kv, z, phi_q, phi_k, v, types.float32, num, types.float32)

        def codegen(context, builder, sig, args):
            arrays = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 2, 3, 4, 6)]
            kv_, z_, pq_, pk_, v_, num_ = [a.data for a in arrays]
            rows = cgutils.unpack_tuple(builder, arrays[1].shape)[0]  # z's length: 2F
            lam_, den0 = args[5], args[7]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32")
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), v16.as_pointer())  # noqa: E731
            lam16 = _splat16(builder, lam_)
            values = [builder.load(at(v_, ir.Constant(i64, lanes * c)), align=4) for c in range(vectors)]
            sums0 = [builder.load(at(num_, ir.Constant(i64, lanes * c)), align=4) for c in range(vectors)]
            entry = builder.block
            loop, done = builder.append_basic_block("state_rows"), builder.append_basic_block("state_done")
            builder.cbranch(builder.icmp_signed(">", rows, ir.Constant(i64, 0)), loop, done)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            den = builder.phi(f32)
            sums = [builder.phi(v16) for _ in range(vectors)]
            i.add_incoming(ir.Constant(i64, 0), entry)
            den.add_incoming(den0, entry)
            for sum_, first in zip(sums, sums0):
                sum_.add_incoming(first, entry)
            pk, pq = builder.load(builder.gep(pk_, [i])), builder.load(builder.gep(pq_, [i]))
            z_at = builder.gep(z_, [i])
            z_i = builder.fadd(builder.fmul(builder.load(z_at), lam_), pk)
            builder.store(z_i, z_at)
            den_next = builder.fadd(den, builder.fmul(pq, z_i))
            pk16, pq16 = _splat16(builder, pk), _splat16(builder, pq)
            start = builder.mul(i, ir.Constant(i64, lanes * vectors))
            following = []
            for c in range(vectors):
                address = at(kv_, builder.add(start, ir.Constant(i64, lanes * c)))
                updated = builder.call(fma, [builder.load(address, align=4), lam16, builder.fmul(pk16, values[c])])
                builder.store(updated, address, align=4)
                following.append(builder.call(fma, [pq16, updated, sums[c]]))
            after = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(after, builder.block)
            den.add_incoming(den_next, builder.block)
            for sum_, value in zip(sums, following):
                sum_.add_incoming(value, builder.block)
            builder.cbranch(builder.icmp_signed("<", after, rows), loop, done)
            builder.position_at_end(done)
            den_out = builder.phi(f32)
            results = [builder.phi(v16) for _ in range(vectors)]
            den_out.add_incoming(den0, entry)
            den_out.add_incoming(den_next, loop)
            for result, first, value in zip(results, sums0, following):
                result.add_incoming(first, entry)
                result.add_incoming(value, loop)
            for c, result in enumerate(results):
                builder.store(result, at(num_, ir.Constant(i64, lanes * c)), align=4)
            return den_out

        return signature, codegen

    return state_pass


_state_pass_16, _state_pass_32, _state_pass_64, _state_pass_128 = (_state_pass(n) for n in (1, 2, 4, 8))


def _window_pass(vectors: int):
    """The intrinsic of a 4-token tile's weighted sum of window values on 16 x ``vectors`` columns
    from column c0: num[t0 + a, c0:] += sum_r weights[a, r] values[first + r, c0:] for a < 4,
    r < nr, the 4 tokens' sums in vector registers across all the rows (numba's loops loaded and
    stored them for every row and token). The loops' order of operations: a hybrid layer's
    attention at T = 256 came out bit for bit the same, 2.9 -> 1.5 ms with the state pass (by hand)."""
    lanes, v16, i64 = 16, _V16, ir.IntType(64)

    @intrinsic
    def window_pass(typingctx, weights, values, first, nr, num, t0, c0):
        if not (_is_matrix(weights) and _is_matrix(values) and _is_matrix(num)):
            return None
        signature = types.void(weights, values, types.intp, types.intp, num, types.intp, types.intp)

        def codegen(context, builder, sig, args):
            arrays = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 4)]
            weights_, values_, num_ = [a.data for a in arrays]
            weights_stride = cgutils.unpack_tuple(builder, arrays[0].shape)[1]
            d = cgutils.unpack_tuple(builder, arrays[1].shape)[1]  # values' and num's row length
            first, nr, t0, c0 = args[2], args[3], args[5], args[6]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32")
            at = lambda base, offset: builder.bitcast(builder.gep(base, [offset]), v16.as_pointer())  # noqa: E731
            num_at = [[builder.add(builder.mul(builder.add(t0, ir.Constant(i64, a)), d), builder.add(c0, ir.Constant(i64, lanes * c)))
                       for c in range(vectors)] for a in range(4)]
            sums0 = [[builder.load(at(num_, o), align=4) for o in row] for row in num_at]
            entry = builder.block
            loop, done = builder.append_basic_block("window_rows"), builder.append_basic_block("window_done")
            builder.cbranch(builder.icmp_signed(">", nr, ir.Constant(i64, 0)), loop, done)
            builder.position_at_end(loop)
            r = builder.phi(i64)
            sums = [[builder.phi(v16) for _ in range(vectors)] for _ in range(4)]
            r.add_incoming(ir.Constant(i64, 0), entry)
            for row, row0 in zip(sums, sums0):
                for sum_, value in zip(row, row0):
                    sum_.add_incoming(value, entry)
            start = builder.add(builder.mul(builder.add(first, r), d), c0)
            value_rows = [builder.load(at(values_, builder.add(start, ir.Constant(i64, lanes * c))), align=4)
                          for c in range(vectors)]
            following = []
            for a in range(4):
                e = builder.load(builder.gep(weights_, [builder.add(builder.mul(ir.Constant(i64, a), weights_stride), r)]))
                e16 = _splat16(builder, e)
                following.append([builder.call(fma, [e16, value_rows[c], sums[a][c]]) for c in range(vectors)])
            after = builder.add(r, ir.Constant(i64, 1))
            r.add_incoming(after, builder.block)
            for row, values_next in zip(sums, following):
                for sum_, value in zip(row, values_next):
                    sum_.add_incoming(value, builder.block)
            builder.cbranch(builder.icmp_signed("<", after, nr), loop, done)
            builder.position_at_end(done)
            results = [[builder.phi(v16) for _ in range(vectors)] for _ in range(4)]
            for row, row0, row_next in zip(results, sums0, following):
                for result, value0, value in zip(row, row0, row_next):
                    result.add_incoming(value0, entry)
                    result.add_incoming(value, loop)
            for row, offsets in zip(results, num_at):
                for result, offset in zip(row, offsets):
                    builder.store(result, at(num_, offset), align=4)
            return context.get_dummy_value()

        return signature, codegen

    return window_pass


_window_pass_16, _window_pass_32, _window_pass_64 = (_window_pass(n) for n in (1, 2, 4))


@njit(inline="always", **_JIT)
def _window_values(weights, values, first, nr, num_w, t0):
    """num_w[t0 + a] += sum_r weights[a, r] values[first + r] for the 4 tokens a < 4 of a tile, r < nr:
    compiled passes of 64 columns (16 or 32 for heads that small; 4 tokens x 64 columns of sums and
    a row are 20 of AVX-512's 32 vector registers), other head sizes these loops."""
    d = values.shape[1]
    if d % 64 == 0:
        for c0 in range(0, d, 64):
            _window_pass_64(weights, values, first, nr, num_w, t0, c0)
    elif d == 32:
        _window_pass_32(weights, values, first, nr, num_w, t0, 0)
    elif d == 16:
        _window_pass_16(weights, values, first, nr, num_w, t0, 0)
    else:
        for r in range(nr):
            vr = values[first + r]
            for a in range(4):
                e, num = weights[a, r], num_w[t0 + a]
                for i in range(d):
                    num[i] += e * vr[i]


@njit(inline="always", **_JIT)
def _state_step(kv_h, z_h, phi_q, phi_k, v_l, lam, num, den):
    """One token's pass over a head's state: every row i of S (kv_h [2F, D]) and z [2F] decays by lam
    and takes the leaving key's phi_k[i] v_l (phi_k and v_l zeros when no key leaves the window), and
    the query reads the row: num [D] += phi_q[i] S_i, den + sum_i phi_q[i] z_i returned. Compiled
    passes for D = 16, 32, 64 and 128 (:func:`_state_pass`); other sizes these loops."""
    d = num.shape[0]
    if d == 64:
        return _state_pass_64(kv_h, z_h, phi_q, phi_k, v_l, lam, num, den)
    if d == 128:
        return _state_pass_128(kv_h, z_h, phi_q, phi_k, v_l, lam, num, den)
    if d == 32:
        return _state_pass_32(kv_h, z_h, phi_q, phi_k, v_l, lam, num, den)
    if d == 16:
        return _state_pass_16(kv_h, z_h, phi_q, phi_k, v_l, lam, num, den)
    for i in range(kv_h.shape[0]):
        row, pq, pk = kv_h[i], phi_q[i], phi_k[i]
        z_h[i] = z_h[i] * lam + pk
        den += pq * z_h[i]
        for j in range(d):
            r = row[j] * lam + pk * v_l[j]
            row[j] = r
            num[j] += pq * r
    return den


# --- the attentions over a block of tokens ---------------------------------------------------
#
# T tokens of a layer at once, each head on one thread for all T tokens (one parallel region per
# layer, not two per token: prefill's attention 34 -> ~20 us per token and layer on 2 threads). The
# ring is only read while the heads run: the key at position p' comes from the block's own keys
# when p' >= position, else from the ring's slot p' % W, which still holds it; the ring takes the
# block's last W keys after. Each head first takes what does not read S for all the block's tokens
# at once (the feature maps of the queries and of the keys leaving the window, the softmax over
# each window, 4 tokens at a time), then S token by token: the step's arithmetic, with those sums
# of D products in another order (prefill's attention 5.5 -> ~4.0 ms a layer at T = 256; decode
# ~0.028 -> ~0.032 ms, medians of 7 alternating, by hand).


@njit(inline="always", **_JIT)
def _slot_key(keys, ring, first, p_key, g, slot):
    """The key (or value) at position ``p_key``: the block's row when the block holds it (``first``:
    the block's first position), else the ring's ``slot``."""
    return keys[p_key - first, g] if p_key >= first else ring[g, slot]


@njit(parallel=True, **_JIT)
def hybrid_attention(q, k, v, fq_t, fk_t, window_factor, log_decay, kv, z, k_window, v_window, k_sink, v_sink,
                     position, scale, softcap, inv_freq, pre_rope, out):
    """T tokens of a hybrid layer after ``position`` tokens, as T calls of
    ``arch.hybrid.decode_step``; the state updated in place.

    q [T, H, D]; k, v [T, Hkv, D] (before RoPE when ``pre_rope``, else already rotated); fq_t, fk_t
    [H, F, D] (the feature maps' weights, each head's transposed); window_factor, log_decay [H]
    (log_decay all 0: no decay); kv [H, 2F, D], z [H, 2F];
    k_window, v_window [Hkv, W, D]; k_sink, v_sink [Hkv, n_s, D] (n_s may be 0); softcap 0: none.
    Writes out [T, H, D]."""
    t_n, h, d = q.shape
    hkv, w = k_window.shape[0], k_window.shape[1]
    n_s = k_sink.shape[1]
    f2 = kv.shape[1]
    group = h // hkv
    # RoPE tables for the block, shared by the heads (trigonometry per head and token was ~15% of
    # prefill's attention): each token's position, the position its leaving key is rotated back by
    # (W - p), and its sinks' query position
    half = inv_freq.shape[0]
    tables = np.empty((3, 2, t_n if pre_rope else 0, half), np.float32)
    if pre_rope:
        for t in range(t_n):
            p = position + t
            _rope_table(inv_freq, p, tables[0, 0, t], tables[0, 1, t])
            _rope_table(inv_freq, w - p, tables[1, 0, t], tables[1, 1, t])
            _rope_table(inv_freq, min(p, w + n_s - 1), tables[2, 0, t], tables[2, 1, t])
    # keys as the softmax reads them (rotated)
    k_rot = np.empty((t_n, hkv, d), np.float32)
    for t in range(t_n):
        for g in range(hkv):
            if pre_rope:
                _rotate(k[t, g], k_rot[t, g], tables[0, 0, t], tables[0, 1, t])
            else:
                k_rot[t, g] = k[t, g]
            # a sink is written once (at position < n_s) and read only from position W on
            if position + t < n_s:
                k_sink[g, position + t] = k_rot[t, g]
                v_sink[g, position + t] = v[t, g]
    # the keys and values the block's windows read, in position order (W - 1 before the block, then
    # the block's): token t reads rows t .. t + W - 1 (those at positions >= 0)
    # (a copy that a lone token, decode, skips: it reads the ring in place, as its softmax is not batched)
    first_position = position - (w - 1)
    panel_rows = t_n + w - 1 if t_n >= 4 else 0
    k_panel, v_panel = np.zeros((hkv, panel_rows, d), np.float32), np.zeros((hkv, panel_rows, d), np.float32)
    for r in range(panel_rows):
        pos = first_position + r
        for g in range(hkv):
            if pos >= position:
                k_panel[g, r], v_panel[g, r] = k_rot[pos - position, g], v[pos - position, g]
            elif pos >= 0:
                k_panel[g, r], v_panel[g, r] = k_window[g, pos % w], v_window[g, pos % w]
    # what a token's state pass takes when no key leaves the window (read only, shared by the heads)
    no_key, no_value = np.zeros(f2, np.float32), np.zeros(d, np.float32)
    for head in prange(h):
        g = head // group
        lam = np.float32(math.exp(log_decay[head]))
        factor = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-window_factor[head])))
        kv_h, z_h = kv[head], z[head]
        # the feature maps of the block's queries and of the keys leaving the window, all tokens at
        # once (they do not read S)
        rows, lin = np.empty((t_n, d), np.float32), np.empty((t_n, f2 // 2), np.float32)
        phi_qs, phi_ks = np.empty((t_n, f2), np.float32), np.empty((t_n, f2), np.float32)
        for t in range(t_n):
            rows[t] = q[t, head]
        _feature_maps(rows, fq_t[head], lin, phi_qs)
        for t in range(t_n):
            p = position + t
            if p - w >= n_s:  # the key at p - W enters S (sinks never do)
                src = _slot_key(k_rot, k_window, position, p - w, g, p % w)
                if pre_rope:
                    _rotate(src, rows[t], tables[1, 0, t], tables[1, 1, t])
                else:
                    rows[t] = src
            else:
                rows[t] = 0.0
        _feature_maps(rows, fk_t[head], lin, phi_ks)
        # the softmax over each token's window (and the sinks it has passed): it does not read S,
        # so all tokens' come first, 4 tokens at a time sharing their keys' and values' loads
        for t in range(t_n):
            if pre_rope:
                _rotate(q[t, head], rows[t], tables[0, 0, t], tables[0, 1, t])
            else:
                rows[t] = q[t, head]
        keys, values = k_panel[g], v_panel[g]
        num_w, den_w = np.zeros((t_n, d), np.float32), np.empty(t_n, np.float32)
        weights = np.empty((4, w + 3), np.float32)
        sink_weights = np.empty((4, n_s), np.float32)
        q_sink = np.empty(d, np.float32)
        for t0 in range(0, t_n, 4):
            nt = min(4, t_n - t0)
            nr = nt + w - 1
            if panel_rows:
                _window_scores(rows, keys, t0, nt, nr, weights)
            else:  # fewer than 4 tokens: each key where it is (the ring or the block)
                for a in range(nt):
                    for r in range(nr):
                        pos = first_position + t0 + r
                        weights[a, r] = _feature_sum(_slot_key(k_rot, k_window, position, pos, g, pos % w), rows[t0 + a])
            for a in range(nt):
                t = t0 + a
                p = position + t
                first = max(a, w - 1 - position - t0)  # this token's first row (positions >= 0)
                last = a + w - 1
                top = -np.inf
                for r in range(first, last + 1):
                    score = weights[a, r] * scale
                    if softcap > 0:
                        score = np.float32(math.tanh(score / softcap)) * softcap
                    weights[a, r] = score
                    top = max(top, score)
                active = min(n_s, max(0, p - w + 1))
                if active:
                    if pre_rope:
                        _rotate(q[t, head], q_sink, tables[2, 0, t], tables[2, 1, t])
                    else:
                        q_sink[:] = q[t, head]
                    for j in range(active):
                        sink_weights[a, j] = _score(q_sink, k_sink[g, j], scale, softcap)
                        top = max(top, sink_weights[a, j])
                den = np.float32(0.0)
                for r in range(nr):
                    e = _exp(weights[a, r] - top) if first <= r <= last else np.float32(0.0)
                    weights[a, r] = e
                    den += e
                for j in range(active):
                    sink_weights[a, j] = _exp(sink_weights[a, j] - top)
                    den += sink_weights[a, j]
                den_w[t] = den * factor
                num = num_w[t]
                for j in range(active):
                    e, vs = sink_weights[a, j], v_sink[g, j]
                    for i in range(d):
                        num[i] += e * vs[i]
            if nt == 4:
                _window_values(weights, values, t0, nr, num_w, t0)
            else:
                for r in range(nr):
                    pos = first_position + t0 + r
                    vr = values[t0 + r] if panel_rows else _slot_key(v, v_window, position, pos, g, pos % w)
                    for a in range(nt):
                        e, num = weights[a, r], num_w[t0 + a]
                        for i in range(d):
                            num[i] += e * vr[i]
            for a in range(nt):
                num = num_w[t0 + a]
                for i in range(d):
                    num[i] *= factor
        for t in range(t_n):
            p = position + t
            num, den = num_w[t], den_w[t]
            phi_q, phi_k = phi_qs[t], phi_ks[t]
            # S and z: the key at p - W leaves the window into them (unless it is a sink), or they
            # only decay (lam 1: unchanged, the same pass with zeros); then the query reads them, in
            # one pass over S's rows
            if p - w >= n_s:
                den = _state_step(kv_h, z_h, phi_q, phi_k, _slot_key(v, v_window, position, p - w, g, p % w), lam,
                                  num, den)
            else:
                den = _state_step(kv_h, z_h, phi_q, no_key, no_value, lam, num, den)
            for i in range(d):
                out[t, head, i] = num[i] / den
    for t in range(max(0, t_n - w), t_n):  # the ring keeps the last W keys
        for g in range(hkv):
            k_window[g, (position + t) % w] = k_rot[t, g]
            v_window[g, (position + t) % w] = v[t, g]


@njit(parallel=True, **_JIT)
def window_attention(q, k, v, k_ring, v_ring, position, scale, softcap, out):
    """T tokens of a kept sliding-window layer, as T calls of ``arch.window.window_ring_step``:
    q [T, H, D], k and v [T, Hkv, D] rotated; the ring [Hkv, Wb, D] updated in place; out [T, H, D]."""
    t_n, h, d = q.shape
    hkv, w = k_ring.shape[0], k_ring.shape[1]
    group = h // hkv
    for head in prange(h):
        g = head // group
        scores = np.empty(w, np.float32)
        num = np.empty(d, np.float32)
        for t in range(t_n):
            p = position + t
            filled = min(w, p + 1)
            top = -np.inf
            for j in range(filled):
                scores[j] = _score(q[t, head], _slot_key(k, k_ring, position, p - (p - j) % w, g, j), scale, softcap)
                top = max(top, scores[j])
            den = np.float32(0.0)
            for j in range(filled):
                scores[j] = _exp(scores[j] - top)
                den += scores[j]
            num[:] = 0.0
            for j in range(filled):
                a = scores[j]
                vj = _slot_key(v, v_ring, position, p - (p - j) % w, g, j)
                for i in range(d):
                    num[i] += a * vj[i]
            for i in range(d):
                out[t, head, i] = num[i] / den
    for t in range(max(0, t_n - w), t_n):
        for g in range(hkv):
            k_ring[g, (position + t) % w] = k[t, g]
            v_ring[g, (position + t) % w] = v[t, g]


# --- the whole model -------------------------------------------------------------------------

# columns of the layer table (int64 [L, LAYER_COLUMNS]); -1: the layer has no such tensor
(L_KIND, L_QKV, L_O, L_GATE_UP, L_DOWN, L_ATTN_NORM, L_FFN_NORM, L_ATTN_POST_NORM, L_FFN_POST_NORM, L_Q_NORM,
 L_K_NORM, L_QKV_BIAS, L_O_BIAS, L_GATE_UP_BIAS, L_DOWN_BIAS, L_FMAP_Q, L_FMAP_K, L_WINDOW_FACTOR, L_LOG_DECAY,
 L_STATE, L_ROPE) = range(21)
LAYER_COLUMNS = 21
KIND_HYBRID, KIND_WINDOW = 0, 1
# dims (int64): the model's sizes and switches; consts (float32): its scalars
(D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_FEATURES, D_WINDOW, D_SINKS, D_INTERMEDIATE, D_VOCAB, D_BASE_WINDOW,
 D_PRE_ROPE, D_QK_NORM, D_ACTIVATION, D_EMBED, D_HEAD, D_FINAL_NORM, D_QUANTIZE) = range(17)
DIMS = 17  # D_EMBED, D_HEAD: rows of the weight table; D_FINAL_NORM: an offset in f32; D_QUANTIZE: 1 quantizes
# the activations of products with quantized weights (arch.ops.quantize_activations), 0 keeps them float32
C_EPS, C_NORM_OFFSET, C_SCALE, C_EMBEDDING_SCALE, C_ATTN_SOFTCAP, C_FINAL_SOFTCAP = range(6)
CONSTS = 6
ACT_SILU, ACT_GELU_TANH = 0, 1
GELU_C = np.float32(math.sqrt(2.0 / math.pi))


@njit(inline="always", **_JIT)
def _rms_norm(x, f32, off, eps, offset, out):
    """out = x / rms(x) * (offset + w), w = f32[off : off + len(x)] (arch.block.rms_norm)."""
    n = x.shape[0]
    s = np.float32(0.0)
    for i in range(n):
        s += x[i] * x[i]
    r = np.float32(1.0) / np.float32(math.sqrt(s / np.float32(n) + eps))
    for i in range(n):
        out[i] = x[i] * r * (f32[off + i] + offset)


@njit(inline="always", **_JIT)
def _add_bias(y, f32, off):
    if off >= 0:
        for t in range(y.shape[0]):
            for i in range(y.shape[1]):
                y[t, i] += f32[off + i]


@njit(inline="always", **_JIT)
def _add_residual(x, out, f32, post_norm, eps, offset):
    """x += out of a sub-layer [T, hidden], normed first where the layer has a post-norm
    (sandwich norms; ``post_norm`` its offset in f32, -1 for none)."""
    for t in range(x.shape[0]):
        if post_norm >= 0:
            _rms_norm(out[t], f32, post_norm, eps, offset, out[t])
        for i in range(x.shape[1]):
            x[t, i] += out[t, i]


@njit(parallel=True, **_JIT)
def activate(gate_up, kind, out):
    """out [T, I] = act(gate) * up for gate_up [T, 2I] (gate first), a token per thread. One loop per
    activation, so that each vectorises (_exp for SiLU): a branch inside the loop kept it scalar
    (T = 128: 0.50 ms a layer serial with math.exp, 0.10 ms so, by hand)."""
    inter = out.shape[1]
    for t in prange(out.shape[0]):
        gate, up, a = gate_up[t, :inter], gate_up[t, inter:], out[t]
        if kind == ACT_SILU:
            for i in range(inter):
                a[i] = gate[i] / (np.float32(1.0) + _exp(-gate[i])) * up[i]
        else:
            for i in range(inter):
                x = gate[i]
                a[i] = np.float32(0.5) * x * (np.float32(1.0) + np.float32(
                    math.tanh(GELU_C * (x + np.float32(0.044715) * x * x * x)))) * up[i]


@njit(**_JIT)
def forward(tokens, position, q8, q4, scales, f32, entries, layers, dims, consts, inv_freq, state, logits):
    """Feed ``tokens`` [T] of one sequence after ``position`` tokens: every layer of
    ``arch.block.layer`` over all T tokens at once (each matrix read once per call), attention
    token by token on the fixed state (``state``: the sequence's flat float32 buffer, updated in
    place). Writes the last token's logits [1, V] unless ``logits`` is [1, 0]."""
    hidden, heads, kv_heads, d = dims[D_HIDDEN], dims[D_HEADS], dims[D_KV_HEADS], dims[D_HEAD_DIM]
    f2, w, n_s, inter = 2 * dims[D_FEATURES], dims[D_WINDOW], dims[D_SINKS], dims[D_INTERMEDIATE]
    pre_rope = dims[D_PRE_ROPE] != 0
    quantize = dims[D_QUANTIZE] != 0
    eps, offset, scale = consts[C_EPS], consts[C_NORM_OFFSET], consts[C_SCALE]
    attn_cap = consts[C_ATTN_SOFTCAP]
    t_n = tokens.shape[0]
    q_size, kv_size = heads * d, kv_heads * d
    x = np.empty((t_n, hidden), np.float32)
    for t in range(t_n):
        embedding_row(q8, q4, scales, f32, entries[dims[D_EMBED]], tokens[t], x[t])
        if consts[C_EMBEDDING_SCALE] != 1.0:
            for i in range(hidden):
                x[t, i] *= consts[C_EMBEDDING_SCALE]
    # The block's buffers: the attention's (qkv, q, k, v, att) and the MLP's (gate_up, act) are never
    # live together, so they share one allocation; a sub-layer's output (proj) takes the normed
    # input's place, which its product has read. A block of 256 tokens then holds 5.9 MB, not 9.0
    # (SmolLM2), so it fits the peak-RSS budget that 128 tokens did.
    normed = np.empty((t_n, hidden), np.float32)
    proj = normed
    qkv_width = q_size + 2 * kv_size
    attention_part = qkv_width + 2 * q_size + 2 * kv_size
    work = np.empty(t_n * max(attention_part, 3 * inter), np.float32)
    qkv = work[: t_n * qkv_width].reshape((t_n, qkv_width))
    o = t_n * qkv_width
    q = work[o : o + t_n * q_size].reshape((t_n, heads, d))
    o += t_n * q_size
    k = work[o : o + t_n * kv_size].reshape((t_n, kv_heads, d))
    o += t_n * kv_size
    v = work[o : o + t_n * kv_size].reshape((t_n, kv_heads, d))
    o += t_n * kv_size
    att = work[o : o + t_n * q_size].reshape((t_n, heads, d))
    gate_up = work[: t_n * 2 * inter].reshape((t_n, 2 * inter))
    act = work[t_n * 2 * inter : t_n * 3 * inter].reshape((t_n, inter))
    no_decay = np.zeros(heads, np.float32)
    no_sinks = np.zeros((kv_heads, 0, d), np.float32)
    for li in range(layers.shape[0]):
        lay = layers[li]
        rope = inv_freq[lay[L_ROPE]]
        for t in range(t_n):
            _rms_norm(x[t], f32, lay[L_ATTN_NORM], eps, offset, normed[t])
        linear(q8, q4, scales, f32, entries[lay[L_QKV]], normed, qkv, quantize)
        _add_bias(qkv, f32, lay[L_QKV_BIAS])
        for t in range(t_n):
            for hd in range(heads):
                for i in range(d):
                    q[t, hd, i] = qkv[t, hd * d + i]
            for g in range(kv_heads):
                for i in range(d):
                    k[t, g, i] = qkv[t, q_size + g * d + i]
                    v[t, g, i] = qkv[t, q_size + kv_size + g * d + i]
            if dims[D_QK_NORM]:
                for hd in range(heads):
                    _rms_norm(q[t, hd], f32, lay[L_Q_NORM], eps, offset, q[t, hd])
                for g in range(kv_heads):
                    _rms_norm(k[t, g], f32, lay[L_K_NORM], eps, offset, k[t, g])
        so = lay[L_STATE]
        if lay[L_KIND] == KIND_WINDOW:
            wb = dims[D_BASE_WINDOW]
            ring = kv_heads * wb * d
            k_ring = state[so : so + ring].reshape((kv_heads, wb, d))
            v_ring = state[so + ring : so + 2 * ring].reshape((kv_heads, wb, d))
            for t in range(t_n):
                for hd in range(heads):
                    _rope(q[t, hd], q[t, hd], rope, position + t)
                for g in range(kv_heads):
                    _rope(k[t, g], k[t, g], rope, position + t)
            window_attention(q, k, v, k_ring, v_ring, position, scale, attn_cap, att)
        else:
            kv = state[so : so + heads * f2 * d].reshape((heads, f2, d))
            so += heads * f2 * d
            z = state[so : so + heads * f2].reshape((heads, f2))
            so += heads * f2
            ring = kv_heads * w * d
            k_window = state[so : so + ring].reshape((kv_heads, w, d))
            v_window = state[so + ring : so + 2 * ring].reshape((kv_heads, w, d))
            so += 2 * ring
            k_sink, v_sink = no_sinks, no_sinks
            if n_s > 0:
                k_sink = state[so : so + kv_heads * n_s * d].reshape((kv_heads, n_s, d))
                v_sink = state[so + kv_heads * n_s * d : so + 2 * kv_heads * n_s * d].reshape((kv_heads, n_s, d))
            fm = heads * d * (f2 // 2)
            fq = f32[lay[L_FMAP_Q] : lay[L_FMAP_Q] + fm].reshape((heads, f2 // 2, d))  # transposed at load
            fk = f32[lay[L_FMAP_K] : lay[L_FMAP_K] + fm].reshape((heads, f2 // 2, d))
            window_factor = f32[lay[L_WINDOW_FACTOR] : lay[L_WINDOW_FACTOR] + heads]
            log_decay = no_decay if lay[L_LOG_DECAY] < 0 else f32[lay[L_LOG_DECAY] : lay[L_LOG_DECAY] + heads]
            if not pre_rope:  # the first models: feature maps on the rotated q and k
                for t in range(t_n):
                    for hd in range(heads):
                        _rope(q[t, hd], q[t, hd], rope, position + t)
                    for g in range(kv_heads):
                        _rope(k[t, g], k[t, g], rope, position + t)
            hybrid_attention(q, k, v, fq, fk, window_factor, log_decay, kv, z, k_window, v_window, k_sink, v_sink,
                             position, scale, attn_cap, rope, pre_rope, att)
        linear(q8, q4, scales, f32, entries[lay[L_O]], att.reshape((t_n, q_size)), proj, quantize)
        _add_bias(proj, f32, lay[L_O_BIAS])
        _add_residual(x, proj, f32, lay[L_ATTN_POST_NORM], eps, offset)
        for t in range(t_n):
            _rms_norm(x[t], f32, lay[L_FFN_NORM], eps, offset, normed[t])
        linear(q8, q4, scales, f32, entries[lay[L_GATE_UP]], normed, gate_up, quantize)
        _add_bias(gate_up, f32, lay[L_GATE_UP_BIAS])
        activate(gate_up, dims[D_ACTIVATION], act)
        linear(q8, q4, scales, f32, entries[lay[L_DOWN]], act, proj, quantize)
        _add_bias(proj, f32, lay[L_DOWN_BIAS])
        _add_residual(x, proj, f32, lay[L_FFN_POST_NORM], eps, offset)
    if logits.shape[1] == 0:  # no logits wanted (a [1, 0] row)
        return
    last = np.empty((1, hidden), np.float32)
    _rms_norm(x[t_n - 1], f32, dims[D_FINAL_NORM], eps, offset, last[0])
    linear(q8, q4, scales, f32, entries[dims[D_HEAD]], last, logits, quantize)
    cap = consts[C_FINAL_SOFTCAP]
    if cap > 0:
        for i in range(logits.shape[1]):
            logits[0, i] = np.float32(math.tanh(logits[0, i] / cap)) * cap
