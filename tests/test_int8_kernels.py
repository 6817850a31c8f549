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
    xq, dx, offsets = np.empty(k, np.int8), np.empty(9, np.float32), np.empty(k // 4, np.int32)
    ik.quantize_blocks(x, xq, dx, offsets)
    want_q, want_d = quantize_activations(x)
    np.testing.assert_array_equal(xq, want_q)
    np.testing.assert_array_equal(dx, want_d)
    np.testing.assert_array_equal(offsets, -8 * xq.astype(np.int64).reshape(-1, 4).sum(1))


def _rows(kind, rng, rows, k, start):
    """A buffer of ``rows`` rows from element ``start``: q8_0 quants (int8) or q4_0 bytes (uint8),
    and the rows' values w_j per element (int64: the quant, or the nibble - 8) in element order."""
    blocks = k // 32
    if kind == "q4_0":
        raw = rng.integers(0, 256, start + rows * k // 2).astype(np.uint8)
        packed = raw[start:].reshape(rows, blocks, 16).astype(np.int64)
        return raw, np.concatenate([packed & 15, packed >> 4], axis=2).reshape(rows, k) - 8
    raw = rng.integers(-128, 128, start + rows * k).astype(np.int8)
    return raw, raw[start:].reshape(rows, k).astype(np.int64)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_rows_times_quantized_activations(kind, k):
    rng = np.random.default_rng()
    rows, blocks, start = 11, k // 32, 5  # the rows from an odd offset in the buffer
    raw, w = _rows(kind, rng, rows, k, start)
    d = rng.uniform(-0.02, 0.02, (rows, blocks)).astype(np.float32)
    x = (rng.standard_normal(k) * rng.uniform(0.1, 10, k)).astype(np.float32)
    y = np.empty(rows, np.float32)
    ik.rows_times_activations(raw, start, rows, k, d, x, y)
    q, dx = quantize_activations(x)
    per_block = (w * q.astype(np.int64)).reshape(rows, blocks, 32).sum(2)  # exact integers
    exact = (d.astype(np.float64) * dx.astype(np.float64) * per_block).sum(1)
    # float32: per block the scale d dx rounded once, each lane's exact int32 sum rounded in the
    # fma, the fmas' chain over blocks / 2 pairs and a tree of 4 levels: |error| <= (blocks + 8)
    # eps times the sum of the terms' magnitudes, bounded by the elements' (lanes may cancel)
    magnitude = (np.abs(w) * np.abs(q.astype(np.int64))).reshape(rows, blocks, 32).sum(2)
    bound = (blocks + 8) * F32_EPS * (np.abs(d.astype(np.float64) * dx) * magnitude).sum(1)
    assert np.all(np.abs(y - exact) <= bound), (np.abs(y - exact) / bound).max()


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
        "for kind, k in (('q4_0', 96), ('q4_0', 576), ('q8_0', 96), ('q8_0', 1536)):\n"
        "    rows = 40\n"
        "    raw = (rng.integers(0, 256, rows * k // 2).astype(np.uint8) if kind == 'q4_0'\n"
        "           else rng.integers(-128, 128, rows * k).astype(np.int8))\n"
        "    d = rng.uniform(-0.02, 0.02, (rows, k // 32)).astype(np.float32)\n"
        "    x = (rng.standard_normal(k) * rng.uniform(0.1, 10, k)).astype(np.float32)\n"
        "    y = np.empty(rows, np.float32)\n"
        "    ik.rows_times_activations(raw, 0, rows, k, d, x, y)\n"
        "    out.append(y)\n"
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
