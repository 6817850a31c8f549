"""``edge-lolcats bench exports``: for each export format and precision, the export's time, file
size and peak memory (a fresh process each), and its quality on the runtime engine that runs it
(compiled for GGUF, onnxruntime for ONNX) against the PyTorch float32 model on held-out text:
top-1 next-token agreement and perplexity."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

DEFAULT_TARGETS = "gguf:f32,gguf:f16,gguf:q8_0,gguf:q4_0,onnx:f32,onnx:int8,onnx:int4"


def _export(model: str, fmt: str, precision: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "edge_lolcats.cli", "export", model, "--format", fmt, "--out", out]
    cmd += ["--dtype", precision] if fmt == "gguf" else (["--quantize", precision] if precision != "f32" else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"export {fmt}:{precision} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def _reference_logits(model, seqs):
    from edge_lolcats.nn.model import forward

    return [forward(model, s[None], with_state=False)[0][0] for s in seqs]


def _score(logits_list, ref_list, seqs) -> tuple[float, float]:
    nll, agree, n = 0.0, 0, 0
    for logits, ref, seq in zip(logits_list, ref_list, seqs):
        logp = torch.as_tensor(logits[:-1]).float().log_softmax(-1)
        nll += -logp.gather(-1, seq[1:, None]).sum().item()
        agree += int((logp.argmax(-1) == ref[:-1].argmax(-1)).sum())
        n += len(seq) - 1
    return math.exp(nll / n), agree / n


def run(args):
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.runtime.api import open_engine
    from edge_lolcats.training.data import load_corpus

    loaded = load_model(args.model)
    corpus = load_corpus(loaded.tokenizer, args.data, seq_len=args.seq_len)
    n_seq = max(1, args.tokens // args.seq_len)
    seqs = [torch.from_numpy(s) for s in corpus.heldout[:n_seq]]
    ref = _reference_logits(loaded.model, seqs)
    ref_ppl, _ = _score(ref, ref, seqs)
    rows = [{"format": "pytorch", "precision": "f32", "ppl": ref_ppl, "top1_agreement": 1.0}]
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="edge-lolcats-exports-")
    for target in args.targets.split(","):
        fmt, _, precision = target.strip().partition(":")
        path = os.path.join(out_dir, f"model-{precision}.gguf" if fmt == "gguf" else f"onnx-{precision}")
        summary = _export(args.model, fmt, precision, path)
        # measured on the runtime that runs the export for users (the compiled engine for GGUF,
        # onnxruntime for ONNX), token by token: the engines return the last token's logits
        engine = open_engine(path)
        logits = []
        for s in seqs:
            state, rows_ = engine.empty_state(), []
            for token in s.tolist():
                lg, state = engine.run([token], state)
                rows_.append(lg[0])
            logits.append(np.stack(rows_))
        del engine
        ppl, agree = _score(logits, ref, seqs)
        rows.append({"format": fmt, "precision": precision, "mb": summary["bytes"] / 2**20,
                     "export_s": summary["seconds"], "export_peak_rss_mb": summary["peak_rss_mb"],
                     "ppl": ppl, "ppl_change": ppl / ref_ppl - 1, "top1_agreement": agree})
        r = rows[-1]
        print(f"{fmt}:{precision}: {r['mb']:.0f} MiB, export {r['export_s']:.1f} s, peak RSS {r['export_peak_rss_mb']:.0f} MB, "
              f"ppl {ppl:.3f} ({100 * r['ppl_change']:+.2f}%), top-1 {100 * agree:.2f}%", file=sys.stderr)
    print("| format | precision | size (MiB) | export (s) | export peak RSS (MB) | held-out ppl | ppl change | top-1 vs PyTorch f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["format"] == "pytorch":
            print(f"| pytorch | f32 | - | - | - | {r['ppl']:.3f} | - | 100% |")
        else:
            print(f"| {r['format']} | {r['precision']} | {r['mb']:.0f} | {r['export_s']:.1f} | {r['export_peak_rss_mb']:.0f} "
                  f"| {r['ppl']:.3f} | {100 * r['ppl_change']:+.2f}% | {100 * r['top1_agreement']:.2f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": n_seq * (args.seq_len - 1), "results": rows}, f, indent=2)
