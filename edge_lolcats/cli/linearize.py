"""edge-lolcats linearize: swap the attention, train both stages, write a checkpoint."""
from __future__ import annotations

import json
import os
import sys

from .common import PROG, CLIError


def cmd_linearize(args):
    from edge_lolcats.formats.checkpoint import save_checkpoint
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import linearize, state_bytes

    loaded = load_model(args.base)
    if loaded.kind == "lolcats-checkpoint":
        raise CLIError(f"{args.base} is already linearized")
    from edge_lolcats.arch.hybrid import Recurrence

    recurrence = Recurrence(args.feature_maps.replace("-", "_"), args.decay, args.sink_tokens)
    model = linearize(loaded.model, window_size=args.window_size, feature_dim=args.feature_dim,
                      sliding_layers=args.sliding_layers, recurrence=recurrence)
    base = args.base if loaded.kind == "gguf" and not os.path.exists(args.base) else os.path.abspath(args.base)
    training = None
    if args.stage1_tokens or args.stage2_tokens:
        training = _train(args, model, loaded.tokenizer, base)
    elif args.resume:
        raise CLIError("--resume needs a training budget (--stage1-tokens / --stage2-tokens)")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 writes the checkpoint
    out = save_checkpoint(model, loaded.tokenizer, args.out, base=base if args.delta else None)
    if training is not None:
        import shutil

        summary, work_dir = training
        with open(os.path.join(out, "training.json"), "w") as f:
            json.dump(summary, f, indent=2)
        shutil.copy(os.path.join(work_dir, "metrics.jsonl"), os.path.join(out, "metrics.jsonl"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    sb = state_bytes(model)
    print(f"linearized {args.base} ({model.args.family}): {model.args.num_layers} layers, window {args.window_size}, "
          f"feature dim {args.feature_dim}")
    print(f"wrote {out} ({size / 2**20:.1f} MiB{', delta on ' + base if args.delta else ''})")
    print(f"decode state: {sb / 2**20:.2f} MiB, fixed at any context length")


def _init_distributed(config):
    """Under torchrun (WORLD_SIZE > 1): one process group; gloo on CPU, NCCL on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if config.device == "cuda" else "gloo")
    if config.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        config.device = f"cuda:{local_rank}"


def _train(args, model, tokenizer, base):
    from edge_lolcats.training.data import load_corpus
    from edge_lolcats.training.train import TrainConfig, train

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    config = TrainConfig(stage1_tokens=args.stage1_tokens, stage2_tokens=args.stage2_tokens, seq_len=args.seq_len,
                         stage2_seq_len=args.stage2_seq_len or 0,
                         batch_size=args.batch_size, stage1_lr=args.stage1_lr, stage2_lr=args.stage2_lr,
                         lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         lora_targets=targets, kd=args.kd, seed=args.seed, save_every=args.save_every,
                         device=args.device)
    corpus = load_corpus(tokenizer, args.data, seq_len=args.seq_len, seed=args.seed)
    work_dir = args.work_dir or os.path.abspath(args.out).rstrip("/") + ".train"
    print(f"data: {len(corpus.train)} training and {len(corpus.heldout)} held-out sequences of {args.seq_len} "
          f"tokens ({len(corpus.train_names)} / {len(corpus.heldout_names)} documents); work dir {work_dir}",
          file=sys.stderr)
    meta = {"base": base, "window_size": args.window_size, "feature_dim": args.feature_dim}
    _init_distributed(config)
    try:
        progress = train(model, corpus, config, work_dir, resume=args.resume, meta=meta,
                         show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last checkpoint is in {work_dir}: continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    summary = {"base": base, "data": args.data or "default corpus", "data_fingerprint": corpus.fingerprint(),
               "stage1_tokens": progress.tokens["1"], "stage2_tokens": progress.tokens["2"],
               "train_seconds": round(progress.train_seconds, 1), "cpu_seconds": round(progress.cpu_seconds, 1),
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()}}
    return summary, work_dir
