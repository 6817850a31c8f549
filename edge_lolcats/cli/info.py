"""edge-lolcats info MODEL: family, layer plan, state bytes per context."""
from __future__ import annotations

import json


def cmd_info(args):
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import is_linearized, layer_plan, lolcats_config, state_bytes

    loaded = load_model(args.model)
    model, a = loaded.model, loaded.model.args
    linear = is_linearized(model)
    kv_per_token = 2 * a.num_kv_heads * a.head_dim * 4  # float32 keys and values, one layer
    plan = layer_plan(model)
    info = {
        "model": args.model, "path": loaded.path, "kind": loaded.kind, "family": a.family,
        "layers": a.num_layers, "hidden_size": a.hidden_size, "heads": a.num_heads, "kv_heads": a.num_kv_heads,
        "head_dim": a.head_dim, "vocab_size": a.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_plan": _plan_text(plan),
        "linearized": linear,
        "lolcats": lolcats_config(model) if linear else None,
        "state_bytes": state_bytes(model),
        "kv_cache_bytes_per_token": None if linear else a.num_layers * kv_per_token,
        # what the attention keeps at each context length: fixed for hybrid layers and base
        # windows, growing for full softmax layers
        "state_bytes_at": {n: state_bytes(model) if linear else sum(
            kv_per_token * (n if a.window_of(i) is None else min(n, a.window_of(i))) for i in range(a.num_layers))
            for n in (1024, 8192, 32768, 131072)},
        "chat_template": loaded.tokenizer.chat_template is not None,
    }
    if args.json:
        info["layer_plan"] = plan
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "state_bytes_at":
            value = ", ".join(f"{n // 1024}K: {b / 2**20:.1f} MiB" for n, b in value.items())
        print(f"{key:26s} {value}")


def _plan_text(plan: list) -> str:
    """Runs of equal layer kinds: "hybrid x30" or "softmax-window(4096) x5, softmax x1, ..."."""
    runs = []
    for kind in plan:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", ".join(f"{k} x{n}" for k, n in runs)
