"""Export to one self-contained GGUF file (weights, tokenizer, chat template).

A linearized model becomes architecture ``lolcats`` (see :mod:`edge_lolcats.converters.gguf_names`);
a softmax model becomes llama.cpp's file of its family (``llama``, ``qwen2``, ``qwen3``, ``gemma2``,
``gemma3``, ``phi3``), laid out as llama.cpp's converter does (:mod:`edge_lolcats.arch.gguf`). LoRA is merged first (on a copy). Big matrices take the requested type; norms,
feature maps and window factors stay float32 (they are small and precision-sensitive).
The file is written to a temporary name beside the destination and renamed into place.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import os

import numpy as np

from edge_lolcats.arch.hybrid import Recurrence
from edge_lolcats.formats.fileio import atomic_file
from . import gguf_names as names
from . import quantize

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


def _encode(array: np.ndarray, dtype: str, name: str, importance: dict | None = None):
    """(data, raw_dtype) for GGUFWriter.add_tensor; ``importance`` ({GGUF name: [K]}, when calibrated)
    weights q4_0's rounding."""
    small = array.ndim < 2 or any(p in name for p in names.LOLCATS_ONLY) or name.endswith("_norm.weight")
    if small or dtype == "f32":
        return array.astype(np.float32), quantize.qtype("f32")
    if dtype == "f16":
        return array.astype(np.float16), quantize.qtype("f16")
    if array.shape[-1] % 32:
        return array.astype(np.float16), quantize.qtype("f16")  # rows that do not split into blocks of 32
    if dtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        # as llama.cpp's own 4-bit mixes do, the vocabulary matrices keep more bits: measured on SmolLM2
        # (tied embeddings), q4_0 there cost +50% held-out perplexity, q8_0 there costs little
        dtype = "q8_0"
    weights = None
    if dtype == "q4_0" and importance is not None:
        weights = importance.get(name)
        if weights is None:
            raise ExportError(f"no calibration for {name}: its input is not among the model's Linear layers")
    return quantize.quantize(array, dtype, weights), quantize.qtype(dtype)


def _gguf_importance(importance: dict) -> dict:
    """{Linear module name: importance [K]} -> {GGUF tensor name: importance}. A fused matrix
    (attn_qkv; gate and up as ffn_up) shares its parts' input, so it takes the first part's."""
    out = {}
    for module, values in importance.items():
        try:
            out[names.to_gguf(module + ".weight")] = values
        except KeyError:
            continue
    for g, values in list(out.items()):
        if ".attn_q." in g:
            out.setdefault(g.replace(".attn_q.", f".{names.FUSED_QKV}."), values)
    return out


def export_gguf(model, tokenizer, path: str, dtype: str = "f32", source: str = "", progress=None,
                as_softmax: bool = False, calibration: np.ndarray | None = None) -> dict:
    """Write ``model`` to ``path``; returns a summary (architecture, tensor count, bytes).

    ``calibration`` (token ids [n, T]) weights q4_0's rounding by each input channel's activations on
    that text (:mod:`.quantize`; the CLI passes the installed corpus's); None rounds as gguf-py does.

    A linearized model becomes a ``lolcats`` file. A softmax model becomes llama.cpp's file of its
    family (edge_lolcats.arch.gguf: the same layout llama.cpp's converter writes); ``as_softmax``
    writes a linearized model that way too, LoRA merged and the feature maps dropped: the teacher
    at the same precision, for llama.cpp."""
    import gguf
    import torch

    from edge_lolcats.arch import ArchitectureError, gguf_keys
    from edge_lolcats.arch.gguf import base_keys, weights_to_gguf

    from edge_lolcats.nn.lora import lora_modules, merge_lora
    from edge_lolcats.nn.model import is_linearized, lolcats_config, state_layout

    if dtype not in DTYPES:
        raise ExportError(f"unsupported --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    args = model.args
    if lora_modules(model):
        model = merge_lora(copy.deepcopy(model))
    linear = is_linearized(model) and not as_softmax
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if linear:
        arch = names.LOLCATS_ARCH
        keys = base_keys(args, arch)
        tensors = {names.to_gguf(k): v for k, v in state.items()}
    else:
        try:
            convention, keys = gguf_keys(args)
        except ArchitectureError as e:
            raise ExportError(f"a softmax {args.family} model cannot be written for llama.cpp: {e}") from None
        arch = convention.arch
        state = {k: v for k, v in state.items() if not any(p in names.to_gguf(k) for p in names.LOLCATS_ONLY)}
        tensors = weights_to_gguf(args, convention, state)
    importance = None
    if dtype == "q4_0" and calibration is not None:
        from edge_lolcats.nn.model import teacher_mode

        with teacher_mode(model) if is_linearized(model) and as_softmax else contextlib.nullcontext():
            importance = _gguf_importance(quantize.input_importance(model, calibration))

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        key = lambda k: k.format(arch=arch)  # noqa: E731
        writer.add_name(source or arch)
        for k, typed in keys.items():
            _add_typed(writer, k, typed)
        if linear:
            lol = lolcats_config(model)
            writer.add_uint32(key(names.KEY_WINDOW_SIZE), int(lol["window_size"]))
            writer.add_uint32(key(names.KEY_FEATURE_DIM), int(lol["feature_dim"]))
            writer.add_string(key(names.KEY_FEATURE_MAP), lol.get("feature_map", "hedgehog"))
            writer.add_array(key(names.KEY_LAYER_KINDS), list(state_layout(model).kinds))
            recurrence = Recurrence.of(lol)
            writer.add_string(key(names.KEY_FEATURE_MAPS), recurrence.feature_maps)
            writer.add_bool(key(names.KEY_DECAY), recurrence.decay)
            writer.add_uint32(key(names.KEY_SINK_TOKENS), recurrence.sink_tokens)
            writer.add_bool(key(names.KEY_QK_PERMUTED), False)
            writer.add_uint32(key(names.KEY_FORMAT_VERSION), names.FORMAT_VERSION)
            writer.add_string(key(names.KEY_SOURCE), json.dumps({"model": source, "lolcats": lol}, default=str))
            writer.add_string(key(names.KEY_MODEL_FINGERPRINT), model_fingerprint(model))
            writer.add_string(key(names.KEY_MODEL_ARGS), json.dumps(args.to_dict()))
        writer.add_file_type(names.FILE_TYPES[dtype])
        for k, v in tokenizer.gguf_metadata().items():
            _add_value(writer, k, v)
        # tensors encoded on every core (numpy releases the GIL in its loops: the calibrated q4_0 search
        # is most of a 4-bit export's time), written in order
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            encoded = pool.map(lambda item: _encode(np.ascontiguousarray(item[1]), dtype, item[0], importance),
                               tensors.items())
            for i, (gg_name, (data, raw)) in enumerate(zip(tensors, encoded)):
                writer.add_tensor(gg_name, data, raw_dtype=raw)
                if progress is not None:
                    progress(i + 1, len(tensors))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": path, "architecture": arch, "dtype": dtype, "tensors": len(tensors), "bytes": os.path.getsize(path)}


def _add_typed(writer, key: str, typed: tuple):
    """A (type, value) pair from edge_lolcats.arch.gguf's key tables."""
    kind, value = typed
    if kind == "u32":
        writer.add_uint32(key, int(value))
    elif kind == "f32":
        writer.add_float32(key, float(value))
    elif kind == "str":
        writer.add_string(key, str(value))
    elif kind == "bools":
        writer.add_array(key, [bool(v) for v in value])
    else:
        raise ExportError(f"cannot write metadata {key!r} of kind {kind!r}")


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
