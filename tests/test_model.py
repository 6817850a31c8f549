"""Linearize, forward with state, checkpoints and generation on small random models.

Float32 tolerance for whole-model logits: a 2-layer model with O(1) activations, where forms differ
only in summation order (~1e-7 relative per op); logits are O(1), we allow 2e-5 absolute.
"""
import json
import os

import pytest
import torch
from conftest import tiny_model

from edge_lolcats.formats.checkpoint import save_checkpoint
from edge_lolcats.formats.loading import load_checkpoint
from edge_lolcats.nn.generate import SamplingConfig, generate, prefill, sample
from edge_lolcats.formats.gguf_io import ModelFileError
from edge_lolcats.nn.hybrid_attention import HybridState
from edge_lolcats.formats.loading import ModelNotFound, load_model, resolve
from edge_lolcats.nn.model import HybridAttention, forward, linearize, state_bytes

ATOL = 2e-5


def ids(n, seed=0):
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_large_window_linearized_equals_softmax_teacher(family):
    model = tiny_model(family, sliding_window=None) if family == "mistral" else tiny_model(family)
    x = ids(40)
    with torch.no_grad():
        teacher, _ = forward(model, x)
        proj_before = model.model.layers[0].self_attn.q_proj.weight.clone()
        linearize(model, window_size=64, feature_dim=16)
        lin, _ = forward(model, x)
    assert all(isinstance(layer.self_attn, HybridAttention) for layer in model.model.layers)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, proj_before)
    torch.testing.assert_close(lin, teacher, atol=ATOL, rtol=0)


def test_small_window_changes_the_output():
    """A guard for the test above: with W < N the hybrid is not softmax attention."""
    model = tiny_model()
    x = ids(40)
    with torch.no_grad():
        teacher, _ = forward(model, x)
        lin, _ = forward(linearize(model, window_size=8, feature_dim=16), x)
    torch.testing.assert_close(lin[:, :8], teacher[:, :8], atol=ATOL, rtol=0)
    assert (lin[:, 9:] - teacher[:, 9:]).abs().max() > 1e-2


@pytest.mark.parametrize("linear", [True, False])
def test_prefill_in_chunks_then_steps_equals_one_forward(linear):
    model = tiny_model()
    if linear:
        linearize(model, window_size=8, feature_dim=16, chunk_size=4)
    x = ids(50, seed=1)
    with torch.no_grad():
        full, _ = forward(model, x)
        state, outs = None, []
        for a, b in ((0, 13), (13, 14), (14, 30)):
            logits, state = forward(model, x[:, a:b], state)
            outs.append(logits)
        for i in range(30, 50):
            logits, state = forward(model, x[:, i : i + 1], state)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)
    assert state.position == 50
    assert state.fixed_size == linear


def test_state_size_is_fixed_over_1000_generated_tokens():
    model = linearize(tiny_model(), window_size=16, feature_dim=8)
    prompt = ids(20)[0].tolist()
    sizes = {}
    for n in (10, 1000):
        result = generate(model, prompt, max_new_tokens=n, sampling=SamplingConfig(greedy=False, seed=0))
        assert len(result.token_ids) == n
        assert result.state.position == len(prompt) + n - 1
        assert all(isinstance(s, HybridState) for s in result.state.layers)
        sizes[n] = result.state.nbytes
        shapes = [tuple(t.shape) for s in result.state.layers for t in (s.kv, s.z, s.k_window, s.v_window)]
        sizes[f"shapes{n}"] = shapes
    assert sizes[10] == sizes[1000] == state_bytes(model)
    assert sizes["shapes10"] == sizes["shapes1000"]


def test_softmax_cache_grows_with_tokens():
    model = tiny_model()
    r10 = generate(model, [5, 6, 7], max_new_tokens=10)
    r50 = generate(model, [5, 6, 7], max_new_tokens=50)
    assert r50.state.nbytes > r10.state.nbytes


def test_greedy_generation_is_deterministic_and_sampling_respects_seed():
    model = linearize(tiny_model(), window_size=8, feature_dim=8)
    prompt = ids(12)[0].tolist()
    a = generate(model, prompt, max_new_tokens=12).token_ids
    b = generate(model, prompt, max_new_tokens=12).token_ids
    assert a == b
    s1 = generate(model, prompt, max_new_tokens=12, sampling=SamplingConfig(greedy=False, temperature=1.5, seed=3))
    s2 = generate(model, prompt, max_new_tokens=12, sampling=SamplingConfig(greedy=False, temperature=1.5, seed=3))
    assert s1.token_ids == s2.token_ids


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, -3.0])
    g = torch.Generator().manual_seed(0)
    top1 = {sample(logits, SamplingConfig(greedy=False, top_k=1), g) for _ in range(20)}
    assert top1 == {1}
    top2 = {sample(logits, SamplingConfig(greedy=False, top_k=2, temperature=5.0), g) for _ in range(200)}
    assert top2 == {1, 2}
    # p(1) = 0.73, p(2) = 0.27 at temperature 1: top_p 0.5 keeps token 1 alone
    nucleus = {sample(logits, SamplingConfig(greedy=False, top_p=0.5), g) for _ in range(50)}
    assert nucleus == {1}
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingConfig(greedy=False, **bad).validate()


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="empty prompt"):
        prefill(tiny_model(), [])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_hf_folder_load_and_checkpoint_roundtrip(family, tiny_model_dir, tmp_path):
    folder, original = tiny_model_dir(family)
    loaded = load_model(folder)
    assert loaded.kind == "hf-folder"
    x = ids(30)
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded.model, x)[0], original(x).logits, atol=ATOL, rtol=0)
    model = linearize(loaded.model, window_size=8, feature_dim=8)
    with torch.no_grad():  # make the new weights non-trivial so a lost tensor would show
        for layer in model.model.layers:
            if isinstance(layer.self_attn, HybridAttention):  # (Mistral's sliding layers are kept as they are)
                layer.self_attn.feature_map_q.weight.normal_()
                layer.self_attn.window_factor.normal_()
        expected, _ = forward(model, x)
    for delta in (False, True):
        out = save_checkpoint(model, loaded.tokenizer, str(tmp_path / f"ckpt-{delta}"),
                              base=folder if delta else None)
        assert resolve(out)[0] == "lolcats-checkpoint"
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["lolcats"]["window_size"] == 8 and config["lolcats"]["layout"] == ("delta" if delta else "full")
        again = load_model(out)
        assert again.model.lolcats["layers"] == model.lolcats["layers"]
        with torch.no_grad():
            got, _ = forward(again.model, x)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert again.tokenizer.encode("hello world") == loaded.tokenizer.encode("hello world")
    full = os.path.getsize(tmp_path / "ckpt-False" / "model.safetensors")
    delta = os.path.getsize(tmp_path / "ckpt-True" / "model.safetensors")
    assert delta < full / 10


def test_checkpoint_write_is_atomic(tiny_model_dir, tmp_path, monkeypatch):
    folder, _ = tiny_model_dir()
    loaded = load_model(folder)
    model = linearize(loaded.model, window_size=8, feature_dim=8)
    out = save_checkpoint(model, loaded.tokenizer, str(tmp_path / "ckpt"))
    before = open(os.path.join(out, "model.safetensors"), "rb").read()

    import edge_lolcats.formats.checkpoint as ckpt

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, loaded.tokenizer, out)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "tiny-llama"]  # no temporary folder left behind


def test_bad_checkpoints_are_refused(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir()
    loaded = load_model(folder)
    out = save_checkpoint(linearize(loaded.model, window_size=8, feature_dim=8), loaded.tokenizer,
                          str(tmp_path / "ckpt"))
    weights = os.path.join(out, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_checkpoint(out)
    os.remove(weights)
    with pytest.raises(ModelFileError, match="missing"):
        load_checkpoint(out)


def test_pickled_weights_are_never_loaded(tiny_model_dir):
    folder, model = tiny_model_dir()
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(folder, f))
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ModelFileError, match="safetensors"):
        load_model(folder)


def test_gguf_path_and_name_resolve_to_the_same_file(smollm2_gguf):
    assert resolve("smollm2-135m") == ("gguf", smollm2_gguf.path)
    assert resolve(smollm2_gguf.path) == ("gguf", smollm2_gguf.path)


def test_unknown_model_lists_what_is_accepted(tmp_path):
    with pytest.raises(ModelNotFound) as e:
        load_model("no-such-model")
    message = str(e.value)
    assert "smollm2-135m" in message and ".gguf" in message and "HF folder" in message and "\n" not in message


def test_unsupported_family_is_refused(tmp_path):
    from transformers import GPT2Config

    from edge_lolcats.arch import ArchitectureError, args_from_hf

    with pytest.raises(ArchitectureError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3, "
                                                "gemma2, gemma3_text, gemma3, phi3"):
        args_from_hf(GPT2Config(n_layer=1, n_embd=32, n_head=2).to_dict())
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelFileError, match="architecture 'gpt2' is not supported; supported: llama"):
        load_model(str(tmp_path))
