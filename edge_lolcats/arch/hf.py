"""Reading the fields every family shares from an HF ``config.json`` dict (as written by
transformers, or as its ``PretrainedConfig.to_dict()`` completes it)."""
from __future__ import annotations

from .args import FULL, SLIDING, ArchitectureError, Rope


def require(config: dict, *keys):
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise ArchitectureError(f"config.json of a {config.get('model_type')!r} model lacks {', '.join(missing)}")


def rope_from_params(params: dict, theta_default: float, head_dim: int, partial: float | None = None) -> Rope:
    """One layer type's Rope from transformers' ``rope_parameters`` (or an old ``rope_scaling``)."""
    params = dict(params or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", partial) or 1.0
    if kind not in Rope.KINDS:
        raise ArchitectureError(f"RoPE type {kind!r} is not supported (supported: {', '.join(Rope.KINDS)})")
    return Rope(theta=float(params.get("rope_theta", theta_default)), dim=int(head_dim * partial), kind=kind,
                factor=float(params.get("factor", 1.0)),
                low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                original_max_position=int(params.get("original_max_position_embeddings", 8192)))


def ropes(config: dict, head_dim: int, local_theta_key: str | None = None) -> dict:
    """{layer type: Rope}: one Rope for every layer, or (Gemma 3) one per layer type."""
    params = config.get("rope_parameters")
    if params is None:  # transformers 4 layout
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    partial = config.get("partial_rotary_factor")
    if FULL in params or SLIDING in params:
        out = {t: rope_from_params(p, 10000.0, head_dim, partial) for t, p in params.items()}
    else:
        out = {FULL: rope_from_params(params, 10000.0, head_dim, partial)}
    if local_theta_key and config.get(local_theta_key) and SLIDING not in out:
        out[SLIDING] = Rope(theta=float(config[local_theta_key]), dim=out[FULL].dim)
    return out


def layer_types(config: dict, n_layers: int) -> tuple:
    """Per-layer attention kind: the config's ``layer_types``; else every layer sliding when the
    config names a window (Mistral, Phi-3), else every layer full."""
    types = config.get("layer_types")
    if types:
        return tuple(types)
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) is not False:
        return (SLIDING,) * n_layers
    return (FULL,) * n_layers


def eos_list(eos) -> tuple:
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def common(config: dict, local_theta_key: str | None = None) -> dict:
    """ModelArgs fields shared by every family (Llama's defaults where the config is silent)."""
    require(config, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    n_layers = int(config["num_hidden_layers"])
    types = layer_types(config, n_layers)
    return dict(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        layer_types=types, sliding_window=config.get("sliding_window") if SLIDING in types else None,
        rope=ropes(config, head_dim, local_theta_key),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_list(config.get("eos_token_id")),
    )


def rename_layer_parts(weights: dict, renames: dict) -> dict:
    """``model.layers.N.<old>.rest`` -> ``model.layers.N.<new>.rest`` for each old -> new part."""
    out = {}
    for name, value in weights.items():
        head, sep, rest = name.partition("model.layers.")
        if sep and not head:
            n, _, part = rest.partition(".")
            for old, new in renames.items():
                if part == old or part.startswith(old + "."):
                    part = new + part[len(old):]
                    break
            name = f"model.layers.{n}.{part}"
        out[name] = value
    return out
