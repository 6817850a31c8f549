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
# What each family's tiny config sets beyond TINY: the options that make the family what it is
# (a small base window of 16 where the family has one, so masks are exercised on short texts).
FAMILY_CONFIGS = {
    "llama": {},
    "llama3": dict(model_type="llama", rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                   low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
                   attention_bias=True, tie_word_embeddings=False),
    "mistral": dict(sliding_window=16),
    "qwen2": {},
    "qwen3": dict(head_dim=24),
    "gemma2": dict(query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, num_hidden_layers=3),
    "gemma3_text": dict(query_pre_attn_scalar=24, sliding_window=16, num_hidden_layers=3,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 1000000.0}}),
    "phi3": dict(partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def hf_tiny_model(family="llama", seed=0, **overrides):
    """A small random transformers causal LM of a family (the reference), in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {**TINY, **FAMILY_CONFIGS[family], **overrides}
    model_type = options.pop("model_type", family)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **options)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is tiny; scale up so attention patterns are not uniform
        for name, p in model.named_parameters():
            if any(f"{n}.weight" in name for n in ("q_proj", "k_proj", "qkv_proj")):
                p.mul_(8)
            elif name.endswith(".bias"):
                p.normal_()
            elif "norm" in name:  # norm weights away from their init, so a wrong offset would show
                p.normal_(0.0, 0.1).add_(0.0 if "gemma" in family else 1.0)
    return model


def ours_from_hf(hf_model):
    """Our model holding a transformers model's weights (the HF-folder loader's path, in memory)."""
    from edge_lolcats.arch import args_from_hf, weights_from_hf
    from edge_lolcats.loading import build_model

    config = hf_model.config.to_dict()
    args = args_from_hf(config)
    return build_model(args, weights_from_hf(args, config["model_type"], dict(hf_model.state_dict()))).eval()


def tiny_model(family="llama", seed=0, **overrides):
    """A small random model of a family as our PyTorch model, in float32."""
    return ours_from_hf(hf_tiny_model(family, seed, **overrides))


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    """Factory: write a tiny random model of a family as an HF folder (safetensors + tokenizer)."""

    def make(family="llama", **overrides):
        model = hf_tiny_model(family, **overrides)
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
