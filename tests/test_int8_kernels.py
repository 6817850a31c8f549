"""The int8 products (runtime.int8_kernels) against float64 references on fresh random inputs: the
activations' q8_0 blocks exactly as numpy rounds them, and q4_0 rows times them within float32's
rounding of the per-block scales and the float32 sums. No torch."""
import numpy as np
import pytest

from edge_lolcats.runtime import int8_kernels as ik

F32_EPS = np.finfo(np.float32).eps


def reference_blocks(x: np.ndarray):
    """q8_0 blocks of x in float32 arithmetic, as the kernel rounds them (ties to even)."""
    blocks = x.reshape(-1, 32)
    d = (np.abs(blocks).max(1) / np.float32(127.0)).astype(np.float32)
    inverse = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    xq = np.rint(blocks * inverse[:, None]).astype(np.int8)
    return xq.ravel(), d


def test_activations_quantize_as_q8_0_blocks():
    rng = np.random.default_rng()
    x = (rng.standard_normal(32 * 7) * rng.uniform(0.01, 30, 32 * 7)).astype(np.float32)
    x[64:96] = 0.0  # an all-zero block: scale 0, quants 0
    xq, dx, offsets = np.empty(x.size, np.int8), np.empty(7, np.float32), np.empty(7, np.float32)
    ik.quantize_blocks(x, xq, dx, offsets)
    want_q, want_d = reference_blocks(x)
    np.testing.assert_array_equal(xq, want_q)
    np.testing.assert_array_equal(dx, want_d)
    assert dx[2] == 0 and not xq[64:96].any()
    # each element within half a step of its block's scale (the rounding), the block's largest exactly +-127
    step = np.repeat(dx, 32)
    assert np.all(np.abs(x - xq.astype(np.float64) * step) <= 0.5 * step * (1 + 4 * F32_EPS) + 1e-30)
    assert np.all(np.abs(xq.reshape(7, 32)).max(1)[[0, 1, 3, 4, 5, 6]] == 127)
    sums = xq.reshape(7, 32).astype(np.int64).sum(1)
    np.testing.assert_allclose(offsets, -8.0 * dx.astype(np.float64) * sums, rtol=2 * F32_EPS)


@pytest.mark.skipif(not ik.HAS_VNNI, reason="needs a CPU with AVX-512 VNNI (vpdpbusd)")
@pytest.mark.parametrize("k", [32, 96, 576])
def test_q4_rows_times_quantized_activations(k):
    rng = np.random.default_rng()
    rows, blocks, start = 11, k // 32, 5  # the rows from an odd byte offset in the buffer
    q4 = rng.integers(0, 256, start + rows * k // 2).astype(np.uint8)
    d = rng.uniform(-0.02, 0.02, (rows, blocks)).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    xq, dx, offsets = np.empty(k, np.int8), np.empty(blocks, np.float32), np.empty(blocks, np.float32)
    ik.quantize_blocks(x, xq, dx, offsets)
    y = np.empty(rows, np.float32)
    ik.q4_rows_times_q8(q4, start, rows, k, d, xq, dx, offsets, y)
    # float64: the nibbles (c - 8) as the file defines them, times the quantized activations
    packed = q4[start:].reshape(rows, blocks, 16).astype(np.int64)
    c = np.concatenate([packed & 15, packed >> 4], axis=2) - 8  # [rows, blocks, 32], element order
    per_block = (c * xq.reshape(blocks, 32).astype(np.int64)).sum(2)  # exact integers
    terms = d.astype(np.float64) * dx.astype(np.float64) * per_block
    exact = terms.sum(1)
    # float32: per block the scale d dx rounded once, times each of the 8 lanes' exact int32 sums of
    # unsigned nibbles (c + 8) x xq (one rounding in the fma), the -8 offset's term rounded twice
    # more, and all of it summed in float32: |error| <= (2 blocks + 12) eps times the sum of the
    # terms' magnitudes, which the elements' magnitudes bound (lanes may cancel; a bound, not a fit)
    scale = np.abs(d.astype(np.float64) * dx)
    magnitude = np.abs(xq.reshape(blocks, 32).astype(np.int64))
    bound = (2 * blocks + 12) * F32_EPS * (scale * (((c + 8) * magnitude).sum(2) + 8 * magnitude.sum(1))).sum(1)
    assert np.all(np.abs(y - exact) <= bound), (np.abs(y - exact) / bound).max()
    # and the quantized product is the float32 one within the activations' rounding (half a step each)
    dense = (c * np.repeat(d, 32, axis=1).reshape(rows, blocks, 32)).reshape(rows, k)
    assert np.all(np.abs(y - dense @ x.astype(np.float64)) <= np.abs(dense) @ (0.5 * np.repeat(dx, 32)) * 1.001 + bound)


def test_the_int8_product_is_refused_without_vnni(monkeypatch):
    """Where the CPU lacks VNNI the product raises instead of compiling (LLVM would abort the process)."""
    monkeypatch.setattr(ik, "HAS_VNNI", False)
    one = np.zeros(32, np.float32)
    with pytest.raises(RuntimeError, match="VNNI"):
        ik.q4_rows_times_q8(np.zeros(16, np.uint8), 0, 1, 32, np.ones((1, 1), np.float32), one.astype(np.int8),
                            one[:1], one[:1], one[:1])
