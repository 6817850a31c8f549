"""What both GGUF engines read from a ``lolcats`` file before its weights: the model's description,
its linearization and recurrence, the state layout, the tokenizer and identity; and the tensor
shapes that description implies, checked before any weight is used. No torch."""
from __future__ import annotations

from dataclasses import dataclass

from edge_lolcats.arch import ArchitectureError, args_from_gguf
from edge_lolcats.arch.args import ModelArgs
from edge_lolcats.arch.hybrid import Recurrence
from edge_lolcats.arch.state import HYBRID, StateLayout
from edge_lolcats.converters import gguf_names as names
from edge_lolcats.formats.gguf_io import GGUFFile, ModelFileError, read_gguf
from edge_lolcats.formats.tokenizer import Tokenizer


# projections both GGUF engines run as one matrix each (rows joined): fewer, larger products per token
FUSED = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


@dataclass
class LolcatsFile:
    gguf: GGUFFile
    args: ModelArgs
    lolcats: dict
    recurrence: Recurrence
    layout: StateLayout
    tokenizer: Tokenizer
    fingerprint: str | None
    weights: str  # the file's precision name (--dtype): "q8_0", ...


def open_lolcats_gguf(path: str) -> LolcatsFile:
    gguf = read_gguf(path)
    if gguf.architecture != names.LOLCATS_ARCH:
        raise ModelFileError(f"{path}: architecture {gguf.architecture!r}; the runtime runs "
                             f"{names.LOLCATS_ARCH!r} files (export a linearized model)")
    try:
        args = args_from_gguf(gguf.metadata, set(gguf.tensors))
        lolcats = gguf.lolcats(args.num_layers)
        recurrence = Recurrence.of(lolcats)
    except (TypeError, ValueError, ArchitectureError) as e:
        raise ModelFileError(f"{path}: missing or bad {names.LOLCATS_ARCH} metadata ({e})") from None
    if gguf.value(names.KEY_QK_PERMUTED):
        raise ModelFileError(f"{path}: q/k rows permuted for llama.cpp; this runtime expects them unpermuted")
    return LolcatsFile(gguf, args, lolcats, recurrence, StateLayout.of(args, lolcats),
                       Tokenizer.from_gguf_metadata(gguf.metadata), gguf.value(names.KEY_MODEL_FINGERPRINT),
                       names.file_type_name(gguf.value(names.KEY_FILE_TYPE)))


def log_decay(f: LolcatsFile, layer: int):
    """A hybrid layer's log(lam) per head, float32, from the stored rate: log(lam) = -exp(rate)
    (None without decay)."""
    import numpy as np

    if not f.recurrence.decay:
        return None
    return (-np.exp(f.gguf.tensor(f"blk.{layer}.{names.DECAY_GGUF}.weight"))).astype(np.float32)


def expected_shapes(f: LolcatsFile, layer: int) -> dict:
    """{GGUF tensor name: row-major shape} of one layer's tensors that the description fixes."""
    a, lay = f.args, f.layout
    t = lambda ours: names.layer_tensor(layer, ours)  # noqa: E731
    shapes = {t("self_attn.q_proj"): (a.q_size, a.hidden_size), t("self_attn.k_proj"): (a.kv_size, a.hidden_size),
              t("self_attn.v_proj"): (a.kv_size, a.hidden_size), t("self_attn.o_proj"): (a.hidden_size, a.q_size),
              t("mlp.gate_proj"): (a.intermediate_size, a.hidden_size),
              t("mlp.up_proj"): (a.intermediate_size, a.hidden_size),
              t("mlp.down_proj"): (a.hidden_size, a.intermediate_size)}
    if lay.kinds[layer] == HYBRID:
        shapes[t("self_attn.feature_map_q")] = shapes[t("self_attn.feature_map_k")] = (
            a.num_heads, a.head_dim, lay.feature_dim)
        shapes[f"blk.{layer}.{names.WINDOW_FACTOR_GGUF}.weight"] = (a.num_heads,)
        if f.recurrence.decay:
            shapes[f"blk.{layer}.{names.DECAY_GGUF}.weight"] = (a.num_heads,)
    return shapes


def check_shapes(f: LolcatsFile, layer: int):
    """ModelFileError naming the first tensor of ``layer`` that is missing or of the wrong shape."""
    for name, want in expected_shapes(f, layer).items():
        tensor = f.gguf.tensors.get(name)
        if tensor is None:
            raise ModelFileError(f"{f.gguf.path}: tensor {name!r} is missing")
        got = tuple(int(x) for x in reversed(tensor.shape))
        if got != tuple(want):
            short = name.split(".", 2)[2].rsplit(".", 1)[0]
            raise ModelFileError(f"{f.gguf.path}: blk.{layer}.{short} has shape {got}, expected {tuple(want)}")
