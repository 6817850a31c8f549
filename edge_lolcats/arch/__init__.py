"""The model definition, torch-free: a :class:`ModelArgs` per model (read by the family's own file
from an HF config or GGUF metadata) and one decoder block (:mod:`.block`) that every backend runs.

Adding a family is one file here, plus its name in ``_FAMILY_MODULES`` below: ``MODEL_TYPES`` (HF
model types it reads), ``args_from_hf(config) -> ModelArgs``, ``weights_from_hf(args, weights)``
(HF parameter names to ours), and for llama.cpp's files ``GGUF`` (architecture -> :class:`.gguf.Convention`),
``args_from_gguf(metadata, arch, tensor_names, read_tensor)`` and ``gguf_keys(args)``.
"""
from __future__ import annotations

from . import gemma, llama, phi3, qwen
from .args import FULL, SLIDING, ArchitectureError, ModelArgs, Rope

_FAMILY_MODULES = (llama, qwen, gemma, phi3)
# HF model_type -> the module that reads it
FAMILIES = {t: m for m in _FAMILY_MODULES for t in m.MODEL_TYPES}
SUPPORTED = tuple(FAMILIES)
# llama.cpp architectures we read and write
GGUF_ARCHS = tuple(a for m in _FAMILY_MODULES for a in m.GGUF)


def family_module(model_type: str):
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ArchitectureError(f"architecture {model_type!r} is not supported; supported: "
                                f"{', '.join(SUPPORTED)}") from None


def args_from_hf(config: dict) -> ModelArgs:
    """ModelArgs from an HF config.json dict."""
    return family_module(config.get("model_type")).args_from_hf(config)


def gguf_module(arch: str):
    """The family file that reads llama.cpp's architecture ``arch``."""
    for module in _FAMILY_MODULES:
        if arch in getattr(module, "GGUF", {}):
            return module
    raise ArchitectureError(f"GGUF architecture {arch!r} is not supported; supported: "
                            f"{', '.join(GGUF_ARCHS + ('lolcats',))}")


def args_from_gguf(metadata: dict, tensor_names, read_tensor=None) -> ModelArgs:
    """ModelArgs from GGUF metadata: our ``lolcats`` files carry the whole description (format 2) or
    are llama-family (format 1); llama.cpp's own files by their architecture's keys.
    ``read_tensor(name)`` reads a tensor some files keep part of the description in (rope_freqs)."""
    import json

    from edge_lolcats.converters import gguf_names as names

    arch = metadata.get(names.KEY_ARCHITECTURE)
    if arch == names.LOLCATS_ARCH:
        described = metadata.get(names.KEY_MODEL_ARGS.format(arch=arch))
        if described:
            return ModelArgs.from_dict(json.loads(described))
        return llama.args_from_gguf(metadata, arch, tensor_names, read_tensor)
    return gguf_module(arch).args_from_gguf(metadata, arch, tensor_names, read_tensor)


def gguf_keys(args: ModelArgs) -> tuple:
    """(Convention, {key: (type, value)}): how llama.cpp stores a model of ``args``' family."""
    return family_module(args.family).gguf_keys(args)


def weights_from_hf(args: ModelArgs, model_type: str, weights: dict) -> dict:
    """An HF checkpoint's tensors (any array type) under our parameter names."""
    return family_module(model_type).weights_from_hf(args, weights)


__all__ = ["FULL", "SLIDING", "ArchitectureError", "ModelArgs", "Rope", "FAMILIES", "SUPPORTED", "args_from_hf",
           "weights_from_hf", "family_module", "args_from_gguf",
           "gguf_keys", "gguf_module", "GGUF_ARCHS"]
