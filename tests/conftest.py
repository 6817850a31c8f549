import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Without a GPU the Triton kernels run on the CPU in Triton's interpreter. It is chosen when a
# kernel is decorated, so this must be set before anything imports edge_lolcats.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from edge_lolcats.gguf_io import read_gguf
    from edge_lolcats.loading import embedded_model_path

    return read_gguf(embedded_model_path("smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_gguf):
    from edge_lolcats.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_gguf.metadata)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (softmax), loaded once per session. Do not modify it."""
    from edge_lolcats.loading import load_model

    return load_model("smollm2-135m")


TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def tiny_model(family="llama", seed=0, **overrides):
    """A small random causal LM of one of the supported families, in float32."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, AutoModelForCausalLM

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    torch.manual_seed(seed)
    config = cls(**{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is tiny; scale up so attention patterns are not uniform
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(8)
            if getattr(layer.self_attn.q_proj, "bias", None) is not None:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    return model


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    """Factory: write a tiny random model of a family as an HF folder (safetensors + tokenizer)."""

    def make(family="llama", **overrides):
        model = tiny_model(family, **overrides)
        folder = tmp_path / f"tiny-{family}"
        model.save_pretrained(folder, safe_serialization=True)
        smol_tokenizer.save(str(folder))
        return str(folder), model

    return make


def run_cli(*args, env=None, timeout=600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge_lolcats.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
