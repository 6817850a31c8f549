"""Export to one self-contained GGUF file (weights, tokenizer, chat template).

A linearized model becomes architecture ``lolcats`` (see :mod:`edge_lolcats.converters.gguf_names`);
a softmax model becomes a plain ``llama`` file that llama.cpp loads, q/k rows permuted as its
converter does. LoRA is merged first (on a copy). Big matrices take the requested type; norms,
feature maps and window factors stay float32 (they are small and precision-sensitive).
The file is written to a temporary name beside the destination and renamed into place.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np

from ..fileio import atomic_file
from . import gguf_names as names

DTYPES = ("f32", "f16", "q8_0", "q4_0")


class ExportError(ValueError):
    pass


def model_fingerprint(model) -> str:
    """sha256 (16 hex) over a model's weights as float32, names sorted; LoRA merged by the caller.
    Both exporters record it, so a runtime state saved on one export loads on the other."""
    import hashlib

    import torch

    h = hashlib.sha256()
    state = model.state_dict()
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _qtype(dtype: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[dtype]


def _encode(array: np.ndarray, dtype: str, name: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    from gguf import quants

    small = array.ndim < 2 or any(p in name for p in names.LOLCATS_ONLY) or name.endswith("_norm.weight")
    if small or dtype == "f32":
        return array.astype(np.float32), _qtype("f32")
    if dtype == "f16":
        return array.astype(np.float16), _qtype("f16")
    if array.shape[-1] % 32:
        return array.astype(np.float16), _qtype("f16")  # rows that do not split into blocks of 32
    if dtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        # as llama.cpp's own 4-bit mixes do, the vocabulary matrices keep more bits: measured on SmolLM2
        # (tied embeddings), q4_0 there cost +50% held-out perplexity, q8_0 there costs little
        dtype = "q8_0"
    return quants.quantize(array.astype(np.float32), _qtype(dtype)), _qtype(dtype)


def export_gguf(model, tokenizer, path: str, dtype: str = "f32", source: str = "", progress=None,
                as_softmax: bool = False) -> dict:
    """Write ``model`` to ``path``; returns a summary (architecture, tensor count, bytes).

    ``as_softmax`` writes a linearized model's weights (LoRA merged) as a plain llama file with
    softmax attention, dropping the feature maps: the teacher at the same precision, for llama.cpp."""
    import gguf
    import torch

    from edge_lolcats.arch import FULL

    from ..lora import lora_modules, merge_lora
    from ..model import is_linearized, lolcats_config

    if dtype not in DTYPES:
        raise ExportError(f"unsupported --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    args = model.args
    if lora_modules(model):
        model = merge_lora(copy.deepcopy(model))
    linear = is_linearized(model) and not as_softmax
    arch = names.LOLCATS_ARCH if linear else names.LLAMA_ARCH
    rope = args.rope[FULL]
    if not linear and (args.family not in ("llama", "mistral") or rope.kind != "default" or args.qkv_bias
                       or args.window_of(0) is not None):
        raise ExportError(f"a softmax {args.family} model (RoPE {rope.kind}) has no llama.cpp 'llama' equivalent "
                          f"here; only plain Llama models export as softmax GGUF")
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        key = lambda k: k.format(arch=arch)  # noqa: E731
        writer.add_name(source or arch)
        writer.add_uint32(key(names.KEY_CONTEXT_LENGTH), int(args.max_position_embeddings))
        writer.add_uint32(key(names.KEY_EMBEDDING_LENGTH), int(args.hidden_size))
        writer.add_uint32(key(names.KEY_BLOCK_COUNT), int(args.num_layers))
        writer.add_uint32(key(names.KEY_FEED_FORWARD_LENGTH), int(args.intermediate_size))
        writer.add_uint32(key(names.KEY_HEAD_COUNT), heads)
        writer.add_uint32(key(names.KEY_HEAD_COUNT_KV), kv_heads)
        writer.add_uint32(key(names.KEY_KEY_LENGTH), head_dim)
        writer.add_uint32(key(names.KEY_VALUE_LENGTH), head_dim)
        writer.add_float32(key(names.KEY_RMS_EPS), float(args.norm_eps))
        writer.add_float32(key(names.KEY_ROPE_FREQ_BASE), float(rope.theta))
        writer.add_uint32(key(names.KEY_ROPE_DIMENSION_COUNT), rope.dim)
        writer.add_uint32(key(names.KEY_VOCAB_SIZE), int(args.vocab_size))
        if linear:
            lol = lolcats_config(model)
            writer.add_uint32(key(names.KEY_WINDOW_SIZE), int(lol["window_size"]))
            writer.add_uint32(key(names.KEY_FEATURE_DIM), int(lol["feature_dim"]))
            writer.add_string(key(names.KEY_FEATURE_MAP), lol.get("feature_map", "hedgehog"))
            writer.add_bool(key(names.KEY_QK_PERMUTED), False)
            writer.add_uint32(key(names.KEY_FORMAT_VERSION), names.FORMAT_VERSION)
            writer.add_string(key(names.KEY_SOURCE), json.dumps({"model": source, "lolcats": lol}, default=str))
            writer.add_string(key(names.KEY_MODEL_FINGERPRINT), model_fingerprint(model))
            writer.add_string(key(names.KEY_MODEL_ARGS), json.dumps(args.to_dict()))
        writer.add_file_type(names.FILE_TYPES[dtype])
        for k, v in tokenizer.gguf_metadata().items():
            _add_value(writer, k, v)

        state = model.state_dict()
        if args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if not linear:
            state = {k: v for k, v in state.items() if not any(p in names.to_gguf(k) for p in names.LOLCATS_ONLY)}
        for i, (our_name, tensor) in enumerate(state.items()):
            gg_name = names.to_gguf(our_name)
            array = tensor.detach().to(torch.float32).cpu().numpy()
            if not linear and ".attn_q." in gg_name:
                from ..loading import permute_rope_rows

                array = permute_rope_rows(array, heads)
            elif not linear and ".attn_k." in gg_name:
                from ..loading import permute_rope_rows

                array = permute_rope_rows(array, kv_heads)
            data, raw = _encode(np.ascontiguousarray(array), dtype, gg_name)
            writer.add_tensor(gg_name, data, raw_dtype=raw)
            if progress is not None:
                progress(i + 1, len(state))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": path, "architecture": arch, "dtype": dtype, "tensors": len(state), "bytes": os.path.getsize(path)}


def _add_value(writer, key: str, value):
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise ExportError(f"cannot write metadata {key!r} of type {type(value).__name__}")
