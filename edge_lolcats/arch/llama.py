"""Llama 1/2/3.x (rope scaling "llama3" of 3.1+) and Mistral: the plain pre-norm block.

SiLU-gated MLP, RMSNorm before attention and before the MLP, optional biases (``attention_bias``
puts them on q, k, v and o; ``mlp_bias`` on the MLP). Mistral is the same block; its
``sliding_window`` makes every layer a sliding-window layer.
"""
from __future__ import annotations

from dataclasses import replace

from edge_lolcats.converters import gguf_names as names

from .args import FULL, SLIDING, ArchitectureError, ModelArgs
from .gguf import Convention, base_fields, base_keys
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
    if name != "silu":
        raise ArchitectureError(f"activation {name!r} is not supported for this family (silu)")
    return "silu"


# --- GGUF: llama.cpp's "llama" architecture (Mistral too; also our format-1 "lolcats" files) ----

GGUF = {"llama": Convention("llama", permute_qk=True)}
GGUF_ARCHS = tuple(GGUF)


def args_from_gguf(metadata: dict, arch: str, tensor_names, read_tensor=None) -> ModelArgs:
    """ModelArgs from a llama-architecture file's ``{arch}.*`` keys (a sliding window, which
    llama.cpp's llama ignores, makes it Mistral; a rope_freqs tensor is Llama 3.1's scaling)."""
    fields = base_fields(metadata, arch, tensor_names)
    if names.ROPE_FREQS in tensor_names:
        if read_tensor is None:
            raise ArchitectureError("this file scales RoPE per frequency (rope_freqs); read it with its tensors")
        rope = fields["rope"][FULL]
        fields["rope"] = {FULL: replace(rope, freq_divisors=tuple(float(x) for x in read_tensor(names.ROPE_FREQS)))}
    window = metadata.get(names.KEY_SLIDING_WINDOW.format(arch=arch))
    if window:
        fields.update(layer_types=(SLIDING,) * fields["num_layers"], sliding_window=int(window))
    return ModelArgs(family="mistral" if window else "llama", **fields,
                     qkv_bias="blk.0.attn_q.bias" in tensor_names, o_bias="blk.0.attn_output.bias" in tensor_names)


def gguf_keys(args: ModelArgs) -> tuple:
    """(convention, {key: (type, value)}) for writing ``args`` as llama.cpp's llama file."""
    if args.rope[FULL].kind not in ("default", "linear", "llama3") or args.mlp_bias:
        raise ArchitectureError("this Llama variant has no llama.cpp 'llama' equivalent here")
    keys = base_keys(args, "llama")
    if args.sliding_window:
        keys[names.KEY_SLIDING_WINDOW.format(arch="llama")] = ("u32", args.sliding_window)
    return GGUF["llama"], keys
