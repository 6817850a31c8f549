"""q4_0 products on activations quantized to 8 bits, with the CPU's int8 dot products (AVX-512
VNNI's vpdpbusd): how llama.cpp's q4_0 kernels multiply, and the next step of the compiled
engine's decode (docs/design/compiled-runtime-plan.md, session 13). Not used by the engine yet:
its products are float32 on float32 activations, and the one model definition it is tested
against has no quantized activations; both change together.

The activations of a product are quantized once per call, in blocks of 32 as q8_0 stores weights:
dx = max|x| / 127, xq = round(x / dx) (ties to even). A q4_0 row times them is then

    sum_b d_b dx_b sum_j (c_j - 8) xq_j = sum_b d_b (dx_b S_b + K_b),  K_b = -8 dx_b sum_j xq_j

where S_b = sum_j c_j xq_j is an exact int32 sum (c_j the nibble, 0..15: vpdpbusd multiplies an
unsigned byte by a signed one) and K_b is the same for every row. Each block's eight int32 lanes
are converted and scaled into float32 lanes: no sum across lanes until the row's end.

numba widens integer arithmetic to int64, so the block loop is LLVM IR (an intrinsic). No torch.
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .compiled_kernels import _JIT, BLOCK


def _has_vnni() -> bool:
    """Whether this CPU has the 512- and 256-bit vpdpbusd that :func:`_q4_block_sums` asks LLVM for."""
    _llvm.initialize_native_target()
    features = _llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512vl"))


HAS_VNNI = _has_vnni()

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element, count):
    return ir.VectorType(element, count)


def _splat(builder, values, lanes_each):
    """A float32 vector of ``lanes_each`` copies of each scalar in ``values``, in order."""
    short = ir.Constant(_vector(_F32, len(values)), ir.Undefined)
    for i, v in enumerate(values):
        short = builder.insert_element(short, v, ir.Constant(_I32, i))
    order = [i for i in range(len(values)) for _ in range(lanes_each)]
    return builder.shuffle_vector(short, short, ir.Constant(_vector(_I32, len(order)), order))


def _blocks_product(builder, weights, acts, scale, first, count):
    """The float32 lanes (count x 8) of ``count`` (1 or 2) q4_0 blocks from block ``first``: their
    nibbles in element order against the activation bytes, summed 4 products to an int32 lane by
    vpdpbusd, converted and times each block's scale."""
    width = 32 * count
    packed = builder.load(builder.bitcast(builder.gep(weights, [builder.mul(first, ir.Constant(_I64, 16))]),
                                          _vector(_I8, 16 * count).as_pointer()), align=1)
    low = builder.and_(packed, ir.Constant(_vector(_I8, 16 * count), [15] * 16 * count))
    high = builder.lshr(packed, ir.Constant(_vector(_I8, 16 * count), [4] * 16 * count))
    # block c's low nibbles are its elements 0..15 and its high ones 16..31
    order = [i for c in range(count) for i in (*range(16 * c, 16 * c + 16), *range(16 * count + 16 * c, 16 * count + 16 * c + 16))]
    nibbles = builder.shuffle_vector(low, high, ir.Constant(_vector(_I32, width), order))
    x = builder.load(builder.bitcast(builder.gep(acts, [builder.mul(first, ir.Constant(_I64, 32))]),
                                     _vector(_I8, width).as_pointer()), align=1)
    lanes = _vector(_I32, 8 * count)
    dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                         f"llvm.x86.avx512.vpdpbusd.{256 * count}")
    sums = builder.call(dot, [ir.Constant(lanes, None), builder.bitcast(nibbles, lanes), builder.bitcast(x, lanes)])
    scales = [builder.load(builder.gep(scale, [builder.add(first, ir.Constant(_I64, c))])) for c in range(count)]
    return builder.sitofp(sums, _vector(_F32, 8 * count)), _splat(builder, scales, 8)


@intrinsic
def _q4_block_sums(typingctx, row, start, xq, scale, blocks):
    """sum_b scale[b] S_b over ``blocks`` q4_0 blocks of ``row`` (uint8) from byte ``start`` (16
    bytes a block: byte j holds element j in its low nibble and element j + 16 in its high one)
    against ``xq`` (int8, 32 a block in element order); S_b = sum_j c_j xq_j, c_j the nibble.
    Two blocks a step on 512 bits, an odd last one on 256; the lanes summed as a tree at the end
    (a chain of 15 additions was ~10 ns of a 576-element row)."""
    signature = types.float32(row, types.intp, xq, scale, types.intp)

    def codegen(context, builder, sig, args):
        weights = builder.gep(builder.bitcast(context.make_array(sig.args[0])(context, builder, args[0]).data,
                                              _I8.as_pointer()), [args[1]])
        acts = builder.bitcast(context.make_array(sig.args[2])(context, builder, args[2]).data, _I8.as_pointer())
        scale = context.make_array(sig.args[3])(context, builder, args[3]).data
        blocks = args[4]
        v16 = _vector(_F32, 16)
        fma16 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32")
        pairs = builder.sdiv(blocks, ir.Constant(_I64, 2))
        entry = builder.block
        loop, pairs_done = builder.append_basic_block("q4_pairs"), builder.append_basic_block("q4_pairs_done")
        builder.cbranch(builder.icmp_signed(">", pairs, ir.Constant(_I64, 0)), loop, pairs_done)

        builder.position_at_end(loop)
        p, acc = builder.phi(_I64), builder.phi(v16)
        p.add_incoming(ir.Constant(_I64, 0), entry)
        acc.add_incoming(ir.Constant(v16, None), entry)
        products, scales = _blocks_product(builder, weights, acts, scale, builder.mul(p, ir.Constant(_I64, 2)), 2)
        following = builder.call(fma16, [products, scales, acc])
        after = builder.add(p, ir.Constant(_I64, 1))
        p.add_incoming(after, builder.block)
        acc.add_incoming(following, builder.block)
        builder.cbranch(builder.icmp_signed("<", after, pairs), loop, pairs_done)

        builder.position_at_end(pairs_done)
        lanes = builder.phi(v16)
        lanes.add_incoming(ir.Constant(v16, None), entry)
        lanes.add_incoming(following, loop)
        half = lambda v, n: builder.fadd(  # noqa: E731  the two halves of an n-lane vector, added
            builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n // 2), list(range(n // 2)))),
            builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n // 2), list(range(n // 2, n)))))
        eight = half(lanes, 16)
        odd = builder.icmp_signed("!=", builder.srem(blocks, ir.Constant(_I64, 2)), ir.Constant(_I64, 0))
        before_last = builder.block
        last, done = builder.append_basic_block("q4_last"), builder.append_basic_block("q4_done")
        builder.cbranch(odd, last, done)

        builder.position_at_end(last)
        products, scales = _blocks_product(builder, weights, acts, scale, builder.sub(blocks, ir.Constant(_I64, 1)), 1)
        v8 = _vector(_F32, 8)
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8] * 3), "llvm.fma.v8f32")
        with_last = builder.call(fma8, [products, scales, eight])
        builder.branch(done)

        builder.position_at_end(done)
        total = builder.phi(v8)
        total.add_incoming(eight, before_last)
        total.add_incoming(with_last, last)
        two = half(half(total, 8), 4)
        return builder.fadd(builder.extract_element(two, ir.Constant(_I32, 0)),
                            builder.extract_element(two, ir.Constant(_I32, 1)))

    return signature, codegen


@njit(**_JIT)
def quantize_blocks(x, xq, dx, offsets):
    """x [K] (float32) as q8_0 blocks: xq [K] (int8), dx [K / 32] (float32), and offsets [K / 32] =
    -8 dx_b sum_j xq_j (the q4_0 rows' -8, the same for every row)."""
    for b in range(dx.shape[0]):
        block = x[BLOCK * b : BLOCK * (b + 1)]
        top = np.float32(0.0)
        for j in range(BLOCK):
            top = max(top, abs(block[j]))
        d = top / np.float32(127.0)
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = 0
        for j in range(BLOCK):
            q = np.int8(np.round(block[j] * inverse))
            xq[BLOCK * b + j] = q
            total += q
        dx[b] = d
        offsets[b] = np.float32(-8.0) * d * np.float32(total)


def q4_rows_times_q8(q4, start, rows, k, d, xq, dx, offsets, y):
    """y[r] = q4_0 row r (``rows`` rows of K from byte ``start`` of q4; d [rows, K / 32] their
    scales, float32) times the quantized activations (:func:`quantize_blocks`). One thread.
    RuntimeError on a CPU without AVX-512 VNNI (LLVM would abort the process compiling it)."""
    if not HAS_VNNI:
        raise RuntimeError("the int8 products need a CPU with AVX-512 VNNI (vpdpbusd)")
    _q4_rows_times_q8(q4, start, rows, k, d, xq, dx, offsets, y)


@njit(**_JIT)
def _q4_rows_times_q8(q4, start, rows, k, d, xq, dx, offsets, y):
    blocks = k // BLOCK
    scale = np.empty(blocks, np.float32)
    for r in range(rows):
        dr = d[r]
        extra = np.float32(0.0)
        for b in range(blocks):
            scale[b] = dr[b] * dx[b]
            extra += dr[b] * offsets[b]
        y[r] = _q4_block_sums(q4, start + r * (k // 2), xq, scale, blocks) + extra
