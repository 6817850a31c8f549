"""Attention transfer by position: how well stage 1's hybrid layers match their softmax teacher at
positions far past the training length, for several recurrences and training lengths at an equal
token budget. The measurement behind the training recipe (docs/BENCHMARKS.md, "Training for
length").

    python -m edge_lolcats.bench.transfer --tokens 49152 --variants first@1024,default@1024,default@4096

Each variant linearizes the base afresh, trains stage 1 only (feature maps, window factors, decay)
on the default corpus for ``--tokens`` tokens in sequences of its length, then measures, on held-out
sequences of ``--eval-len`` tokens, each layer's attention MSE against the teacher (x1000, mean over
layers and heads) in position buckets. The teacher's output is what every layer receives, as in
training, so layers are measured independently.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from edge_lolcats.arch import block
from edge_lolcats.arch.hybrid import DEFAULT, Recurrence
from edge_lolcats.arch.ops import TorchOps

RECURRENCES = {"first": Recurrence(), "default": DEFAULT,
               "pre_rope": Recurrence("pre_rope"), "pre_rope+decay": Recurrence("pre_rope", decay=True)}
BUCKETS = (0, 1024, 2048, 4096, 8192, 16384, 32768)


def mse_by_position(model, ids: torch.Tensor, buckets=BUCKETS) -> dict:
    """{"a-b": attention MSE x1000 over positions [a, b)} for one batch of held-out ids [B, N]."""
    from edge_lolcats.nn.model import HybridAttention

    args, inner = model.args, model.model
    xp = TorchOps(ids.device)
    n = ids.shape[1]
    per_position = torch.zeros(n, dtype=torch.float64)
    layers = 0

    def measure(attn):
        def attend(q, k, v, rotate):
            nonlocal layers
            target = attn.teacher(rotate(q), rotate(k), v).float()
            if isinstance(attn, HybridAttention):
                student, _ = attn.attend(q, k, v, rotate)
                per_position.add_(((student.float() - target) ** 2).mean((0, 1, 3)).double().cpu())
                layers += 1
            return target.to(v.dtype)
        return attend

    with torch.no_grad():
        rotate = block.rotations(xp, args, torch.arange(n, device=ids.device))
        x = block.embed(xp, args, inner.embed_tokens, ids)
        for i, layer in enumerate(inner.layers):
            x = block.layer(xp, args, layer, x, rotate[args.layer_types[i]], measure(layer.self_attn))
    per_position *= 1000.0 / max(layers, 1)
    edges = [b for b in buckets if b < n] + [n]
    return {f"{a}-{b}": float(per_position[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])}


def run_variant(base: str, recurrence: Recurrence, seq_len: int, tokens: int, heldout: torch.Tensor, *,
                window_size: int = 64, feature_dim: int = 64, lr: float = 1e-2, seed: int = 0) -> dict:
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import linearize
    from edge_lolcats.training.data import load_corpus
    from edge_lolcats.training.train import make_optimizer, set_trainable, stage1_step, TrainConfig, batch_indices

    loaded = load_model(base)
    model = linearize(loaded.model, window_size=window_size, feature_dim=feature_dim, recurrence=recurrence)
    corpus = load_corpus(loaded.tokenizer, None, seq_len=seq_len, seed=seed)
    config = TrainConfig(stage1_tokens=tokens, seq_len=seq_len, stage1_lr=lr, seed=seed)
    optimizer = make_optimizer(set_trainable(model, 1), config, 1)
    train = torch.from_numpy(corpus.train)
    torch.manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(config.steps(1)):
        batch = train[torch.from_numpy(batch_indices(len(train), 1, step, 1, seed))]
        optimizer.zero_grad(set_to_none=True)
        losses.append(stage1_step(model, batch, config.mse_weight))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
    train_s = time.perf_counter() - t0
    model.eval()
    buckets = [mse_by_position(model, heldout[i : i + 1]) for i in range(len(heldout))]
    mean = {k: float(np.mean([b[k] for b in buckets])) for k in buckets[0]}
    return {"recurrence": recurrence.to_dict(), "seq_len": seq_len, "tokens": config.steps(1) * seq_len,
            "train_seconds": round(train_s, 1), "last_train_mse": float(np.mean(losses[-5:])), "heldout_mse": mean}


def heldout_sequences(base: str, length: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` held-out sequences of ``length`` tokens from the default corpus's long held-out
    documents (each from a different document where there are enough)."""
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.training.data import load_corpus

    tok = load_model(base).tokenizer
    corpus = load_corpus(tok, None, seq_len=1024, seed=seed, long_tokens=length)
    docs = [ids for _, ids in corpus.long_docs if len(ids) >= length]
    if not docs:
        raise SystemExit(f"no held-out document of {length} tokens")
    return torch.from_numpy(np.stack([docs[i % len(docs)][:length] for i in range(count)]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edge_lolcats.bench.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=49152, help="stage-1 training tokens per variant")
    p.add_argument("--variants", default="first@1024,default@1024,default@4096",
                   help=f"RECURRENCE@SEQ_LEN, comma-separated; recurrences: {', '.join(RECURRENCES)}")
    p.add_argument("--eval-len", type=int, default=8192)
    p.add_argument("--eval-seqs", type=int, default=2)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    heldout = heldout_sequences(a.base, a.eval_len, a.eval_seqs)
    results = []
    for spec in a.variants.split(","):
        name, _, seq = spec.partition("@")
        r = run_variant(a.base, RECURRENCES[name], int(seq), a.tokens, heldout)
        r["variant"] = spec
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"tokens": a.tokens, "eval_len": a.eval_len, "eval_seqs": a.eval_seqs, "results": results}, f,
                          indent=1)
    cols = list(results[0]["heldout_mse"])
    print("| variant | train s | " + " | ".join(f"MSE {c}" for c in cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for r in results:
        print(f"| {r['variant']} | {r['train_seconds']:.0f} | " + " | ".join(f"{r['heldout_mse'][c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
