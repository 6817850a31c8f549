"""The recurrent state's layout, defined here once: its parts, their shapes, their names in
exported graphs and state files, and its size. The PyTorch model (``HybridState``, ``RingState``),
both exporters, both runtime engines, state files and tests all read it from here.

Each layer of a linearized model is one of two kinds (``lolcats["layers"]``):

- ``hybrid`` (:data:`HYBRID`): the LoLCATs hybrid attention (arch.hybrid). For batch B, H query
  heads and Hkv key/value heads of dimension D, F features, a window of W and n_s sink tokens::

    state.{i}.kv        [B, H, 2F, D]   sum over keys that left the window of phi_k(k) v^T (decayed)
    state.{i}.z         [B, H, 2F]      sum of phi_k(k) over the same keys
    state.{i}.k_window  [B, Hkv, W, D]  the last W keys after RoPE (ring: position p in slot p % W)
    state.{i}.v_window  [B, Hkv, W, D]  their values
    state.{i}.k_sink    [B, Hkv, n_s, D] the first n_s keys after RoPE (only when n_s > 0)
    state.{i}.v_sink    [B, Hkv, n_s, D]

- ``window`` (:data:`WINDOW`): a layer that is sliding-window softmax in the base model (Gemma's
  local layers, Mistral), kept as it is over a fixed ring of its own window Wb, per KV head::

    state.{i}.k_ring    [B, Hkv, Wb, D] the last Wb keys, after RoPE (position p in slot p % Wb)
    state.{i}.v_ring    [B, Hkv, Wb, D]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

HYBRID, WINDOW = "hybrid", "window"
PARTS = ("kv", "z", "k_window", "v_window")  # a hybrid layer's
SINK_PARTS = ("k_sink", "v_sink")  # and, with sink tokens, these
RING_PARTS = ("k_ring", "v_ring")  # a kept window layer's
DTYPE = "float32"
PREFIX, NEW_PREFIX = "state.", "new_state."  # graph inputs / outputs


@dataclass(frozen=True)
class StateLayout:
    num_layers: int
    heads: int
    head_dim: int
    feature_dim: int
    window_size: int
    kinds: tuple = ()  # per layer HYBRID or WINDOW; () means every layer HYBRID
    kv_heads: int = 0  # rings keep KV heads only; 0 means as many as query heads
    base_window: int = 0  # a WINDOW layer's ring length
    sink_tokens: int = 0  # a HYBRID layer's sinks

    def __post_init__(self):
        if not self.kinds:
            object.__setattr__(self, "kinds", (HYBRID,) * self.num_layers)
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)

    @classmethod
    def of(cls, args, lolcats: dict) -> "StateLayout":
        """The layout of a model described by ``args`` (ModelArgs) linearized with ``lolcats``."""
        from .hybrid import Recurrence

        kinds = tuple(lolcats.get("layers") or (HYBRID,) * args.num_layers)
        return cls(args.num_layers, args.num_heads, args.head_dim, int(lolcats["feature_dim"]),
                   int(lolcats["window_size"]), kinds, args.num_kv_heads, int(args.sliding_window or 0),
                   Recurrence.of(lolcats).sink_tokens)

    def part_shapes(self, layer: int = 0) -> dict:
        """{part: shape without the batch axis} of one layer."""
        h, hkv, d, f, w, n_s = self.heads, self.kv_heads, self.head_dim, self.feature_dim, self.window_size, self.sink_tokens
        if self.kinds[layer] == WINDOW:
            return {"k_ring": (hkv, self.base_window, d), "v_ring": (hkv, self.base_window, d)}
        shapes = {"kv": (h, 2 * f, d), "z": (h, 2 * f), "k_window": (hkv, w, d), "v_window": (hkv, w, d)}
        return {**shapes, "k_sink": (hkv, n_s, d), "v_sink": (hkv, n_s, d)} if n_s else shapes

    def layer_names(self, layer: int) -> list:
        return [name(layer, p) for p in self.part_shapes(layer)]

    def names(self) -> list:
        return [n for i in range(self.num_layers) for n in self.layer_names(i)]

    def shapes(self, batch=1) -> dict:
        """{state name: [batch, ...]} for every layer (``batch`` may be a symbolic name)."""
        return {name(i, p): [batch, *s] for i in range(self.num_layers) for p, s in self.part_shapes(i).items()}

    def offsets(self) -> dict:
        """{state name: (offset, shape without the batch axis)} of every part laid end to end in one
        sequence's flat float32 buffer, layer by layer in :meth:`part_shapes` order (the compiled
        engine keeps a sequence's state as one such buffer)."""
        out, offset = {}, 0
        for i in range(self.num_layers):
            for part, shape in self.part_shapes(i).items():
                out[name(i, part)] = (offset, shape)
                offset += math.prod(shape)
        return out

    @property
    def size_per_sequence(self) -> int:
        """Floats in one sequence's state."""
        return sum(math.prod(s) for i in range(self.num_layers) for s in self.part_shapes(i).values())

    @property
    def bytes_per_sequence(self) -> int:
        return 4 * self.size_per_sequence


def name(layer: int, part: str) -> str:
    return f"{PREFIX}{layer}.{part}"


def output_name(state_name: str) -> str:
    """The graph output carrying a state input's new value."""
    return NEW_PREFIX + state_name[len(PREFIX):]
