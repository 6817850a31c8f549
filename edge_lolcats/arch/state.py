"""The recurrent state's layout, defined here once: its parts, their shapes, their names in
exported graphs and state files, and its size. The PyTorch model (``HybridState``), both
exporters, both runtime engines, state files and tests all read it from here.

Per hybrid layer i, for batch B, H query heads of dimension D, F features and a window of W::

    state.{i}.kv        [B, H, 2F, D]   sum over keys that left the window of phi_k(k) v^T
    state.{i}.z         [B, H, 2F]      sum of phi_k(k) over the same keys
    state.{i}.k_window  [B, H, W, D]    the last W keys (ring: position p in slot p % W)
    state.{i}.v_window  [B, H, W, D]    their values
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PARTS = ("kv", "z", "k_window", "v_window")
DTYPE = "float32"
PREFIX, NEW_PREFIX = "state.", "new_state."  # graph inputs / outputs


@dataclass(frozen=True)
class StateLayout:
    num_layers: int
    heads: int
    head_dim: int
    feature_dim: int
    window_size: int

    @classmethod
    def of(cls, args, lolcats: dict) -> "StateLayout":
        """The layout of a model described by ``args`` (ModelArgs) linearized with ``lolcats``."""
        return cls(args.num_layers, args.num_heads, args.head_dim, int(lolcats["feature_dim"]),
                   int(lolcats["window_size"]))

    def part_shapes(self) -> dict:
        """{part: shape without the batch axis} of one layer."""
        h, d, f, w = self.heads, self.head_dim, self.feature_dim, self.window_size
        return {"kv": (h, 2 * f, d), "z": (h, 2 * f), "k_window": (h, w, d), "v_window": (h, w, d)}

    def names(self) -> list:
        return [name(i, p) for i in range(self.num_layers) for p in PARTS]

    def shapes(self, batch=1) -> dict:
        """{state name: [batch, ...]} for every layer (``batch`` may be a symbolic name)."""
        parts = self.part_shapes()
        return {name(i, p): [batch, *parts[p]] for i in range(self.num_layers) for p in PARTS}

    @property
    def bytes_per_sequence(self) -> int:
        return 4 * self.num_layers * sum(math.prod(s) for s in self.part_shapes().values())


def name(layer: int, part: str) -> str:
    return f"{PREFIX}{layer}.{part}"


def output_name(state_name: str) -> str:
    """The graph output carrying a state input's new value."""
    return NEW_PREFIX + state_name[len(PREFIX):]
