"""The forms of the hybrid attention (reference, chunked, recurrent; the arch block and decode steps
on torch and numpy) agree with each other and with a brute-force loop, with every recurrence option
(feature maps before RoPE, decay, sink tokens) and without.

Tolerances: in float64 the forms differ only in summation order, so they agree to ~1e-12 (we allow
1e-10). In float32 every form accumulates in float32; with unit-scale inputs, D = 16..64 and sums
over <= 200 keys the relative rounding is ~1e-6, so we allow 1e-4 absolute / 1e-4 relative on
outputs that are O(1) convex combinations of v.
"""
import math

import pytest
import torch

import numpy as np

from edge_lolcats.arch import hybrid
from edge_lolcats.arch.args import Rope
from edge_lolcats.arch.ops import NUMPY, TorchOps
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


def rotate_one(x, inv_freq, p):
    """RoPE of one vector x [D] at position p, written out pair by pair (half-split layout)."""
    out = x.clone()
    half = inv_freq.shape[0]
    for f in range(half):
        c, s = math.cos(p * float(inv_freq[f])), math.sin(p * float(inv_freq[f]))
        a, b = x[f], x[f + half]
        out[f], out[f + half] = a * c - b * s, a * s + b * c
    return out


def brute_force(q, k, v, fq, fk, wf, window_size, scale=None, softcap=None, rope=None, log_decay=None,
                sink_tokens=0, linear=True):
    """Per-query Python loop straight from the formula in arch/hybrid.py's docstring (``linear``
    False: without the linear branch, StreamingLLM's sinks + window)."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    W, n_s = window_size, sink_tokens
    rot = (lambda x, p: rotate_one(x, rope.double(), p)) if rope is not None else (lambda x, p: x)
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // rep].double(), v[bi, hi // rep].double()
            qh = q[bi, hi].double()
            if linear:
                pq = feature_map(qh[None, None], fq[hi : hi + 1].double())[0, 0]
                pk = feature_map(kh[None, None], fk[hi : hi + 1].double())[0, 0]
            a = torch.sigmoid(wf[hi].double())
            lam = 1.0 if log_decay is None else math.exp(float(log_decay[hi]))
            for i in range(n):
                soft = [(j, j) for j in range(max(0, i - W + 1), i + 1)]  # (key, position it meets the query at)
                soft += [(s, s + max(0, i - W - n_s + 1)) for s in range(n_s) if s <= i - W]
                sc = torch.stack([rot(qh[i], i) @ rot(kh[j], p) * (scale or 1 / math.sqrt(d)) for j, p in soft])
                if softcap:
                    sc = softcap * torch.tanh(sc / softcap)
                e = torch.exp(sc - sc.max())
                num = a * sum(e[t] * vh[j] for t, (j, _) in enumerate(soft))
                den = a * e.sum()
                for j in range(n_s, i - W + 1 if linear else n_s):
                    l = lam ** (i - W - j) * (pq[i] @ pk[j])
                    num = num + l * vh[j]
                    den = den + l
                out[bi, hi, i] = num / den
    return out


def rope_of(d, theta=10.0):
    return torch.from_numpy(Rope(theta=theta, dim=d).inv_freq())


def options(kind, h, d, dtype=torch.float64, seed=0):
    """Recurrence options by name: "" (the first models'), or any of "rope", "decay", "sinks"."""
    g = torch.Generator().manual_seed(seed + 99)
    out = {}
    if "rope" in kind:
        out["rope"] = rope_of(d)
    if "decay" in kind:  # lam between 0.7 and 1: visible within tens of tokens
        out["log_decay"] = -(torch.rand(h, generator=g, dtype=dtype) * 0.35)
    if "sinks" in kind:
        out["sink_tokens"] = 3
    return out


OPTION_SETS = ["", "rope", "decay", "sinks", "rope+decay+sinks"]


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


@pytest.mark.parametrize("kind", OPTION_SETS)
def test_reference_matches_brute_force(kind):
    """19 tokens, window 4, 3 sinks: sinks leave the window at 4..6, linear keys from token 7 on."""
    seed = torch.seed() % 2**31
    args = make_inputs(2, 4, 2, 19, 8, 6, torch.float64, seed=seed)
    opts = options(kind, 4, 8, seed=seed)
    expected = brute_force(*args, window_size=4, **opts)
    out, _ = hybrid_attention_reference(*args, window_size=4, **opts)
    assert_close(out, expected, f"reference vs brute force ({kind or 'plain'}, seed {seed})", **TOL[torch.float64])


def run_steps(xp, q, k, v, fq, fk, wf, opts, window_size, sizes, decode_every=2, state=None):
    """The arch block and decode steps over ``sizes`` blocks (blocks of 1 alternate with the decode
    step), on torch tensors (xp = TorchOps) or numpy arrays (xp = NUMPY). Returns (out, state parts)."""
    to = (lambda t: None if t is None else t.detach().numpy().copy()) if xp is NUMPY else (lambda t: t)
    n_s = opts.get("sink_tokens", 0)
    if state is None:
        state = empty_state(q.shape[0], q.shape[1], q.shape[3], fq.shape[-1], window_size, kv_heads=k.shape[1],
                            sink_tokens=n_s, dtype=q.dtype).parts
    state = [to(a) for a in state]
    pos, outs = 0, []
    for size in sizes:
        sl = slice(pos, pos + size)
        step = hybrid.decode_step if size == 1 and pos % decode_every else hybrid.block_step
        o, state = step(xp, to(q[:, :, sl]), to(k[:, :, sl]), to(v[:, :, sl]), to(fq), to(fk), to(wf),
                        to(opts.get("log_decay")), state, pos if xp is NUMPY else torch.tensor(pos),
                        scale=opts.get("scale", 1 / math.sqrt(q.shape[-1])), softcap=opts.get("softcap"),
                        rope=to(opts.get("rope")), sink_tokens=n_s)
        outs.append(torch.as_tensor(o))
        pos += size
    return torch.cat(outs, 2), [torch.as_tensor(a) for a in state]


def test_score_scale_and_softcap_in_every_form():
    """Gemma's options (a scale other than 1/sqrt(D), soft-capped scores) against the loop, in every
    form: reference, chunked, recurrent, the arch block and decode steps on torch and on numpy."""
    seed = torch.seed() % 2**31
    q, k, v, fq, fk, wf = make_inputs(1, 4, 2, 23, 8, 6, torch.float64, seed=seed, scale=3.0)
    opts = dict(scale=0.21, softcap=2.5, **options("rope+decay+sinks", 4, 8, seed=seed))
    expected = brute_force(q, k, v, fq, fk, wf, window_size=5, **opts)
    plain = brute_force(q, k, v, fq, fk, wf, window_size=5, **{**opts, "scale": None, "softcap": None})
    assert (expected - plain).abs().max() > 1e-2  # the options matter on these inputs
    for name, form in FORMS.items():
        out, _ = form(q, k, v, fq, fk, wf, window_size=5, chunk_size=4, **opts)
        assert_close(out, expected, f"{name} (seed {seed})", **TOL[torch.float64])
    sizes = [1] * 10 + [3, 1, 1, 8]
    out, _ = run_steps(TorchOps(), q, k, v, fq, fk, wf, opts, 5, sizes)
    assert_close(out, expected, f"block/decode steps (seed {seed})", **TOL[torch.float64])
    out, _ = run_steps(NUMPY, q, k, v, fq, fk, wf, opts, 5, sizes)
    assert_close(out, expected, f"numpy steps (seed {seed})", **TOL[torch.float64])


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


STATE_PARTS = ("kv", "z", "k_window", "v_window", "k_sink", "v_sink")


@pytest.mark.parametrize("kind", OPTION_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,h,h_kv,n,w,c", CASES)
def test_three_forms_agree(b, h, h_kv, n, w, c, dtype, kind):
    seed = torch.seed() % 2**31  # fresh inputs each run; the seed is in the failure message
    args = make_inputs(b, h, h_kv, n, 16, 8, dtype, seed=seed)
    opts = options(kind, h, 16, dtype, seed=seed)
    ref, ref_state = hybrid_attention_reference(*args, window_size=w, output_final_state=True, **opts)
    chk, chk_state = hybrid_attention_chunked(*args, window_size=w, chunk_size=c, output_final_state=True, **opts)
    rec, rec_state = hybrid_attention_recurrent(*args, window_size=w, output_final_state=True, **opts)
    tol = TOL[dtype]
    assert ref.dtype == chk.dtype == rec.dtype == dtype
    what = f"({kind or 'plain'}, seed {seed})"
    assert_close(chk, ref, f"chunked vs reference {what}", **tol)
    assert_close(rec, ref, f"recurrent vs reference {what}", **tol)
    for name in STATE_PARTS:
        assert_close(getattr(chk_state, name), getattr(rec_state, name), f"chunked vs recurrent state.{name}", **tol)
        assert_close(getattr(ref_state, name), getattr(rec_state, name), f"reference vs recurrent state.{name}", **tol)
    assert ref_state.position == chk_state.position == rec_state.position == n
    assert ref_state.k_window.shape[1] == h_kv  # the ring is per KV head


@pytest.mark.parametrize("kind", OPTION_SETS)
@pytest.mark.parametrize("form", ["reference", "chunked", "recurrent"])
def test_split_and_resume_equals_one_call(form, kind):
    """A call on tokens [0, s) then a call resumed from its state equals one call on [0, N), for
    splits before, at and after the window and the sinks, and at chunk boundaries."""
    fn = FORMS[form]
    seed = torch.seed() % 2**31
    args = make_inputs(2, 6, 3, 90, 16, 8, torch.float64, seed=seed)
    q, k, v, fq, fk, wf = args
    opts = options(kind, 6, 16, seed=seed)
    full, full_state = fn(*args, window_size=16, chunk_size=8, output_final_state=True, **opts)
    for split in (0, 2, 5, 16, 17, 19, 24, 40):
        _, st = fn(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq, fk, wf, window_size=16, chunk_size=8,
                   output_final_state=True, **opts)
        second, st2 = fn(q[:, :, split:], k[:, :, split:], v[:, :, split:], fq, fk, wf, window_size=16, chunk_size=8,
                         initial_state=st, output_final_state=True, **opts)
        what = f"{form} ({kind or 'plain'}, seed {seed}): resumed at {split}"
        assert_close(second, full[:, :, split:], what, **TOL[torch.float64])
        for name in STATE_PARTS:
            assert_close(getattr(st2, name), getattr(full_state, name), f"{what}: final {name}", **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["", "rope+decay+sinks"])
def test_prefill_then_steps_equals_full_forward(kind):
    args = make_inputs(1, 9, 3, 120, 64, 64, torch.float32, seed=2)
    q, k, v, fq, fk, wf = args
    opts = options(kind, 9, 64, torch.float32)
    full, _ = hybrid_attention_chunked(*args, window_size=64, **opts)
    _, state = hybrid_attention_chunked(q[:, :, :70], k[:, :, :70], v[:, :, :70], fq, fk, wf, window_size=64,
                                        output_final_state=True, **opts)
    outs = []
    for i in range(70, 120):
        o, state = hybrid_attention_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], fq, fk, wf, state,
                                         **opts)
        outs.append(o)
    assert_close(torch.cat(outs, 2), full[:, :, 70:], "steps after chunked prefill", **TOL[torch.float32])
    assert state.position == 120


def test_step_does_not_modify_its_input_state():
    q, k, v, fq, fk, wf = make_inputs(1, 2, 2, 1, 8, 4, torch.float32, seed=3)
    opts = options("rope+decay+sinks", 2, 8, torch.float32)
    state = empty_state(1, 2, 8, 4, 4, sink_tokens=3)
    before = state.clone()
    for _ in range(9):
        _, new = hybrid_attention_step(q, k, v, fq, fk, wf, state, **opts)
        for name in STATE_PARTS:
            assert torch.equal(getattr(state, name), getattr(before, name))
        state, before = new, new.clone()


@pytest.mark.parametrize("kind", ["", "rope+decay+sinks"])
@pytest.mark.parametrize("n,w,c", [(45, 16, 8), (20, 32, 16), (64, 16, 16)])
def test_chunked_gradients_match_reference(n, w, c, kind):
    """Gradients of q, k, v, the feature maps, the window factors and the decay, outputs and final
    state both, with and without an initial state."""
    seed = torch.seed() % 2**31
    q, k, v, fq, fk, wf = make_inputs(2, 4, 2, n, 8, 4, torch.float64, seed=seed)
    opts = options(kind, 4, 8, seed=seed)
    leaves = [q, k, v, fq, fk, wf] + ([opts["log_decay"]] if "log_decay" in opts else [])
    for t in leaves:
        t.requires_grad_()
    grad_out = torch.randn(2, 4, n - 7, 8, dtype=torch.float64)

    def loss(form):
        _, st = form(q[:, :, :7], k[:, :, :7], v[:, :, :7], fq, fk, wf, window_size=w, chunk_size=c,
                     output_final_state=True, **opts)
        out, st = form(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], fq, fk, wf, window_size=w, chunk_size=c,
                       initial_state=st, output_final_state=True, **opts)
        return (out * grad_out).sum() + st.kv.sum() + st.z.sum()

    ref_grads = torch.autograd.grad(loss(hybrid_attention_reference), leaves)
    chk_grads = torch.autograd.grad(loss(hybrid_attention_chunked), leaves)
    names = ("q", "k", "v", "fq_weight", "fk_weight", "window_factor", "log_decay")
    for name, got, want in zip(names, chk_grads, ref_grads):
        linear_only = ("fq_weight", "fk_weight", "window_factor", "log_decay")  # need keys past the window
        assert want.abs().max() > 0 or (n <= w and name in linear_only), name
        assert_close(got, want, f"grad {name} ({kind or 'plain'}, seed {seed})", **TOL[torch.float64])


def test_large_window_is_plain_causal_softmax():
    """With every key inside the window the window factor cancels: causal softmax attention, the
    same with RoPE applied by the form (pre_rope) as by the caller."""
    q, k, v, fq, fk, wf = make_inputs(1, 4, 2, 30, 8, 4, torch.float64, seed=5)
    out, _ = hybrid_attention_chunked(q, k, v, fq, fk, wf, window_size=64, chunk_size=8)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert_close(out, expected, "window >= N vs causal softmax", **TOL[torch.float64])
    rope = rope_of(8)
    out, _ = hybrid_attention_chunked(q, k, v, fq, fk, wf, window_size=64, chunk_size=8, rope=rope,
                                      log_decay=torch.full((4,), -0.1, dtype=torch.float64), sink_tokens=2)
    pos = torch.arange(30)
    qr, kr = hybrid.rotate(TorchOps(), q, rope, pos), hybrid.rotate(TorchOps(), kr, rope, pos)
    expected = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
    assert_close(out, expected, "window >= N vs causal softmax with RoPE", **TOL[torch.float64])


def test_bad_shapes_raise():
    q, k, v, fq, fk, wf = make_inputs(1, 4, 2, 10, 8, 4, torch.float32, seed=6)
    with pytest.raises(ValueError, match="window_factor"):
        hybrid_attention_chunked(q, k, v, fq, fk, wf[:2])
    with pytest.raises(ValueError, match="fq_weight"):
        hybrid_attention_chunked(q, k, v, fq[:, :4], fk, wf)
    with pytest.raises(ValueError, match="multiple"):
        hybrid_attention_chunked(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), fq, fk, wf)
    with pytest.raises(ValueError, match="log_decay"):
        hybrid_attention_chunked(q, k, v, fq, fk, wf, log_decay=wf[:3])
    with pytest.raises(ValueError, match="sink tokens"):
        _, st = hybrid_attention_chunked(q, k, v, fq, fk, wf, output_final_state=True)
        hybrid_attention_chunked(q, k, v, fq, fk, wf, initial_state=st, sink_tokens=2)


@pytest.mark.parametrize("kind", OPTION_SETS)
@pytest.mark.parametrize("xp_name", ["torch", "numpy"])
def test_block_and_decode_steps_match_reference(kind, xp_name):
    """The steps every backend runs (the ONNX graphs trace them on torch, the runtime runs them on
    numpy): blocks of varying T and single decode steps from one state equal the reference, outputs
    and final state, before, at and past the window and the sinks, with the ring wrapping."""
    seed = torch.seed() % 2**31
    for dtype in (torch.float64, torch.float32):
        args = make_inputs(2, 6, 3, 75, 16, 8, dtype, seed=seed)
        opts = options(kind, 6, 16, dtype, seed=seed)
        ref, ref_state = hybrid_attention_reference(*args, window_size=16, output_final_state=True, **opts)
        xp = NUMPY if xp_name == "numpy" else TorchOps()
        out, parts = run_steps(xp, *args, opts, 16, (1, 5, 16, 1, 1, 1, 1, 20, 1, 1, 27))
        what = f"{xp_name} steps ({kind or 'plain'}, {dtype}, seed {seed})"
        assert_close(out, ref, what, **TOL[dtype])
        for name, got, want in zip(STATE_PARTS, parts, ref_state.parts):
            assert_close(got, want, f"{what}: state.{name}", **TOL[dtype])


def test_pre_rope_linear_branch_ignores_positions():
    """With the feature maps before RoPE the linear branch sees no position: with the window's weight
    at zero (window_factor -inf: the output is the linear branch alone), rotating q and k at any
    positions (another RoPE, none, a resumed state whose ring keys are rotated back) leaves it
    unchanged. With the feature maps after RoPE (the caller rotates), shifting every position by
    4,096 changes it: the failure the first shipped model had past its training length."""
    q, k, v, fq, fk, _ = make_inputs(1, 4, 2, 60, 8, 6, torch.float64, seed=7)
    off = torch.full((4,), -float("inf"), dtype=torch.float64)
    valid = slice(8 + 2, None)  # queries with at least one linear key (window 8, 2 sinks)

    def linear_branch(rope, split=None, qk=(q, k)):
        qq, kk = qk
        common = dict(window_size=8, chunk_size=8, rope=rope, sink_tokens=2)
        if split is None:
            return hybrid_attention_chunked(qq, kk, v, fq, fk, off, **common)[0][:, :, valid]
        _, st = hybrid_attention_chunked(qq[:, :, :split], kk[:, :, :split], v[:, :, :split], fq, fk, off,
                                         output_final_state=True, **common)
        second, _ = hybrid_attention_recurrent(qq[:, :, split:], kk[:, :, split:], v[:, :, split:], fq, fk, off,
                                               initial_state=st, **common)
        return torch.cat([torch.zeros_like(q[:, :, :split]), second], 2)[:, :, valid]

    plain = linear_branch(None)
    assert torch.isfinite(plain).all()
    for rope in (rope_of(8), rope_of(8, theta=10000.0)):
        assert_close(linear_branch(rope), plain, "pre-RoPE linear branch vs no RoPE", **TOL[torch.float64])
        resumed = linear_branch(rope, split=23)
        assert_close(resumed[:, :, 23 - 10:], plain[:, :, 23 - 10:], "after a resumed state", **TOL[torch.float64])
    xp, rope = TorchOps(), rope_of(8, theta=10000.0)
    shifted = [tuple(hybrid.rotate(xp, x, rope, torch.arange(60) + s) for x in (q, k)) for s in (0, 4096)]
    near, far = (linear_branch(None, qk=qk) for qk in shifted)
    assert (near - far).abs().max() > 1e-2  # post-RoPE: the shift is seen


def test_strong_decay_and_chunks_longer_than_the_window_stay_finite():
    """lam^(1 - W) overflows where chunk 0 holds real queries (C > W) after a state: every form must
    weight the state per row with a non-negative exponent (found in review: the chunked form gave NaN)."""
    q, k, v, fq, fk, wf = make_inputs(1, 2, 1, 120, 8, 4, torch.float64, seed=8)
    ld = torch.full((2,), -2.0, dtype=torch.float64, requires_grad=True)
    opts = dict(window_size=8, chunk_size=32, log_decay=ld, sink_tokens=2, rope=rope_of(8))
    full, _ = hybrid_attention_recurrent(q, k, v, fq, fk, wf, **opts)
    for form in (hybrid_attention_reference, hybrid_attention_chunked):
        _, st = form(q[:, :, :100], k[:, :, :100], v[:, :, :100], fq, fk, wf, output_final_state=True, **opts)
        out, _ = form(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:], fq, fk, wf, initial_state=st, **opts)
        assert_close(out, full[:, :, 100:], f"{form.__name__} after a state", **TOL[torch.float64])
        (grad,) = torch.autograd.grad(out.sum(), ld)
        assert torch.isfinite(grad).all(), form.__name__
