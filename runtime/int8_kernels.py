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

from .compiled_kernels import _JIT

BLOCK = 32


def _has_vnni() -> bool:
    """Whether this CPU has the 256-bit vpdpbusd that :func:`_q4_block_sums` asks LLVM for."""
    _llvm.initialize_native_target()
    features = _llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512vl"))


HAS_VNNI = _has_vnni()

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16I8, _V32I8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
_V8I32, _V8F32 = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)


@intrinsic
def _q4_block_sums(typingctx, row, start, xq, scale, blocks):
    """sum_b scale[b] S_b over ``blocks`` q4_0 blocks of ``row`` (uint8) from byte ``start`` (16
    bytes a block: byte j holds element j in its low nibble and element j + 16 in its high one)
    against ``xq`` (int8, 32 a block in element order); S_b = sum_j c_j xq_j, c_j the nibble."""
    signature = types.float32(row, types.intp, xq, scale, types.intp)

    def codegen(context, builder, sig, args):
        row_data = context.make_array(sig.args[0])(context, builder, args[0]).data
        xq_data = context.make_array(sig.args[2])(context, builder, args[2]).data
        scale_data = context.make_array(sig.args[3])(context, builder, args[3]).data
        start, blocks = args[1], args[4]
        weights = builder.gep(builder.bitcast(row_data, _I8.as_pointer()), [start])
        acts = builder.bitcast(xq_data, _I8.as_pointer())
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3),
                                             "llvm.x86.avx512.vpdpbusd.256")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")
        zero = ir.Constant(_V8F32, None)
        entry = builder.block
        loop, done = builder.append_basic_block("q4_blocks"), builder.append_basic_block("q4_blocks_done")
        builder.cbranch(builder.icmp_signed(">", blocks, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        b, acc = builder.phi(_I64), builder.phi(_V8F32)
        b.add_incoming(ir.Constant(_I64, 0), entry)
        acc.add_incoming(zero, entry)
        packed = builder.load(builder.bitcast(builder.gep(weights, [builder.mul(b, ir.Constant(_I64, 16))]),
                                              _V16I8.as_pointer()), align=1)
        low = builder.and_(packed, ir.Constant(_V16I8, [15] * 16))
        high = builder.lshr(packed, ir.Constant(_V16I8, [4] * 16))
        nibbles = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        x = builder.load(builder.bitcast(builder.gep(acts, [builder.mul(b, ir.Constant(_I64, BLOCK))]),
                                         _V32I8.as_pointer()), align=1)
        sums = builder.call(dot, [ir.Constant(_V8I32, None), builder.bitcast(nibbles, _V8I32), builder.bitcast(x, _V8I32)])
        s = builder.insert_element(ir.Constant(_V8F32, ir.Undefined), builder.load(builder.gep(scale_data, [b])),
                                   ir.Constant(_I32, 0))
        s = builder.shuffle_vector(s, s, ir.Constant(_V8I32, [0] * 8))
        following = builder.call(fma, [builder.sitofp(sums, _V8F32), s, acc])
        after = builder.add(b, ir.Constant(_I64, 1))
        b.add_incoming(after, builder.block)
        acc.add_incoming(following, builder.block)
        builder.cbranch(builder.icmp_signed("<", after, blocks), loop, done)

        builder.position_at_end(done)
        lanes = builder.phi(_V8F32)
        lanes.add_incoming(zero, entry)
        lanes.add_incoming(following, loop)
        total = builder.extract_element(lanes, ir.Constant(_I32, 0))
        for lane in range(1, 8):
            total = builder.fadd(total, builder.extract_element(lanes, ir.Constant(_I32, lane)))
        return total

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


@njit(**_JIT)
def q4_rows_times_q8(q4, start, rows, k, d, xq, dx, offsets, y):
    """y[r] = q4_0 row r (``rows`` rows of K from byte ``start`` of q4; d [rows, K / 32] their
    scales, float32) times the quantized activations (:func:`quantize_blocks`). One thread."""
    blocks = k // BLOCK
    scale = np.empty(blocks, np.float32)
    for r in range(rows):
        dr = d[r]
        extra = np.float32(0.0)
        for b in range(blocks):
            scale[b] = dr[b] * dx[b]
            extra += dr[b] * offsets[b]
        y[r] = _q4_block_sums(q4, start + r * (k // 2), xq, scale, blocks) + extra
