"""Qwen2 / Qwen2.5 (biases on q, k, v) and Qwen3 (QK-norm: RMSNorm over each head's q and k before
RoPE, no biases). Otherwise the Llama block."""
from __future__ import annotations

from .args import ModelArgs
from .gguf import Convention, base_fields, base_keys
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


GGUF = {"qwen2": Convention("qwen2"), "qwen3": Convention("qwen3")}
GGUF_ARCHS = tuple(GGUF)


def args_from_gguf(metadata: dict, arch: str, tensor_names, read_tensor=None) -> ModelArgs:
    return ModelArgs(family=arch, **base_fields(metadata, arch, tensor_names), qk_norm=arch == "qwen3",
                     qkv_bias="blk.0.attn_q.bias" in tensor_names)


def gguf_keys(args: ModelArgs) -> tuple:
    return GGUF[args.family], base_keys(args, args.family)
