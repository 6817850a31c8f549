"""Gemma 2 and Gemma 3 (text): sandwich norms, (1 + w) RMSNorm, GeGLU with tanh GELU, embeddings
scaled by sqrt(hidden), attention scaled by query_pre_attn_scalar^-1/2, interleaved local
(sliding-window) and global layers. Gemma 2 soft-caps attention scores and logits; Gemma 3 has
QK-norm and a second RoPE base for its local layers.

HF's ``post_attention_layernorm`` is Gemma's norm *on the attention output* (ours:
``attn_post_norm``); its ``pre_feedforward_layernorm`` is the norm before the MLP (``ffn_norm``).
"""
from __future__ import annotations

import math


from edge_lolcats.converters import gguf_names as names

from .args import FULL, SLIDING, ArchitectureError, ModelArgs, Rope
from .gguf import Convention, base_fields, base_keys, sliding_layers
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


# --- GGUF: llama.cpp's "gemma2" and "gemma3" ----------------------------------------------------

GGUF = {"gemma2": Convention("gemma2", norm_shift=1.0, has_output=False),
        "gemma3": Convention("gemma3", norm_shift=1.0)}
GGUF_ARCHS = tuple(GGUF)
# llama.cpp's defaults where a file is silent: the local-layer period, Gemma 2's soft-caps
_PERIOD = {"gemma2": 2, "gemma3": 6}
_LARGEST = {"gemma2": 46, "gemma3": 62}  # layers of the 27B models, whose scale is 1/sqrt(hidden/heads)


def args_from_gguf(metadata: dict, arch: str, tensor_names, read_tensor=None) -> ModelArgs:
    key = lambda k, default=None: metadata.get(k.format(arch=arch), default)  # noqa: E731
    fields = base_fields(metadata, arch, tensor_names)
    n, heads, hidden = fields["num_layers"], fields["num_heads"], fields["hidden_size"]
    window = key(names.KEY_SLIDING_WINDOW)
    if window:
        local = sliding_layers(metadata, arch, n, _PERIOD[arch])
        fields.update(layer_types=tuple(SLIDING if x else FULL for x in local), sliding_window=int(window))
    if arch == "gemma3":  # local layers: their own base, no scaling
        fields["rope"] = {FULL: fields["rope"][FULL],
                          SLIDING: Rope(theta=float(key(names.KEY_ROPE_FREQ_BASE_SWA, 10000.0)),
                                        dim=fields["rope"][FULL].dim)}
    # query_pre_attn_scalar is not in llama.cpp's files; its rule, unless we wrote the scale
    scale = key(names.KEY_ATTENTION_SCALE) or (
        (hidden / heads) ** -0.5 if n == _LARGEST[arch] else fields["head_dim"] ** -0.5)
    gemma2 = arch == "gemma2"
    return ModelArgs(family=arch, **fields, norm_offset=1.0, sandwich_norms=True, qk_norm=not gemma2,
                     activation="gelu_tanh", attention_scale=float(scale), embedding_scale=hidden ** 0.5,
                     attn_softcap=float(key(names.KEY_ATTN_SOFTCAP, 50.0)) if gemma2 else None,
                     final_softcap=(float(key(names.KEY_FINAL_SOFTCAP, 30.0)) if gemma2
                                    else key(names.KEY_FINAL_SOFTCAP) or None))


def gguf_keys(args: ModelArgs) -> tuple:
    arch = args.family
    keys = base_keys(args, arch)
    k = lambda name: name.format(arch=arch)  # noqa: E731
    keys[k(names.KEY_ATTENTION_SCALE)] = ("f32", args.attention_scale)
    if args.sliding_window:
        keys[k(names.KEY_SLIDING_WINDOW)] = ("u32", args.sliding_window)
        keys[k(names.KEY_SLIDING_WINDOW_PATTERN)] = ("bools", [t == SLIDING for t in args.layer_types])
    if arch == "gemma3" and SLIDING in args.rope:
        keys[k(names.KEY_ROPE_FREQ_BASE_SWA)] = ("f32", args.rope[SLIDING].theta)
    if args.attn_softcap:
        keys[k(names.KEY_ATTN_SOFTCAP)] = ("f32", args.attn_softcap)
    if args.final_softcap:
        keys[k(names.KEY_FINAL_SOFTCAP)] = ("f32", args.final_softcap)
    return GGUF[arch], keys
