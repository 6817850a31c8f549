"""Linearized checkpoints: a folder with config.json (the model description, ``model_args``, and a
``lolcats`` section), model.safetensors and the tokenizer files. Loading never unpickles.
Checkpoints of the first format (an HF config.json with ``lolcats``, HF parameter names) still load.

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

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edge_lolcats.arch import ArchitectureError, ModelArgs, args_from_hf
from edge_lolcats.nn.model import linearize

from .fileio import atomic_folder
from .gguf_io import ModelFileError
from .tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG_FORMAT = 2  # 1: an HF config.json plus "lolcats", HF parameter names
# Parameter names that linearization (or training) adds on top of the base model.
DELTA_MARKERS = ("feature_map_q.", "feature_map_k.", "window_factor", "decay_log_rate", "lora_")


def is_delta_param(name: str) -> bool:
    return any(m in name for m in DELTA_MARKERS)


def save_checkpoint(model, tokenizer: Tokenizer, out_dir: str, *, base: str | None = None) -> str:
    """Write ``model`` (linearized) to ``out_dir``. With ``base``, write a delta on top of it."""
    lolcats = dict(getattr(model, "lolcats", None) or {})
    if not lolcats:
        raise ValueError("model is not linearized")
    state = model.state_dict()
    if base is not None:
        lolcats["base"] = base
        state = {k: v for k, v in state.items() if is_delta_param(k)}
    else:
        lolcats.pop("base", None)
        if model.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    lolcats["layout"] = "delta" if base is not None else "full"
    config = {"format": CONFIG_FORMAT, "model_args": model.args.to_dict(), "lolcats": lolcats}

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


def checkpoint_args(folder: str, config: dict) -> ModelArgs:
    """The model description of a checkpoint's config.json (either format)."""
    try:
        if "model_args" in config:
            return ModelArgs.from_dict(config["model_args"])
        return args_from_hf({k: v for k, v in config.items() if k != "lolcats"})
    except (ArchitectureError, TypeError, KeyError) as e:
        raise ModelFileError(f"{folder}: config.json does not describe a model we run ({e})") from None


def rebuild(model, dims, lolcats):
    """Linearize (and add LoRA, if the checkpoint has it) as the checkpoint records, so that its
    names fit."""
    from edge_lolcats.nn.lora import apply_lora

    from edge_lolcats.arch.hybrid import Recurrence

    # checkpoints from before the option linearized every layer; version-1 ones have the first recurrence
    linearize(model, **dims, sliding_layers=lolcats.get("sliding_layers", "linearize"),
              recurrence=Recurrence.of(lolcats))
    lora = lolcats.get("lora")
    if lora:
        apply_lora(model, rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora.get("dropout", 0.0)),
                   targets=lora.get("targets", ("q_proj", "k_proj", "v_proj", "o_proj")))
    return model
