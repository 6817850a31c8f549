"""Qwen2 / Qwen2.5 (biases on q, k, v) and Qwen3 (QK-norm: RMSNorm over each head's q and k before
RoPE, no biases). Otherwise the Llama block."""
from __future__ import annotations

from .args import ModelArgs
from .hf import common, rename_layer_parts
from .llama import HF_RENAMES, _act

MODEL_TYPES = ("qwen2", "qwen3")


def args_from_hf(config: dict) -> ModelArgs:
    qwen3 = config["model_type"] == "qwen3"
    return ModelArgs(family=config["model_type"], **common(config), qk_norm=qwen3,
                     qkv_bias=bool(config.get("attention_bias", False)) if qwen3 else True,
                     activation=_act(config.get("hidden_act", "silu")))


def weights_from_hf(args: ModelArgs, weights: dict) -> dict:
    return rename_layer_parts(weights, HF_RENAMES)
