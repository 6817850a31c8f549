"""Quantized activations and the int8 products (runtime.int8_kernels) against the one definition
(arch.ops.quantize_activations) and float64 references on fresh random inputs: the activations'
q8_0 blocks exactly, q8_0 and q4_0 rows times them within float32's rounding of the per-block
scales and sums, and every instruction tier the CPU can run giving bit-identical results. No torch."""
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_lolcats.arch.ops import quantize_activations, quantized_activations
from edge_lolcats.runtime import int8_kernels as ik

F32_EPS = np.finfo(np.float32).eps


def test_the_definition_quantizes_blocks_of_32_to_8_bits():
    """Each element within half a step of its block's scale (max|x| / 127), the block's largest at
    +-127, an all-zero block all zeros, ties to even; float64 reference."""
    rng = np.random.default_rng()
    x = (rng.standard_normal((3, 32 * 7)) * rng.uniform(0.01, 30, (3, 32 * 7))).astype(np.float32)
    x[1, 64:96] = 0.0
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5], np.float32)
    x[2, :32] = np.concatenate([[127.0], ties, np.zeros(23)])  # d = 1 exactly: the halves are ties
    q, d = quantize_activations(x)
    assert q.dtype == np.int8 and d.dtype == np.float32 and d.shape == (3, 7)
    np.testing.assert_allclose(d, np.abs(x.astype(np.float64)).reshape(3, 7, 32).max(2) / 127, rtol=F32_EPS)
    step = np.repeat(d, 32, axis=1).astype(np.float64)
    assert np.all(np.abs(x - q * step) <= 0.5 * step * (1 + 4 * F32_EPS))
    assert d[1, 2] == 0 and not q[1, 64:96].any()
    tops = np.abs(q.astype(np.int64)).reshape(3, 7, 32).max(2)
    assert np.all(tops[d > 0] == 127)
    np.testing.assert_array_equal(q[2, 1:9], [0, 2, 2, 0, -2, -2, 4, 126])  # to even
    np.testing.assert_array_equal(quantized_activations(x), (q.reshape(3, 7, 32) * d[..., None]).reshape(3, -1))
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_activations(np.zeros(40, np.float32))


def test_kernels_quantize_as_the_definition():
    rng = np.random.default_rng()
    k = 32 * 9
    x = (rng.standard_normal(k) * rng.uniform(0.001, 100, k)).astype(np.float32)
    x[96:128] = 0.0
    x[128:160] = np.concatenate([[127.0], np.arange(31) - 14.5])  # d = 1: ties, to even
    xq, dx, sums = np.empty(k, np.int8), np.empty(9, np.float32), np.empty(9, np.int32)
    ik.quantize_blocks(x, xq, dx, sums)
    want_q, want_d = quantize_activations(x)
    np.testing.assert_array_equal(xq, want_q)
    np.testing.assert_array_equal(dx, want_d)
    np.testing.assert_array_equal(sums, xq.astype(np.int64).reshape(-1, 32).sum(1))


def _matrix(kind, rng, rows, k):
    """A quantized matrix as GGUF stores it: quants [rows, K/32, 32] (int8, q8_0) or bytes [rows,
    K/32, 16] (uint8, q4_0), random float16 scales [rows, K/32] (their bits, uint16), and the rows'
    values w_j per element (int64: the quant, or the nibble - 8) in element order."""
    blocks = k // 32
    d = rng.uniform(-0.02, 0.02, (rows, blocks)).astype(np.float16)
    if kind == "q4_0":
        raw = rng.integers(0, 256, (rows, blocks, 16)).astype(np.uint8)
        w = np.concatenate([raw & 15, raw >> 4], axis=2).astype(np.int64).reshape(rows, k) - 8
        return raw, d.view(np.uint16), d, w
    raw = rng.integers(-128, 128, (rows, blocks, 32)).astype(np.int8)
    return raw, d.view(np.uint16), d, raw.astype(np.int64).reshape(rows, k)


def _interleaved(raw, bits, pieces, start):
    """The matrix in place_rows' layout from byte ``start`` of a buffer, placed in ``pieces`` (row
    counts: a matrix joined from tensors whose rows do not start groups)."""
    rows, blocks, width = raw.shape
    groups = -(-rows // ik.GROUP)
    buffer = np.zeros(start + groups * ik.GROUP * blocks * width, raw.dtype)
    scales = np.zeros(groups * ik.GROUP * blocks, np.uint16)
    first = 0
    for count in pieces:
        ik.place_rows(raw[first : first + count], bits[first : first + count], buffer[start:], scales, first)
        first += count
    assert first == rows
    return buffer, scales, groups


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("k,tokens", [(32, 1), (96, 5), (576, 8), (1536, 3)])
def test_groups_times_quantized_activations(kind, k, tokens):
    """37 rows placed as tensors of 5, 20 and 12 rows (groups begun mid-tensor, a padded last
    group), from an odd offset; tiles of 4 tokens and single tokens. float64 reference on the exact
    integers: per block the scale d dx rounded once, its exact integer sum I_b (|I_b| < 2^24, so
    exactly converted) scaled in an fma, the fmas chained over the blocks: |error| <= (blocks + 1)
    eps sum_b |d dx I_b|."""
    rng = np.random.default_rng()
    rows, blocks = 37, k // 32
    raw, bits, d, w = _matrix(kind, rng, rows, k)
    buffer, scales, groups = _interleaved(raw, bits, [5, 20, 12], start=5)
    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.1, 10, (tokens, k))).astype(np.float32)
    y = np.full((tokens, groups * ik.GROUP), np.nan, np.float32)
    ik.groups_times_activations(buffer, 5, groups, k, scales, x, y)
    q, dx = quantize_activations(x)
    per_block = np.einsum("rbj,tbj->trb", w.reshape(rows, blocks, 32), q.astype(np.int64).reshape(tokens, blocks, 32))
    terms = d.astype(np.float64)[None] * dx.astype(np.float64)[:, None, :] * per_block
    bound = (blocks + 1) * F32_EPS * np.abs(terms).sum(2)
    error = np.abs(y[:, :rows] - terms.sum(2))
    assert np.all(error <= bound), (error / bound).max()
    np.testing.assert_array_equal(y[:, rows:], 0.0)  # the padding rows: zero scales


def test_place_rows_puts_4_bytes_of_16_rows_in_each_chunk():
    """The layout itself, byte by byte, for both kinds (the kernels' and the dequantizing readers'
    contract): chunk c of group g's block b holds row 16 g + r's bytes 4c..4c+3 of block b at
    64 c + 4 r."""
    rng = np.random.default_rng()
    for kind in ("q8_0", "q4_0"):
        raw, bits, _, _ = _matrix(kind, rng, 21, 64)
        buffer, scales, groups = _interleaved(raw, bits, [3, 18], start=0)
        width = raw.shape[2]
        layout = buffer.reshape(groups, 2, width // 4, ik.GROUP, 4)
        for row in range(21):
            g, r = divmod(row, ik.GROUP)
            for b in range(2):
                np.testing.assert_array_equal(layout[g, b, :, r].ravel(), raw[row, b])
                assert scales[(g * 2 + b) * ik.GROUP + r] == bits[row, b]


TIERS = {"avx512vnni": {"avx512vnni", "avx512vl"}, "avxvnni": {"avxvnni"}, "avx2": {"avx2"}, None: set()}


def _host_features() -> dict:
    from llvmlite import binding

    binding.initialize_native_target()
    return dict(binding.get_host_cpu_features())


def test_every_instruction_tier_gives_the_same_bits(tmp_path):
    """The products' int32 lanes are exact whichever instructions make them, so every tier this CPU
    can run (AVX-512 VNNI, AVX-VNNI, AVX2, none) gives the same float32 results bit for bit. Each
    runs in a process that numba compiles for a CPU with the features down to that tier
    (NUMBA_CPU_FEATURES; its own cache folder)."""
    host = _host_features()
    runnable = [t for t, need in TIERS.items() if all(host.get(f) for f in need)]
    if len(runnable) < 2:
        pytest.skip("this CPU runs only the plain-integer tier")
    script = (
        "import sys, numpy as np\n"
        "from edge_lolcats.runtime import int8_kernels as ik\n"
        "rng = np.random.default_rng(7)\n"
        "out = []\n"
        "for kind, k, tokens in (('q4_0', 96, 5), ('q4_0', 576, 1), ('q8_0', 96, 6), ('q8_0', 1536, 1)):\n"
        "    groups = 3\n"
        "    size = groups * 16 * k // (2 if kind == 'q4_0' else 1)\n"
        "    raw = (rng.integers(0, 256, size).astype(np.uint8) if kind == 'q4_0'\n"
        "           else rng.integers(-128, 128, size).astype(np.int8))\n"
        "    scales = rng.uniform(-0.02, 0.02, groups * 16 * k // 32).astype(np.float16).view(np.uint16)\n"
        "    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.1, 10, (tokens, k))).astype(np.float32)\n"
        "    y = np.empty((tokens, groups * 16), np.float32)\n"
        "    ik.groups_times_activations(raw, 0, groups, k, scales, x, y)\n"
        "    out.append(y.ravel())\n"
        "np.save(sys.argv[1], np.concatenate(out))\n"
        "print(ik.TIER)\n")
    results = {}
    for tier in runnable:
        env = dict(os.environ, NUMBA_CPU_FEATURES=_features_down_to(tier), NUMBA_CACHE_DIR=str(tmp_path / f"cache-{tier}"))
        out = tmp_path / f"{tier}.npy"
        r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == str(tier)
        results[tier] = np.load(out)
    first = results[runnable[0]]
    for tier in runnable[1:]:
        np.testing.assert_array_equal(results[tier], first, err_msg=f"{tier} vs {runnable[0]}")


def _features_down_to(tier) -> str:
    """NUMBA_CPU_FEATURES for this host with the int8 dot product tiers above ``tier`` switched off."""
    features = _host_features()
    above = list(TIERS)[: list(TIERS).index(tier)]
    off = {"avx512vnni", "avxvnni"} & set().union(*(TIERS[t] for t in above))
    if tier is None:  # nor any AVX-512 or AVX2
        off |= {f for f in features if f.startswith("avx512")} | {"avx2"}
    features.update({f: False for f in off})
    return ",".join(("+" if on else "-") + name for name, on in features.items())


def test_a_cpu_without_int8_dot_products_multiplies_the_quantized_values(tmp_path):
    """Where no tier runs (no AVX2: older x86, other architectures), the compiled product of one token
    multiplies the quantized activations in float32: the definition's values, within float32's
    rounding of K-term sums (test_compiled_kernels' bound). numba compiles for such a CPU here."""
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_compiled_kernels import packed, F32_EPS\n"
        "from edge_lolcats.arch.ops import quantized_activations\n"
        "from edge_lolcats.runtime import compiled_kernels as ck, int8_kernels as ik\n"
        "assert not ik.INT8_DOTS\n"
        "rng = np.random.default_rng()\n"
        "for kind in (ck.Q8, ck.Q4):\n"
        "    n, k = 37, 96\n"
        "    buffers, entry, dense = packed(rng.standard_normal((n, k)), kind)\n"
        "    x = (rng.standard_normal((1, k)) * rng.uniform(0.1, 10, (1, k))).astype(np.float32)\n"
        "    y = np.zeros((1, n), np.float32)\n"
        "    ck.linear(buffers['q8'], buffers['q4'], buffers['scales'], buffers['f32'], entry, x.copy(), y, True)\n"
        "    seen = quantized_activations(x).astype(np.float64)\n"
        "    exact = seen @ dense.T\n"
        "    assert np.all(np.abs(y - exact) <= k * F32_EPS * (np.abs(seen) @ np.abs(dense).T)), np.abs(y - exact).max()\n"
        "print('ok')\n")
    env = dict(os.environ, NUMBA_CPU_FEATURES=_features_down_to(None), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
