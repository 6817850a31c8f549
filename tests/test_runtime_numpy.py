"""The torch-free numpy runtime against the PyTorch reference forms and model."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_hybrid_attention import TOL, assert_close, make_inputs

from edge_lolcats.converters.gguf_export import export_gguf
from edge_lolcats.nn.hybrid_attention import hybrid_attention_reference
from edge_lolcats.nn.model import forward, linearize
from edge_lolcats.runtime.hybrid_numpy import block_step, decode_step
from edge_lolcats.runtime.numpy_engine import GGUFEngine


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_block_step_matches_reference(dtype):
    seed = torch.seed() % 2**31
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    args = make_inputs(2, 6, 3, 60, 16, 8, tdtype, seed=seed)
    ref, ref_state = hybrid_attention_reference(*args, window_size=16, output_final_state=True)
    q, k, v, fq, fk, wf = (a.numpy() for a in args)
    kv, z = np.zeros((2, 6, 16, 16), dtype), np.zeros((2, 6, 16), dtype)
    kw, vw = np.zeros((2, 6, 16, 16), dtype), np.zeros((2, 6, 16, 16), dtype)
    pos, outs = 0, []
    for size in (1, 15, 1, 17, 26):
        sl = slice(pos, pos + size)
        o, kv, z, kw, vw = block_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq, fk, wf, kv, z, kw, vw, pos)
        outs.append(o)
        pos += size
    tol = TOL[torch.float32]  # the numpy step returns float32 outputs and state
    assert_close(torch.from_numpy(np.concatenate(outs, 2)), ref, f"numpy block steps (seed {seed})", **tol)
    assert_close(torch.from_numpy(kv), ref_state.kv, f"numpy kv (seed {seed})", **tol)
    assert_close(torch.from_numpy(kw), ref_state.k_window, f"numpy k_window (seed {seed})", **tol)


def test_numpy_decode_step_matches_reference_across_the_window():
    """Token by token through 40 positions with W = 16 (the ring wraps twice), float64, grouped heads."""
    seed = torch.seed() % 2**31
    args = make_inputs(1, 6, 2, 40, 16, 8, torch.float64, seed=seed)
    ref, ref_state = hybrid_attention_reference(*args, window_size=16, output_final_state=True)
    q, k, v, fq, fk, wf = (a.numpy() for a in args)
    kv, z = np.zeros((1, 6, 16, 16)), np.zeros((1, 6, 16))
    kw, vw = np.zeros((1, 6, 16, 16)), np.zeros((1, 6, 16, 16))
    outs = [decode_step(q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], fq, fk, wf, kv, z, kw, vw, p)
            for p in range(40)]
    tol = TOL[torch.float32]  # outputs come back as float32
    assert_close(torch.from_numpy(np.concatenate(outs, 2)), ref, f"numpy decode steps (seed {seed})", **tol)
    assert_close(torch.from_numpy(kv), ref_state.kv, f"numpy kv (seed {seed})", **TOL[torch.float64])
    assert_close(torch.from_numpy(z), ref_state.z, f"numpy z (seed {seed})", **TOL[torch.float64])


def test_gguf_engine_matches_pytorch(tmp_path, smol_tokenizer):
    model = linearize(tiny_model("qwen2"), window_size=8, feature_dim=8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.feature_map_q.weight.normal_()
    path = str(tmp_path / "m.gguf")
    export_gguf(model, smol_tokenizer, path)
    engine = GGUFEngine(path)
    x = torch.randint(0, 49152, (1, 37))
    with torch.no_grad():
        ref, ref_state = forward(model, x)
    state, pos = engine.empty_state(), 0
    for size in (5, 1, 1, 12, 18):
        logits, state = engine.run(x[0, pos : pos + size].numpy(), state)
        pos += size
        assert np.abs(logits[0] - ref[0, pos - 1].numpy()).max() < 1e-4, pos
    np.testing.assert_allclose(state.tensors["state.1.kv"], ref_state.layers[1].kv.numpy(), rtol=1e-4, atol=1e-5)
    assert state.nbytes == sum(s.nbytes for s in ref_state.layers)


def test_gguf_engine_runs_without_torch(tmp_path, smol_tokenizer):
    path = str(tmp_path / "m.gguf")
    export_gguf(linearize(tiny_model(), window_size=8, feature_dim=8), smol_tokenizer, path, dtype="q8_0")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edge_lolcats.runtime.numpy_engine import GGUFEngine\n"
            f"e = GGUFEngine({path!r})\n"
            "ids = e.tokenizer.encode('Once upon a time')\n"
            "logits, state = e.run(ids, e.empty_state())\n"
            "for _ in range(20):\n"
            "    logits, state = e.run([int(logits[0].argmax())], state)\n"
            "print(state.position)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(len(smol_tokenizer.encode("Once upon a time")) + 20)


def test_stored_q8_0_weights_compute_the_same_logits(tmp_path, smol_tokenizer):
    """weights="stored" multiplies through the q8_0 blocks: the same weights as the float32 mode
    (which dequantizes them at load), so the same logits up to float32 summation order, in
    prefill (dequantized per call) and decode (per-block dot products)."""
    from edge_lolcats.runtime.numpy_engine import GGUFEngine, Q8Matrix

    path = str(tmp_path / "m.q8_0.gguf")
    export_gguf(linearize(tiny_model("qwen2"), window_size=8, feature_dim=8), smol_tokenizer, path, dtype="q8_0")
    full, stored = GGUFEngine(path), GGUFEngine(path, weights="stored")
    qkv = ("q_proj", "k_proj", "v_proj")
    assert isinstance(stored.layers[0].self_attn.fused[qkv][0].matrix, Q8Matrix)  # qwen2: with biases
    assert isinstance(stored.embed, Q8Matrix)
    assert stored.weights.endswith("as stored") and not full.weights.endswith("as stored")
    tokens = np.random.default_rng().integers(0, 49152, 20)
    a, b = full.empty_state(), stored.empty_state()
    for chunk in (tokens[:12], tokens[12:13], tokens[13:14], tokens[14:]):
        la, a = full.run(chunk, a)
        lb, b = stored.run(chunk, b)
        # logits ~O(1), 64-wide dot products in another order: float32 rounding is ~1e-6
        np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weights must be one of"):
        GGUFEngine(path, weights="int4")
