"""Products of q8_0 and q4_0 rows with activations quantized to 8 bits, as int8 dot products: how
the one model definition multiplies quantized weights (:func:`edge_lolcats.arch.ops.quantize_activations`),
and how llama.cpp's CPU kernels do. The compiled engine's products (decode and prefill) run here. No torch.

The activations of a product are quantized once per call, in blocks of 32 (q8_0's format): dx =
max|x| / 127, q = round(x / dx), ties to even. A row times them is then, exactly in integers per
block,

    y = sum_b (d_b dx_b) I_b,   I_b = sum_j w_j q_j     (w_j: the q8_0 quant, or the q4_0 nibble - 8)

The rows are interleaved 16 to a group (:func:`place_rows`), so int32 lane r of a 512-bit vector
belongs to row r: a block's 8 dot-product instructions (4 elements of 16 rows each, times the same 4
activations broadcast) leave I_b of 16 rows in one vector, converted to float32 and multiplied by
d_b dx_b in one fma. A prefill block takes 4 tokens a pass over a group (the weights loaded and
unpacked once for them).

Where the compile target has AVX-512 VNNI or AVX-VNNI the lanes come from vpdpbusd (unsigned bytes
times signed ones, 4 products to a lane): q4_0 as its unsigned nibbles, q8_0 as w + 128, each lane
starting from -8 or -128 times the block's sum of q (the same for every row). AVX2 makes them with
vpmaddubsw + vpmaddwd (q8_0 as |w| times q with w's sign: its 16-bit pairs would saturate on w + 128),
other CPUs with plain integer vectors: the integers are exact either way, so every tier gives
bit-identical results (tested). numba widens integer arithmetic to int64, so the block loop is LLVM
IR (an intrinsic).
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .jit_options import BLOCK, JIT

# numba's on-disk cache keys a function by its own file only, so an edit to the files this module's
# compiled code depends on would leave that code stale: their digests (sha256, 16 hex digits), held
# to the files by tests/test_compiled_kernels.py. Updating them edits this file, which refreshes the cache.
COMPILED_WITH = {"jit_options.py": "e6065198eb9266fd"}


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


def _load(builder, base, offset, vector_type):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vector_type.as_pointer()), align=1)


def _dot_lanes(builder, tier, start, unsigned, signed):
    """start (16 int32 lanes) + the sums of 4 consecutive products unsigned x signed (64 bytes each)
    in each lane."""
    lanes16, lanes8 = _vector(_I32, 16), _vector(_I32, 8)
    if tier == "avx512vnni":
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes16, [lanes16] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(dot, [start, builder.bitcast(unsigned, lanes16), builder.bitcast(signed, lanes16)])
    if tier in ("avxvnni", "avx2"):  # 256 bits an instruction: two halves
        pieces = []
        for c in range(2):
            take = lambda v, n, c=c: builder.shuffle_vector(v, v, _constant_vector(_I32, range(n * c, n * c + n)))  # noqa: E731
            u, s, first = take(unsigned, BLOCK), take(signed, BLOCK), take(start, 8)
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
        return builder.shuffle_vector(pieces[0], pieces[1], _constant_vector(_I32, range(16)))
    # any other CPU: plain integer vectors (the products do not come here when INT8_DOTS is false,
    # but the code is compiled all the same)
    wide = _vector(_I32, 64)
    products = builder.mul(builder.zext(unsigned, wide), builder.sext(signed, wide))
    total = start
    for s in range(4):
        total = builder.add(total, builder.shuffle_vector(products, products, _constant_vector(_I32, range(s, 64, 4))))
    return total


GROUP = 16  # rows interleaved in a group: the 16 int32 lanes of a 512-bit vector, a row each
CHUNKS = {True: 4, False: 8}  # 64-byte chunks a block of a group holds: q4_0 (nibble pairs), q8_0


def interleaved_sizes(rows: int, k: int, q4: bool) -> tuple[int, int]:
    """(quant buffer elements, scales) a matrix of ``rows`` x ``k`` takes in :func:`place_rows`'
    layout: its rows padded to whole groups of 16."""
    padded = -(-rows // GROUP) * GROUP
    return padded * k // (2 if q4 else 1), padded * k // BLOCK


@njit(inline="always", **JIT)
def group_bytes(q4):
    """Bytes of one block (32 elements) of a group of 16 rows: 64 a chunk."""
    return 256 if q4 else 512


def place_rows(quants: np.ndarray, scales: np.ndarray, out_quants: np.ndarray, out_scales: np.ndarray, first: int):
    """Rows of a quantized matrix into the interleaved layout the products read, from row ``first``
    of the matrix (a matrix joined from several tensors is placed tensor by tensor).

    quants [R, K/32, 32 or 16]: each block's q8_0 quants (int8) or q4_0 bytes (uint8) as GGUF
    stores them (q4_0 byte j: element j in the low nibble, j + 16 in the high one); scales [R, K/32]:
    the blocks' float16 bits. out_quants: the whole matrix's buffer, [G, K/32, chunks, 16, 4] with
    G = ceil(N / 16) groups: chunk c of a group's block holds, row after row, the row's bytes 4c..4c+3
    of that block; for q4_0 their low nibbles are elements 4c.. and their high ones 16 + 4c.., so
    one 64-byte load and a mask or shift give 4 elements of 16 rows. out_scales [G, K/32, 16].
    A row's 4 consecutive elements are an int32 lane of vpdpbusd: one instruction multiplies 4
    elements of 16 rows by the same 4 activations (broadcast), a block's 8 instructions leave each
    row's whole block sum in its lane, and one conversion and one fma scale 16 rows at once."""
    rows, blocks, width = quants.shape
    if out_quants.size < -(-(first + rows) // GROUP) * GROUP * blocks * width:
        raise ValueError(f"{out_quants.size} bytes cannot hold {first + rows} rows of {blocks} blocks in groups of {GROUP}")
    # compiled: numpy's copy through a transposed view took 76 ms for a 49152 x 576 q8_0 matrix, this 8-12
    _place_rows(quants.view(np.uint8), scales, out_quants.view(np.uint8), out_scales, first)


@njit(parallel=True, **JIT)
def _place_rows(quants, scales, out_quants, out_scales, first):
    # rows on all threads: most of the load's repack is the kernel's first touch of the new pages
    # (a fault each 4 KB), which the threads take in parallel too
    rows, blocks, width = quants.shape
    chunks = width // 4
    for i in prange(rows):
        g, lane = divmod(first + i, GROUP)
        for b in range(blocks):
            at = (g * blocks + b) * 64 * chunks + 4 * lane
            block = quants[i, b]
            for c in range(chunks):
                for e in range(4):
                    out_quants[at + 64 * c + e] = block[4 * c + e]
            out_scales[(g * blocks + b) * GROUP + lane] = scales[i, b]


def _is_row(a, dtypes):
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype in dtypes


def _group_tile(tokens: int, prefetch: bool):
    """The intrinsic multiplying one group of 16 interleaved rows by ``tokens`` tokens' quantized
    activations; with ``prefetch``, asking for the weights :data:`PREFETCH_BYTES` ahead (a decode
    step reads each weight once, from memory)."""

    @intrinsic
    def group_times_quantized(typingctx, weights, start, xq, x_start, k, sums, dx, s_start, scales, d_start,
                              blocks, out):
        """out[16 t + r] = row r of the group from byte ``start`` of ``weights`` (int8: q8_0,
        uint8: q4_0; :func:`place_rows`' layout) times token t's activations, t < tokens:
        sum_b d_rb dx_tb I_rtb over ``blocks`` blocks. Token t's quants are xq[x_start + t k ...]
        (int8, K = k of them), its blocks' scales dx and quant sums (int32) at s_start + t blocks;
        the rows' float16 scales at scales[d_start], 16 a block."""
        if not (_is_row(weights, (types.int8, types.uint8)) and _is_row(xq, (types.int8,))
                and _is_row(sums, (types.int32,)) and _is_row(dx, (types.float32,))
                and _is_row(scales, (types.uint16,)) and _is_row(out, (types.float32,))):
            return None
        q4 = weights.dtype == types.uint8
        signature = types.void(weights, types.intp, xq, types.intp, types.intp, sums, dx, types.intp, scales,
                               types.intp, types.intp, out)

        def codegen(context, builder, sig, args):
            data = lambda i: context.make_array(sig.args[i])(context, builder, args[i]).data  # noqa: E731
            i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
            weights_ = builder.gep(builder.bitcast(data(0), _I8.as_pointer()), [args[1]])
            acts, sums_, dx_ = builder.bitcast(data(2), _I8.as_pointer()), data(5), data(6)
            halves = builder.gep(builder.bitcast(data(8), ir.HalfType().as_pointer()), [args[9]])
            out_, x_start, k, s_start, blocks_ = data(11), args[3], args[4], args[7], args[10]
            v16, lanes, bytes64 = _vector(_F32, 16), _vector(_I32, 16), _vector(_I8, 64)
            fma16 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32")
            prefetch_ = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
            size = 64 * CHUNKS[q4]
            # q4_0: nibbles c in 0..15, each element c - 8; q8_0: w + 128 in 0..255 (w's bits with the top
            # one flipped) where vpdpbusd takes unsigned bytes. Either way each lane is off by a constant
            # times the activations' sum over the lane, so a block's is C times the block's sum of q, the
            # same for every row: it starts the lanes. AVX2's pairwise products saturate at 16 bits, too
            # small for 255 x 127 x 2, so there q8_0 is |w| times q with w's sign (C = 0).
            signed_trick = not q4 and TIER == "avx2"
            offset = 8 if q4 else (0 if signed_trick else 128)

            entry = builder.block
            loop, done = builder.append_basic_block("blocks"), builder.append_basic_block("done")
            builder.cbranch(builder.icmp_signed(">", blocks_, i64(0)), loop, done)
            builder.position_at_end(loop)
            b = builder.phi(_I64)
            b.add_incoming(i64(0), entry)
            accs = [builder.phi(v16) for _ in range(tokens)]
            for acc in accs:
                acc.add_incoming(ir.Constant(v16, None), entry)
            here = builder.gep(weights_, [builder.mul(b, i64(size))])
            if prefetch:
                for line in range(0, size, 64):
                    builder.call(prefetch_, [builder.gep(here, [i64(PREFETCH_BYTES + line)]),
                                             ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            loads = [_load(builder, here, i64(64 * c), bytes64) for c in range(CHUNKS[q4])]
            if q4:
                chunks = ([builder.and_(v, ir.Constant(bytes64, [15] * 64)) for v in loads]
                          + [builder.lshr(v, ir.Constant(bytes64, [4] * 64)) for v in loads])
            elif signed_trick:
                negative = [builder.icmp_signed("<", v, ir.Constant(bytes64, None)) for v in loads]
                chunks = [builder.select(n, builder.sub(ir.Constant(bytes64, None), v), v) for n, v in zip(negative, loads)]
            else:
                chunks = [builder.xor(v, ir.Constant(bytes64, [-128] * 64)) for v in loads]
            d_rows = builder.fpext(builder.load(builder.bitcast(builder.gep(halves, [builder.mul(b, i64(GROUP))]),
                                                                _vector(ir.HalfType(), 16).as_pointer()), align=2), v16)
            following = []
            for t, acc in enumerate(accs):
                at = builder.add(builder.add(s_start, builder.mul(i64(t), blocks_)), b)
                x_block = builder.gep(acts, [builder.add(builder.add(x_start, builder.mul(i64(t), k)),
                                                         builder.mul(b, i64(BLOCK)))])
                total = builder.mul(builder.load(builder.gep(sums_, [at])), ir.Constant(_I32, -offset))
                dot = builder.insert_element(ir.Constant(lanes, ir.Undefined), total, ir.Constant(_I32, 0))
                dot = builder.shuffle_vector(dot, dot, ir.Constant(lanes, [0] * 16))
                for c, w in enumerate(chunks):
                    four = builder.load(builder.bitcast(builder.gep(x_block, [i64(4 * c)]), _I32.as_pointer()), align=1)
                    x4 = builder.insert_element(ir.Constant(lanes, ir.Undefined), four, ir.Constant(_I32, 0))
                    x4 = builder.bitcast(builder.shuffle_vector(x4, x4, ir.Constant(lanes, [0] * 16)), bytes64)
                    if signed_trick:
                        x4 = builder.select(negative[c], builder.sub(ir.Constant(bytes64, None), x4), x4)
                    dot = _dot_lanes(builder, TIER, dot, w, x4)
                d_x = builder.load(builder.gep(dx_, [at]))
                dx16 = builder.shuffle_vector(builder.insert_element(ir.Constant(v16, ir.Undefined), d_x, ir.Constant(_I32, 0)),
                                              ir.Constant(v16, ir.Undefined), ir.Constant(lanes, [0] * 16))
                following.append(builder.call(fma16, [builder.sitofp(dot, v16), builder.fmul(d_rows, dx16), acc]))
            after = builder.add(b, i64(1))
            for acc, value in zip(accs, following):
                acc.add_incoming(value, builder.block)
            b.add_incoming(after, builder.block)
            builder.cbranch(builder.icmp_signed("<", after, blocks_), loop, done)

            builder.position_at_end(done)
            results = [builder.phi(v16) for _ in following]
            for t, (result, value) in enumerate(zip(results, following)):
                result.add_incoming(ir.Constant(v16, None), entry)
                result.add_incoming(value, loop)
                builder.store(result, builder.bitcast(builder.gep(out_, [i64(GROUP * t)]), v16.as_pointer()), align=4)
            return context.get_dummy_value()

        return signature, codegen

    return group_times_quantized


# How far ahead of the block being multiplied a decode product asks for the weights (bytes). The
# hardware prefetcher alone kept a token's products at ~13 GB/s, half the machine's bandwidth and
# below the kernel's in-cache speed: the two did not overlap. Asking ~8 KB ahead took the 30 layers'
# products of a SmolLM2-shaped q8_0 model from 7.9 to 3.5 ms (2 threads, by hand; 4 KB 3.8, 16 KB 3.8).
PREFETCH_BYTES = 8192
TILE = 4  # tokens a prefill tile multiplies per pass over a group's block (16 rows x 4 tokens)
group_times_one = _group_tile(1, prefetch=True)
group_times_tile = _group_tile(TILE, prefetch=False)


@njit(inline="always", **JIT)
def quantize_blocks(x, xq, dx, sums):
    """x [K] (float32) as :func:`edge_lolcats.arch.ops.quantize_activations` quantizes it: xq [K]
    (int8), dx [K / 32] (float32), and sums [K / 32] (int32): each block's sum of quants (the
    products' lanes start from a multiple of it)."""
    for b in range(dx.shape[0]):
        block = x[BLOCK * b : BLOCK * (b + 1)]
        top = np.float32(0.0)
        for j in range(BLOCK):
            top = max(top, abs(block[j]))
        d = top / np.float32(127.0)
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = np.int32(0)
        for j in range(BLOCK):
            q = np.int8(np.rint(block[j] * inverse))
            xq[BLOCK * b + j] = q
            total += np.int32(q)
        dx[b] = d
        sums[b] = total


@intrinsic
def holds_q4(typingctx, weights):
    """Whether ``weights`` is a q4_0 buffer (uint8; q8_0 is int8), as a constant of the compiled code."""
    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), int(weights.dtype == types.uint8))

    return types.boolean(weights), codegen


@njit(**JIT)
def groups_times_activations(weights, start, groups, k, scales, x, y):
    """y [T, 16 groups] = the interleaved rows of ``groups`` groups from byte ``start`` of ``weights``
    (:func:`place_rows`; their scales from scales[0]) times x [T, K] (float32), quantized first: the
    compiled engine's product without its threads, for the tests."""
    t_n, blocks = x.shape[0], k // BLOCK
    xq, dx, sums = np.empty((t_n, k), np.int8), np.empty((t_n, blocks), np.float32), np.empty((t_n, blocks), np.int32)
    for t in range(t_n):
        quantize_blocks(x[t], xq[t], dx[t], sums[t])
    xq_, dx_, sums_ = xq.reshape(t_n * k), dx.reshape(t_n * blocks), sums.reshape(t_n * blocks)
    out = np.empty(GROUP * TILE, np.float32)
    size = GROUP * k // 2 if holds_q4(weights) else GROUP * k  # bytes of a group
    for g in range(groups):
        at, d_at = start + g * size, g * blocks * GROUP
        t = 0
        while t + TILE <= t_n:
            group_times_tile(weights, at, xq_, t * k, k, sums_, dx_, t * blocks, scales, d_at, blocks, out)
            for i in range(TILE):
                y[t + i, GROUP * g : GROUP * (g + 1)] = out[GROUP * i : GROUP * (i + 1)]
            t += TILE
        while t < t_n:
            group_times_one(weights, at, xq_, t * k, k, sums_, dx_, t * blocks, scales, d_at, blocks, out)
            y[t, GROUP * g : GROUP * (g + 1)] = out[:GROUP]
            t += 1
