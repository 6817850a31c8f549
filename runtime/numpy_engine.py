"""numpy engine over a ``lolcats`` GGUF export. No torch.

Weights are dequantized to float32 once at load (memory-mapped file, then one float32 copy); the
decoder is the model's one definition (:mod:`edge_lolcats.arch.block`) run on numpy arrays, its
attention the block and decode steps of :mod:`edge_lolcats.arch.hybrid` on the fixed state. Same call shape
as the ONNX engine:
``run(tokens, state) -> (logits of the last token [B, V], new state)``.

``weights="stored"`` keeps q8_0 matrices as stored instead (int8 blocks and their scales, a
quarter of the float32 memory) and multiplies through them: the other side of the trade-off,
measured in docs/BENCHMARKS.md (numpy has no int8 matrix product, so it is much slower).
"""
from __future__ import annotations

import numpy as np

from types import SimpleNamespace

from edge_lolcats.arch import block, hybrid
from edge_lolcats.arch.hybrid import PRE_ROPE
from edge_lolcats.arch.ops import ACTIVATIONS, NUMPY, quantized_activations
from edge_lolcats.arch.state import HYBRID, WINDOW
from edge_lolcats.arch.window import window_ring_step
from edge_lolcats.converters import gguf_names as names

from .generation import large_allocations_unmapped_when_freed
from .gguf_model import FUSED, check_shapes, log_decay, open_lolcats_gguf
from .state import State, empty_state


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


class Table:
    """A float32 matrix [out, in] used both ways: embedding rows, and x @ W.T through a transposed
    view (BLAS reads it as it is: no second copy of a tied vocabulary matrix)."""

    def __init__(self, w: np.ndarray):
        self.w, self.shape = w, w.shape

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.w[ids]

    def rmatmul(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w.T


class Dense:
    """A float32 linear layer's matrix [out, in], stored transposed for x @ W.T, optional bias."""

    def __init__(self, w: np.ndarray, bias: np.ndarray | None = None):
        self.t, self.bias, self.shape = np.ascontiguousarray(w.T), bias, w.shape

    def rmatmul(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.t
        if self.bias is not None:
            y += self.bias
        return y


class Biased:
    """A :class:`Q8Matrix` plus a float32 bias."""

    def __init__(self, matrix, bias: np.ndarray):
        self.matrix, self.bias, self.shape = matrix, bias, matrix.shape

    def rmatmul(self, x: np.ndarray) -> np.ndarray:
        return self.matrix.rmatmul(x) + self.bias


class QuantizedInput:
    """A matrix the file stores as q8_0 or q4_0 blocks, multiplied as the model definition says:
    x's q8_0 blocks (:func:`edge_lolcats.arch.ops.quantized_activations`), not x itself."""

    def __init__(self, matrix):
        self.matrix, self.shape = matrix, matrix.shape

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.matrix.rows(ids)

    def rmatmul(self, x: np.ndarray) -> np.ndarray:
        return self.matrix.rmatmul(quantized_activations(x))


WEIGHT_MODES = ("float32", "stored")


class GGUFEngine:
    """``weights``: the matrices as float32 copies, or q8_0 ones as stored. ``activations``: how
    products with q8_0 / q4_0 weights take their input ("q8_0": quantized, the model definition
    and the compiled engine's default; "float32")."""

    def __init__(self, path: str, weights: str = "float32", activations: str = "q8_0"):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}; got {weights!r}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}")
        self.activations = activations
        with large_allocations_unmapped_when_freed():
            self._load(path, weights)

    def _load(self, path: str, weights: str):
        from gguf import GGMLQuantizationType

        def quantized(names_, matrix):  # products with q8_0 / q4_0 weights take quantized activations
            types_ = {gguf.tensors[n].tensor_type for n in names_}
            if self.activations == "q8_0" and types_ <= {GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0}:
                return QuantizedInput(matrix)
            return matrix

        f = open_lolcats_gguf(path)
        gguf, self.args, self.lolcats, self.recurrence = f.gguf, f.args, f.lolcats, f.recurrence
        args, self.layout, self.tokenizer, self.fingerprint = f.args, f.layout, f.tokenizer, f.fingerprint
        self.path = path
        self.max_position_embeddings = args.max_position_embeddings

        def t(name):  # an owned float32 copy, so the mapped file's pages can be let go
            array = gguf.tensor(name)
            return array if array.flags.writeable else np.array(array)  # read-only: a view of the file

        def stored(name):  # q8_0 as stored (weights="stored"), else float32
            tensor = gguf.tensors.get(name)
            if weights == "stored" and tensor is not None and tensor.tensor_type == GGMLQuantizationType.Q8_0:
                return Q8Matrix.from_gguf(tensor)
            return None

        def linear(names_, layer_part):  # one linear layer, or several fused along the output axis
            ggnames = [names.layer_tensor(i, f"{layer_part}.{n}") for n in names_]
            bias_names = [g[: -len("weight")] + "bias" for g in ggnames]
            bias = np.concatenate([t(b) for b in bias_names]) if bias_names[0] in gguf.tensors else None
            q8 = [stored(g) for g in ggnames]
            if all(m is not None for m in q8):
                matrix = Q8Matrix.concat(q8) if len(q8) > 1 else q8[0]
                return quantized(ggnames, matrix if bias is None else Biased(matrix, bias))
            # the parts are dropped as soon as they are joined: holding them cost 50 MB of RSS (malloc)
            return quantized(ggnames, Dense(np.concatenate([t(g) for g in ggnames]) if len(ggnames) > 1 else t(ggnames[0]), bias))

        head = "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"
        self.embed = stored("token_embd.weight") or Table(t("token_embd.weight"))
        self.head = quantized([head], (stored(head) or Table(t(head))) if head != "token_embd.weight" else self.embed)
        self.weights = f.weights
        if weights == "stored" and isinstance(self.embed, Q8Matrix):
            self.weights += " as stored"
        self.norm = t("output_norm.weight")
        self.layers = []
        norms = ["attn_norm", "ffn_norm"] + (["attn_post_norm", "ffn_post_norm"] if args.sandwich_norms else [])
        for i in range(args.num_layers):
            check_shapes(f, i)
            attn = SimpleNamespace(
                kind=self.layout.kinds[i], o_proj=linear(("o_proj",), "self_attn"),
                fused={FUSED["self_attn"]: (linear(FUSED["self_attn"], "self_attn"),
                                            [args.q_size, args.kv_size, args.kv_size])})
            if attn.kind == HYBRID:
                attn.feature_map_q = t(names.layer_tensor(i, "self_attn.feature_map_q"))
                attn.feature_map_k = t(names.layer_tensor(i, "self_attn.feature_map_k"))
                attn.window_factor = t(f"blk.{i}.{names.WINDOW_FACTOR_GGUF}.weight")
                attn.log_decay = log_decay(f, i)
            if args.qk_norm:
                attn.q_norm = t(names.layer_tensor(i, "self_attn.q_norm"))
                attn.k_norm = t(names.layer_tensor(i, "self_attn.k_norm"))
            mlp = SimpleNamespace(down_proj=linear(("down_proj",), "mlp"),
                                  fused={FUSED["mlp"]: (linear(FUSED["mlp"], "mlp"), [args.intermediate_size] * 2)})
            layer = SimpleNamespace(self_attn=attn, mlp=mlp, **{n: t(names.layer_tensor(i, n)) for n in norms})
            self.layers.append(layer)
            gguf.release_pages()  # peak RSS: the float32 weights, not those plus the whole file

    format = "gguf"
    name = "numpy"

    def empty_state(self, batch: int = 1) -> State:
        return empty_state(self.layout, batch)

    @property
    def state_bytes(self) -> int:
        return self.layout.bytes_per_sequence

    def run(self, tokens, state: State):
        """Feed ``tokens`` ([T] or [B, T]) after ``state``, which is updated in place and returned
        with the logits of the last token [B, V]. T = 1 takes the decode path (same math)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        t = ids.shape[1]
        if t == 0:
            raise ValueError("no tokens to run")
        args, xp, tensors = self.args, NUMPY, state.tensors
        rotate = block.rotations(xp, args, state.position + np.arange(t))
        x = block.embed(xp, args, self.embed, ids)  # [B, T, hidden]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn

            def attend(q, k, v, rotate, i=i, attn=attn):
                options = dict(scale=args.attention_scale, softcap=args.attn_softcap)
                names_ = self.layout.layer_names(i)
                if attn.kind == WINDOW:  # the base's own window, on its ring
                    out, *rings = window_ring_step(xp, rotate(q), rotate(k), v, *(tensors[n] for n in names_),
                                                   state.position, **options)
                    tensors.update(zip(names_, rings))
                    return out.astype(np.float32)
                rec = self.recurrence
                if rec.feature_maps == PRE_ROPE:
                    options["rope"] = rotate.inv_freq
                else:
                    q, k = rotate(q), rotate(k)
                step = hybrid.decode_step if t == 1 else hybrid.block_step  # decode: in place where it can
                out, parts = step(xp, q, k, v, attn.feature_map_q, attn.feature_map_k, attn.window_factor,
                                  attn.log_decay, [tensors[n] for n in names_], state.position,
                                  sink_tokens=rec.sink_tokens, **options)
                tensors.update(zip(names_, parts))
                return out

            x = block.layer(xp, args, layer, x, rotate[args.layer_types[i]], attend)
        logits = block.logits(xp, args, self.norm, self.head, x[:, -1])
        state.position += t
        return logits, state
