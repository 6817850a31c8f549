"""Every supported family on a tiny random-weight model built with transformers: the largest logit
difference of each of our backends against transformers' own model.

    edge-lolcats bench families [--tokens 48] [--json OUT]

Each model is linearized with a hybrid window covering the text and the base's sliding layers kept
on their rings (a base window of 16, so the rings wrap), which makes every backend compute the
teacher exactly: PyTorch (prefill), the ONNX export (block graph for the prompt, decode graph token
by token), the lolcats GGUF on the numpy runtime (likewise), and llama.cpp's GGUF of the softmax
model read back by our loader. The test suite checks the same on the same configs
(tests/test_families.py); this prints the figures for docs/BENCHMARKS.md. Needs transformers.
"""
from __future__ import annotations

import json
import tempfile

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
# What each family's tiny config sets beyond TINY: the options that make the family what it is
# (a small base window of 16 where the family has one, so masks and rings are exercised on short texts).
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


def hf_tiny_model(family="llama", seed=0, **overrides):
    """A small random transformers causal LM of a family (the reference), in float32, its weights
    scaled so that attention is not uniform and norms and biases are away from their init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {**TINY, **FAMILY_CONFIGS[family], **overrides}
    model_type = options.pop("model_type", family)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **options)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"{n}.weight" in name for n in ("q_proj", "k_proj", "qkv_proj")):
                p.mul_(8)
            elif name.endswith(".bias"):
                p.normal_()
            elif "norm" in name:  # away from their init, so a wrong norm offset would show
                p.normal_(0.0, 0.1).add_(0.0 if "gemma" in family else 1.0)
    return model


def ours_from_hf(hf_model):
    """Our model holding a transformers model's weights (the HF-folder loader's path, in memory)."""
    from edge_lolcats.arch import args_from_hf, weights_from_hf
    from edge_lolcats.formats.loading import build_model

    config = hf_model.config.to_dict()
    args = args_from_hf(config)
    return build_model(args, weights_from_hf(args, config["model_type"], dict(hf_model.state_dict()))).eval()


def measure(family: str, tokens: int, tokenizer, folder: str) -> dict:
    """{backend: max |logit - transformers' logit|} over every position of a random text."""
    import os

    import numpy as np
    import torch

    from edge_lolcats.converters.gguf_export import export_gguf
    from edge_lolcats.converters.onnx_export import export_onnx
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import forward, linearize
    from edge_lolcats.runtime.api import open_engine

    hf = hf_tiny_model(family)
    ids = torch.randint(3, TINY["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    softmax = ours_from_hf(hf)
    model = linearize(ours_from_hf(hf), window_size=tokens + 16, feature_dim=8)
    llama_cpp = os.path.join(folder, f"{family}.llama-cpp.gguf")
    export_gguf(softmax, tokenizer, llama_cpp)
    diffs = {}
    with torch.no_grad():
        want = hf(ids).logits[0]
        for name, m in (("pytorch softmax", softmax), ("pytorch linearized", model),
                        ("llama.cpp GGUF, reloaded", load_model(llama_cpp).model)):
            diffs[name] = (forward(m, ids)[0][0] - want).abs().max().item()
    export_onnx(model, tokenizer, os.path.join(folder, f"{family}-onnx"))
    export_gguf(model, tokenizer, os.path.join(folder, f"{family}.gguf"))
    prompt = tokens // 2  # the first half in one block, then token by token (the decode paths)
    for name, path in (("onnx", f"{family}-onnx"), ("gguf runtime", f"{family}.gguf")):
        engine = open_engine(os.path.join(folder, path))
        logits, state = engine.run(ids[0, :prompt].numpy(), engine.empty_state())
        rows = [logits[0]]
        for i in range(prompt, tokens):
            logits, state = engine.run(ids[0, i:i + 1].numpy(), state)
            rows.append(logits[0])
        diffs[name] = float(np.abs(np.stack(rows) - want[prompt - 1:].numpy()).max())
    return diffs


def run(args):
    from edge_lolcats.formats.gguf_io import read_gguf
    from edge_lolcats.formats.loading import embedded_model_path
    from edge_lolcats.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(embedded_model_path("smollm2-135m")).metadata)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in FAMILY_CONFIGS:
            results[family] = measure(family, args.tokens, tokenizer, folder)
            print(f"{family}: " + ", ".join(f"{k} {v:.1e}" for k, v in results[family].items()), flush=True)
    backends = list(next(iter(results.values())))
    print("\n| family | " + " | ".join(backends) + " |")
    print("|---" * (len(backends) + 1) + "|")
    for family, r in results.items():
        print(f"| {family} | " + " | ".join(f"{r[b]:.1e}" for b in backends) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "max_abs_logit_diff_vs_transformers": results}, f, indent=2)
