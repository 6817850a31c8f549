"""The torch-free numpy runtime against the PyTorch reference forms and model."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model

from edge_lolcats.converters.gguf_export import export_gguf
from edge_lolcats.arch.hybrid import DEFAULT, Recurrence
from edge_lolcats.nn.model import forward, linearize
from edge_lolcats.runtime.numpy_engine import GGUFEngine


# The numpy block and decode steps themselves are tested against the reference with every recurrence
# option in test_hybrid_attention.py (test_block_and_decode_steps_match_reference[numpy]).


@pytest.mark.parametrize("recurrence", [Recurrence(), DEFAULT], ids=["first", "default"])
def test_gguf_engine_matches_pytorch(tmp_path, smol_tokenizer, recurrence):
    """The export's runtime equals the PyTorch model, with the first models' recurrence and with
    feature maps before RoPE, decay and sinks (past window + sinks, across prefill blocks and steps)."""
    model = linearize(tiny_model("qwen2"), window_size=8, feature_dim=8, recurrence=recurrence)
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
    prefill (dequantized per call) and decode (per-block dot products). Float32 activations: with
    quantized ones the two modes' sums could round an activation to neighbouring steps
    (test_compiled_engine.py's test_quantized_activations_are_the_definitions)."""
    from edge_lolcats.runtime.numpy_engine import GGUFEngine, Q8Matrix

    path = str(tmp_path / "m.q8_0.gguf")
    export_gguf(linearize(tiny_model("qwen2"), window_size=8, feature_dim=8), smol_tokenizer, path, dtype="q8_0")
    full, stored = GGUFEngine(path, activations="float32"), GGUFEngine(path, weights="stored", activations="float32")
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
