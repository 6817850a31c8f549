"""GGUF names shared by our writer (export) and our readers (the torch loader and the numpy
runtime). Pure data: no torch, no numpy. Our side of each name is the parameter layout of
:mod:`edge_lolcats.arch.block`.

The parts shared with Llama keep llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...,
``{arch}.attention.head_count_kv``, rope keys). The linearized model has its own architecture name,
``lolcats``, new keys for the hybrid attention and new tensors for the feature maps and window
factors. Unlike llama.cpp's llama files, a lolcats file keeps q/k rows in the transformers
(half-split RoPE) layout, which the feature maps were trained on: ``lolcats.rope.qk_permuted`` is
false. A plain ``llama`` file (the softmax teacher for llama.cpp) has them permuted, as llama.cpp
expects.
"""

LOLCATS_ARCH = "lolcats"
LLAMA_ARCH = "llama"
FORMAT_VERSION = 3  # 3: the recurrence options (feature maps before RoPE, decay, sinks)

# metadata keys; "{arch}" is filled with the architecture name
KEY_CONTEXT_LENGTH = "{arch}.context_length"
KEY_EMBEDDING_LENGTH = "{arch}.embedding_length"
KEY_BLOCK_COUNT = "{arch}.block_count"
KEY_FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
KEY_HEAD_COUNT = "{arch}.attention.head_count"
KEY_HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
KEY_KEY_LENGTH = "{arch}.attention.key_length"
KEY_VALUE_LENGTH = "{arch}.attention.value_length"
KEY_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
KEY_ROPE_FREQ_BASE = "{arch}.rope.freq_base"
KEY_ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
KEY_VOCAB_SIZE = "{arch}.vocab_size"
KEY_ROPE_FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"  # Gemma 3's local layers
KEY_ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
KEY_ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
KEY_SLIDING_WINDOW = "{arch}.attention.sliding_window"
KEY_SLIDING_WINDOW_PATTERN = "{arch}.attention.sliding_window_pattern"  # period, or one bool per layer
KEY_ATTENTION_SCALE = "{arch}.attention.scale"
KEY_ATTN_SOFTCAP = "{arch}.attn_logit_softcapping"
KEY_FINAL_SOFTCAP = "{arch}.final_logit_softcapping"
ROPE_FREQS = "rope_freqs.weight"  # llama: Llama 3.1's per-frequency divisors
# llama.cpp's fused tensors (Phi-3): q, k, v rows in one attn_qkv; gate then up rows in ffn_up
FUSED_QKV = "attn_qkv"
# ours
KEY_WINDOW_SIZE = "{arch}.attention.window_size"
KEY_FEATURE_DIM = "{arch}.attention.feature_dim"
KEY_FEATURE_MAP = "{arch}.attention.feature_map"  # "hedgehog"
KEY_QK_PERMUTED = "{arch}.rope.qk_permuted"
# the hybrid layers' recurrence (edge_lolcats.arch.hybrid.Recurrence): "pre_rope" or "post_rope", a learned
# decay or not, sink tokens; absent in files before format 3, whose recurrence is Recurrence()
KEY_FEATURE_MAPS = "{arch}.attention.feature_maps"
KEY_DECAY = "{arch}.attention.decay"
KEY_SINK_TOKENS = "{arch}.attention.sink_tokens"
# per layer "hybrid" or "window" (arch.state); absent in files before it: every layer hybrid
KEY_LAYER_KINDS = "{arch}.attention.layer_kinds"
KEY_FORMAT_VERSION = "{arch}.format_version"
KEY_SOURCE = "{arch}.source"  # what the file was exported from (model name and checkpoint config)
# sha256 (16 hex) of the exported float32 weights, the same in the GGUF and ONNX exports of one
# model: the runtime's state files carry it and refuse a state from another model
KEY_MODEL_FINGERPRINT = "{arch}.model_fingerprint"
# format 2: the whole model description (edge_lolcats.arch.ModelArgs) as JSON; format 1 files are
# llama-family and described by the llama keys above
KEY_MODEL_ARGS = "{arch}.model_args"
KEY_ARCHITECTURE = "general.architecture"
KEY_FILE_TYPE = "general.file_type"
# the tokenizer (llama.cpp's names; our Tokenizer reads and writes them)
KEY_TOKENIZER_MODEL = "tokenizer.ggml.model"  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
KEY_TOKENIZER_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS_ID = "tokenizer.ggml.bos_token_id"
KEY_EOS_ID = "tokenizer.ggml.eos_token_id"
KEY_UNK_ID = "tokenizer.ggml.unknown_token_id"
KEY_PAD_ID = "tokenizer.ggml.padding_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
TOKENIZER_PREFIX = "tokenizer.ggml."
# general.file_type (llama.cpp's LLAMA_FTYPE) of the weight precisions we name with --dtype
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}


def file_type_name(value) -> str:
    """Our --dtype name of a general.file_type value (int, or a string as llama-cpp-python gives it)."""
    try:
        return {v: k for k, v in FILE_TYPES.items()}.get(int(value), "?")
    except (TypeError, ValueError):
        return "?"


# ggml tensor types of the weights we write, by the format's numbering: name -> (id, elements per
# block, bytes per block). The runtime sizes these without importing gguf-py (its import, which
# pulls sentencepiece and yaml, was 45-90 ms and 2.5 MB of a process's start); other types go
# through gguf-py's GGML_QUANT_SIZES. A test holds this to gguf-py's table.
GGML_TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q8_0": (8, 32, 34)}
GGML_TYPE_IDS = {name: id_ for name, (id_, _, _) in GGML_TYPES.items()}

# tensors: our parameter name (edge_lolcats.arch.block) -> GGUF name, per layer with {n}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_post_norm": "post_attention_norm",
    "ffn_norm": "ffn_norm",
    "ffn_post_norm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    # lolcats only
    "self_attn.feature_map_q": "attn_fmap_q",
    "self_attn.feature_map_k": "attn_fmap_k",
}
# bare parameters (no .weight) of the hybrid layer, stored as blk.N.<name>.weight
WINDOW_FACTOR = "self_attn.window_factor"
WINDOW_FACTOR_GGUF = "attn_window_factor"
DECAY = "self_attn.decay_log_rate"  # log(lam) = -exp(this), per head
DECAY_GGUF = "attn_decay_log_rate"
BARE_PARAMS = {WINDOW_FACTOR: WINDOW_FACTOR_GGUF, DECAY: DECAY_GGUF}
LOLCATS_ONLY = ("attn_fmap_q", "attn_fmap_k", WINDOW_FACTOR_GGUF, DECAY_GGUF)
_FROM_GGUF = {v: k for k, v in LAYER_TENSORS.items()}
_BARE_FROM_GGUF = {v: k for k, v in BARE_PARAMS.items()}


def to_gguf(name: str) -> str:
    """Our parameter name -> GGUF tensor name (KeyError if it has none)."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    prefix, _, rest = name.partition("model.layers.")
    if prefix or not rest:
        raise KeyError(name)
    n, _, part = rest.partition(".")
    if part in BARE_PARAMS:
        return f"blk.{n}.{BARE_PARAMS[part]}.weight"
    module, _, suffix = part.rpartition(".")
    return f"blk.{n}.{LAYER_TENSORS[module]}.{suffix}"


def from_gguf(name: str) -> str:
    """GGUF tensor name -> our parameter name (KeyError if unknown)."""
    for ours, gg in GLOBAL_TENSORS.items():
        if gg == name:
            return ours
    blk, n, part, suffix = name.split(".", 3)
    if blk != "blk":
        raise KeyError(name)
    if part in _BARE_FROM_GGUF:
        return f"model.layers.{n}.{_BARE_FROM_GGUF[part]}"
    return f"model.layers.{n}.{_FROM_GGUF[part]}.{suffix}"


def layer_tensor(layer: int, ours: str, suffix: str = "weight") -> str:
    """The GGUF name of layer ``layer``'s tensor ``ours`` (a key of LAYER_TENSORS)."""
    return f"blk.{layer}.{LAYER_TENSORS[ours]}.{suffix}"
