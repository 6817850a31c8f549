"""edge-lolcats eval: the linearization against its teacher and fixed-memory baselines."""
from __future__ import annotations

import json
import os
import sys

from .common import PROG, CLIError


def cmd_eval(args):
    import numpy as np

    from edge_lolcats.evaluation.evaluate import (evaluate, long_context_targets, long_texts, markdown_table, plot,
                                                  targets_table, write_json)
    from edge_lolcats.training.data import load_corpus, read_documents
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import is_linearized, linearize

    loaded = load_model(args.model)
    if not is_linearized(loaded.model):
        raise CLIError(f"{args.model} is not a linearized checkpoint (linearize it first)")
    lolcats = loaded.model.lolcats
    training = {}
    path = os.path.join(loaded.path, "training.json")
    if os.path.isfile(path):
        with open(path) as f:
            training = json.load(f)
    config = training.get("config", {})
    data = args.data if args.data is not None else (None if training.get("data") in (None, "default corpus")
                                                    else training["data"])
    seq_len = args.seq_len or config.get("seq_len", 1024)
    seed = args.seed if args.seed is not None else config.get("seed", 0)
    from edge_lolcats.arch.hybrid import Recurrence

    teacher = None
    if args.teacher:
        t = load_model(args.teacher)
        if t.kind == "lolcats-checkpoint":
            raise CLIError(f"--teacher {args.teacher} is linearized; give the softmax base model")
        teacher = linearize(t.model, window_size=lolcats["window_size"], feature_dim=lolcats["feature_dim"],
                            sliding_layers=lolcats.get("sliding_layers", "linearize"), recurrence=Recurrence.of(lolcats))
    elif lolcats.get("lora_merged"):
        raise CLIError("LoRA is merged into this checkpoint, so its teacher cannot be recovered: pass --teacher")
    tok = loaded.tokenizer
    sep = tok.eos_token_ids[0] if tok.eos_token_ids else None
    if args.data is not None and os.path.isfile(args.data) and args.data.endswith((".txt", ".md", ".md.gz")):
        # one text given here, read whole: the held-out text (the training data's own file is split as in training)
        if args.data == training.get("data"):
            print(f"{PROG}: warning: {args.data} is the training data; read whole, it includes trained-on text",
                  file=sys.stderr)
        ids = np.asarray(tok.encode(read_documents(data)[0].text), dtype=np.int64)
        if len(ids) < 2 * seq_len:
            raise CLIError(f"{data}: {len(ids)} tokens; give a text of at least {2 * seq_len}")
        heldout = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
        texts, joined = [(os.path.basename(data), ids[: args.max_length + 1])], False
        source = data
    else:
        corpus = load_corpus(tok, data, seq_len=seq_len, seed=seed)
        if training.get("data_fingerprint") and training["data_fingerprint"] != corpus.fingerprint():
            print(f"{PROG}: warning: this data differs from the training data; held-out text may have been trained on",
                  file=sys.stderr)
        heldout = corpus.heldout
        texts, joined = long_texts(corpus.long_docs, args.max_length, sep)
        texts = texts[: args.long_docs]
        source = data or "default corpus (held-out split)"
    if joined:
        print(f"{PROG}: no held-out document reaches {args.max_length} tokens: the position buckets read held-out "
              f"documents joined end to end ({texts[0][0]})", file=sys.stderr)
    stage2_only = None
    if args.stage2_only:
        stage2_only = load_model(args.stage2_only).model
    result = evaluate(loaded.model, tok, heldout, texts if args.long_docs else [], teacher=teacher,
                      max_tokens=args.max_tokens, passkey_trials=args.passkey_trials,
                      passkey_lengths=args.passkey_lengths if args.passkey_trials else (),
                      stage2_only=stage2_only, progress=not args.no_progress)
    result.update(model=args.model, data=source, long_texts_joined=joined,
                  teacher_positions=loaded.model.args.max_position_embeddings)
    result["targets"] = long_context_targets(result)
    print(markdown_table(result))
    print()
    print(targets_table(result["targets"]))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot, title=f"{args.model} on {os.path.basename(source)}")
        print(f"plot: {args.plot}", file=sys.stderr)
