"""Triton kernels against the quadratic reference: outputs, final states and gradients.

Without a GPU (CI) the kernels run in Triton's interpreter on the CPU (conftest sets
TRITON_INTERPRET=1), on small shapes. With CUDA they run compiled, and a few larger bfloat16
cases are added. The reference runs in float64 on the same inputs.

Tolerances. float32 kernels: every output is a ratio of sums of at most N + W positive terms
(and of products of D-long dot products), computed in float32 with float32 accumulation; the
relative rounding error of such a sum is bounded by about (terms) * 2^-24, i.e. < 2e-5 for the
N <= 200 used here. We allow 1e-4 of the largest reference value (measured errors are ~1e-7 of it).
bfloat16 (CUDA only): inputs are rounded to bfloat16 before the reference sees them, so what
remains is the kernels' bfloat16 rounding of the products' operands (feature maps, softmax weights,
2^-9 relative each) and of the output: 2e-2 of the largest value.
"""
import pytest
import torch

from edge_lolcats.nn.hybrid_attention import (
    empty_state,
    hybrid_attention_reference,
    hybrid_attention_step,
)
from edge_lolcats.kernels.hybrid_attention import hybrid_attention_step_triton, hybrid_attention_triton
from test_hybrid_attention import OPTION_SETS, options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "fq_weight", "fk_weight", "window_factor", "log_decay")
STATE_PARTS = ("kv", "z", "k_window", "v_window", "k_sink", "v_sink")


def make_inputs(b, h, hkv, n, d, f, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    # feature maps away from the identity init so that both halves of phi vary
    fq = torch.randn(h, d, f, generator=g, dtype=torch.float64) / d**0.5
    fk = torch.randn(h, d, f, generator=g, dtype=torch.float64) / d**0.5
    wf = torch.randn(h, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype if i < 3 else torch.float32 if dtype != torch.float64 else dtype)
            for i, t in enumerate((q, k, v, fq, fk, wf))]


def rel_err(x, ref, floor=1e-30):
    """Largest error over the largest reference value (or ``floor``, for sums that cancel)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=floor)).item()


def split_options(kind, h, d, device):
    """(float64 CPU options for the reference, the kernels' float32 options on ``device``, the
    differentiable leaves of each: the decay)."""
    ref = options(kind, h, d, torch.float64)
    tri = {k: (v.float().to(device) if torch.is_tensor(v) else v) for k, v in ref.items()}
    leaves = []
    for o in (ref, tri):
        if "log_decay" in o:
            o["log_decay"] = o["log_decay"].detach().requires_grad_()
        leaves.append([o["log_decay"]] if "log_decay" in o else [])
    return ref, tri, leaves[0], leaves[1]


def check_against_reference(b, h, hkv, n, d, f, window, chunk, seed, dtype=torch.float32, tol=1e-4,
                            device=DEVICE, kind=""):
    xs = make_inputs(b, h, hkv, n, d, f, seed, dtype=dtype, device=device)
    opts_ref, opts, extra_ref, extra = split_options(kind, h, d, device)
    ref_in = [x.detach().double().cpu().requires_grad_() for x in xs]
    out_ref, state_ref = hybrid_attention_reference(*ref_in, window_size=window, output_final_state=True, **opts_ref)
    grad_out = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads_ref = torch.autograd.grad((out_ref * grad_out).sum(), ref_in + extra_ref)

    tri_in = [x.detach().requires_grad_() for x in xs]
    out, state = hybrid_attention_triton(*tri_in, window_size=window, chunk_size=chunk, output_final_state=True,
                                         **opts)
    assert out.dtype == dtype and out.shape == out_ref.shape
    grads = torch.autograd.grad((out.float() * grad_out.to(device=out.device, dtype=torch.float32)).sum(),
                                tri_in + extra)

    assert rel_err(out.cpu(), out_ref) < tol
    for name in STATE_PARTS:
        if getattr(state_ref, name).numel():
            assert rel_err(getattr(state, name).cpu(), getattr(state_ref, name)) < tol, name
    assert state.position == state_ref.position == n
    for name, gx, gr in zip(NAMES, grads, grads_ref):
        assert gx.shape == gr.shape
        # With N <= W the window factor cancels out of every output: its true gradient is 0 and
        # the kernels' is a float32 sum of O(1) terms that cancel, so it is judged against 1.
        assert rel_err(gx.cpu(), gr, floor=1.0 if name == "window_factor" else 1e-30) < tol, name


# (B, H, Hkv, N, D, F, W, C): N < W; N not a multiple of C; W not a multiple of C (look-back of
# one and of several blocks); grouped kv heads; batch > 1; a head size that is not a power of two.
CASES = [
    (1, 2, 2, 5, 16, 8, 8, 16),
    (2, 2, 1, 50, 16, 8, 8, 16),
    (1, 4, 2, 37, 32, 16, 64, 16),
    (2, 3, 3, 100, 16, 8, 10, 32),
    (1, 2, 1, 130, 24, 8, 40, 16),
    (1, 1, 1, 200, 64, 16, 64, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}N{}D{}F{}W{}C{}".format(*c))
def test_forward_backward_match_reference(case):
    check_against_reference(*case, seed=sum(case))


@pytest.mark.parametrize("kind", [k for k in OPTION_SETS if k])
@pytest.mark.parametrize("case", CASES[1:5:2], ids=lambda c: "B{}H{}Hkv{}N{}D{}F{}W{}C{}".format(*c))
def test_recurrence_options_forward_backward_match_reference(case, kind):
    """Feature maps before RoPE, the decay (its gradient included), sinks: outputs, final state and
    every gradient against the float64 reference."""
    check_against_reference(*case, seed=sum(case), kind=kind)


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 products need a GPU (the interpreter mishandles them)")
@pytest.mark.parametrize("d", [64, 128])
def test_bfloat16_on_gpu(d):
    check_against_reference(2, 4, 2, 1000, d, 64, 64, 64, seed=d, dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes only compiled")
@pytest.mark.parametrize("d,chunk", [(64, 64), (128, 64), (128, 32)])
def test_float32_on_gpu_llama_shapes(d, chunk):
    check_against_reference(1, 8, 2, 700, d, 64, 64, chunk, seed=d + chunk)


@pytest.mark.parametrize("kind", ["", "rope+decay+sinks"])
def test_initial_state_continues_a_sequence(kind):
    """Prefill in two calls (second from the first's state) == one reference call on the whole."""
    b, h, hkv, d, f, w = 2, 2, 1, 16, 8, 16
    xs = make_inputs(b, h, hkv, 90, d, f, seed=7, dtype=torch.float32, device=DEVICE)
    opts_ref, opts, _, _ = split_options(kind, h, d, DEVICE)
    out_ref, state_ref = hybrid_attention_reference(*[x.double().cpu() for x in xs], window_size=w,
                                                    output_final_state=True, **opts_ref)
    q, k, v, *weights = xs
    for split in (2, 10, 40):  # among the sinks, inside the first window, and past it
        out1, state = hybrid_attention_triton(q[:, :, :split], k[:, :, :split], v[:, :, :split], *weights,
                                              window_size=w, chunk_size=16, output_final_state=True, **opts)
        out2, state = hybrid_attention_triton(q[:, :, split:], k[:, :, split:], v[:, :, split:], *weights,
                                              window_size=w, chunk_size=16, initial_state=state,
                                              output_final_state=True, **opts)
        assert rel_err(torch.cat([out1, out2], 2).detach().cpu(), out_ref) < 1e-4
        assert state.position == 90
        for name in STATE_PARTS:
            if getattr(state_ref, name).numel():
                assert rel_err(getattr(state, name).cpu(), getattr(state_ref, name)) < 1e-4, name


@pytest.mark.parametrize("kind", ["", "rope+decay+sinks"])
def test_decode_step_matches_torch_step_across_the_window(kind):
    """The fused step on a state, token by token past the window and the sinks, == the PyTorch step
    (float64)."""
    b, h, hkv, d, f, w, n = 2, 3, 1, 24, 8, 6, 15
    xs = make_inputs(b, h, hkv, n, d, f, seed=3, dtype=torch.float32, device=DEVICE)
    opts_ref, opts, _, _ = split_options(kind, h, d, DEVICE)
    sinks = opts.get("sink_tokens", 0)
    q, k, v, *weights = xs
    state = empty_state(b, h, d, f, w, kv_heads=hkv, sink_tokens=sinks, device=DEVICE)
    state_ref = empty_state(b, h, d, f, w, kv_heads=hkv, sink_tokens=sinks, dtype=torch.float64)
    weights_ref = [x.double().cpu() for x in weights]
    for t in range(n):
        sl = slice(t, t + 1)
        out, state = hybrid_attention_step_triton(q[:, :, sl], k[:, :, sl], v[:, :, sl], *weights, state, **opts)
        out_ref, state_ref = hybrid_attention_step(q[:, :, sl].double().cpu(), k[:, :, sl].double().cpu(),
                                                   v[:, :, sl].double().cpu(), *weights_ref, state_ref, **opts_ref)
        assert rel_err(out.cpu(), out_ref.detach()) < 1e-5
        assert state.position == state_ref.position == t + 1
        for name in STATE_PARTS:
            if getattr(state_ref, name).numel():
                assert rel_err(getattr(state, name).cpu(), getattr(state_ref, name).detach()) < 1e-5, name
    # the step is pure: the state it was given is untouched
    kv_prev = state.kv.clone()
    hybrid_attention_step_triton(q[:, :, :1], k[:, :, :1], v[:, :, :1], *weights, state, **opts)
    assert torch.equal(state.kv, kv_prev)


def test_rejects_what_the_kernels_cannot_take():
    xs = make_inputs(1, 2, 1, 20, 16, 8, seed=0, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        hybrid_attention_triton(*xs, window_size=8, chunk_size=24)
    with pytest.raises(TypeError, match="kernels take"):
        hybrid_attention_triton(xs[0].double(), *xs[1:], window_size=8, chunk_size=16)
    with pytest.raises(ValueError, match="fq_weight"):
        hybrid_attention_triton(*xs[:3], xs[3][:, :8], *xs[4:], window_size=8, chunk_size=16)


def test_model_dispatch(monkeypatch):
    """chunked runs on PyTorch on the CPU and on the kernels on CUDA; the environment forces any form."""
    from edge_lolcats.arch import ModelArgs
    from edge_lolcats.nn.model import ATTENTION_FORM_ENV, Attention, HybridAttention

    args = ModelArgs(family="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=16)
    from edge_lolcats.arch.block import rotations
    from edge_lolcats.arch.hybrid import DEFAULT, Recurrence
    from edge_lolcats.arch.ops import TorchOps

    first = HybridAttention(Attention(args), args, 0, window_size=8, feature_dim=8, chunk_size=16,
                            recurrence=Recurrence())
    new = HybridAttention(Attention(args), args, 0, window_size=8, feature_dim=8, chunk_size=16, recurrence=DEFAULT)
    q = torch.randn(1, 2, 30, 16)
    assert first.resolved_form(q) == new.resolved_form(q) == "chunked"
    if torch.cuda.is_available():
        assert first.resolved_form(q.cuda()) == new.resolved_form(q.cuda()) == "triton"
    monkeypatch.setenv(ATTENTION_FORM_ENV, "reference")
    assert first.resolved_form(q) == "reference"
    k, v = torch.randn(1, 1, 30, 16), torch.randn(1, 1, 30, 16)
    rotate = rotations(TorchOps(), args, torch.arange(30))["full_attention"]
    out_ref, _ = first.attend(q, k, v, rotate)
    monkeypatch.setenv(ATTENTION_FORM_ENV, "triton")
    first.to(DEVICE)
    rotate = rotations(TorchOps(DEVICE), args, torch.arange(30, device=DEVICE))["full_attention"]
    out_tri, _ = first.attend(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), rotate)
    assert rel_err(out_tri.cpu(), out_ref) < 1e-5
    monkeypatch.setenv(ATTENTION_FORM_ENV, "reference")
    new_ref, _ = new.attend(q, k, v, rotations(TorchOps(), args, torch.arange(30))["full_attention"])
    monkeypatch.setenv(ATTENTION_FORM_ENV, "triton")
    new_tri, _ = new.to(DEVICE).attend(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), rotate)
    assert rel_err(new_tri.detach().cpu(), new_ref.detach()) < 1e-5
    monkeypatch.setenv(ATTENTION_FORM_ENV, "flash")
    with pytest.raises(ValueError, match="choose from"):
        first.attend(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), rotate)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA training path needs a GPU")
def test_training_steps_run_on_the_kernels_on_cuda(monkeypatch):
    """Both training stages call the Triton kernels on CUDA (under bf16 autocast, as train() runs
    them), and stage 1's loss agrees with the CPU run of the PyTorch chunked form."""
    from conftest import tiny_model

    import edge_lolcats.kernels.hybrid_attention as kernels
    from edge_lolcats.nn.model import linearize
    from edge_lolcats.training.train import stage1_step, stage2_step

    calls = []
    real = kernels.hybrid_attention_triton
    monkeypatch.setattr(kernels, "hybrid_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = linearize(tiny_model("llama", head_dim=64, hidden_size=256, num_attention_heads=4,
                                 num_key_value_heads=2))
    ids = torch.randint(0, 49152, (2, 300), generator=torch.Generator().manual_seed(0))
    loss_cpu = stage1_step(model, ids, mse_weight=1.0, backward=False)
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_gpu = stage1_step(model, ids.cuda(), mse_weight=1.0)
        assert len(calls) == 2  # one per layer
        parts = stage2_step(model, ids.cuda(), kd=False, kd_weight=0.0)
    assert len(calls) == 4
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert abs(loss_gpu - loss_cpu) < 0.05 * abs(loss_cpu)  # bf16 projections and products
    assert parts["ce"] > 0
