"""Export a linearized model to ONNX with its recurrent state as explicit inputs and outputs.

One graph, ``model.onnx``, is a pure function

    (input_ids [B, T], position [] int64, state.{i}.kv, state.{i}.z, state.{i}.k_window,
     state.{i}.v_window for every layer i) -> (logits [B, V] of the last token, the new states)

with T dynamic: the runtime feeds prompts in blocks (prefill) and single tokens (decode) through
the same graph. Each layer computes :func:`edge_lolcats.hybrid_attention.hybrid_attention_block_step`,
the form of the hybrid math with no data-dependent control flow. ``model.json`` beside it records
dimensions, the state layout, the tokenizer files and the chat template.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings

import torch
import torch.nn as nn

from ..fileio import atomic_folder
from .gguf_export import model_fingerprint

STATE_PARTS = ("kv", "z", "k_window", "v_window")
FORMAT_VERSION = 1


class ExportError(ValueError):
    pass


def state_names(n_layers: int) -> list[str]:
    return [f"state.{i}.{part}" for i in range(n_layers) for part in STATE_PARTS]


def state_shapes(model, batch="batch") -> dict:
    from ..model import empty_layer_state

    layer = empty_layer_state(model, device="meta")
    return {f"state.{i}.{p}": [batch, *getattr(layer, p).shape[1:]]
            for i in range(model.config.num_hidden_layers) for p in STATE_PARTS}


class BlockStepGraph(nn.Module):
    """The whole decoder as one pure step over a block of tokens (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        from ..model import attention_dims

        self.model = model
        self.heads, self.kv_heads, self.head_dim = attention_dims(model.config)
        self.register_buffer("inv_freq", model.model.rotary_emb.inv_freq.detach().clone().float(), persistent=False)
        self.attention_scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))

    def forward(self, input_ids, position, *states):
        from ..hybrid_attention import hybrid_attention_block_step
        from ..model import apply_rope

        inner = self.model.model
        b, t = input_ids.shape
        x = inner.embed_tokens(input_ids)
        positions = (position + torch.arange(t, dtype=torch.int64)).float()  # [T]
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[None]  # [1, T, D]
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        new_states = []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, k, cos, sin)
            out, *state = hybrid_attention_block_step(
                q, k, v, attn.feature_map_q.weight, attn.feature_map_k.weight, attn.window_factor,
                *states[4 * i : 4 * i + 4], position)
            new_states += state
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(inner.norm(x[:, -1]))
        return (logits, *new_states)


def example_inputs(model, batch: int = 2, tokens: int = 3, position: int = 5):
    # kv and z are sums of positive features: keep them positive
    states = [torch.randn(*shape).abs() if name.endswith((".kv", ".z")) else torch.randn(*shape)
              for name, shape in state_shapes(model, batch).items()]
    return (torch.randint(0, model.config.vocab_size, (batch, tokens)), torch.tensor(position, dtype=torch.int64),
            *states)


def export_onnx(model, tokenizer, out_dir: str, *, quantize: str | None = None, source: str = "",
                opset: int = 18, tokens: int | None = None) -> dict:
    """Write ``model.onnx`` + ``model.json`` + tokenizer files to ``out_dir`` (atomically).
    ``tokens`` fixes the graph's token count (1: a decode-only graph); by default it is dynamic."""
    from ..lora import lora_modules, merge_lora
    from ..model import attention_dims, is_linearized

    if not is_linearized(model):
        raise ExportError("ONNX export needs a linearized model (its state is what the graph carries)")
    if quantize not in (None, "int8"):
        raise ExportError(f"unsupported --quantize {quantize!r}; choose int8")
    model = copy.deepcopy(model).float().eval()
    if lora_modules(model):
        merge_lora(model)
    graph = BlockStepGraph(model).eval()
    n_layers = model.config.num_hidden_layers
    names = state_names(n_layers)
    out_names = ["logits"] + [n.replace("state.", "new_state.", 1) for n in names]
    dynamic = {"input_ids": {0: "batch", 1: "tokens"} if tokens is None else {0: "batch"}, "logits": {0: "batch"}}
    for n in names + out_names[1:]:
        dynamic[n] = {0: "batch"}

    out_dir = os.path.abspath(out_dir)
    with atomic_folder(out_dir) as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            # head counts and sizes are constants of the model, which is what the tracer warns about
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, example_inputs(model, tokens=tokens or 3), path, input_names=["input_ids", "position", *names],
                              output_names=out_names, dynamic_axes=dynamic, opset_version=opset, dynamo=False)
        import onnx

        onnx.checker.check_model(path)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            qpath = os.path.join(tmp, "model.int8.onnx")
            # the vocabulary projection stays float32: quantizing it (tied to the embeddings on
            # SmolLM2) cost +38% held-out perplexity, the rest of the MatMuls little (docs/BENCHMARKS.md)
            graph_nodes = onnx.load(path, load_external_data=False).graph.node
            keep = [n.name for n in graph_nodes if "logits" in n.output]
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=keep)
            os.replace(qpath, path)
            onnx.checker.check_model(path)
        tokenizer.save(tmp)
        heads, kv_heads, head_dim = attention_dims(model.config)
        lol = model.config.lolcats
        meta = {
            "format": "edge-lolcats-onnx", "format_version": FORMAT_VERSION, "source": source, "opset": opset,
            "model_fingerprint": model_fingerprint(model),
            "weights": "int8" if quantize else "f32",
            "graph": "model.onnx", "inputs": ["input_ids", "position", *names], "outputs": out_names,
            "logits": "last token only, [batch, vocab]", "tokens_per_call": tokens,
            "layers": n_layers, "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "window_size": lol["window_size"], "feature_dim": lol["feature_dim"], "feature_map": "hedgehog",
            "max_position_embeddings": model.config.max_position_embeddings,
            "state": {n: {"shape": s, "dtype": "float32"} for n, s in state_shapes(model).items()},
            "state_bytes_per_sequence": 4 * sum(math.prod(s[1:]) for s in state_shapes(model).values()),
            "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": tokenizer.eos_token_ids,
            "chat_template": tokenizer.chat_template,
        }
        with open(os.path.join(tmp, "model.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    return {"path": out_dir, "format": "onnx", "weights": meta["weights"], "bytes": size}

