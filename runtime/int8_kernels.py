"""Products of q8_0 and q4_0 rows with activations quantized to 8 bits, as int8 dot products: how
the one model definition multiplies quantized weights (:func:`edge_lolcats.arch.ops.quantize_activations`),
and how llama.cpp's CPU kernels do. The compiled engine's decode products run here. No torch.

The activations of a product are quantized once per call, in blocks of 32 (q8_0's format): dx =
max|x| / 127, q = round(x / dx), ties to even. A row times them is then, exactly in integers per
block,

    y = sum_b (d_b dx_b) I_b,   I_b = sum_j w_j q_j     (w_j: the q8_0 quant, or the q4_0 nibble - 8)

computed 8 int32 lanes a block (lane i holds elements 4i..4i+3), each lane converted to float32 and
multiplied by the block's d_b dx_b into float32 lanes, summed across lanes only at the row's end.

Where the compile target has AVX-512 VNNI the lanes come from vpdpbusd (unsigned bytes times signed
ones, 4 products to a lane): q4_0 as its unsigned nibbles c_j with the -8 folded into the lanes'
starting values (-8 q's sum of the lane, the same for every row), q8_0 as |w| times q with w's sign.
Elsewhere the same lanes come from plain integer vector arithmetic: the integers are exact either
way, so both give bit-identical results (tested). numba widens integer arithmetic to int64, so the
block loop is LLVM IR (an intrinsic).
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .jit_options import BLOCK, JIT


def _target_features() -> set[str]:
    """The CPU features numba compiles for: those NUMBA_CPU_FEATURES names (numba's on-disk cache keys
    its entries by them, so code built for one set is never loaded for another), else the host's."""
    if config.CPU_FEATURES is not None:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    _llvm.initialize_native_target()
    return {name for name, on in _llvm.get_host_cpu_features().items() if on}


def _dot_tier(features: set[str]) -> str | None:
    """Which instructions make the int32 lanes: AVX-512 VNNI's vpdpbusd (two blocks an instruction),
    AVX-VNNI's (one), AVX2's vpmaddubsw + vpmaddwd, or none (:data:`INT8_DOTS` false: the products
    then multiply the quantized activations in float32, the same values)."""
    if {"avx512vnni", "avx512vl"} <= features:
        return "avx512vnni"
    if "avxvnni" in features:
        return "avxvnni"
    return "avx2" if "avx2" in features else None


TIER = _dot_tier(_target_features())
INT8_DOTS = TIER is not None

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element, count):
    return ir.VectorType(element, count)


def _constant_vector(element, values):
    return ir.Constant(_vector(element, len(values)), list(values))


def _splat(builder, values, lanes_each):
    """A float32 vector of ``lanes_each`` copies of each scalar in ``values``, in order."""
    short = ir.Constant(_vector(_F32, len(values)), ir.Undefined)
    for i, v in enumerate(values):
        short = builder.insert_element(short, v, ir.Constant(_I32, i))
    order = [i for i in range(len(values)) for _ in range(lanes_each)]
    return builder.shuffle_vector(short, short, _constant_vector(_I32, order))


def _load(builder, base, offset, vector_type):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vector_type.as_pointer()), align=1)


def _block_lanes(builder, q4, weights, acts, offsets, first, count):
    """The int32 lanes (count x 8) of ``count`` (1 or 2) blocks from block ``first``: lane i of a
    block sums its elements 4i..4i+3's products w_j q_j (exact)."""
    width = BLOCK * count
    bytes_ = _vector(_I8, width)
    x = _load(builder, acts, builder.mul(first, ir.Constant(_I64, BLOCK)), bytes_)
    lanes = _vector(_I32, 8 * count)
    if q4:  # 16 bytes a block: byte j holds element j in its low nibble and element j + 16 in its high one
        packed = _load(builder, weights, builder.mul(first, ir.Constant(_I64, 16)), _vector(_I8, 16 * count))
        low = builder.and_(packed, _constant_vector(_I8, [15] * 16 * count))
        high = builder.lshr(packed, _constant_vector(_I8, [4] * 16 * count))
        order = [i for c in range(count)
                 for i in (*range(16 * c, 16 * c + 16), *range(16 * count + 16 * c, 16 * count + 16 * c + 16))]
        unsigned, signed = builder.shuffle_vector(low, high, _constant_vector(_I32, order)), x  # c_j in 0..15
        # the -8 of every nibble: -8 times each lane's sum of q, the same for every row
        start = _load(builder, offsets, builder.mul(first, ir.Constant(_I64, 8)), lanes)
    else:  # q8_0: |w| (w = -128 reads as 128 unsigned) times q with w's sign
        w = _load(builder, weights, builder.mul(first, ir.Constant(_I64, BLOCK)), bytes_)
        negative = builder.icmp_signed("<", w, ir.Constant(bytes_, None))
        unsigned = builder.select(negative, builder.sub(ir.Constant(bytes_, None), w), w)
        signed = builder.select(negative, builder.sub(ir.Constant(bytes_, None), x), x)  # q is never -128
        start = ir.Constant(lanes, None)
    return _dot_lanes(builder, TIER, start, unsigned, signed, count)


def _dot_lanes(builder, tier, start, unsigned, signed, count):
    """start + the sums of 4 consecutive products unsigned x signed (bytes) in each int32 lane."""
    width, lanes8 = BLOCK * count, _vector(_I32, 8)
    if tier == "avx512vnni":
        lanes = _vector(_I32, 8 * count)
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                             f"llvm.x86.avx512.vpdpbusd.{256 * count}")
        return builder.call(dot, [start, builder.bitcast(unsigned, lanes), builder.bitcast(signed, lanes)])
    if tier in ("avxvnni", "avx2"):  # a block (256 bits) an instruction
        pieces = []
        for c in range(count):
            take = lambda v, n, c=c: builder.shuffle_vector(v, v, _constant_vector(_I32, range(n * c, n * c + n)))  # noqa: E731
            u, s, first = take(unsigned, BLOCK), take(signed, BLOCK), take(start, 8) if count > 1 else start
            if tier == "avxvnni":
                dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes8, [lanes8] * 3),
                                                     "llvm.x86.avx512.vpdpbusd.256")
                pieces.append(builder.call(dot, [first, builder.bitcast(u, lanes8), builder.bitcast(s, lanes8)]))
                continue
            # pairs to int16 (no saturation: |u s + u s| <= 2 x 128 x 127 < 32768), then pairs of those to int32
            shorts = _vector(ir.IntType(16), 16)
            pairs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(shorts, [_vector(_I8, BLOCK)] * 2),
                                                   "llvm.x86.avx2.pmadd.ub.sw")
            quads = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes8, [shorts] * 2),
                                                   "llvm.x86.avx2.pmadd.wd")
            summed = builder.call(quads, [builder.call(pairs, [u, s]), ir.Constant(shorts, [1] * 16)])
            pieces.append(builder.add(first, summed))
        return pieces[0] if count == 1 else builder.shuffle_vector(pieces[0], pieces[1], _constant_vector(_I32, range(16)))
    # any other CPU: plain integer vectors (the products do not come here when INT8_DOTS is false,
    # but the code is compiled all the same)
    wide = _vector(_I32, width)
    products = builder.mul(builder.zext(unsigned, wide), builder.sext(signed, wide))
    total = start
    for s in range(4):
        total = builder.add(total, builder.shuffle_vector(products, products,
                                                          _constant_vector(_I32, range(s, width, 4))))
    return total


def _is_row(a, dtypes):
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype in dtypes


@intrinsic
def row_times_quantized(typingctx, weights, start, xq, offsets, d, dx, blocks):
    """One row's product with quantized activations: sum_b (d[b] dx[b]) I_b over ``blocks`` blocks
    of the row from element ``start`` of ``weights`` (int8: q8_0 quants, 32 a block; uint8: q4_0
    bytes, 16 a block), against ``xq`` (int8, 32 a block); ``offsets`` (int32, 8 a block) are
    the q4_0 lanes' starting values (:func:`quantize_blocks`; unread for q8_0). d: the row's
    scales, dx: the activations', float32. Two blocks a step on 512 bits, an odd last one on 256;
    the lanes summed as a tree at the end (a chain of 15 additions was ~10 ns of a 576-element row)."""
    if not (_is_row(weights, (types.int8, types.uint8)) and _is_row(xq, (types.int8,))
            and _is_row(offsets, (types.int32,)) and _is_row(d, (types.float32,)) and _is_row(dx, (types.float32,))):
        return None
    q4 = weights.dtype == types.uint8
    signature = types.float32(weights, types.intp, xq, offsets, d, dx, types.intp)

    def codegen(context, builder, sig, args):
        data = lambda i: context.make_array(sig.args[i])(context, builder, args[i]).data  # noqa: E731
        weights_ = builder.gep(builder.bitcast(data(0), _I8.as_pointer()), [args[1]])
        acts, offsets_, d_, dx_ = builder.bitcast(data(2), _I8.as_pointer()), data(3), data(4), data(5)
        blocks_ = args[6]
        step = lambda first, count: (  # noqa: E731  (lanes as float32, each block's d dx over its 8 lanes)
            builder.sitofp(_block_lanes(builder, q4, weights_, acts, offsets_, first, count),
                           _vector(_F32, 8 * count)),
            _splat(builder, [builder.fmul(builder.load(builder.gep(d_, [builder.add(first, ir.Constant(_I64, c))])),
                                          builder.load(builder.gep(dx_, [builder.add(first, ir.Constant(_I64, c))])))
                             for c in range(count)], 8))
        v16, v8 = _vector(_F32, 16), _vector(_F32, 8)
        fma16 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32")
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8] * 3), "llvm.fma.v8f32")
        pairs = builder.sdiv(blocks_, ir.Constant(_I64, 2))
        entry = builder.block
        loop, pairs_done = builder.append_basic_block("pairs"), builder.append_basic_block("pairs_done")
        builder.cbranch(builder.icmp_signed(">", pairs, ir.Constant(_I64, 0)), loop, pairs_done)

        builder.position_at_end(loop)
        p, acc = builder.phi(_I64), builder.phi(v16)
        p.add_incoming(ir.Constant(_I64, 0), entry)
        acc.add_incoming(ir.Constant(v16, None), entry)
        lanes, scales = step(builder.mul(p, ir.Constant(_I64, 2)), 2)
        following = builder.call(fma16, [lanes, scales, acc])
        after = builder.add(p, ir.Constant(_I64, 1))
        p.add_incoming(after, builder.block)
        acc.add_incoming(following, builder.block)
        builder.cbranch(builder.icmp_signed("<", after, pairs), loop, pairs_done)

        builder.position_at_end(pairs_done)
        summed = builder.phi(v16)
        summed.add_incoming(ir.Constant(v16, None), entry)
        summed.add_incoming(following, loop)
        half = lambda v, n: builder.fadd(  # noqa: E731  the two halves of an n-lane vector, added
            builder.shuffle_vector(v, v, _constant_vector(_I32, range(n // 2))),
            builder.shuffle_vector(v, v, _constant_vector(_I32, range(n // 2, n))))
        eight = half(summed, 16)
        odd = builder.icmp_signed("!=", builder.srem(blocks_, ir.Constant(_I64, 2)), ir.Constant(_I64, 0))
        before_last = builder.block
        last, done = builder.append_basic_block("last"), builder.append_basic_block("done")
        builder.cbranch(odd, last, done)

        builder.position_at_end(last)
        lanes, scales = step(builder.sub(blocks_, ir.Constant(_I64, 1)), 1)
        with_last = builder.call(fma8, [lanes, scales, eight])
        builder.branch(done)

        builder.position_at_end(done)
        total = builder.phi(v8)
        total.add_incoming(eight, before_last)
        total.add_incoming(with_last, last)
        two = half(half(total, 8), 4)
        return builder.fadd(builder.extract_element(two, ir.Constant(_I32, 0)),
                            builder.extract_element(two, ir.Constant(_I32, 1)))

    return signature, codegen


@intrinsic
def holds_q4(typingctx, weights):
    """Whether ``weights`` is a q4_0 buffer (uint8; q8_0 is int8), as a constant of the compiled code."""
    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), int(weights.dtype == types.uint8))

    return types.boolean(weights), codegen


@njit(inline="always", **JIT)
def quantize_blocks(x, xq, dx, offsets):
    """x [K] (float32) as :func:`edge_lolcats.arch.ops.quantize_activations` quantizes it: xq [K]
    (int8), dx [K / 32] (float32); and offsets [K / 4] (int32) = -8 times each 4 quants' sum, the
    q4_0 lanes' starting values."""
    for b in range(dx.shape[0]):
        block = x[BLOCK * b : BLOCK * (b + 1)]
        top = np.float32(0.0)
        for j in range(BLOCK):
            top = max(top, abs(block[j]))
        d = top / np.float32(127.0)
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        for j in range(BLOCK):
            xq[BLOCK * b + j] = np.int8(np.rint(block[j] * inverse))
        dx[b] = d
    for i in range(offsets.shape[0]):
        offsets[i] = np.int32(-8) * (np.int32(xq[4 * i]) + np.int32(xq[4 * i + 1]) + np.int32(xq[4 * i + 2])
                                     + np.int32(xq[4 * i + 3]))


@njit(**JIT)
def rows_times_activations(weights, start, rows, k, d, x, y):
    """y[r] = row r of ``rows`` (each K elements, from element ``start`` of ``weights``: int8 q8_0
    quants or uint8 q4_0 bytes; d [rows, K / 32] their scales, float32) times x [K] (float32),
    quantized first. One thread; the compiled engine's decode does the same inside its product."""
    blocks = k // BLOCK
    xq, dx, offsets = np.empty(k, np.int8), np.empty(blocks, np.float32), np.empty(k // 4, np.int32)
    quantize_blocks(x, xq, dx, offsets)
    width = k // 2 if holds_q4(weights) else k
    for r in range(rows):
        y[r] = row_times_quantized(weights, start + r * width, xq, offsets, d[r], dx, blocks)
