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
    from edge_lolcats.nn.model import forward

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
    from edge_lolcats.nn.model import forward, linearize

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
    from edge_lolcats.nn.model import linearize

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
    from edge_lolcats.nn.model import forward
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
    from edge_lolcats.nn.lora import apply_lora
    from edge_lolcats.nn.model import linearize
    from edge_lolcats.training.train import set_trainable, stage1_step, stage2_step

    name, hf, _ = family
    # every layer hybrid (Mistral's layers are all sliding: kept, they would leave nothing to train)
    model = linearize(ours_from_hf(hf), window_size=4, feature_dim=8, sliding_layers="linearize")
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
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import forward

    for fam in ("phi3", "gemma2"):
        folder, hf = tiny_model_dir(fam)
        loaded = load_model(folder)
        ids = _ids(20, seed=5)
        with torch.no_grad():
            logits, _ = forward(loaded.model, ids)
        assert (logits - _hf_logits(hf, ids)).abs().max() < TOL, fam


# llama.cpp's layout of each family: which architecture name its converter writes
LLAMA_CPP_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def _same_args(a, b) -> bool:
    """Equal descriptions, floats compared at float32 precision (GGUF stores them as float32)."""
    import dataclasses
    import math

    from edge_lolcats.arch import Rope

    def same(x, y):
        if isinstance(x, Rope):  # Llama 3.1's scaling travels as llama.cpp's per-frequency divisors
            return isinstance(y, Rope) and x.dim == y.dim and np.allclose(x.inv_freq(), y.inv_freq(), rtol=1e-6)
        if isinstance(x, float) or isinstance(y, float):
            return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6)
        if dataclasses.is_dataclass(x):
            return type(x) is type(y) and all(same(getattr(x, f.name), getattr(y, f.name))
                                              for f in dataclasses.fields(x))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        return x == y

    diff = [f.name for f in dataclasses.fields(a) if not same(getattr(a, f.name), getattr(b, f.name))]
    assert not diff, f"fields differ: {[(n, getattr(a, n), getattr(b, n)) for n in diff]}"
    return True


@pytest.fixture(scope="module")
def llama_cpp_file(family, tmp_path_factory, smol_tokenizer):
    """Each family's softmax model written as llama.cpp's GGUF of that family (f32)."""
    from edge_lolcats.converters.gguf_export import export_gguf

    name, _, ours = family
    folder = tmp_path_factory.mktemp(f"llama-cpp-{name}")
    summary = export_gguf(ours, smol_tokenizer, str(folder / f"{name}.gguf"), dtype="f32")
    return folder, f"{name}.gguf", summary


def test_llama_cpp_gguf_of_each_family_loads_back_to_the_same_model(family, llama_cpp_file):
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import forward

    name, hf, ours = family
    folder, file, summary = llama_cpp_file
    assert summary["architecture"] == LLAMA_CPP_ARCH[name]
    loaded = load_model(str(folder / file))
    assert _same_args(loaded.model.args, ours.args), name  # the description survives llama.cpp's keys
    ids = _ids(30, seed=6)
    with torch.no_grad():
        got, want = forward(loaded.model, ids)[0], forward(ours, ids)[0]
    # Gemma's norms travel as 1 + w (float32 rounding of the sum, <= 6e-8 per weight)
    assert (got - want).abs().max() < (1e-5 if "gemma" in name else 1e-6), f"{name}: {_worst(got, want)}"


def test_transformers_reads_our_llama_cpp_files_to_the_same_weights(family, llama_cpp_file, tmp_path, smol_tokenizer):
    """An independent reader of llama.cpp's layout (transformers' GGUF loader) finds the weights we
    wrote: permuted q/k rows, Gemma's shifted norms, Phi-3's fused projections, llama.cpp's names.
    Its own limits: it reads Qwen3's head_dim as 128 whatever the file says (so Qwen3 is checked
    on a model with that head_dim) and no Llama biases (those are compared by our own reader)."""
    import accelerate  # noqa: F401 - transformers needs it to read GGUF; it is in the dev extra
    from transformers import AutoModelForCausalLM

    from edge_lolcats.arch import weights_from_hf
    from edge_lolcats.converters.gguf_export import export_gguf

    name, _, ours = family
    folder, file, _ = llama_cpp_file
    if name == "qwen3":
        ours, folder, file = ours_from_hf(hf_tiny_model("qwen3", head_dim=128)), tmp_path, "qwen3.gguf"
        export_gguf(ours, smol_tokenizer, str(folder / file), dtype="f32")
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=torch.float32)
    read = weights_from_hf(ours.args, theirs.config.model_type, dict(theirs.state_dict()))
    mine = ours.state_dict()
    compared = [k for k in mine if k in read]
    assert len(compared) >= len([k for k in mine if not k.endswith(".bias")]) - 1, name  # lm_head may be tied
    for k in compared:  # Gemma's norms: (1 + w) - 1 in float32 is w to within 6e-8
        torch.testing.assert_close(read[k], mine[k], atol=1e-7, rtol=0, msg=f"{name}: {k}")


# --- layers that are sliding-window softmax in the base: kept on a ring, or linearized -------------


@pytest.mark.parametrize("fam", ["gemma3_text", "gemma2", "mistral"])
def test_kept_window_layers_are_exact_past_their_window_in_every_backend(fam, tmp_path, smol_tokenizer):
    """Linearized with the base's sliding layers kept (their own window of 16 on a fixed ring) and a
    hybrid window covering the text: the model is transformers' own, past the base window, in
    PyTorch, on the ONNX export and on the GGUF export, prefill in blocks and token by token."""
    from edge_lolcats.converters.gguf_export import export_gguf
    from edge_lolcats.converters.onnx_export import export_onnx
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import RingState, forward, layer_plan, linearize, state_bytes
    from edge_lolcats.runtime.api import open_engine

    hf = hf_tiny_model(fam)
    model = linearize(ours_from_hf(hf), window_size=48, feature_dim=8, sliding_layers="keep")
    expected_plan = ["softmax-ring(16)" if t == "sliding_attention" else "hybrid" for t in model.args.layer_types]
    assert layer_plan(model) == expected_plan and "softmax-ring(16)" in expected_plan
    ids = _ids(40, seed=7)
    want = _hf_logits(hf, ids)[0]
    with torch.no_grad():
        whole, _ = forward(model, ids, with_state=False)  # training's path: no state
        state, steps = None, []
        for size in (7, 1, 20, 1, 1, 10):  # blocks and single tokens across the ring's wrap
            start = state.position if state else 0
            logits, state = forward(model, ids[:, start:start + size], state)
            steps.append(logits[0, -1])
    assert (whole[0] - want).abs().max() < TOL, f"{fam}: {_worst(whole[0], want)}"
    ends = np.cumsum([7, 1, 20, 1, 1, 10]) - 1
    for got, end in zip(steps, ends):
        assert (got - want[end]).abs().max() < TOL, f"{fam}, position {end}"
    assert state.nbytes == state_bytes(model)
    assert any(isinstance(s, RingState) for s in state.layers)
    export_onnx(model, smol_tokenizer, str(tmp_path / "onnx"))
    export_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"))
    for path in (tmp_path / "onnx", tmp_path / "m.gguf"):
        engine = open_engine(str(path))
        assert engine.state_bytes == state_bytes(model)
        for got, end in zip(_runtime_logits(engine, ids[0].numpy(), [7, 1, 20, 1, 1, 10]), ends):
            assert np.abs(got - want[end].numpy()).max() < TOL, f"{fam} on {path.name}, position {end}"
    reloaded = load_model(str(tmp_path / "m.gguf")).model  # the torch loader honours the file's layer kinds
    assert layer_plan(reloaded) == expected_plan


def test_sliding_layers_can_be_linearized_too():
    from edge_lolcats.nn.model import HybridAttention, layer_plan, linearize

    model = linearize(ours_from_hf(hf_tiny_model("gemma3_text")), window_size=8, feature_dim=8,
                      sliding_layers="linearize")
    assert layer_plan(model) == ["hybrid"] * 3 and model.lolcats["layers"] == ["hybrid"] * 3
    assert all(isinstance(layer.self_attn, HybridAttention) for layer in model.model.layers)
    with pytest.raises(ValueError, match="sliding_layers must be one of keep, linearize"):
        linearize(ours_from_hf(hf_tiny_model("gemma3_text")), sliding_layers="drop")


# The tiny llama's state (2 layers, 4 heads and 2 KV heads of 16, feature dim 8, window 8, the
# default 4 sink tokens), written out once: per layer kv [4, 2*8, 16] + z [4, 2*8] + k and v windows
# [2, 8, 16] + k and v sinks [2, 4, 16], float32.
TINY_STATE_BYTES = 2 * (4 * 16 * 16 + 4 * 16 + 2 * 2 * 8 * 16 + 2 * 2 * 4 * 16) * 4


def test_state_layout_is_the_one_definition_of_the_state():
    """The layout (arch.state) against the formula above, and every holder of a state against it:
    the PyTorch model's states, kept-window rings per KV head."""
    from edge_lolcats.arch.state import HYBRID, WINDOW, StateLayout
    from edge_lolcats.nn.model import forward, linearize, state_bytes, state_layout

    layout = StateLayout(num_layers=2, heads=4, head_dim=16, feature_dim=8, window_size=8, kv_heads=2, sink_tokens=4)
    assert layout.bytes_per_sequence == TINY_STATE_BYTES
    parts = ("kv", "z", "k_window", "v_window", "k_sink", "v_sink")
    assert layout.names() == [f"state.{i}.{p}" for i in range(2) for p in parts]
    assert layout.shapes("b")["state.1.kv"] == ["b", 4, 16, 16]
    model = linearize(ours_from_hf(hf_tiny_model("llama")), window_size=8, feature_dim=8)
    assert state_layout(model) == layout and state_bytes(model) == TINY_STATE_BYTES
    with torch.no_grad():
        _, state = forward(model, _ids(11))
    assert state.nbytes == TINY_STATE_BYTES
    for i, layer_state in enumerate(state.layers):
        for part, shape in layout.part_shapes(i).items():
            assert tuple(getattr(layer_state, part).shape) == (1, *shape)
    gemma = linearize(ours_from_hf(hf_tiny_model("gemma3_text")), window_size=8, feature_dim=8)
    rings = state_layout(gemma)
    assert rings.kinds == (WINDOW, HYBRID, WINDOW)
    assert rings.part_shapes(0) == {"k_ring": (2, 16, 16), "v_ring": (2, 16, 16)}  # KV heads, base window 16
