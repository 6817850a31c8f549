"""Export a linearized model to ONNX with its recurrent state as explicit inputs and outputs.

Two graphs over one weights file, each a pure function

    (input_ids, position [] int64, state.{i}.kv, state.{i}.z, state.{i}.k_window, state.{i}.v_window
     [, state.{i}.k_sink, state.{i}.v_sink] for every layer i) -> (logits [B, V] of the last token,
     the new states)

- ``model.onnx``: any batch and any number of tokens T per call (prefill in blocks, batches); each
  layer computes :func:`edge_lolcats.arch.hybrid.block_step`.
- ``decode.onnx``: one sequence, one token (input_ids [1, 1]); each layer computes
  :func:`edge_lolcats.arch.hybrid.decode_step`, built node by node with onnxruntime's contrib ops
  (:mod:`.onnx_decode`: ~65 nodes a layer where the traced step had ~125 after onnxruntime's
  fusions; static shapes, T = 1's work only).

Both share the state layout, so a session moves between them freely. Their weights live once in
``weights.bin`` (ONNX external data; both graphs point at the same offsets), which the runtime
maps into memory and hands to both sessions. ``model.json`` beside them records dimensions, the
state layout, the tokenizer files and the chat template.
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from edge_lolcats.arch import block
from edge_lolcats.arch import state as state_layout_names
from edge_lolcats.arch.hybrid import Recurrence
from edge_lolcats.arch.ops import TorchOps

from edge_lolcats.formats.fileio import atomic_folder
from .gguf_export import model_fingerprint
from .onnx_decode import OPSET as DECODE_OPSET
from .onnx_decode import STACKED, ExportError, build_decode_graph, output_names
from .quantize import weight_key

# 3: the model description (ModelArgs) in model.json; 4: the recurrence, rings per KV head; 5: int8 / int4
# weights as MatMulNBits (GGUF's q8_0 / q4_0 blocks) instead of onnxruntime's dynamic quantization;
# 6: the compact decode graph (onnx_decode, opset 23)
FORMAT_VERSION = 6
OPSET = 18  # the traced block graph's
WEIGHTS_FILE = "weights.bin"
DECODE_DATA = "decode.data"  # the decode graph's weights while it is written, before weights.bin takes them
# initializers this small stay inside the graph (shape constants, scales): not worth an offset
INLINE_BYTES = 4096


def _fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing ``linears`` side by side (outputs concatenated)."""
    bias = linears[0].bias is not None
    fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=bias)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


class _Fused(nn.Module):
    """A module seen through fused projections: ``fused[names] = (Linear, sizes)`` (read by
    ``TorchOps.linears``) for each group of ``names``; every other attribute is the module's own."""

    def __init__(self, module: nn.Module, groups: tuple = ()):
        super().__init__()
        self.module = module
        self.fused_linears = nn.ModuleList(_fused_linear(*(getattr(module, n) for n in names)) for names in groups)
        self.fused = {names: (f, [getattr(module, n).out_features for n in names])
                      for names, f in zip(groups, self.fused_linears)}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def _fused_layer(layer: nn.Module) -> _Fused:
    """A decoder layer whose q/k/v and gate/up projections run as one MatMul each."""
    fused = _Fused(layer)
    fused.self_attn = _Fused(layer.self_attn, (("q_proj", "k_proj", "v_proj"),))
    fused.mlp = _Fused(layer.mlp, (("gate_proj", "up_proj"),))
    return fused


class StepGraph(nn.Module):
    """The whole decoder as one pure step over a block of tokens (see the module docstring). It
    runs the model's one definition (:mod:`edge_lolcats.arch.block`); what is the graph's own is
    only how it computes: q/k/v and gate/up as one MatMul each (a graph pays per node)."""

    def __init__(self, model):
        super().__init__()
        from edge_lolcats.nn.model import state_layout

        self.model = model
        self.layers = nn.ModuleList(_fused_layer(layer) for layer in model.model.layers)
        layout = state_layout(model)
        sizes = [len(layout.layer_names(i)) for i in range(layout.num_layers)]
        self.state_slices = [slice(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]

    def forward(self, input_ids, position, *states):
        from edge_lolcats.arch import hybrid
        from edge_lolcats.arch.window import window_ring_step
        from edge_lolcats.nn.model import WindowAttention

        args, inner = self.model.args, self.model.model
        xp = TorchOps()
        positions = position + torch.arange(input_ids.shape[1], dtype=torch.int64)  # [T]
        rotate = block.rotations(xp, args, positions)
        x = block.embed(xp, args, inner.embed_tokens, input_ids)
        new_states = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            layer_states = states[self.state_slices[i]]

            def attend(q, k, v, rotate, attn=attn, layer_states=layer_states):
                if isinstance(attn.module, WindowAttention):  # the base's own window, on its ring
                    out, *state = window_ring_step(xp, rotate(q), rotate(k), v, *layer_states, position,
                                                   scale=attn.scale, softcap=attn.softcap)
                else:
                    rec = attn.recurrence
                    if rec.feature_maps == hybrid.PRE_ROPE:
                        rope = rotate.inv_freq
                    else:
                        q, k, rope = rotate(q), rotate(k), None
                    out, state = hybrid.block_step(xp, q, k, v, *attn.weights, attn.log_decay, layer_states, position,
                                      scale=attn.scale, softcap=attn.softcap, rope=rope, sink_tokens=rec.sink_tokens)
                new_states.extend(state)
                return out

            x = block.layer(xp, args, layer, x, rotate[args.layer_types[i]], attend)
        logits = block.logits(xp, args, inner.norm, self.model.lm_head, x[:, -1])
        return (logits, *new_states)


def state_shapes(model, batch="batch") -> dict:
    from edge_lolcats.nn.model import state_layout

    return state_layout(model).shapes(batch)


def example_inputs(model, batch: int = 2, tokens: int = 3, position: int = 5):
    # kv and z are sums of positive features: keep them positive
    states = [torch.randn(*shape).abs() if name.endswith((".kv", ".z")) else torch.randn(*shape)
              for name, shape in state_shapes(model, batch).items()]
    return (torch.randint(0, model.args.vocab_size, (batch, tokens)), torch.tensor(position, dtype=torch.int64),
            *states)


def _export_graph(graph: nn.Module, model, path: str):
    names = list(state_shapes(model))
    out_names = output_names(names)
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}}
    for n in names + out_names[1:]:
        dynamic[n] = {0: "batch"}
    inputs = example_inputs(model, batch=2, tokens=3)
    with torch.no_grad(), warnings.catch_warnings():
        # head counts and sizes are constants of the model, which is what the tracer warns about
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, inputs, path, input_names=["input_ids", "position", *names], output_names=out_names,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


QUANTIZE = {"int8": 8, "int4": 4}  # --quantize: bits of MatMulNBits, blocks of 32


def _importance_by_weight(graph: "StepGraph", by_module: dict) -> dict:
    """{weight_key: importance [K]} for every Linear the graph multiplies by, from
    ``quantize.input_importance``'s {module name: importance}; a fused Linear takes its first
    part's (the parts share their input)."""
    name_of = {id(m): n for n, m in graph.model.named_modules()}
    out = {}
    for m in graph.modules():
        if isinstance(m, nn.Linear) and name_of.get(id(m)) in by_module:
            out[weight_key(m.weight.detach().numpy())] = by_module[name_of[id(m)]]
        elif isinstance(m, _Fused):
            for names, (linear, _) in m.fused.items():
                part = name_of.get(id(getattr(m.module, names[0])))
                if part in by_module:
                    out[weight_key(linear.weight.detach().numpy())] = by_module[part]
    return out


def _quantize_nbits(path: str, bits: int, accuracy_level: int, vocab_size: int, importance: dict | None = None,
                    done: dict | None = None, progress=None):
    """Every linear layer (a MatMul by a 2-D weight initializer [K, N], K a multiple of 32) becomes
    ``com.microsoft.MatMulNBits`` with GGUF's own quantization of the same weight: 8 bits are q8_0,
    4 bits q4_0 except the vocabulary projection, which stays 8 bits (as the GGUF q4_0 file keeps
    it q8_0); the embedding lookup becomes ``GatherBlockQuantized`` over the q8_0 rows. So an int8 / int4 export holds exactly the weights of the q8_0 / q4_0 GGUF file
    (converters/nbits.py). The feature maps' per-head [H, D, F] weights stay float32 (small, and
    the softmax after them is sensitive). ``accuracy_level`` 4 multiplies with int8 activations
    (onnxruntime's fast kernels; 1 keeps them float32: 8-bit at level 0 ran 80x slower, FACTS).
    ``importance`` ({_weight_key: [K]}) weights q4_0's rounding as the GGUF exporter does; ``done``
    keeps each matrix's blocks for the next graph (both graphs hold the same weights);
    ``progress(i, n)`` is called as each of the n matrices is rounded."""
    import onnx
    from onnx import helper, numpy_helper

    from . import nbits, quantize

    done = {} if done is None else done
    m = onnx.load(path)
    inits = {i.name: i for i in m.graph.initializer}
    uses = {}
    for n in m.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    def linear_weight(n):
        """(initializer, K, N, W [N, K] float32, bits) of a MatMul by a weight of its own, else None."""
        weight = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.dims[0] % nbits.BLOCK or uses[weight.name] != 1:
            return None
        k, cols = (int(d) for d in weight.dims)
        b = 8 if cols == vocab_size else bits  # the vocabulary projection: 8 bits always
        return weight, k, cols, numpy_helper.to_array(weight).T.astype("float32"), b

    found = {}  # node index -> (initializer, K, N, bits, key) of each MatMul to replace
    jobs = {}
    for index, n in enumerate(m.graph.node):
        linear = linear_weight(n)
        if linear is None:
            continue
        weight, k, cols, w, b = linear
        key = (weight_key(w), b)
        found[index] = (weight, k, cols, b, key)
        if key in done or key in jobs:
            continue
        weights = None
        if b == 4 and importance is not None:
            weights = importance.get(key[0])
            if weights is None:
                raise ExportError(f"no calibration for MatMul weight {weight.name} {list(weight.dims)}: "
                                  "a traced Linear not matched to the model's")
        jobs[key] = (w, "q8_0" if b == 8 else "q4_0", weights)
    # rounded on every core (numpy releases the GIL in its loops: the calibrated q4_0 search is most of the time)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rounded = pool.map(lambda job: nbits.from_gguf(quantize.quantize(*job), 8 if job[1] == "q8_0" else 4),
                           jobs.values())
        for i, (key, blocks) in enumerate(zip(jobs, rounded)):
            done[key] = blocks
            if progress is not None:
                progress(i + 1, len(jobs))

    nodes, dropped = [], set()
    for index, n in enumerate(m.graph.node):
        table = inits.get(n.input[0]) if n.op_type == "Gather" else None
        if table is not None and len(table.dims) == 2 and table.dims[0] == vocab_size and table.dims[1] % nbits.BLOCK == 0:
            # the embedding as the q8_0 file stores it: 8-bit rows in blocks of 32, gathered and scaled
            raw = quantize.reference(numpy_helper.to_array(table), "q8_0")
            packed, scales = nbits.from_gguf(raw, 8)
            m.graph.initializer.extend([numpy_helper.from_array(packed.reshape(len(packed), -1), table.name + ".nbits"),
                                        numpy_helper.from_array(scales, table.name + ".scales")])
            nodes.append(helper.make_node("GatherBlockQuantized", [table.name + ".nbits", n.input[1], table.name + ".scales"],
                                          list(n.output), name=n.name + "_nbits", domain="com.microsoft", bits=8,
                                          block_size=nbits.BLOCK, gather_axis=0, quantize_axis=1))
            dropped.add(table.name)
            continue
        if index not in found:
            nodes.append(n)
            continue
        weight, k, cols, b, key = found[index]
        packed, scales = done[key]
        m.graph.initializer.extend([numpy_helper.from_array(packed, weight.name + ".nbits"),
                                    numpy_helper.from_array(scales, weight.name + ".scales")])
        nodes.append(helper.make_node("MatMulNBits", [n.input[0], weight.name + ".nbits", weight.name + ".scales"],
                                      list(n.output), name=n.name + "_nbits", domain="com.microsoft", K=k, N=cols,
                                      bits=b, block_size=nbits.BLOCK, accuracy_level=accuracy_level))
        dropped.add(weight.name)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    kept = [i for i in m.graph.initializer if i.name not in dropped]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, path)


def _basic_optimized(path: str):
    """Replace the traced block graph at ``path`` by onnxruntime's basic optimization of it:
    constants folded and redundant nodes removed, rewrites that run before the graph is split
    between execution providers, so the graph keeps to standard ops and stays portable. The trace
    is mostly shape arithmetic (SmolLM2: 20,658 nodes, 6,758 of them Constant; 10,989 after), and
    onnxruntime redid this work on every load (creating the session took 4.5 s, 2.4 s after)."""
    import onnx
    import onnxruntime as ort

    optimized, data = path + ".basic", os.path.basename(path) + ".basic.data"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = optimized
    # onnxruntime writes the weights beside the graph (a protobuf holds at most 2 GB); inline again after, as traced
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(INLINE_BYTES))
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    onnx.save(onnx.load(optimized), path)
    os.remove(optimized)
    os.remove(os.path.join(os.path.dirname(path), data))


def _share_weights(paths: list[str], weights_path: str) -> dict:
    """Move the graphs' initializers into one external-data file, each distinct tensor once:
    the block and decode graphs are built from the same module, so their weights coincide
    (under different names; the decode graph's stacks of per-layer tensors hold the block graph's
    as slices), and the file (and the runtime's memory) holds them once.
    Returns, per graph file, {initializer: {offset, length, dtype, shape}} for ``model.json``, so
    the runtime maps them without parsing protobuf (it does not depend on the onnx package)."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    offsets: dict[bytes, tuple[int, int]] = {}
    table: dict[str, dict] = {}
    with open(weights_path, "wb") as out:
        for path in paths:
            m = onnx.load(path)
            entries = table[os.path.basename(path)] = {}
            for t in m.graph.initializer:
                raw = t.raw_data or onnx.numpy_helper.to_array(t).tobytes()
                # a stack of layers' tensors along its first axis (the decode graph's feature maps of the
                # leaving keys, [L, H, D, F]): each layer's slice is a tensor of its own, the block graph's
                slices = t.dims[0] if t.name.startswith(STACKED) else 1
                if len(raw) // slices < INLINE_BYTES:
                    continue
                # bytes and type, not shape: a tied vocabulary matrix is the embedding's gather table
                # [V, K] and the head's MatMulNBits weight [V, K/32, 32], the same bytes stored once
                key = hashlib.sha256(raw + str(t.data_type).encode()).digest()
                if key not in offsets:
                    out.seek(-out.tell() % 64, 1)  # 64-byte aligned: arrays mapped from the file stay aligned
                    offsets[key] = (out.tell(), len(raw))
                    if slices > 1:
                        step = len(raw) // slices
                        for i in range(slices):
                            part = hashlib.sha256(raw[i * step : (i + 1) * step] + str(t.data_type).encode()).digest()
                            offsets.setdefault(part, (out.tell() + i * step, step))
                    out.write(raw)
                offset, length = offsets[key]
                entries[t.name] = {"offset": offset, "length": length, "shape": list(t.dims),
                                   "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name}
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(field)
                t.raw_data = b"x"  # set_external_data wants a raw_data field (then drops it)
                set_external_data(t, os.path.basename(weights_path), offset=offset, length=length)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(m, path)
    return table


def export_onnx(model, tokenizer, out_dir: str, *, quantize: str | None = None, source: str = "",
                accuracy_level: int = 4, calibration: np.ndarray | None = None, progress=None) -> dict:
    """Write ``model.onnx`` + ``decode.onnx`` + ``weights.bin`` + ``model.json`` + tokenizer files to
    ``out_dir`` (atomically). ``quantize`` "int8" / "int4": the linear layers as MatMulNBits with
    the q8_0 / q4_0 GGUF file's weights (:func:`_quantize_nbits`; ``calibration`` as for
    :func:`.gguf_export.export_gguf`, so the same calibration gives the same weights). ``progress(i,
    n)``: the weight matrices rounded so far, when quantizing (a calibrated int4 export takes minutes)."""
    from edge_lolcats.nn.lora import lora_modules, merge_lora
    from edge_lolcats.nn.model import is_linearized, state_layout

    if not is_linearized(model):
        raise ExportError("ONNX export needs a linearized model (its state is what the graph carries)")
    if quantize not in (None, *QUANTIZE):
        raise ExportError(f"unsupported --quantize {quantize!r}; choose {' or '.join(QUANTIZE)}")
    model = copy.deepcopy(model).float().eval()
    if lora_modules(model):
        merge_lora(model)
    layout = state_layout(model)
    names = layout.names()
    out_names = output_names(names)

    out_dir = os.path.abspath(out_dir)
    with atomic_folder(out_dir) as tmp:
        import onnx

        importance = None
        if quantize == "int4" and calibration is not None:
            from . import quantize as quantization

            importance = _importance_by_weight(StepGraph(model), quantization.input_importance(model, calibration))
        quantized = {}  # each matrix's blocks, rounded once for both graphs
        path = os.path.join(tmp, "model.onnx")
        _export_graph(StepGraph(model).eval(), model, path)
        onnx.checker.check_model(path)
        if quantize:
            _quantize_nbits(path, QUANTIZE[quantize], accuracy_level, model.args.vocab_size, importance, quantized,
                            progress)
        _basic_optimized(path)
        decode = build_decode_graph(model, bits=QUANTIZE.get(quantize), accuracy_level=accuracy_level,
                                    quantized=quantized, importance=importance)
        # its weights outside the protobuf (over 2 GB it could not be written), then into weights.bin
        onnx.save(decode, os.path.join(tmp, "decode.onnx"), save_as_external_data=True, location=DECODE_DATA,
                  size_threshold=INLINE_BYTES)
        del decode
        # the decode graph first: its stacked tensors hold the block graph's per-layer ones (_share_weights)
        paths = [os.path.join(tmp, f) for f in ("decode.onnx", "model.onnx")]
        external = _share_weights(paths, os.path.join(tmp, WEIGHTS_FILE))
        os.remove(os.path.join(tmp, DECODE_DATA))
        for path in paths:
            onnx.checker.check_model(path)
        tokenizer.save(tmp)
        args, lol = model.args, model.lolcats
        meta = {
            "format": "edge-lolcats-onnx", "format_version": FORMAT_VERSION, "source": source, "opset": OPSET,
            "decode_opset": DECODE_OPSET,
            "model_fingerprint": model_fingerprint(model),
            "weights": quantize or "f32", "accuracy_level": accuracy_level if quantize else None,
            "graph": "model.onnx", "decode_graph": "decode.onnx", "weights_file": WEIGHTS_FILE,
            "inputs": ["input_ids", "position", *names], "outputs": out_names,
            "logits": "last token only, [batch, vocab]",
            "layers": args.num_layers, "hidden_size": args.hidden_size, "vocab_size": args.vocab_size,
            "heads": args.num_heads, "kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
            "model_args": args.to_dict(),
            "window_size": lol["window_size"], "feature_dim": lol["feature_dim"], "feature_map": "hedgehog",
            "layer_kinds": list(layout.kinds), "recurrence": Recurrence.of(lol).to_dict(),
            "max_position_embeddings": args.max_position_embeddings,
            "state": {n: {"shape": s, "dtype": state_layout_names.DTYPE} for n, s in layout.shapes("batch").items()},
            "state_bytes_per_sequence": layout.bytes_per_sequence,
            "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": tokenizer.eos_token_ids,
            "chat_template": tokenizer.chat_template,
            "external_initializers": external,
        }
        with open(os.path.join(tmp, "model.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    return {"path": out_dir, "format": "onnx", "weights": meta["weights"], "bytes": size}

