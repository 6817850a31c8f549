"""Gemma 2 and Gemma 3 (text): sandwich norms, (1 + w) RMSNorm, GeGLU with tanh GELU, embeddings
scaled by sqrt(hidden), attention scaled by query_pre_attn_scalar^-1/2, interleaved local
(sliding-window) and global layers. Gemma 2 soft-caps attention scores and logits; Gemma 3 has
QK-norm and a second RoPE base for its local layers.

HF's ``post_attention_layernorm`` is Gemma's norm *on the attention output* (ours:
``attn_post_norm``); its ``pre_feedforward_layernorm`` is the norm before the MLP (``ffn_norm``).
"""
from __future__ import annotations

import math

from .args import ArchitectureError, ModelArgs
from .hf import common, rename_layer_parts

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
HF_RENAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "ffn_post_norm"}
# where a multimodal Gemma 3 checkpoint keeps its language model (both transformers layouts)
TEXT_PREFIXES = ("model.language_model.", "language_model.model.")


def args_from_hf(config: dict) -> ModelArgs:
    if config["model_type"] == "gemma3":  # the multimodal wrapper: the text model is nested
        config = {**config["text_config"], "model_type": "gemma3_text"}
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ArchitectureError(f"Gemma activation {act!r} is not supported (gelu_pytorch_tanh)")
    gemma2 = config["model_type"] == "gemma2"
    fields = common(config, local_theta_key="rope_local_base_freq")
    return ModelArgs(
        family="gemma2" if gemma2 else "gemma3", **fields, norm_offset=1.0, sandwich_norms=True,
        qk_norm=not gemma2, activation="gelu_tanh",
        qkv_bias=bool(config.get("attention_bias", False)), o_bias=bool(config.get("attention_bias", False)),
        attention_scale=float(config.get("query_pre_attn_scalar") or fields["head_dim"]) ** -0.5,
        embedding_scale=math.sqrt(fields["hidden_size"]),
        # Gemma 3 keeps attn_logit_softcapping in its config but never applies it (transformers, llama.cpp)
        attn_softcap=config.get("attn_logit_softcapping") if gemma2 else None, final_softcap=config.get("final_logit_softcapping"))


def weights_from_hf(args: ModelArgs, weights: dict) -> dict:
    text = {}
    for name, value in weights.items():
        for prefix in TEXT_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix):]
                break
        else:
            if name.startswith(("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                                "multi_modal_projector.")):
                continue  # the image encoder: not part of the text model
        text[name] = value
    if "lm_head.weight" not in text and "language_model.lm_head.weight" in weights:
        text["lm_head.weight"] = weights["language_model.lm_head.weight"]
    return rename_layer_parts(text, HF_RENAMES)
