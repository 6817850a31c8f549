"""numpy engine over a ``lolcats`` GGUF export. No torch.

Weights are dequantized to float32 once at load (memory-mapped file, then one float32 copy); the
decoder runs block by block on the fixed state with :func:`hybrid_numpy.block_step`. Same call
shape as the ONNX engine: ``run(tokens, state) -> (logits of the last token [B, V], new state)``.

``weights="stored"`` keeps q8_0 matrices as stored instead (int8 blocks and their scales, a
quarter of the float32 memory) and multiplies through them: the other side of the trade-off,
measured in docs/BENCHMARKS.md (numpy has no int8 matrix product, so it is much slower).
"""
from __future__ import annotations

import numpy as np

from ..converters import gguf_names as names
from ..gguf_io import ModelFileError, read_gguf
from ..tokenizer import Tokenizer
from .hybrid_numpy import block_step, decode_step
from .state import STATE_PARTS, State, empty_state


class Q8Matrix:
    """A q8_0 matrix [out, in] kept as stored: ``qs`` int8 [out, in/32, 32], ``scale`` float32
    [out, in/32]; W[o, 32 b + k] = qs[o, b, k] * scale[o, b]."""

    def __init__(self, qs: np.ndarray, scale: np.ndarray):
        self.qs, self.scale = qs, scale
        self.shape = (qs.shape[0], qs.shape[1] * qs.shape[2])

    @classmethod
    def from_gguf(cls, tensor) -> "Q8Matrix":
        rows = int(tensor.shape[1])
        blocks = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1, 34)  # f16 scale + 32 int8
        return cls(np.ascontiguousarray(blocks[..., 2:]).view(np.int8), blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))

    @classmethod
    def concat(cls, matrices: list["Q8Matrix"]) -> "Q8Matrix":
        return cls(np.concatenate([m.qs for m in matrices]), np.concatenate([m.scale for m in matrices]))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """W[ids] in float32 (embedding lookup)."""
        return (self.qs[ids] * self.scale[ids][..., None]).reshape(*np.shape(ids), self.shape[1])

    def rmatmul(self, x: np.ndarray) -> np.ndarray:
        """x [..., in] @ W.T -> [..., out]. Few rows (decode): per-block dot products, never a
        float32 copy of W; many rows (prefill): W dequantized for this call, then one GEMM."""
        lead, n = x.shape[:-1], int(np.prod(x.shape[:-1]))
        x2 = x.reshape(n, -1)
        if n <= 4:
            xb = x2.reshape(n, *self.qs.shape[1:])
            y = np.stack([(np.einsum("obk,bk->ob", self.qs, row) * self.scale).sum(1) for row in xb])
        else:
            y = x2 @ (self.qs * self.scale[..., None]).reshape(self.shape).T
        return y.reshape(*lead, self.shape[0]).astype(np.float32, copy=False)


def _mm(x: np.ndarray, w) -> np.ndarray:
    """x @ w for a float32 matrix stored transposed [in, out], or a :class:`Q8Matrix` [out, in]."""
    return w.rmatmul(x) if isinstance(w, Q8Matrix) else x @ w


WEIGHT_MODES = ("float32", "stored")


class GGUFEngine:
    def __init__(self, path: str, weights: str = "float32"):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}; got {weights!r}")
        gguf = read_gguf(path)
        if gguf.architecture != names.LOLCATS_ARCH:
            raise ModelFileError(f"{path}: architecture {gguf.architecture!r}; the runtime runs "
                                 f"{names.LOLCATS_ARCH!r} files (export a linearized model)")
        key = gguf.arch_key
        try:
            self.layers = int(key("block_count"))
            self.heads = int(key("attention.head_count"))
            self.kv_heads = int(key("attention.head_count_kv", self.heads))
            self.hidden = int(key("embedding_length"))
            self.head_dim = int(key("attention.key_length") or self.hidden // self.heads)
            self.window_size = int(key("attention.window_size"))
            self.feature_dim = int(key("attention.feature_dim"))
            self.eps = float(key("attention.layer_norm_rms_epsilon", 1e-5))
            theta = float(key("rope.freq_base", 10000.0))
        except TypeError:
            raise ModelFileError(f"{path}: missing {names.LOLCATS_ARCH} metadata") from None
        if key("rope.qk_permuted"):
            raise ModelFileError(f"{path}: q/k rows permuted for llama.cpp; this runtime expects them unpermuted")
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        self.path = path
        self.fingerprint = gguf.arch_key("model_fingerprint")
        self.max_position_embeddings = int(key("context_length", 0)) or None
        def t(name):  # an owned float32 copy, so the mapped file's pages can be let go
            array = gguf.tensor(name)
            return array if array.flags.writeable else np.array(array)  # read-only: a view of the file

        from gguf import GGMLQuantizationType

        def matrix(name):  # a linear layer's weight: float32, or q8_0 as stored
            tensor = gguf.tensors.get(name)
            if weights == "stored" and tensor is not None and tensor.tensor_type == GGMLQuantizationType.Q8_0:
                return Q8Matrix.from_gguf(tensor)
            return t(name)

        self.embed = matrix("token_embd.weight")
        self.output = matrix("output.weight") if "output.weight" in gguf.tensors else self.embed
        self.weights = names.file_type_name(gguf.metadata.get("general.file_type"))
        if weights == "stored" and isinstance(self.embed, Q8Matrix):
            self.weights += " as stored"
        self.norm = t("output_norm.weight")
        self.blocks = []
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            p = f"blk.{i}."
            block = {n: t(p + n + ".weight") for n in ("attn_norm", "ffn_norm", "attn_fmap_q", "attn_fmap_k",
                                                      "attn_window_factor")}
            block.update({n: matrix(p + n + ".weight") for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                 "ffn_gate", "ffn_up", "ffn_down")})
            expect = {"attn_q": (q_rows, self.hidden), "attn_k": (kv_rows, self.hidden),
                      "attn_v": (kv_rows, self.hidden), "attn_output": (self.hidden, q_rows),
                      "attn_fmap_q": (self.heads, self.head_dim, self.feature_dim),
                      "attn_fmap_k": (self.heads, self.head_dim, self.feature_dim),
                      "attn_window_factor": (self.heads,)}
            for n, shape in expect.items():
                if block[n].shape != shape:
                    raise ModelFileError(f"{path}: {p}{n} has shape {block[n].shape}, expected {shape}")
            # one matrix for q, k, v and one for gate, up: fewer, larger products per token
            # (the parts are popped as they are joined: holding them longer cost 50 MB of RSS, malloc)
            qkv, gate_up = ("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")
            if isinstance(block["attn_q"], Q8Matrix):
                block["qkv"] = Q8Matrix.concat([block.pop(n) for n in qkv])
                block["gate_up"] = Q8Matrix.concat([block.pop(n) for n in gate_up])
            else:  # float32, stored transposed for x @ W
                block["qkv"] = np.ascontiguousarray(np.concatenate([block.pop(n) for n in qkv]).T)
                block["gate_up"] = np.ascontiguousarray(np.concatenate([block.pop(n) for n in gate_up]).T)
                block["attn_output"] = np.ascontiguousarray(block["attn_output"].T)
                block["ffn_down"] = np.ascontiguousarray(block["ffn_down"].T)
            biases = [p + n + ".bias" for n in ("attn_q", "attn_k", "attn_v")]
            block["qkv_bias"] = (np.concatenate([t(b) for b in biases]) if biases[0] in gguf.tensors else None)
            self.blocks.append(block)
            gguf.release_pages()  # peak RSS: the float32 weights, not those plus the whole file
        # a view: BLAS reads it transposed, no second vocabulary matrix
        self.output_t = self.output if isinstance(self.output, Q8Matrix) else self.output.T
        del self.output

    format = "gguf"

    def empty_state(self, batch: int = 1) -> State:
        return empty_state(self.layers, self.heads, self.head_dim, self.feature_dim, self.window_size, batch)

    @property
    def state_bytes(self) -> int:
        return self.empty_state().nbytes

    def _rms(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def run(self, tokens, state: State):
        """Feed ``tokens`` ([T] or [B, T]) after ``state``, which is updated in place and returned
        with the logits of the last token [B, V]. T = 1 takes the decode path (same math)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, t = ids.shape
        if t == 0:
            raise ValueError("no tokens to run")
        x = self.embed.rows(ids) if isinstance(self.embed, Q8Matrix) else self.embed[ids]  # [B, T, hidden]
        angles = (state.position + np.arange(t))[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([angles, angles], -1)
        cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)  # [T, D]
        half = self.head_dim // 2
        q_end, k_end = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim

        def rope(a):  # [B, H, T, D], half-split layout
            rotated = np.concatenate([-a[..., half:], a[..., :half]], -1)
            return a * cos + rotated * sin

        tensors = state.tensors
        for i, blk in enumerate(self.blocks):
            h = self._rms(x, blk["attn_norm"])
            qkv = _mm(h, blk["qkv"])
            if blk["qkv_bias"] is not None:
                qkv += blk["qkv_bias"]
            q = rope(qkv[..., :q_end].reshape(b, t, self.heads, self.head_dim).transpose(0, 2, 1, 3))
            k = rope(qkv[..., q_end:k_end].reshape(b, t, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3))
            v = qkv[..., k_end:].reshape(b, t, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
            s = [tensors[f"state.{i}.{p}"] for p in STATE_PARTS]
            args = (q, k, v, blk["attn_fmap_q"], blk["attn_fmap_k"], blk["attn_window_factor"])
            if t == 1:
                out = decode_step(*args, *s, state.position)
            else:
                out, *s = block_step(*args, *s, state.position)
                tensors.update({f"state.{i}.{p}": a for p, a in zip(STATE_PARTS, s)})
            x = x + _mm(out.transpose(0, 2, 1, 3).reshape(b, t, -1), blk["attn_output"])
            gate, up = np.split(_mm(self._rms(x, blk["ffn_norm"]), blk["gate_up"]), 2, axis=-1)
            x = x + _mm((gate / (1 + np.exp(-gate))) * up, blk["ffn_down"])
        logits = _mm(self._rms(x[:, -1], self.norm), self.output_t)
        state.position += t
        return logits, state

