"""The three forms of the hybrid attention agree with each other and with a brute-force loop.

Tolerances: in float64 the forms differ only in summation order, so they agree to ~1e-12 (we allow
1e-10). In float32 every form accumulates in float32; with unit-scale inputs, D = 16..64 and sums
over <= 200 keys the relative rounding is ~1e-6, so we allow 1e-4 absolute / 1e-4 relative on
outputs that are O(1) convex combinations of v.
"""
import math

import pytest
import torch

from edge_lolcats.nn.hybrid_attention import (
    FORMS,
    WINDOW_FACTOR_INIT,
    empty_state,
    feature_map,
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
    hybrid_attention_reference,
    hybrid_attention_step,
)

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def make_inputs(b, h, h_kv, n, d, f, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype) * scale
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=dtype) * scale
    v = torch.randn(b, h_kv, n, d, generator=g, dtype=dtype)
    fq = torch.randn(h, d, f, generator=g, dtype=dtype) / math.sqrt(d)
    fk = torch.randn(h, d, f, generator=g, dtype=dtype) / math.sqrt(d)
    wf = torch.randn(h, generator=g, dtype=dtype) + WINDOW_FACTOR_INIT
    return q, k, v, fq, fk, wf


def brute_force(q, k, v, fq, fk, wf, window_size, scale=None, softcap=None):
    """Per-query Python loop straight from the formula in the module docstring."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // rep].double(), v[bi, hi // rep].double()
            qh = q[bi, hi].double()
            pq = feature_map(qh[None, None], fq[hi : hi + 1].double())[0, 0]
            pk = feature_map(kh[None, None], fk[hi : hi + 1].double())[0, 0]
            a = torch.sigmoid(wf[hi].double())
            for i in range(n):
                win = list(range(max(0, i - window_size + 1), i + 1))
                s = torch.stack([qh[i] @ kh[j] * (scale or 1 / math.sqrt(d)) for j in win])
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                e = torch.exp(s - s.max())
                num = a * sum(e[t] * vh[j] for t, j in enumerate(win))
                den = a * e.sum()
                for j in range(0, i - window_size + 1):
                    l = pq[i] @ pk[j]
                    num = num + l * vh[j]
                    den = den + l
                out[bi, hi, i] = num / den
    return out


def assert_close(actual, expected, what, **tol):
    diff = (actual.double() - expected.double()).abs()
    allowed = tol["atol"] + tol["rtol"] * expected.double().abs()
    bad = diff > allowed
    if bad.any():
        worst = int((diff - allowed).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        pytest.fail(f"{what}: {int(bad.sum())} of {diff.numel()} elements off; worst at {idx}: "
                    f"{actual.flatten()[worst].item():.6g} vs {expected.flatten()[worst].item():.6g} "
                    f"(max abs diff {diff.max().item():.3g})")


def test_feature_map_identity_init_is_softmax_of_x():
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    w = torch.eye(8, dtype=torch.float64).expand(2, 8, 8)
    phi = feature_map(x, w)
    assert phi.shape == (1, 2, 5, 16)
    torch.testing.assert_close(phi[..., :8], x.softmax(-1))
    torch.testing.assert_close(phi[..., 8:], (-x).softmax(-1))
    assert (phi > 0).all()


def test_reference_matches_brute_force():
    args = make_inputs(2, 4, 2, 13, 8, 6, torch.float64, seed=0)
    expected = brute_force(*args, window_size=4)
    out, _ = hybrid_attention_reference(*args, window_size=4)
    assert_close(out, expected, "reference vs brute force", **TOL[torch.float64])


def test_score_scale_and_softcap_in_every_form():
    """Gemma's options (a scale other than 1/sqrt(D), soft-capped scores) against the loop, in every
    form: reference, chunked, recurrent, the export's block and decode steps, and numpy's."""
    import numpy as np

    from edge_lolcats.nn.hybrid_attention import hybrid_attention_block_step, hybrid_attention_decode_step
    from edge_lolcats.runtime import hybrid_numpy

    seed = torch.seed() % 2**31
    q, k, v, fq, fk, wf = make_inputs(1, 4, 2, 23, 8, 6, torch.float64, seed=seed, scale=3.0)
    options = dict(scale=0.21, softcap=2.5)
    expected = brute_force(q, k, v, fq, fk, wf, window_size=5, **options)
    plain = brute_force(q, k, v, fq, fk, wf, window_size=5)
    assert (expected - plain).abs().max() > 1e-2  # the options matter on these inputs
    for name, form in FORMS.items():
        out, _ = form(q, k, v, fq, fk, wf, window_size=5, chunk_size=4, **options)
        assert_close(out, expected, f"{name} (seed {seed})", **TOL[torch.float64])
    empty = empty_state(1, 4, 8, 6, 5, dtype=torch.float64)
    state = (empty.kv, empty.z, empty.k_window, empty.v_window)
    outs, np_state, np_outs = [], [a.numpy().copy() for a in state], []
    for i in range(23):
        t = slice(i, i + 1)
        step = hybrid_attention_decode_step if i % 2 else hybrid_attention_block_step
        out, *state = step(q[:, :, t], k[:, :, t], v[:, :, t], fq, fk, wf, *state, torch.tensor(i), **options)
        outs.append(out)
        np_args = [x[:, :, t].numpy() for x in (q, k, v)] + [fq.numpy(), fk.numpy(), wf.numpy()]
        if i % 2:
            np_outs.append(hybrid_numpy.decode_step(*np_args, *np_state, i, **options))
        else:
            o, *np_state = hybrid_numpy.block_step(*np_args, *np_state, i, **options)
            np_outs.append(o)
    assert_close(torch.cat(outs, 2), expected, f"block/decode steps (seed {seed})", **TOL[torch.float64])
    # numpy casts its outputs to float32
    assert_close(torch.from_numpy(np.concatenate(np_outs, 2)), expected, f"numpy steps (seed {seed})",
                 **TOL[torch.float32])


CASES = [
    # (batch, heads, kv_heads, n, window, chunk) covering N < W, N = W, N = W + 1,
    # N not a multiple of the chunk, chunk != window, grouped kv heads 3 -> 9, batch > 1.
    (1, 2, 2, 5, 8, 4),
    (2, 2, 1, 8, 8, 8),
    (1, 3, 3, 9, 8, 8),
    (2, 9, 3, 37, 8, 8),
    (1, 9, 3, 50, 16, 5),
    (2, 4, 2, 71, 16, 32),
    (1, 2, 2, 100, 64, 64),
    (1, 2, 1, 130, 64, 16),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,h,h_kv,n,w,c", CASES)
def test_three_forms_agree(b, h, h_kv, n, w, c, dtype):
    seed = torch.seed() % 2**31  # fresh inputs each run; the seed is in the failure message
    args = make_inputs(b, h, h_kv, n, 16, 8, dtype, seed=seed)
    ref, ref_state = hybrid_attention_reference(*args, window_size=w, output_final_state=True)
    chk, chk_state = hybrid_attention_chunked(*args, window_size=w, chunk_size=c, output_final_state=True)
    rec, rec_state = hybrid_attention_recurrent(*args, window_size=w, output_final_state=True)
    tol = TOL[dtype]
    assert ref.dtype == chk.dtype == rec.dtype == dtype
    assert_close(chk, ref, f"chunked vs reference (seed {seed})", **tol)
    assert_close(rec, ref, f"recurrent vs reference (seed {seed})", **tol)
    for name in ("kv", "z", "k_window", "v_window"):
        assert_close(getattr(chk_state, name), getattr(rec_state, name), f"chunked vs recurrent state.{name}", **tol)
        assert_close(getattr(ref_state, name), getattr(rec_state, name), f"reference vs recurrent state.{name}", **tol)
    assert ref_state.position == chk_state.position == rec_state.position == n


@pytest.mark.parametrize("form", ["reference", "chunked", "recurrent"])
def test_split_and_resume_equals_one_call(form):
    """A call on tokens [0, s) then a call resumed from its state equals one call on [0, N)."""
    fn = FORMS[form]
    args = make_inputs(2, 6, 3, 90, 16, 8, torch.float64, seed=1)
    q, k, v, fq, fk, wf = args
    full, full_state = fn(*args, window_size=16, chunk_size=8, output_final_state=True)
    for split in (0, 5, 16, 17, 40):
        _, st = fn(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq, fk, wf, window_size=16, chunk_size=8,
                   output_final_state=True)
        second, st2 = fn(q[:, :, split:], k[:, :, split:], v[:, :, split:], fq, fk, wf, window_size=16, chunk_size=8,
                         initial_state=st, output_final_state=True)
        assert_close(second, full[:, :, split:], f"{form}: resumed at {split}", **TOL[torch.float64])
        assert_close(st2.kv, full_state.kv, f"{form}: final kv after resume at {split}", **TOL[torch.float64])


def test_prefill_then_steps_equals_full_forward():
    args = make_inputs(1, 9, 3, 120, 64, 64, torch.float32, seed=2)
    q, k, v, fq, fk, wf = args
    full, _ = hybrid_attention_chunked(*args, window_size=64)
    _, state = hybrid_attention_chunked(q[:, :, :70], k[:, :, :70], v[:, :, :70], fq, fk, wf, window_size=64,
                                        output_final_state=True)
    outs = []
    for i in range(70, 120):
        o, state = hybrid_attention_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], fq, fk, wf, state)
        outs.append(o)
    assert_close(torch.cat(outs, 2), full[:, :, 70:], "steps after chunked prefill", **TOL[torch.float32])
    assert state.position == 120


def test_step_does_not_modify_its_input_state():
    q, k, v, fq, fk, wf = make_inputs(1, 2, 2, 1, 8, 4, torch.float32, seed=3)
    state = empty_state(1, 2, 8, 4, 4)
    before = state.clone()
    for _ in range(6):
        _, new = hybrid_attention_step(q, k, v, fq, fk, wf, state)
        for name in ("kv", "z", "k_window", "v_window"):
            assert torch.equal(getattr(state, name), getattr(before, name))
        state, before = new, new.clone()


@pytest.mark.parametrize("n,w,c", [(45, 16, 8), (20, 32, 16), (64, 16, 16)])
def test_chunked_gradients_match_reference(n, w, c):
    args = [t.requires_grad_() for t in make_inputs(2, 4, 2, n, 8, 4, torch.float64, seed=4)]
    grad_out = torch.randn(2, 4, n, 8, dtype=torch.float64)
    ref, ref_state = hybrid_attention_reference(*args, window_size=w, output_final_state=True)
    ((ref * grad_out).sum() + ref_state.kv.sum() + ref_state.z.sum()).backward()
    ref_grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    chk, chk_state = hybrid_attention_chunked(*args, window_size=w, chunk_size=c, output_final_state=True)
    ((chk * grad_out).sum() + chk_state.kv.sum() + chk_state.z.sum()).backward()
    for name, a, g in zip(("q", "k", "v", "fq_weight", "fk_weight", "window_factor"), args, ref_grads):
        assert_close(a.grad, g, f"grad {name}", **TOL[torch.float64])


def test_large_window_is_plain_causal_softmax():
    """With every key inside the window the window factor cancels: causal softmax attention."""
    q, k, v, fq, fk, wf = make_inputs(1, 4, 2, 30, 8, 4, torch.float64, seed=5)
    out, _ = hybrid_attention_chunked(q, k, v, fq, fk, wf, window_size=64, chunk_size=8)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert_close(out, expected, "window >= N vs causal softmax", **TOL[torch.float64])


def test_bad_shapes_raise():
    q, k, v, fq, fk, wf = make_inputs(1, 4, 2, 10, 8, 4, torch.float32, seed=6)
    with pytest.raises(ValueError, match="window_factor"):
        hybrid_attention_chunked(q, k, v, fq, fk, wf[:2])
    with pytest.raises(ValueError, match="fq_weight"):
        hybrid_attention_chunked(q, k, v, fq[:, :4], fk, wf)
    with pytest.raises(ValueError, match="multiple"):
        hybrid_attention_chunked(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), fq, fk, wf)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_step_matches_reference_for_any_block_sizes(dtype):
    """The export form: blocks of varying T (1 included) from a state equal the reference."""
    from edge_lolcats.nn.hybrid_attention import hybrid_attention_block_step

    seed = torch.seed() % 2**31
    args = make_inputs(2, 6, 3, 75, 16, 8, dtype, seed=seed)
    q, k, v, fq, fk, wf = args
    ref, ref_state = hybrid_attention_reference(*args, window_size=16, output_final_state=True)
    st = empty_state(2, 6, 16, 8, 16, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    kv, z, kw, vw, pos, outs = st.kv, st.z, st.k_window, st.v_window, 0, []
    for size in (1, 5, 16, 1, 1, 20, 31):  # 75 tokens: before, at and past the window
        sl = slice(pos, pos + size)
        o, kv, z, kw, vw = hybrid_attention_block_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq, fk, wf, kv, z, kw,
                                                       vw, torch.tensor(pos))
        outs.append(o)
        pos += size
    assert_close(torch.cat(outs, 2), ref, f"block steps vs reference (seed {seed})", **TOL[dtype])
    for name, got in (("kv", kv), ("z", z), ("k_window", kw), ("v_window", vw)):
        assert_close(got, getattr(ref_state, name), f"block steps state.{name} (seed {seed})", **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_step_matches_reference_token_by_token(dtype):
    """The decode graph's form: 40 single tokens through a window of 16 (filling, wrapping twice),
    mixed with blocks of the block step (they share the state layout), equal the reference."""
    from edge_lolcats.nn.hybrid_attention import hybrid_attention_block_step, hybrid_attention_decode_step

    seed = torch.seed() % 2**31
    args = make_inputs(2, 6, 3, 50, 16, 8, dtype, seed=seed)
    q, k, v, fq, fk, wf = args
    ref, ref_state = hybrid_attention_reference(*args, window_size=16, output_final_state=True)
    st = empty_state(2, 6, 16, 8, 16, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    kv, z, kw, vw, outs = st.kv, st.z, st.k_window, st.v_window, []
    for pos in range(50):
        sl = slice(pos, pos + 1)
        step = hybrid_attention_block_step if 20 <= pos < 25 else hybrid_attention_decode_step
        o, kv, z, kw, vw = step(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq, fk, wf, kv, z, kw, vw, torch.tensor(pos))
        outs.append(o)
    assert_close(torch.cat(outs, 2), ref, f"decode steps vs reference (seed {seed})", **TOL[dtype])
    for name, got in (("kv", kv), ("z", z), ("k_window", kw), ("v_window", vw)):
        assert_close(got, getattr(ref_state, name), f"decode steps state.{name} (seed {seed})", **TOL[dtype])
