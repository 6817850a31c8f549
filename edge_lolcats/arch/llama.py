"""Llama 1/2/3.x (rope scaling "llama3" of 3.1+) and Mistral: the plain pre-norm block.

SiLU-gated MLP, RMSNorm before attention and before the MLP, optional biases (``attention_bias``
puts them on q, k, v and o; ``mlp_bias`` on the MLP). Mistral is the same block; its
``sliding_window`` makes every layer a sliding-window layer.
"""
from __future__ import annotations

from .args import ModelArgs
from .hf import common, rename_layer_parts

MODEL_TYPES = ("llama", "mistral")
# HF parameter names -> ours (see edge_lolcats.arch.block for the canonical layout)
HF_RENAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def args_from_hf(config: dict) -> ModelArgs:
    bias = bool(config.get("attention_bias", False))
    return ModelArgs(family=config["model_type"], **common(config), qkv_bias=bias, o_bias=bias,
                     mlp_bias=bool(config.get("mlp_bias", False)), activation=_act(config.get("hidden_act", "silu")))


def weights_from_hf(args: ModelArgs, weights: dict) -> dict:
    return rename_layer_parts(weights, HF_RENAMES)


def _act(name: str) -> str:
    from .args import ArchitectureError

    if name != "silu":
        raise ArchitectureError(f"activation {name!r} is not supported for this family (silu)")
    return "silu"


# --- GGUF (llama.cpp's "llama" architecture; also our format-1 "lolcats" files) ------------------

GGUF_ARCHS = ("llama",)


def args_from_gguf(metadata: dict, arch: str, tensor_names) -> ModelArgs:
    """ModelArgs from a llama-architecture GGUF file's ``{arch}.*`` keys."""
    from edge_lolcats.converters import gguf_names as names

    from .args import FULL, ArchitectureError, Rope

    key = lambda k, default=None: metadata.get(k.format(arch=arch), default)  # noqa: E731
    required = (names.KEY_EMBEDDING_LENGTH, names.KEY_BLOCK_COUNT, names.KEY_HEAD_COUNT, names.KEY_FEED_FORWARD_LENGTH)
    missing = [k.format(arch=arch) for k in required if key(k) is None]
    if missing:
        raise ArchitectureError(f"missing metadata {', '.join(missing)}")
    scaling = key("{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise ArchitectureError(f"RoPE scaling {scaling!r} is not supported (none, linear)")
    if "rope_freqs.weight" in tensor_names:
        raise ArchitectureError("per-frequency RoPE factors (rope_freqs, Llama 3.1+) are not read from GGUF yet; "
                                "load the model's HF folder instead")
    heads, hidden = int(key(names.KEY_HEAD_COUNT)), int(key(names.KEY_EMBEDDING_LENGTH))
    head_dim = int(key(names.KEY_KEY_LENGTH) or key(names.KEY_ROPE_DIMENSION_COUNT) or hidden // heads)
    rope = Rope(theta=float(key(names.KEY_ROPE_FREQ_BASE, 10000.0)),
                kind="linear" if scaling == "linear" else "default",
                factor=float(key("{arch}.rope.scaling.factor", 1.0)))
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    bias = "blk.0.attn_q.bias" in tensor_names
    return ModelArgs(
        family="llama", vocab_size=int(key(names.KEY_VOCAB_SIZE) or len(metadata.get("tokenizer.ggml.tokens", []))),
        hidden_size=hidden, intermediate_size=int(key(names.KEY_FEED_FORWARD_LENGTH)),
        num_layers=int(key(names.KEY_BLOCK_COUNT)), num_heads=heads,
        num_kv_heads=int(key(names.KEY_HEAD_COUNT_KV, heads)), head_dim=head_dim,
        norm_eps=float(key(names.KEY_RMS_EPS, 1e-5)), rope={FULL: rope},
        qkv_bias=bias, o_bias="blk.0.attn_output.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(key(names.KEY_CONTEXT_LENGTH, 2048)),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (eos,))
