"""The torch-free description of a decoder-only model: everything the block needs to know about
a family, read once from an HF config.json or from GGUF metadata (by the family's own file).

Nothing here runs math; :mod:`edge_lolcats.arch.block` does, on torch tensors or numpy arrays.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = ("silu", "gelu_tanh")


class ArchitectureError(ValueError):
    """A config the block cannot run (unknown family, unsupported option)."""


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type, in transformers' half-split layout."""

    theta: float = 10000.0
    dim: int = 0  # rotated dimensions (head_dim, or fewer with partial rotary); set by ModelArgs
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0  # linear and llama3: how much the context was stretched
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3
    # per-frequency divisors of the inverse frequencies, as llama.cpp files carry Llama 3.1's
    # scaling (a rope_freqs tensor); applied after ``kind``
    freq_divisors: tuple = ()

    KINDS = ("default", "linear", "llama3")

    def inv_freq(self) -> np.ndarray:
        """[dim / 2] float32 inverse frequencies, computed as transformers computes them (float32)."""
        base = (np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(self.dim))
        inv = (np.float32(1.0) / np.power(np.float32(self.theta), base)).astype(np.float32)
        if self.kind == "linear":
            inv = inv / np.float32(self.factor)
        elif self.kind == "llama3":  # Llama 3.1: long wavelengths stretched, short kept, smooth between
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        if self.freq_divisors:
            inv = (inv / np.asarray(self.freq_divisors, np.float32)).astype(np.float32)
        return inv

    def llama3_divisors(self) -> tuple:
        """This Rope's scaling as llama.cpp's per-frequency divisors (rope_freqs) of the default one."""
        plain = replace(self, kind="default", freq_divisors=()).inv_freq()
        return tuple(float(d) for d in plain / self.inv_freq())


@dataclass(frozen=True)
class ModelArgs:
    family: str  # a key of edge_lolcats.arch.FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): Gemma stores w - 1
    sandwich_norms: bool = False  # Gemma 2/3: also a norm on the attention output and the MLP output
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k, before RoPE
    activation: str = "silu"  # of the gated MLP: act(gate) * up
    qkv_bias: bool = False  # Qwen2; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    attention_scale: float = 0.0  # softmax(q.k * scale); 0: 1/sqrt(head_dim). Gemma: query_pre_attn_scalar**-0.5
    embedding_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits likewise
    layer_types: tuple = ()  # FULL or SLIDING per layer; () means all FULL
    sliding_window: int | None = None  # keys a SLIDING layer's query sees, itself included
    rope: dict = field(default_factory=dict)  # layer type -> Rope
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        if not self.layer_types:
            set_("layer_types", (FULL,) * self.num_layers)
        set_("layer_types", tuple(self.layer_types))
        if not self.attention_scale:
            set_("attention_scale", 1.0 / math.sqrt(self.head_dim))
        if FULL not in self.rope:
            set_("rope", {FULL: Rope(), **self.rope})
        rope = {t: (r if r.dim else replace(r, dim=self.head_dim)) for t, r in self.rope.items()}
        for t in set(self.layer_types) - set(rope):
            rope[t] = rope[FULL]
        set_("rope", rope)
        set_("eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    def validate(self):
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} kv heads")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"{len(self.layer_types)} layer types for {self.num_layers} layers")
        if set(self.layer_types) - {FULL, SLIDING}:
            problems.append(f"unknown layer types {sorted(set(self.layer_types) - {FULL, SLIDING})}")
        if SLIDING in self.layer_types and not self.sliding_window:
            problems.append("sliding layers without a sliding_window")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} (supported: {', '.join(ACTIVATIONS)})")
        for t, r in self.rope.items():
            if r.kind not in Rope.KINDS:
                problems.append(f"RoPE type {r.kind!r} (supported: {', '.join(Rope.KINDS)})")
            if r.dim % 2 or r.dim > self.head_dim:
                problems.append(f"rotary dimension {r.dim} of head_dim {self.head_dim}")
        if problems:
            raise ArchitectureError(f"{self.family}: " + "; ".join(problems))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window_of(self, layer: int) -> int | None:
        """The base model's own attention window for ``layer`` (None: full causal attention)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_of(self, layer: int) -> Rope:
        return self.rope[self.layer_types[layer]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rope"] = {t: asdict(r) for t, r in self.rope.items()}
        d["layer_types"], d["eos_token_ids"] = list(self.layer_types), list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        d = dict(d)
        d["rope"] = {t: Rope(**{**r, "freq_divisors": tuple(r.get("freq_divisors", ()))})
                     for t, r in d.get("rope", {}).items()}
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ArchitectureError(f"unknown model description fields {sorted(unknown)}")
        return cls(**d)
