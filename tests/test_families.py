"""Every supported family, on tiny random-weight models built with transformers: our one model
definition equals transformers' own model, through PyTorch, the ONNX export and the GGUF export on
the torch-free runtime; and one step of each training stage runs.

Tolerances: all float32. transformers and we compute the same operations in the same order except
for attention kernels (SDPA vs eager) and where RoPE angles are formed (float32 vs float64 in the
numpy runtime); on logits of magnitude ~1-10 that leaves differences of ~1e-5. 1e-4 absolute on
logits is ten times that and far below any real mistake (a wrong norm offset, scale, mask or
rotary layout moves logits by 1e-1 or more; checked by hand by breaking each).
"""
import numpy as np
import pytest
import torch

from conftest import FAMILIES, hf_tiny_model, ours_from_hf

TOL = 1e-4


def _ids(n, seed=0):
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def _worst(a, b) -> str:
    diff = (a - b).abs()
    i = np.unravel_index(int(diff.argmax()), diff.shape)
    return f"max |diff| {float(diff.max()):.2e} at {tuple(int(x) for x in i)}"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(name, transformers model, our model) for each family; built once per module."""
    hf = hf_tiny_model(request.param)
    return request.param, hf, ours_from_hf(hf)


def test_softmax_model_equals_transformers(family):
    """The base model (no linearization) past its sliding window (16): masks, norms, RoPE, scales."""
    from edge_lolcats.model import forward

    name, hf, ours = family
    ids = _ids(40)
    with torch.no_grad():
        logits, state = forward(ours, ids)
    expected = _hf_logits(hf, ids)
    assert (logits - expected).abs().max() < TOL, f"{name}: {_worst(logits, expected)}"
    # prefill then token by token on the KV cache: the same logits
    with torch.no_grad():
        state = forward(ours, ids[:, :30])[1]
        for i in range(30, 40):
            step, state = forward(ours, ids[:, i:i + 1], state)
            assert (step[0, 0] - expected[0, i]).abs().max() < TOL, f"{name}, position {i}"


def test_linearized_with_a_covering_window_equals_transformers(family):
    """A window that covers the whole text (and a base window that does too): the hybrid is the
    softmax teacher exactly, whatever the feature maps."""
    from edge_lolcats.model import forward, linearize

    name, hf, ours = family
    ids = _ids(12, seed=1)
    model = linearize(ours_from_hf(hf), window_size=16, feature_dim=8)
    with torch.no_grad():
        logits, _ = forward(model, ids)
    expected = _hf_logits(hf, ids)
    assert (logits - expected).abs().max() < TOL, f"{name}: {_worst(logits, expected)}"


@pytest.fixture(scope="module")
def exported(family, tmp_path_factory, smol_tokenizer):
    """A linearized (small window, trained-looking feature maps) copy of each family exported to
    ONNX and to GGUF (f32)."""
    from edge_lolcats.converters.gguf_export import export_gguf
    from edge_lolcats.converters.onnx_export import export_onnx
    from edge_lolcats.model import linearize

    name, hf, _ = family
    model = linearize(ours_from_hf(hf), window_size=4, feature_dim=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # feature maps: away from the identity so the linear branch matters
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp(f"export-{name}")
    export_onnx(model, smol_tokenizer, str(folder / "onnx"))
    export_gguf(model, smol_tokenizer, str(folder / "model.gguf"), dtype="f32")
    return name, model, folder


def _runtime_logits(engine, ids, blocks):
    """The last token's logits after feeding ``ids`` in blocks of the given sizes (1 = decode)."""
    state, out, pos = engine.empty_state(), [], 0
    for size in blocks:
        logits, state = engine.run(ids[pos:pos + size], state)
        pos += size
        out.append(logits[0])
    return out


@pytest.mark.parametrize("engine_kind", ["onnx", "gguf"])
def test_exports_on_the_runtime_equal_pytorch(exported, engine_kind):
    """The runtime's engines over each export, in blocks and token by token past the window and
    past the base's sliding window, against the PyTorch model they came from."""
    from edge_lolcats.model import forward
    from edge_lolcats.runtime.api import open_engine

    name, model, folder = exported
    engine = open_engine(str(folder / ("onnx" if engine_kind == "onnx" else "model.gguf")))
    ids = _ids(24, seed=3)[0]
    blocks = [5, 1, 1, 9, 1, 1, 1, 5]
    got = _runtime_logits(engine, ids.numpy(), blocks)
    with torch.no_grad():
        ref = forward(model, ids[None])[0][0]
    ends = np.cumsum(blocks) - 1
    for logits, end in zip(got, ends):
        expected = ref[end].numpy()
        assert np.abs(logits - expected).max() < TOL, f"{name} on {engine_kind}, position {end}: " \
            f"max |diff| {np.abs(logits - expected).max():.2e}"


def test_one_step_of_each_training_stage(family):
    from edge_lolcats.lora import apply_lora
    from edge_lolcats.model import linearize
    from edge_lolcats.train import set_trainable, stage1_step, stage2_step

    name, hf, _ = family
    model = linearize(ours_from_hf(hf), window_size=4, feature_dim=8)
    ids = _ids(20, seed=4)
    params = set_trainable(model, 1)
    loss = stage1_step(model, ids, mse_weight=1000.0)
    assert np.isfinite(loss) and loss > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    apply_lora(model, rank=2)
    params = set_trainable(model, 2)
    parts = stage2_step(model, ids, kd=True, kd_weight=1.0)
    assert np.isfinite(parts["loss"])
    lora_b = [p for n, p in model.named_parameters() if "lora_b" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b), name


def test_hf_folder_loads_each_family(tiny_model_dir):
    """The loader's path (config.json completed by transformers, safetensors, our names) for the
    families whose checkpoints differ most from ours: fused Phi-3 weights and Gemma's norms."""
    from edge_lolcats.loading import load_model
    from edge_lolcats.model import forward

    for fam in ("phi3", "gemma2"):
        folder, hf = tiny_model_dir(fam)
        loaded = load_model(folder)
        ids = _ids(20, seed=5)
        with torch.no_grad():
            logits, _ = forward(loaded.model, ids)
        assert (logits - _hf_logits(hf, ids)).abs().max() < TOL, fam
