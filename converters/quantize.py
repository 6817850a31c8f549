"""Block quantization of weight matrices, shared by the GGUF and ONNX exporters (an int8 / int4 ONNX
export holds exactly the q8_0 / q4_0 GGUF file's weights).

q8_0 is GGUF's reference rounding (gguf-py). q4_0 can be rounded better than its reference (scale =
the block's extreme / -8): given each input channel's importance (the mean square of the activations
that multiply it, measured on calibration text, as llama.cpp's imatrix), each block takes the scale
that minimises the importance-weighted squared error among the reference's and a sweep of
candidates, each refitted by weighted least squares. The blocks stay plain q4_0 (any reader,
llama.cpp included, runs them); only which codes and scales are chosen changes. Measured on the
shipped model (docs/BENCHMARKS.md "Quality of each precision"): held-out perplexity +18% -> +10%.
"""
from __future__ import annotations

import numpy as np

from .nbits import BLOCK
Q4_SWEEP = np.arange(-20, 21) / 10  # candidate inverse scales -(8 + s) / extreme, as llama.cpp's make_qx_quants
Q4_REFITS = 2  # rounds of (round with the fitted scale, refit the scale) per candidate


def weight_key(w) -> bytes:
    """A weight matrix [N, K] by its float32 bytes: how an ONNX graph's anonymous MatMul initializer (a
    traced Linear's weight, transposed by constant folding) is matched to its Linear, and how each
    matrix's rounded blocks are shared between the block and decode graphs."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(w, np.float32)).tobytes()).digest()


def qtype(dtype: str):
    """gguf-py's type of an export precision (f32, f16, q8_0, q4_0)."""
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[dtype]


def reference(array: np.ndarray, dtype: str) -> np.ndarray:
    """GGUF blocks [N, bytes] of ``array`` [N, K] by gguf-py's reference rounding."""
    from gguf import quants

    return quants.quantize(np.asarray(array, np.float32), qtype(dtype))


def q4_0_blocks(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """q4_0 rows [N, K/32 * 18] from scales d [N, K/32] and codes q [N, K/32, 32] in [-8, 7]: per
    block the f16 scale, then 16 bytes whose byte j holds element j (low nibble) and j + 16 (high)."""
    n = (q + 8).astype(np.uint8)
    packed = n[..., :16] | (n[..., 16:] << 4)
    scale = d.astype(np.float16)[..., None].view(np.uint8)
    return np.concatenate([scale, packed], axis=-1).reshape(q.shape[0], -1)


def q4_0_weighted(array: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """q4_0 rows of ``array`` [N, K], each block's scale chosen to minimise sum_j w_j (x_j - d q_j)^2
    with w = ``importance`` [K] (the reference rounding is one of the candidates, so no block is worse
    than gguf-py's by this measure)."""
    from gguf import quants

    x = np.asarray(array, np.float32)
    rows, k = x.shape
    if k % BLOCK or importance.shape != (k,):
        raise ValueError(f"q4_0 needs rows of a multiple of {BLOCK} and one importance per column; "
                         f"got {x.shape} and {importance.shape}")
    x = x.reshape(rows, k // BLOCK, BLOCK)
    w = np.maximum(np.asarray(importance, np.float64), 0)
    w = (w / max(w.mean(), 1e-30) + 1e-6).astype(np.float32).reshape(k // BLOCK, BLOCK)  # scale-free

    def error(y):
        return (w * (x - y) ** 2).sum(-1)

    best = reference(array, "q4_0")
    best_error = error(quants.dequantize(best, qtype("q4_0")).reshape(x.shape))
    best = best.reshape(rows, k // BLOCK, 18)
    extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)  # signed, [N, nb, 1]
    extreme = np.where(extreme == 0, 1.0, extreme)
    for s in Q4_SWEEP:
        q = np.clip(np.round(x * (-(8 + s) / extreme)), -8, 7)
        for refit in range(Q4_REFITS + 1):
            qq = (w * q * q).sum(-1, keepdims=True)
            d = np.where(qq > 0, (w * x * q).sum(-1, keepdims=True) / np.where(qq > 0, qq, 1), 0)
            d = d.astype(np.float16).astype(np.float32)  # as stored
            if refit < Q4_REFITS:
                q = np.clip(np.round(x / np.where(d == 0, 1, d)), -8, 7)
        e = error(d * q)
        better = e < best_error
        if better.any():
            best = np.where(better[..., None], q4_0_blocks(d[..., 0], q).reshape(best.shape), best)
            best_error = np.where(better, e, best_error)
    return best.reshape(rows, -1)


def quantize(array: np.ndarray, dtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """GGUF blocks [N, bytes] of a matrix [N, K] (K a multiple of 32): q8_0 by the reference rounding;
    q4_0 weighted by ``importance`` [K] when given, else the reference."""
    if dtype == "q4_0" and importance is not None:
        return q4_0_weighted(array, importance)
    return reference(array, dtype)


def input_importance(model, tokens: np.ndarray, progress=None) -> dict[str, np.ndarray]:
    """{Linear module name: mean square of its input per channel [in_features] float64} over the
    calibration ``tokens`` [n, T], the model run as it is (a caller wanting the softmax teacher's
    activations runs this under ``teacher_mode``)."""
    import torch

    from edge_lolcats.nn.model import forward

    sums: dict[str, list] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + (x * x).sum(0)
            acc[1] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            for i, seq in enumerate(np.asarray(tokens)):
                forward(model, torch.as_tensor(seq, dtype=torch.long)[None], with_state=False)
                if progress is not None:
                    progress(i + 1, len(tokens))
    finally:
        for h in handles:
            h.remove()
    return {name: (acc[0] / acc[1]).cpu().numpy() for name, acc in sums.items()}
