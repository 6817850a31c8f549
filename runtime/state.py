"""The recurrent state the runtime engines carry: named float32 arrays plus the position.

Names follow the ONNX graph (``state.{i}.kv``, ``state.{i}.z``, ``state.{i}.k_window``,
``state.{i}.v_window``), so both engines keep the same state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATE_PARTS = ("kv", "z", "k_window", "v_window")


@dataclass
class State:
    tensors: dict  # name -> np.ndarray [B, ...]
    position: int  # tokens seen

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())


def empty_state(layers: int, heads: int, head_dim: int, feature_dim: int, window_size: int, batch: int = 1) -> State:
    shapes = {"kv": (heads, 2 * feature_dim, head_dim), "z": (heads, 2 * feature_dim),
              "k_window": (heads, window_size, head_dim), "v_window": (heads, window_size, head_dim)}
    return State({f"state.{i}.{p}": np.zeros((batch,) + shapes[p], np.float32)
                  for i in range(layers) for p in STATE_PARTS}, 0)
