"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with q, k, v fused into one ``qkv_proj`` and gate
and up into one ``gate_up_proj`` (split here into ours), and partial rotary where the config asks."""
from __future__ import annotations

from edge_lolcats.converters import gguf_names as names

from .args import SLIDING, ModelArgs
from .gguf import Convention, base_fields, base_keys
from .hf import common, rename_layer_parts
from .llama import HF_RENAMES, _act

MODEL_TYPES = ("phi3",)


def args_from_hf(config: dict) -> ModelArgs:
    return ModelArgs(family="phi3", **common(config), activation=_act(config.get("hidden_act", "silu")))


def weights_from_hf(args: ModelArgs, weights: dict) -> dict:
    out = {}
    for name, value in weights.items():
        if ".self_attn.qkv_proj." in name:  # rows: q, then k, then v
            q, kv = args.q_size, args.kv_size
            for part, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
                out[name.replace("qkv_proj", part)] = value[rows]
        elif ".mlp.gate_up_proj." in name:  # rows: gate, then up
            half = value.shape[0] // 2
            out[name.replace("gate_up_proj", "gate_proj")] = value[:half]
            out[name.replace("gate_up_proj", "up_proj")] = value[half:]
        else:
            out[name] = value
    return rename_layer_parts(out, HF_RENAMES)


GGUF = {"phi3": Convention("phi3", fused=True)}
GGUF_ARCHS = tuple(GGUF)


def args_from_gguf(metadata: dict, arch: str, tensor_names, read_tensor=None) -> ModelArgs:
    """Phi-3 files name a sliding window (0: none). llama.cpp does not apply it; transformers, and
    we, do."""
    fields = base_fields(metadata, arch, tensor_names)
    window = metadata.get(names.KEY_SLIDING_WINDOW.format(arch=arch))
    if window:
        fields.update(layer_types=(SLIDING,) * fields["num_layers"], sliding_window=int(window))
    return ModelArgs(family="phi3", **fields)


def gguf_keys(args: ModelArgs) -> tuple:
    keys = base_keys(args, "phi3")
    keys[names.KEY_SLIDING_WINDOW.format(arch="phi3")] = ("u32", args.sliding_window or 0)
    return GGUF["phi3"], keys
