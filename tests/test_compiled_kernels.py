"""The compiled engine's kernels against the one definition: products against gguf-py's own
dequantization (float64), the attention decode steps against arch.hybrid.decode_step and
arch.window.window_ring_step on numpy, every recurrence option, 80 steps (the ring wraps, the
sinks are passed). No torch."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from edge_lolcats.arch.args import Rope
from edge_lolcats.arch.hybrid import decode_step
from edge_lolcats.arch.ops import NUMPY, quantize_activations, quantized_activations
from edge_lolcats.arch.window import window_ring_step
from edge_lolcats.runtime import compiled_kernels as ck
from edge_lolcats.runtime import int8_kernels as ik

F32_EPS = np.finfo(np.float32).eps


def packed(w: np.ndarray, kind: int):
    """One matrix in the kernels' flat buffers, quantized as the GGUF exporter does; returns the
    buffers, the table entry and the matrix the file holds (dequantized, float64)."""
    n, k = w.shape
    empty = dict(q8=np.zeros(1, np.int8), q4=np.zeros(1, np.uint8), scales=np.zeros(1, np.uint16),
                 f32=np.zeros(1, np.float32))
    if kind == ck.F32:
        empty["f32"] = np.concatenate([np.zeros(3, np.float32), w.astype(np.float32).ravel()])  # at an offset
        return empty, np.array([ck.F32, 3, 0, n, k]), w.astype(np.float32).astype(np.float64)
    qt, size = (QT.Q8_0, 34) if kind == ck.Q8 else (QT.Q4_0, 18)
    raw = quants.quantize(w.astype(np.float32), qt).reshape(n, k // 32, size)
    name, dtype = ("q8", np.int8) if kind == ck.Q8 else ("q4", np.uint8)
    quant_count, scale_count = ik.interleaved_sizes(n, k, kind == ck.Q4)
    empty[name] = np.zeros(5 + quant_count, dtype)  # at an offset
    empty["scales"] = np.zeros(2 + scale_count, np.uint16)
    ik.place_rows(raw[..., 2:].view(dtype), raw.view(np.uint16)[..., 0], empty[name][5:], empty["scales"][2:], 0)
    dense = quants.dequantize(raw.reshape(n, -1), qt).astype(np.float64).reshape(n, k)
    return empty, np.array([kind, 5, 2, n, k]), dense


@pytest.mark.parametrize("kind", [ck.F32, ck.Q8, ck.Q4], ids=["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("tokens", [1, 5, 8])
@pytest.mark.parametrize("quantize", [False, True], ids=["float32-x", "q8_0-x"])
def test_linear_equals_dequantized_product(kind, tokens, quantize):
    """W x in float64, x quantized first as arch.ops.quantize_activations says where the weights are
    (quantize, q8_0 or q4_0). Bound: float32 sums of K products in any order, |error| <= K eps
    sum |w x|, plus, for the int8 products, each block's scale d dx rounded once and each block's
    exact integer sum converted and scaled (3 more roundings): still within K eps sum |w x| for
    K >= 4 (a bound, not a fit). 37 rows: two groups of 16 and a padded one."""
    rng = np.random.default_rng()
    n, k = 37, 96  # odd rows and 5 tokens: the row groups and token groups of 4 have remainders
    buffers, entry, dense = packed(rng.standard_normal((n, k)), kind)
    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.1, 10, (tokens, k))).astype(np.float32)
    y = np.zeros((tokens, n), np.float32)
    given = x.copy()
    ck.linear(buffers["q8"], buffers["q4"], buffers["scales"], buffers["f32"], entry, given, y, quantize)
    seen = quantized_activations(x) if quantize and kind != ck.F32 else x  # float32, exactly q d
    # the float32 products on quantized values leave x as they multiplied it (it is dead after the
    # product); the int8 ones quantize it into a buffer of their own
    np.testing.assert_array_equal(given, x if ik.INT8_DOTS or not quantize else seen)
    exact = seen.astype(np.float64) @ dense.T
    bound = k * F32_EPS * (np.abs(seen.astype(np.float64)) @ np.abs(dense).T)
    assert np.all(np.abs(y - exact) <= bound), np.abs(y - exact).max()
    if quantize and kind != ck.F32:  # and the quantization moved the result, by at most half a step an element
        # (beyond float32's rounding: the ratio moved / bound was 105-400 over 300 draws of one q4_0 token;
        # a factor of 100 failed once in a full run, 98.8)
        step = 0.5 * np.repeat(quantize_activations(x)[1], 32, axis=-1).astype(np.float64)
        moved = np.abs(exact - x.astype(np.float64) @ dense.T)
        assert moved.max() > 20 * bound.max() and np.all(moved <= step @ np.abs(dense).T * (1 + 1e-6))


def test_linear_does_not_depend_on_the_thread_count():
    import numba

    rng = np.random.default_rng(3)
    buffers, entry, _ = packed(rng.standard_normal((101, 64)), ck.Q8)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    out = []
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        y = np.zeros((1, 101), np.float32)
        ck.linear(buffers["q8"], buffers["q4"], buffers["scales"], buffers["f32"], entry, x, y, True)
        out.append(y)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(out[0], out[1])


@pytest.mark.parametrize("kind", [ck.F32, ck.Q8, ck.Q4], ids=["f32", "q8_0", "q4_0"])
def test_embedding_row_is_the_dequantized_row(kind):
    """Every row, so every lane of the interleaved groups and the last, padded, group."""
    rng = np.random.default_rng()
    buffers, entry, dense = packed(rng.standard_normal((50, 64)), kind)
    for token in range(50):
        out = np.zeros(64, np.float32)
        ck.embedding_row(buffers["q8"], buffers["q4"], buffers["scales"], buffers["f32"], entry, token, out)
        np.testing.assert_array_equal(out, dense[token].astype(np.float32))


OPTION_SETS = ["", "rope", "decay", "sinks", "rope+decay+sinks"]
# 80 tokens in blocks of these sizes, in turn (1: decode; 13 > W: a block passes the whole ring)
BLOCKS = [1, 5, 1, 8, 13, 2, 3, 1, 9]


def blocks(total: int):
    p, i = 0, 0
    while p < total:
        n = min(BLOCKS[i % len(BLOCKS)], total - p)
        yield p, n
        p, i = p + n, i + 1


@pytest.mark.parametrize("kind", OPTION_SETS)
@pytest.mark.parametrize("heads,kv_heads,softcap,d", [(4, 4, 0.0, 16), (6, 3, 0.0, 64), (4, 2, 5.0, 12)])
def test_hybrid_attention_equals_the_decode_steps(kind, heads, kv_heads, softcap, d):
    """80 tokens of one sequence in blocks of 1 to 13, W = 8: the ring wraps ten times (within a
    block too), the sinks fill and are passed; each block against as many decode steps. Head sizes
    16 and 64 run the compiled state and window passes, 12 their loops."""
    rng = np.random.default_rng(len(kind) + 7 * heads + kv_heads)
    f, w, steps = 6, 8, 80
    n_s = 3 if "sinks" in kind else 0
    inv_freq = Rope(theta=10.0, dim=d).inv_freq() if "rope" in kind else None
    log_decay = (-(rng.random(heads) * 0.35)).astype(np.float32) if "decay" in kind else None
    fq, fk = (rng.standard_normal((heads, d, f)).astype(np.float32) for _ in range(2))
    window_factor = rng.standard_normal(heads).astype(np.float32)
    scale = np.float32(d ** -0.5)
    ref = [np.zeros((1, heads, 2 * f, d), np.float32), np.zeros((1, heads, 2 * f), np.float32)] + [
        np.zeros((1, kv_heads, m, d), np.float32) for m in (w, w) + ((n_s, n_s) if n_s else ())]
    ours = [a[0].copy() for a in ref] + ([] if n_s else [np.zeros((kv_heads, 0, d), np.float32)] * 2)
    for start, n in blocks(steps):
        q = (2 * rng.standard_normal((n, heads, d))).astype(np.float32)
        k = (2 * rng.standard_normal((n, kv_heads, d))).astype(np.float32)
        v = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
        want = []
        for t in range(n):
            o, ref = decode_step(NUMPY, q[None, t, :, None], k[None, t, :, None], v[None, t, :, None], fq, fk,
                                 window_factor, log_decay, ref, start + t, scale=scale, softcap=softcap or None,
                                 rope=inv_freq, sink_tokens=n_s)
            ref = list(ref)
            want.append(o[0, :, 0])
        out = np.zeros((n, heads, d), np.float32)
        ck.hybrid_attention(q, k, v, fq.swapaxes(1, 2).copy(), fk.swapaxes(1, 2).copy(), window_factor,
                            np.zeros(heads, np.float32) if log_decay is None else log_decay, *ours, start, scale,
                            np.float32(softcap), np.zeros(0, np.float32) if inv_freq is None else inv_freq,
                            inv_freq is not None, out)
        # float32 both, summed in other orders: relative 1e-5 of values of order 1 (1e-4: FACTS'
        # float32 tolerance across backends, kept tighter here because the math is the same)
        np.testing.assert_allclose(out, np.stack(want), rtol=2e-5, atol=2e-5, err_msg=f"{kind} out at {start}+{n}")
        for name, got, exp in zip(("kv", "z", "k_window", "v_window", "k_sink", "v_sink"), ours, ref):
            np.testing.assert_allclose(got, exp[0], rtol=2e-5, atol=2e-5, err_msg=f"{kind} {name} at {start}+{n}")


@pytest.mark.parametrize("d", [12, 16, 32, 64, 128])
def test_state_step_and_window_values_against_float64(d):
    """The hybrid attention's two inner passes, compiled for head sizes 16, 32, 64 (128: two passes
    of 64 columns for the window) and loops for others, against float64 on fresh inputs. Each
    result is a sum of at most 11 float32 products of values of order 1 (rounded once each, and
    once a sum): within 11 x 2 eps x the sum of magnitudes (~2e-5 here); 1e-5 relative to the
    magnitudes, far below a dropped row or column (order 1)."""
    from numba import njit

    @njit
    def state_step(kv, z, phi_q, phi_k, v, lam, num, den):
        return ck._state_step(kv, z, phi_q, phi_k, v, lam, num, den)

    @njit
    def window_values(weights, values, first, nr, num, t0):
        ck._window_values(weights, values, first, nr, num, t0)

    rng = np.random.default_rng()
    f2, lam = 10, np.float32(rng.uniform(0.5, 1.0))
    kv, num = rng.standard_normal((f2, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    z, phi_q, phi_k = (rng.random(f2).astype(np.float32) for _ in range(3))
    v, den = rng.standard_normal(d).astype(np.float32), np.float32(rng.random())
    want_kv = lam * kv.astype(np.float64) + phi_k[:, None].astype(np.float64) * v
    want_z = lam * z.astype(np.float64) + phi_k
    want_num, want_den = num + phi_q.astype(np.float64) @ want_kv, den + phi_q.astype(np.float64) @ want_z
    magnitude = np.abs(num) + np.abs(phi_q) @ np.abs(want_kv)
    got_den = state_step(kv, z, phi_q, phi_k, v, lam, num, den)
    np.testing.assert_allclose(kv, want_kv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, want_z, rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(num - want_num) <= 1e-5 * magnitude), np.max(np.abs(num - want_num) / magnitude)
    assert abs(got_den - want_den) <= 1e-5 * (den + phi_q @ want_z)

    nr, first, t0 = 11, 3, 2
    weights = rng.random((4, nr + 2)).astype(np.float32)
    values = rng.standard_normal((first + nr + 4, d)).astype(np.float32)
    num_w = rng.standard_normal((t0 + 6, d)).astype(np.float32)
    want = num_w.astype(np.float64)
    want[t0 : t0 + 4] += weights[:, :nr].astype(np.float64) @ values[first : first + nr]
    magnitude = np.abs(num_w).astype(np.float64)
    magnitude[t0 : t0 + 4] += weights[:, :nr] @ np.abs(values[first : first + nr]).astype(np.float64)
    window_values(weights, values, first, nr, num_w, t0)
    assert np.all(np.abs(num_w - want) <= 1e-5 * magnitude), np.max(np.abs(num_w - want) / magnitude)


@pytest.mark.parametrize("heads,kv_heads,softcap", [(4, 2, 0.0), (3, 3, 5.0)])
def test_window_attention_equals_the_ring_steps(heads, kv_heads, softcap):
    rng = np.random.default_rng(heads)
    d, w = 8, 5
    ring = [np.zeros((1, kv_heads, w, d), np.float32) for _ in range(2)]
    ours = [r[0].copy() for r in ring]
    for start, n in blocks(40):
        q = rng.standard_normal((n, heads, d)).astype(np.float32)
        k, v = (rng.standard_normal((n, kv_heads, d)).astype(np.float32) for _ in range(2))
        want = []
        for t in range(n):
            o, *ring = window_ring_step(NUMPY, q[None, t, :, None], k[None, t, :, None], v[None, t, :, None], *ring,
                                        start + t, scale=0.3, softcap=softcap or None)
            want.append(o[0, :, 0])
        out = np.zeros((n, heads, d), np.float32)
        ck.window_attention(q, k, v, *ours, start, np.float32(0.3), np.float32(softcap), out)
        np.testing.assert_allclose(out, np.stack(want), rtol=2e-5, atol=2e-5, err_msg=f"out at {start}+{n}")
        for got, exp in zip(ours, ring):
            np.testing.assert_array_equal(got, exp[0])


def test_attention_blocks_equal_single_steps():
    """A block's heads do the token-by-token arithmetic, but for the feature maps' and the window
    scores' sums of D products, which a block takes 4 tokens at a time and a lone token (decode)
    one dot or 8 features at a time: the same sums in another order, so within float32 rounding of them (D eps relative to
    the sum of the terms' magnitudes; measured 1.5e-7) carried through exp and 40 steps of state; 1e-5,
    far below a wrong slot, angle or decay (1e-2 and more, test_hybrid_attention_equals_the_decode_steps)."""
    rng = np.random.default_rng(11)
    heads, kv_heads, d, f, w, n_s, steps = 6, 2, 16, 6, 8, 3, 40
    inv_freq = Rope(theta=10.0, dim=d).inv_freq()
    fq, fk = (rng.standard_normal((heads, d, f)).astype(np.float32) for _ in range(2))
    window_factor, log_decay = rng.standard_normal(heads).astype(np.float32), -rng.random(heads).astype(np.float32)
    q = rng.standard_normal((steps, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((steps, kv_heads, d)).astype(np.float32) for _ in range(2))
    results = []
    for sizes in ([1] * steps, [steps]):
        state = [np.zeros(s, np.float32) for s in ((heads, 2 * f, d), (heads, 2 * f), (kv_heads, w, d), (kv_heads, w, d),
                                                   (kv_heads, n_s, d), (kv_heads, n_s, d))]
        out, p = np.zeros((steps, heads, d), np.float32), 0
        for n in sizes:
            ck.hybrid_attention(q[p : p + n], k[p : p + n], v[p : p + n], fq.swapaxes(1, 2).copy(), fk.swapaxes(1, 2).copy(), window_factor, log_decay, *state, p,
                                np.float32(0.25), np.float32(0.0), inv_freq, True, out[p : p + n])
            p += n
        results.append((out, state))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exp_is_within_an_ulp_of_float64_exp():
    """The kernels' vectorising exp against numpy's in float64, over float32's whole normal range
    (fresh random inputs) and its ends: 0 below the normal range (where float32's own exp is
    subnormal: weights of a softmax, never read back), inf above, as float32's exp."""
    from numba import njit

    @njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = ck._exp(x[i])

    rng = np.random.default_rng()
    x = np.concatenate([rng.uniform(ck.EXP_LOW, ck.EXP_HIGH, 200_000), rng.uniform(-30, 0, 100_000),
                        [ck.EXP_LOW, ck.EXP_HIGH, 0.0, -0.0, 1e-30]]).astype(np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(out - exact) <= ulp), np.max(np.abs(out - exact) / ulp)
    ends = np.array([-np.inf, -1000.0, np.nextafter(ck.EXP_LOW, -np.inf), np.nextafter(ck.EXP_HIGH, np.inf), 1000.0,
                     np.inf], np.float32)
    exp_all(ends, out[: len(ends)])
    np.testing.assert_array_equal(out[: len(ends)], [0, 0, 0, np.inf, np.inf, np.inf])


@pytest.mark.parametrize("module", [ck, ik], ids=["compiled_kernels", "int8_kernels"])
def test_numba_cache_sees_the_files_compiled_code_depends_on(module):
    """numba's on-disk cache keys a function by its own file only: a module whose compiled code
    inlines another file's code records that file's digest, and an edit there must be followed by
    one here (the new digest), or a second process would run the cached, stale machine code."""
    import hashlib
    import os

    folder = os.path.dirname(module.__file__)
    for name, digest in module.COMPILED_WITH.items():
        with open(os.path.join(folder, name), "rb") as f:
            now = hashlib.sha256(f.read()).hexdigest()[:16]
        assert now == digest, (f"{name} changed: set {module.__name__}.COMPILED_WITH[{name!r}] = {now!r}, "
                               f"so that numba's cache of {os.path.basename(module.__file__)} is rebuilt")
