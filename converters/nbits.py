"""GGUF's q8_0 and q4_0 blocks as onnxruntime's ``com.microsoft.MatMulNBits`` initializers, exactly:
an ONNX export quantized this way holds the same weights as the GGUF file of that precision.

MatMulNBits (bits b, blocks of 32 along K, no zero-point input: the zero point is 2^(b-1)) reads
``B`` uint8 [N, K / 32, 32 b / 8] with consecutive elements of K packed low bits first, and
``scales`` float [N, K / 32]; W[n, k] = (code - 2^(b-1)) * scale. GGUF stores per block of 32 an f16
scale d and either 32 int8 values q (q8_0: W = q d) or 16 bytes whose byte j holds element j in its
low nibble and element j + 16 in its high one (q4_0: W = (nibble - 8) d). So q8_0 codes are q + 128,
q4_0 codes are the nibbles themselves, reordered into MatMulNBits' pairs (2j, 2j + 1). No torch.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
GGUF_BLOCK_BYTES = {8: 34, 4: 18}  # q8_0, q4_0


def _blocks(raw: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(quant bytes [N, K/32, bytes per block - 2], scales float32 [N, K/32]) of GGUF rows [N, bytes]."""
    blocks = np.asarray(raw).view(np.uint8).reshape(raw.shape[0], -1, GGUF_BLOCK_BYTES[bits])
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    return blocks[..., 2:], scales


def from_gguf(raw: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' (B, scales) from a GGUF q8_0 (``bits`` 8) or q4_0 (4) matrix as stored, rows [N, bytes]."""
    quants, scales = _blocks(raw, bits)
    if bits == 8:
        return (quants.view(np.int8).astype(np.int16) + 128).astype(np.uint8), scales
    codes = np.concatenate([quants & 15, quants >> 4], axis=-1)  # [N, K/32, 32]: element order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), scales


def dequantize(b: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """W [N, K] float32 from MatMulNBits' (B, scales): the op's own definition, for tests."""
    if bits == 8:
        codes = b.astype(np.int16)
    else:
        codes = np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], -1).astype(np.int16)
    values = (codes - (1 << (bits - 1))).astype(np.float32) * scales[..., None]
    return values.reshape(b.shape[0], -1)
