"""The compact decode graph: one token of one sequence, built node by node with onnxruntime's
contrib ops instead of traced from PyTorch.

The decode graph traced from PyTorch (export format 5) paid per node: ~3,700 nodes after
onnxruntime's fusions, a quarter of the step in the weights' products and the rest in small ops
(norms left unfused, position tables rebuilt per layer; docs/BENCHMARKS.md, ``--onnx-profile``).
This graph computes the same step, :func:`edge_lolcats.arch.hybrid.decode_step` (and
:func:`edge_lolcats.arch.window.window_ring_step` at T = 1) inside :func:`edge_lolcats.arch.block.layer`,
with the same inputs and outputs, arranged for a graph runtime:

- norms as ``RMSNormalization`` (opset 23) and, with the residual add, ``SkipSimplifiedLayerNormalization``;
  q/k/v and gate/up as one product each (``MatMulNBits`` when quantized, the GGUF file's blocks);
- everything that depends only on the position (RoPE as [D, D] matrices, the ring slot, the
  masks, whether a key enters S) once per step, shared by the layers;
- the feature maps of the keys leaving the windows, which depend only on the input state, for all
  layers at once over stacked weights (:func:`_leaving_features`);
- the attention scale folded into the queries' rotation, the feature maps' +x and -x halves
  through one product and one Softmax, the window factor into phi_q, the decay lam a constant;
- the ring written with ``ScatterND`` at slot p % W (``Where`` on a one-hot slot, broadcast, was
  ~2x slower), the key leaving it read by one ``GatherND`` for every query head.

Tests hold it to the PyTorch model (the one definition) for every family and recurrence option,
through :class:`edge_lolcats.runtime.onnx_engine.OnnxEngine`.
"""
from __future__ import annotations

import numpy as np

from edge_lolcats.arch import state as state_names
from edge_lolcats.arch.hybrid import FEATURE_MAP_EPS, PRE_ROPE

OPSET = 23  # RMSNormalization (the standalone norms)
MS = "com.microsoft"
# initializers named so are stacks of per-layer tensors along their first axis (the export stores
# each layer's slice once, shared with the block graph's tensor of that layer)
STACKED = "layers."


class ExportError(ValueError):
    pass


def output_names(names: list[str]) -> list[str]:
    """Both graphs' outputs: the last token's logits, then each state input's new value."""
    return ["logits"] + [state_names.output_name(n) for n in names]


class _Graph:
    """Nodes and initializers under unique names."""

    def __init__(self):
        self.nodes, self.initializers, self._names, self._consts = [], [], set(), {}

    def _name(self, hint: str) -> str:
        name, n = hint, 0
        while name in self._names:
            n += 1
            name = f"{hint}_{n}"
        self._names.add(name)
        return name

    def const(self, value, hint: str, dtype=np.float32) -> str:
        """An initializer; the same small constant (a shape, a scalar) asked for again is the same one."""
        from onnx import numpy_helper

        array = np.array(value, dtype)
        key = (hint, array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is None or key not in self._consts:
            name = self._name(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            if key is None:
                return name
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list, hint: str = "", outputs: int = 1, domain: str = "", unused=(), **attrs):
        """The node's output name, or names when ``outputs`` > 1 (those in ``unused`` left empty:
        optional outputs not computed)."""
        from onnx import helper

        base = self._name(hint or op_type.lower())
        names = [base] if outputs == 1 else ["" if i in unused else f"{base}.{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=base, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names


class _Weights:
    """The products' weights: float32 [K, N] for MatMul, or MatMulNBits' blocks (``quantized``:
    {(quantize.weight_key(W), bits): (B, scales)}, shared with the traced block graph, so both
    graphs hold the same bytes and weights.bin keeps them once)."""

    def __init__(self, g: _Graph, bits: int | None, accuracy_level: int, quantized: dict, vocab_size: int,
                 importance: dict | None):
        self.g, self.bits, self.level, self.quantized, self.vocab = g, bits, accuracy_level, quantized, vocab_size
        self.importance = importance

    def linear(self, x: str, w: np.ndarray, bias: np.ndarray | None, hint: str) -> str:
        """x [..., K] @ w.T (+ bias); w [N, K] float32."""
        from . import nbits, quantize

        n, k = w.shape
        if self.bits is None or k % nbits.BLOCK:
            y = self.g.op("MatMul", [x, self.g.const(w.T, hint + ".weight")], hint)
        else:
            bits = 8 if n == self.vocab else self.bits  # the vocabulary projection: 8 bits always
            key = (quantize.weight_key(w), bits)
            if key not in self.quantized:
                weights = None
                if bits == 4 and self.importance is not None:
                    weights = self.importance.get(key[0])
                    if weights is None:
                        raise ExportError(f"no calibration for {hint} {list(w.shape)}")
                raw = quantize.quantize(w, "q8_0" if bits == 8 else "q4_0", weights)
                self.quantized[key] = nbits.from_gguf(raw, bits)
            packed, scales = self.quantized[key]
            y = self.g.op("MatMulNBits", [x, self.g.const(packed, hint + ".nbits", np.uint8),
                                          self.g.const(scales, hint + ".scales")], hint, domain=MS,
                          K=k, N=n, bits=bits, block_size=nbits.BLOCK, accuracy_level=self.level)
        return y if bias is None else self.g.op("Add", [y, self.g.const(bias, hint + ".bias")], hint + "_bias")


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _linear_parts(parent, names) -> tuple[np.ndarray, np.ndarray | None]:
    """The Linears ``names`` of ``parent`` side by side: (W [sum N, K], bias or None)."""
    mods = [getattr(parent, n) for n in names]
    w = np.concatenate([_np(m.weight) for m in mods])
    bias = np.concatenate([_np(m.bias) for m in mods]) if mods[0].bias is not None else None
    return w, bias


def _rope_constants(rot: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, S, P) [D, D] with x @ R(p) = x @ (E * cos_p + S * sin_p + P), cos_p / sin_p [D] zero past
    ``rot`` (transformers' rotate_half as a matrix, the dims past ``rot`` passed unchanged)."""
    half = rot // 2
    e, s, p = np.zeros((d, d), np.float32), np.zeros((d, d), np.float32), np.zeros((d, d), np.float32)
    e[np.arange(rot), np.arange(rot)] = 1.0
    s[np.arange(half) + half, np.arange(half)] = -1.0
    s[np.arange(half), np.arange(half) + half] = 1.0
    p[np.arange(rot, d), np.arange(rot, d)] = 1.0
    return e, s, p


class _Step:
    """What depends only on the position, built once per step."""

    def __init__(self, g: _Graph, args, layout):
        self.g, self.args, self.layout = g, args, layout
        self.position = "position"
        self._cache = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def int_const(self, value: int) -> str:
        return self._once(("int", value), lambda: self.g.const(np.int64(value), f"i{value}", np.int64))

    def shifted(self, kind: str, w: int, n_s: int) -> str:
        """An int64 scalar position: ``"back"`` W - p (a leaving key rotated back), ``"sink"``
        min(p, W + n_s - 1) (the queries' position against the sinks)."""
        g, p = self.g, self.position
        if kind == "back":
            return self._once(("back", w), lambda: g.op("Sub", [self.int_const(w), p], "back_position"))
        return self._once(("sink", w, n_s), lambda: g.op("Min", [p, self.int_const(w + n_s - 1)], "sink_position"))

    def rope(self, layer_type: str, position: str, scale: float = 1.0) -> str:
        """RoPE of the layer type at ``position`` as a [D, D] matrix (times ``scale``: the matrix at
        the same position, scaled, not built again)."""
        g = self.g
        if scale != 1.0:
            return self._once(("rope", layer_type, position, scale), lambda: g.op(
                "Mul", [self.rope(layer_type, position), g.const(np.float32(scale), "rope_scale")], "rope_scaled"))

        def build():
            d = self.args.head_dim
            inv_freq = np.asarray(self.args.rope[layer_type].inv_freq(), np.float32)
            rot = 2 * inv_freq.size
            angles = g.op("Mul", [g.op("Cast", [position], "position_f", to=1), g.const(inv_freq, "inv_freq")], "angles")
            emb = g.op("Concat", [angles, angles] + ([g.const(np.zeros(d - rot), "rope_pad")] if d > rot else []),
                       "angles2", axis=0)
            e, s, p = _rope_constants(rot, d)
            r = g.op("Add", [g.op("Mul", [g.const(e, "rope_e"), g.op("Cos", [emb], "cos")], "rope_cos"),
                             g.op("Mul", [g.const(s, "rope_s"), g.op("Sin", [emb], "sin")], "rope_sin")], "rope")
            return r if d == rot else g.op("Add", [r, g.const(p, "rope_pass")], "rope")
        return self._once(("rope", layer_type, position, 1.0), build)

    def _slot(self, w: int) -> str:
        """p % W as a [1] int64 tensor."""
        g = self.g
        return self._once(("slot", w), lambda: g.op(
            "Unsqueeze", [g.op("Mod", [self.position, self.int_const(w)], f"slot{w}"), g.const([0], "axis0", np.int64)],
            f"slot{w}_1"))

    def ring(self, w: int) -> tuple[str, str]:
        """(ScatterND's indices [1, Hkv, 1, 3] of slot p % W in every KV head, additive mask [W]: 0
        where the slot holds a key once the new one is in, else -inf) for a ring of W."""
        def build():
            g, p, hkv = self.g, self.position, self.args.num_kv_heads
            slots = g.const(np.arange(w), f"slots{w}", np.int64)
            heads = np.zeros((1, hkv, 1, 3), np.int64)
            heads[0, :, 0, 1] = np.arange(hkv)
            indices = g.op("Add", [g.const(heads, "ring_heads", np.int64),
                                   g.op("Mul", [self._slot(w), g.const([0, 0, 1], "slot_axis", np.int64)], f"slot{w}_index")],
                           f"ring_indices{w}")
            mask = g.op("Where", [g.op("LessOrEqual", [slots, p], f"filled{w}"), g.const(0.0, "zero"),
                                  g.const(-np.inf, "minus_inf")], f"mask{w}")
            return indices, mask
        return self._once(("ring", w), build)

    def leaving(self, w: int) -> str:
        """GatherND's indices [1, H, 1, 2] (batch_dims 1) of the key leaving a ring of W, slot p % W,
        for every query head from its KV head: [1, Hkv, W, D] -> [1, H, 1, D] in one node."""
        def build():
            g, h, hkv = self.g, self.args.num_heads, self.args.num_kv_heads
            heads = np.zeros((1, h, 1, 2), np.int64)
            heads[0, :, 0, 0] = np.arange(h) // (h // hkv)
            return g.op("Add", [g.const(heads, "leaving_heads", np.int64),
                                g.op("Mul", [self._slot(w), g.const([0, 1], "leaving_axis", np.int64)], f"leaving{w}_slot")],
                        f"leaving_indices{w}")
        return self._once(("leaving", w), build)

    def past_window(self, w: int) -> str:
        """p - W: the position of the key leaving the window."""
        return self._once(("past", w), lambda: self.g.op("Sub", [self.position, self.int_const(w)], "past_window"))

    def sinks(self, w: int, n_s: int) -> tuple[str, str]:
        """(one-hot [n_s, 1] of the sink slot the new key is written to (none once p >= n_s),
        additive mask [n_s]: 0 for the sinks the window has passed, else -inf)."""
        def build():
            g, p = self.g, self.position
            slots = g.const(np.arange(n_s), f"sink_slots{n_s}", np.int64)
            one_hot = g.op("Unsqueeze", [g.op("Equal", [slots, p], "is_sink_slot"), g.const([1], "axis1", np.int64)],
                           "sink_one_hot")
            mask = g.op("Where", [g.op("LessOrEqual", [slots, self.past_window(w)], "sink_active"), g.const(0.0, "zero"),
                                  g.const(-np.inf, "minus_inf")], "sink_mask")
            return one_hot, mask
        return self._once(("sinks", w, n_s), build)

    def enters(self, w: int, n_s: int) -> str:
        """1.0 when the key leaving the window enters S and z (p - W >= n_s), else 0.0."""
        def build():
            g = self.g
            return g.op("Cast", [g.op("GreaterOrEqual", [self.past_window(w), self.int_const(n_s)], "enters_b")],
                        "enters", to=1)
        return self._once(("enters", w, n_s), build)


def _feature_map(g: _Graph, x: str, weight: np.ndarray, hint: str, times: str | None = None,
                 weight_name: str | None = None) -> str:
    """Hedgehog on x [..., H, 1, D] with weight [..., H, D, F] (arch.hybrid.feature_map), as
    [..., H, 2, F]: the halves softmax(xW) and softmax(-xW) on the length-1 axis, so that one
    product and one Softmax take both (x times a [+1, -1] column: -(xW) = (-x)W exactly), times
    ``times`` if given. Reshaped to [..., H, 1, 2F] this is phi in arch.hybrid's order. (Weights
    [W, -W] would save the sign's node at twice the weights read.)"""
    signed = g.op("Mul", [x, g.const(np.array([1.0, -1.0])[None, None, :, None], "signs")], hint + "_signed")
    proj = g.op("MatMul", [signed, g.const(weight, weight_name or hint + ".weight")], hint)
    phi = g.op("Max", [g.op("Softmax", [proj], hint + "_softmax", axis=-1),
                       g.const(np.float32(FEATURE_MAP_EPS), "feature_eps")], hint + "_phi")
    return phi if times is None else g.op("Mul", [phi, times], hint + "_times")


def _leaving_features(g: _Graph, step: _Step, model, layout, shape) -> dict:
    """{hybrid layer: (phi of the key leaving its window as a column [1, H, 2F, 1] (zero unless
    it enters S and z), the value leaving [1, H, 1, D])}.

    The key and value at slot p % W (position p - W) come from the input state alone, so the
    feature maps of all hybrid layers are one chain of nodes over the stacked keys and weights
    [L, H, D, F], not one per layer: each layer's own product read its 2 x 147 KB of weights cold
    (evicted by the streamed matrices) at ~5 GB/s, a stacked one streams them (docs/BENCHMARKS.md)."""
    from edge_lolcats.nn.model import HybridAttention

    args, inner = model.args, model.model
    hybrid = [i for i, layer in enumerate(inner.layers) if isinstance(layer.self_attn, HybridAttention)]
    if not hybrid:
        return {}
    w, n_s, f2 = layout.window_size, layout.sink_tokens, 2 * layout.feature_dim
    keys, out = [], {}
    for i in hybrid:
        _, _, k_window, v_window, *_ = layout.layer_names(i)
        # [1, Hkv, W, D] -> [1, H, 1, D]: slot p % W of every query head's KV head, in one node
        keys.append(g.op("GatherND", [k_window, step.leaving(w)], f"l{i}.k_leave", batch_dims=1))
        out[i] = g.op("GatherND", [v_window, step.leaving(w)], f"l{i}.v_leave", batch_dims=1)
    k_leave = g.op("Concat", keys, "k_leaving", axis=0) if len(keys) > 1 else keys[0]  # [L, H, 1, D]
    if inner.layers[hybrid[0]].self_attn.recurrence.feature_maps == PRE_ROPE:
        # stored rotated at p - W: rotated back, by each layer type's RoPE
        types = [args.layer_types[i] for i in hybrid]
        back = step.shifted("back", w, n_s)
        if len(set(types)) == 1:
            rope_back = step.rope(types[0], back)
        else:
            axes = g.const([0, 1], "axes01", np.int64)
            rope_back = g.op("Concat", [g.op("Unsqueeze", [step.rope(t, back), axes], "rope_back_layer") for t in types],
                             "rope_back_layers", axis=0)  # [L, 1, D, D]
        k_leave = g.op("MatMul", [k_leave, rope_back], "k_leaving_back")
    weights = np.stack([_np(inner.layers[i].self_attn.feature_map_k.weight) for i in hybrid])
    phi = _feature_map(g, k_leave, weights, "phi_k", times=step.enters(w, n_s), weight_name=STACKED + "phi_k.weight")
    columns = g.op("Reshape", [phi, shape([len(hybrid), args.num_heads, f2, 1], "shape_columns")], "phi_k_columns")
    parts = ([columns] if len(hybrid) == 1 else
             g.op("Split", [columns, g.const([1] * len(hybrid), "layer_sizes", np.int64)], "phi_k_layers",
                  outputs=len(hybrid), axis=0))
    return {i: (part, out[i]) for i, part in zip(hybrid, parts)}


def build_decode_graph(model, *, bits: int | None = None, accuracy_level: int = 4, quantized: dict | None = None,
                       importance: dict | None = None):
    """The compact decode graph (an onnx.ModelProto) of a linearized model (float32, LoRA merged):
    inputs ``input_ids`` [1, 1], ``position`` [] and the state; outputs the logits [1, V] and the
    new state, as :func:`output_names`. ``bits`` 8 / 4: products as MatMulNBits with
    the q8_0 / q4_0 GGUF blocks (``quantized`` caches them across graphs; ``importance`` weights
    q4_0's rounding as the GGUF exporter does)."""
    from onnx import TensorProto, helper

    from edge_lolcats.nn.model import HybridAttention, WindowAttention, state_layout

    args = model.args
    layout = state_layout(model)
    g = _Graph()
    step = _Step(g, args, layout)
    weights = _Weights(g, bits, accuracy_level, {} if quantized is None else quantized, args.vocab_size, importance)
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    group = h // hkv
    eps = float(args.norm_eps)
    inner = model.model

    def norm_gamma(module, hint):
        return g.const(_np(module.weight) + np.float32(args.norm_offset), hint)

    def shape(dims, hint):
        return g.const(np.array(dims, np.int64), hint, np.int64)

    def softcap(x, cap, hint):
        if not cap:
            return x
        c = g.const(np.float32(cap), hint + ".cap")
        return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c], hint + "_div")], hint + "_tanh"), c], hint + "_capped")

    # the embedding: GatherBlockQuantized over the q8_0 rows when quantized, as the traced graph
    table = _np(inner.embed_tokens.weight)
    if bits is not None and table.shape[1] % 32 == 0:
        from . import nbits, quantize

        packed, scales = nbits.from_gguf(quantize.reference(table, "q8_0"), 8)
        x = g.op("GatherBlockQuantized", [g.const(packed.reshape(len(packed), -1), "embed.nbits", np.uint8), "input_ids",
                                          g.const(scales, "embed.scales")], "embed", domain=MS, bits=8,
                 block_size=nbits.BLOCK, gather_axis=0, quantize_axis=1)
    else:
        x = g.op("Gather", [g.const(table, "embed.weight"), "input_ids"], "embed", axis=0)
    if args.embedding_scale != 1.0:
        x = g.op("Mul", [x, g.const(np.float32(args.embedding_scale), "embed.scale")], "embed_scaled")

    def attend_softmax(scores, values, hint):
        """(sum_j e_j v_j [1, Hkv, G, D], sum_j e_j [1, Hkv, G, 1]), e = exp(scores - max)."""
        top = g.op("ReduceMax", [scores, g.const([-1], "axis_last", np.int64)], hint + "_max", keepdims=1)
        e = g.op("Exp", [g.op("Sub", [scores, top], hint + "_shifted")], hint + "_exp")
        total = g.op("ReduceSum", [e, g.const([-1], "axis_last", np.int64)], hint + "_sum", keepdims=1)
        return g.op("MatMul", [e, values], hint + "_values"), total

    def scores_of(q_scaled, keys, cap, mask, hint):
        """q [1, H, 1, D] (scale folded in) against keys [1, Hkv, N, D]: [1, Hkv, G, N] + mask."""
        qg = q_scaled if group == 1 else g.op("Reshape", [q_scaled, shape([1, hkv, group, d], "shape_groups")], hint + "_q")
        s = g.op("MatMul", [qg, g.op("Transpose", [keys], hint + "_keys", perm=[0, 1, 3, 2])], hint)
        return g.op("Add", [softcap(s, cap, hint), mask], hint + "_masked")

    outputs = {}
    names = layout.names()
    leaving = _leaving_features(g, step, model, layout, shape)
    residual, delta = x, None
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        prefix = f"l{i}."
        gamma = norm_gamma(layer.attn_norm, prefix + "attn_norm")
        if delta is None:
            normed = g.op("RMSNormalization", [residual, gamma], prefix + "attn_normed", axis=-1, epsilon=eps)
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [residual, delta, gamma],
                                          prefix + "attn_normed", outputs=4, unused=(1, 2), domain=MS, epsilon=eps)
        w, b = _linear_parts(attn, ("q_proj", "k_proj", "v_proj"))
        qkv = weights.linear(normed, w, b, prefix + "qkv")
        # heads first, then split: q [1, H, 1, D], k and v [1, Hkv, 1, D] (T = 1: no transpose)
        qkv = g.op("Reshape", [qkv, shape([1, h + 2 * hkv, 1, d], "shape_qkv")], prefix + "qkv_heads")
        q, k, v = g.op("Split", [qkv, g.const([h, hkv, hkv], "qkv_heads", np.int64)], prefix + "qkv_split",
                       outputs=3, axis=1)
        if args.qk_norm:
            q = g.op("RMSNormalization", [q, norm_gamma(attn.q_norm, prefix + "q_norm")], prefix + "q_normed",
                     axis=-1, epsilon=eps)
            k = g.op("RMSNormalization", [k, norm_gamma(attn.k_norm, prefix + "k_norm")], prefix + "k_normed",
                     axis=-1, epsilon=eps)
        layer_type = args.layer_types[i]
        here = step.rope(layer_type, "position")
        scale = float(attn.scale)
        state_in = layout.layer_names(i)
        if isinstance(attn, WindowAttention):
            k_ring, v_ring = state_in
            wb = layout.base_window
            slot_index, mask = step.ring(wb)
            q_s = g.op("MatMul", [q, step.rope(layer_type, "position", scale)], prefix + "q_rot")
            k_rot = g.op("MatMul", [k, here], prefix + "k_rot")
            k_new = g.op("ScatterND", [k_ring, slot_index, k_rot], prefix + "k_ring")
            v_new = g.op("ScatterND", [v_ring, slot_index, v], prefix + "v_ring")
            soft, total = attend_softmax(scores_of(q_s, k_new, attn.softcap, mask, prefix + "scores"), v_new,
                                         prefix + "soft")
            out = g.op("Div", [soft, total], prefix + "attn")
            new_state = [k_new, v_new]
        elif isinstance(attn, HybridAttention):
            rec = attn.recurrence
            w, n_s = layout.window_size, layout.sink_tokens
            kv, z, k_window, v_window, *sinks = state_in
            slot_index, mask = step.ring(w)
            pre = rec.feature_maps == PRE_ROPE
            if pre:  # phi on q and k as they are; the softmax reads them rotated
                q_s = g.op("MatMul", [q, step.rope(layer_type, "position", scale)], prefix + "q_rot")
                k_rot = g.op("MatMul", [k, here], prefix + "k_rot")
            else:  # the first models: phi on the rotated q and k
                q = g.op("MatMul", [q, here], prefix + "q_rotated")
                k = k_rot = g.op("MatMul", [k, here], prefix + "k_rot")
                q_s = g.op("Mul", [q, g.const(np.float32(scale), "attn_scale")], prefix + "q_rot")
            # the key leaving the window enters S and z (its feature map: _leaving_features)
            phi_k, v_leave = leaving[i]
            f2 = 2 * layout.feature_dim
            update = g.op("MatMul", [phi_k, v_leave], prefix + "kv_update")
            z_update = g.op("Reshape", [phi_k, shape([1, h, f2], "shape_row")], prefix + "z_update")
            if attn.log_decay is not None:
                lam = np.exp(_np(attn.log_decay))
                kv = g.op("Mul", [kv, g.const(lam[:, None, None], prefix + "lam3")], prefix + "kv_decayed")
                z = g.op("Mul", [z, g.const(lam[:, None], prefix + "lam2")], prefix + "z_decayed")
            kv_new = g.op("Add", [kv, update], prefix + "kv")
            z_new = g.op("Add", [z, z_update], prefix + "z")
            k_new = g.op("ScatterND", [k_window, slot_index, k_rot], prefix + "k_window")
            v_new = g.op("ScatterND", [v_window, slot_index, v], prefix + "v_window")
            scores = scores_of(q_s, k_new, attn.softcap, mask, prefix + "scores")
            values = v_new
            new_state = [kv_new, z_new, k_new, v_new]
            if n_s:
                sink_hot, sink_mask = step.sinks(w, n_s)
                ks_new = g.op("Where", [sink_hot, k_rot, sinks[0]], prefix + "k_sink")
                vs_new = g.op("Where", [sink_hot, v, sinks[1]], prefix + "v_sink")
                q_sink = (g.op("MatMul", [q, step.rope(layer_type, step.shifted("sink", w, n_s), scale)], prefix + "q_sink")
                          if pre else q_s)
                scores = g.op("Concat", [scores, scores_of(q_sink, ks_new, attn.softcap, sink_mask, prefix + "sink_scores")],
                              prefix + "all_scores", axis=-1)
                values = g.op("Concat", [v_new, vs_new], prefix + "values", axis=2)
                new_state += [ks_new, vs_new]
            soft, total = attend_softmax(scores, values, prefix + "soft")
            soft = g.op("Reshape", [soft, shape([1, h, 1, d], "shape_q")], prefix + "soft_heads")
            total = g.op("Reshape", [total, shape([1, h, 1, 1], "shape_h111")], prefix + "total_heads")
            # o = (a soft + phi_q S) / (a total + phi_q z) with a = sigmoid(window_factor): numerator and
            # denominator divided by a, so 1 / a scales phi_q (one node, not one on each softmax sum)
            a = 1.0 / (1.0 + np.exp(-_np(attn.window_factor).astype(np.float64)))
            phi_q = _feature_map(g, q, _np(attn.feature_map_q.weight), prefix + "phi_q",
                                times=g.const((1.0 / a)[None, :, None, None], prefix + "inverse_window_factor"))
            phi_q = g.op("Reshape", [phi_q, shape([1, h, 1, f2], "shape_h12f")], prefix + "phi_q_row")
            num = g.op("Add", [soft, g.op("MatMul", [phi_q, kv_new], prefix + "linear_num")], prefix + "num")
            z_col = g.op("Reshape", [z_new, shape([1, h, f2, 1], "shape_col")], prefix + "z_col")
            den = g.op("Add", [total, g.op("MatMul", [phi_q, z_col], prefix + "linear_den")], prefix + "den")
            out = g.op("Div", [num, den], prefix + "attn")
        else:
            raise TypeError(f"layer {i}: {type(attn).__name__} has no compact decode graph")
        for name, value in zip(state_in, new_state):
            outputs[name] = value
        out = g.op("Reshape", [out, shape([1, 1, h * d], "shape_merged")], prefix + "attn_merged")
        a = weights.linear(out, _np(attn.o_proj.weight), None if attn.o_proj.bias is None else _np(attn.o_proj.bias),
                           prefix + "o")
        if args.sandwich_norms:
            a = g.op("RMSNormalization", [a, norm_gamma(layer.attn_post_norm, prefix + "attn_post_norm")],
                     prefix + "attn_post", axis=-1, epsilon=eps)
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                      [residual, a, norm_gamma(layer.ffn_norm, prefix + "ffn_norm")],
                                      prefix + "ffn_normed", outputs=4, unused=(1, 2), domain=MS, epsilon=eps)
        w, b = _linear_parts(layer.mlp, ("gate_proj", "up_proj"))
        gate, up = g.op("Split", [weights.linear(normed, w, b, prefix + "gate_up"),
                                  g.const([args.intermediate_size] * 2, "mlp_sizes", np.int64)], prefix + "gate_up_split",
                        outputs=2, axis=-1)
        if args.activation == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], prefix + "sigmoid")], prefix + "silu")
        elif args.activation == "gelu_tanh":
            act = g.op("FastGelu", [gate], prefix + "gelu", domain=MS)
        else:
            raise TypeError(f"activation {args.activation!r} has no compact decode graph")
        down = layer.mlp.down_proj
        m = weights.linear(g.op("Mul", [act, up], prefix + "gated"), _np(down.weight),
                           None if down.bias is None else _np(down.bias), prefix + "down")
        if args.sandwich_norms:
            m = g.op("RMSNormalization", [m, norm_gamma(layer.ffn_post_norm, prefix + "ffn_post_norm")],
                     prefix + "ffn_post", axis=-1, epsilon=eps)
        delta = m
    normed, *_ = g.op("SkipSimplifiedLayerNormalization", [residual, delta, norm_gamma(inner.norm, "final_norm")],
                      "final_normed", outputs=4, unused=(1, 2), domain=MS, epsilon=eps)
    head = model.lm_head.weight if model.lm_head is not None else inner.embed_tokens.weight
    logits = weights.linear(normed, _np(head), None, "lm_head")
    logits = softcap(g.op("Reshape", [logits, shape([1, args.vocab_size], "shape_logits")], "logits_2d"),
                     args.final_softcap, "final")
    # the outputs under their own names: their producers renamed (an Identity node per state part
    # copied the whole state again, ~10% of the step)
    out_names = output_names(names)
    renamed = {logits: "logits", **{outputs[n]: o for n, o in zip(names, out_names[1:])}}
    if len(renamed) != len(out_names) or set(renamed) & set(names):
        raise ValueError("a state part passes through unchanged: its output needs a copy")
    for node in g.nodes:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    shapes = layout.shapes(1)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1]),
              helper.make_tensor_value_info("position", TensorProto.INT64, [])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in names]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, args.vocab_size])]
    graph_outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[n]) for n, o in zip(names, out_names[1:])]
    graph = helper.make_graph(g.nodes, "edge_lolcats_decode", inputs, graph_outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                             producer_name="edge-lolcats")

