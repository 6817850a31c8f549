"""Linearized checkpoints: an HF-style folder with config.json (plus a ``lolcats`` section),
model.safetensors and the tokenizer files. Loading never unpickles.

Two layouts:
- full: every weight; the folder stands alone.
- delta: only what linearization added or training changed (feature maps, window factors, and
  LoRA weights when there are any), with ``lolcats.base`` naming the base model to load first.
  A few MB instead of the whole model.
Writes are atomic: everything goes to a temporary folder beside the destination, which is then
renamed into place, so a reader never sees a half-written checkpoint.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .fileio import atomic_folder
from .gguf_io import ModelFileError
from .model import linearize
from .tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
# Parameter names that linearization (or training) adds on top of the base model.
DELTA_MARKERS = ("feature_map_q.", "feature_map_k.", "window_factor", "lora_")


def is_delta_param(name: str) -> bool:
    return any(m in name for m in DELTA_MARKERS)


def save_checkpoint(model, tokenizer: Tokenizer, out_dir: str, *, base: str | None = None) -> str:
    """Write ``model`` (linearized) to ``out_dir``. With ``base``, write a delta on top of it."""
    lolcats = dict(getattr(model.config, "lolcats", None) or {})
    if not lolcats:
        raise ValueError("model is not linearized")
    state = model.state_dict()
    if base is not None:
        lolcats["base"] = base
        state = {k: v for k, v in state.items() if is_delta_param(k)}
    else:
        lolcats.pop("base", None)
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    lolcats["layout"] = "delta" if base is not None else "full"
    config = model.config.to_dict()
    config["lolcats"] = lolcats

    out_dir = os.path.abspath(out_dir)
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(tmp, WEIGHTS),
                  metadata={"format": "pt", "edge_lolcats": lolcats["layout"]})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, default=str)
        tokenizer.save(tmp)
    return out_dir


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: unreadable ({e})") from None


def read_weights(folder: str) -> dict:
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        raise ModelFileError(f"{folder}: {WEIGHTS} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: truncated or corrupt ({e})") from None


def load_checkpoint(folder: str, dtype=torch.float32):
    """(model, tokenizer) from a checkpoint folder written by :func:`save_checkpoint`."""
    from .loading import assign_weights, load_model

    config_dict = read_config(folder)
    lolcats = config_dict.get("lolcats")
    if not isinstance(lolcats, dict) or "window_size" not in lolcats or "feature_dim" not in lolcats:
        raise ModelFileError(f"{folder}: config.json has no valid 'lolcats' section")
    weights = read_weights(folder)
    dims = dict(window_size=int(lolcats["window_size"]), feature_dim=int(lolcats["feature_dim"]),
                chunk_size=int(lolcats.get("chunk_size", 64)))
    if lolcats.get("layout") == "delta":
        base = lolcats.get("base")
        if not base:
            raise ModelFileError(f"{folder}: delta checkpoint without 'lolcats.base'")
        loaded = load_model(base, dtype=dtype)
        if loaded.kind == "lolcats-checkpoint":
            raise ModelFileError(f"{folder}: base {base!r} is itself linearized")
        model = _rebuild(loaded.model, dims, lolcats)
        expected = {k: v for k, v in model.state_dict().items() if is_delta_param(k)}
        if set(weights) != set(expected):
            raise ModelFileError(f"{folder}: delta weights do not match the model: missing "
                                 f"{sorted(set(expected) - set(weights))[:5]}, unexpected {sorted(set(weights) - set(expected))[:5]}")
        for k, v in weights.items():
            if v.shape != expected[k].shape:
                raise ModelFileError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        model.load_state_dict(weights, strict=False)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = {k: v for k, v in config_dict.items() if k != "lolcats"}
        model_type = cfg.pop("model_type", None)
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, KeyError) as e:
            raise ModelFileError(f"{folder}: unknown model type {model_type!r} ({e})") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _rebuild(model, dims, lolcats)
        model = assign_weights(model, weights, dtype)
    model.config.lolcats = lolcats
    tokenizer = Tokenizer.from_folder(folder, eos_token_ids=_eos_list(model.config.eos_token_id))
    return model.eval(), tokenizer


def _rebuild(model, dims, lolcats):
    """Linearize (and add LoRA, if the checkpoint has it) so that the checkpoint's names fit."""
    from .lora import apply_lora

    linearize(model, **dims)
    lora = lolcats.get("lora")
    if lora:
        apply_lora(model, rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora.get("dropout", 0.0)),
                   targets=lora.get("targets", ("q_proj", "k_proj", "v_proj", "o_proj")))
    return model


def _eos_list(eos):
    if eos is None:
        return None
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
