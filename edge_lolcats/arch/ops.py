"""The array namespaces the block runs on: :data:`NUMPY` (the torch-free runtime) and
:class:`TorchOps` (the PyTorch model, training, ONNX tracing). Both spell the same few operations;
how a backend stores a linear layer's weight is its own business (``linear``/``linears``).

torch is imported only when a :class:`TorchOps` is made, so the runtime can import this module.
"""
from __future__ import annotations

import math

import numpy as np

_GELU_C = math.sqrt(2.0 / math.pi)


class NumpyOps:
    """numpy arrays, float32. A linear weight is any object with ``rmatmul(x) -> x @ W.T`` (and
    ``bias``); a parent module may offer ``fused[names] = (weight, sizes)`` to do several at once."""

    name = "numpy"

    @staticmethod
    def asarray(a):
        return np.asarray(a)

    @staticmethod
    def rsqrt(x):
        return 1.0 / np.sqrt(x)

    @staticmethod
    def mean(x, axis):
        return x.mean(axis, keepdims=True)

    @staticmethod
    def norm_weight(w):
        return w

    tanh, cos, sin = staticmethod(np.tanh), staticmethod(np.cos), staticmethod(np.sin)

    @staticmethod
    def outer(positions, inv_freq):
        # float64 angles, then float32 tables: exact far past the positions float32 can count
        return np.outer(np.asarray(positions, np.float64), inv_freq.astype(np.float64)).astype(np.float32)

    @staticmethod
    def concat(parts, axis):
        return np.concatenate(parts, axis)

    @staticmethod
    def embedding(table, ids):
        return table.rows(ids)

    @staticmethod
    def scalar_like(x, value):
        return np.float32(value)

    @staticmethod
    def linear(w, x):
        return w.rmatmul(x)

    @classmethod
    def linears(cls, parent, names, x):
        fused = getattr(parent, "fused", None) or {}
        if names in fused:
            weight, sizes = fused[names]
            return np.split(weight.rmatmul(x), np.cumsum(sizes)[:-1], axis=-1)
        return [cls.linear(getattr(parent, n), x) for n in names]

    @staticmethod
    def split_heads(x, heads, head_dim):  # [B, T, H * D] -> [B, H, T, D]
        b, t, _ = x.shape
        return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)

    @staticmethod
    def merge_heads(x):  # [B, H, T, D] -> [B, T, H * D]
        b, h, t, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)

    @staticmethod
    def arange(n):
        return np.arange(n)

    @staticmethod
    def take(x, index, axis):
        return np.take(x, index, axis=axis)

    where, exp = staticmethod(np.where), staticmethod(np.exp)

    @staticmethod
    def amax(x, axis):
        return x.max(axis, keepdims=True)

    @staticmethod
    def sum(x, axis):
        return x.sum(axis, keepdims=True)

    @staticmethod
    def swap_last(x):
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def repeat_heads(x, heads):  # [B, Hkv, ...] -> [B, H, ...], query head h reads kv head h // (H / Hkv)
        return x if x.shape[1] == heads else np.repeat(x, heads // x.shape[1], axis=1)

    @staticmethod
    def maximum(x, value):
        return np.maximum(x, value)

    @staticmethod
    def minimum(x, value):
        return np.minimum(x, value)

    @staticmethod
    def softmax(x, axis):
        x = x - x.max(axis, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis, keepdims=True)
        return x

    @staticmethod
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    @staticmethod
    def as_float(x, like):
        """x (bools, integers) in ``like``'s float dtype."""
        return np.asarray(x).astype(like.dtype)

    @staticmethod
    def read_slot(x, slot):  # [B, H, N, D] -> a copy of [B, H, 1, D] at index ``slot`` of axis 2
        return x[:, :, slot : slot + 1].copy()

    @staticmethod
    def decay_add(acc, decay, update):
        """acc * decay + update (decay None: 1), in place: the decode step's state sums, whose
        arrays the runtime owns (one pass over them instead of three and two temporaries)."""
        if decay is not None:
            acc *= decay
        acc += update
        return acc

    @staticmethod
    def write_slot(x, slot, value):
        """x with index ``slot`` of axis 2 set to value [B, H, 1, D], in place (no-op out of range)."""
        if 0 <= slot < x.shape[2]:
            x[:, :, slot] = value[:, :, 0]
        return x

    @staticmethod
    def activation(name, x):
        if name == "silu":
            return x / (1 + np.exp(-x))
        return 0.5 * x * (1 + np.tanh(np.float32(_GELU_C) * (x + np.float32(0.044715) * x * x * x)))


NUMPY = NumpyOps()

ACTIVATION_BLOCK = 32  # elements per scale of quantized activations (q8_0's block)
# how the runtime's products with q8_0 / q4_0 weights take their input: quantized as below (the
# default, as llama.cpp), or float32
ACTIVATIONS = ("q8_0", "float32")


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., K] (float32) as a product with q8_0 or q4_0 weights takes it: in blocks of 32 along
    K, each quantized to 8 bits as q8_0 stores weights (what llama.cpp's CPU products and
    onnxruntime's MatMulNBits at accuracy_level 4 do, so that the sums are int8 dot products).
    Returns q (int8 [..., K]) and d (float32 [..., K / 32]) with x ~ q d:

        d = max|x_b| / 127,  q = round(x (1 / d)), ties to even (0 where d = 0)

    in float32 arithmetic, which every backend reproduces exactly (the rounding is the definition;
    the products after it differ only in the order of float32 sums)."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] % ACTIVATION_BLOCK:
        raise ValueError(f"quantized activations come in blocks of {ACTIVATION_BLOCK}; got {x.shape[-1]} elements")
    blocks = x.reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    d = np.abs(blocks).max(-1) / np.float32(127.0)
    inverse = np.float32(1.0) / np.where(d > 0, d, np.float32(1.0))
    q = np.rint(blocks * np.where(d > 0, inverse, np.float32(0.0))[..., None])
    return q.astype(np.int8).reshape(x.shape), d


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """x as the products with quantized weights see it: q d of :func:`quantize_activations`, float32."""
    q, d = quantize_activations(x)
    blocks = q.reshape(*q.shape[:-1], -1, ACTIVATION_BLOCK).astype(np.float32) * d[..., None]
    return blocks.reshape(q.shape)


class TorchOps:
    """torch tensors on ``device``. Linear weights are modules (``nn.Linear``, LoRA layers), called;
    a parent may offer ``fused[names] = (module, sizes)``; norms are modules with ``.weight``."""

    name = "torch"

    def __init__(self, device=None):
        import torch
        import torch.nn.functional as F

        self.torch, self.F, self.device = torch, F, device

    def asarray(self, a):
        return self.torch.as_tensor(a, device=self.device)

    def rsqrt(self, x):
        return self.torch.rsqrt(x)

    def mean(self, x, axis):
        return x.mean(axis, keepdim=True)

    def norm_weight(self, w):
        return w.weight if hasattr(w, "weight") else w

    def tanh(self, x):
        return self.torch.tanh(x)

    def cos(self, x):
        return x.cos()

    def sin(self, x):
        return x.sin()

    def outer(self, positions, inv_freq):
        return positions.float()[:, None] * inv_freq.float()[None, :]  # float32, as transformers

    def concat(self, parts, axis):
        return self.torch.cat(parts, axis)

    def embedding(self, table, ids):
        return table(ids)

    def scalar_like(self, x, value):
        return self.torch.tensor(value, dtype=x.dtype)  # Gemma: the scale rounded to the hidden dtype

    def linear(self, w, x):
        return w(x)

    def linears(self, parent, names, x):
        fused = getattr(parent, "fused", None) or {}
        if names in fused:
            module, sizes = fused[names]
            return module(x).split(list(sizes), dim=-1)
        return [getattr(parent, n)(x) for n in names]

    def split_heads(self, x, heads, head_dim):
        b, t, _ = x.shape
        return x.reshape(b, t, heads, head_dim).transpose(1, 2)

    def merge_heads(self, x):
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def arange(self, n):
        return self.torch.arange(n, device=self.device)

    def take(self, x, index, axis):
        return x.index_select(axis, index)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)

    def exp(self, x):
        return x.exp()

    def amax(self, x, axis):
        return x.amax(axis, keepdim=True)

    def sum(self, x, axis):
        return x.sum(axis, keepdim=True)

    def swap_last(self, x):
        return x.transpose(-1, -2)

    def repeat_heads(self, x, heads):
        return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)

    def maximum(self, x, value):
        return x.clamp(min=value)

    def minimum(self, x, value):
        return x.clamp(max=value)

    def softmax(self, x, axis):
        return x.softmax(axis)

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def as_float(self, x, like):
        return self.torch.as_tensor(x, device=like.device).to(like.dtype)

    def read_slot(self, x, slot):
        return x.index_select(2, self.torch.as_tensor(slot, device=x.device).reshape(1))

    def decay_add(self, acc, decay, update):
        """acc * decay + update (decay None: 1), as a new tensor (pure, for autograd and graphs)."""
        return update + (acc if decay is None else acc * decay)

    def write_slot(self, x, slot, value):
        """A new x with index ``slot`` of axis 2 set to value [B, H, 1, D] (pure, for graphs)."""
        hit = (self.torch.arange(x.shape[2], device=x.device) == slot)[:, None]
        return self.torch.where(hit, value, x)

    def activation(self, name, x):
        return self.F.silu(x) if name == "silu" else self.F.gelu(x, approximate="tanh")
