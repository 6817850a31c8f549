"""``edge-lolcats eval``: a linearized model against its softmax teacher and fixed-memory baselines
on held-out text.

Models compared (all from one set of weights where possible):
- ``teacher``: the base model, softmax attention (the linearized model in teacher mode);
- ``linearized``: the model under evaluation;
- ``window``: the teacher's weights with softmax over the last W keys only (no linear part);
- ``sink``: the teacher's weights with a StreamingLLM cache, 4 sink tokens + recent tokens sized
  to the same bytes as the linearized model's state (float32 both);
- ``stage2_only`` (with ``--stage2-only CKPT``): a linearization trained with LoRA alone.

Metrics: perplexity on held-out sequences; top-1 next-token agreement with the teacher and
KL(teacher || model), per token; perplexity by position bucket (0-512, 512-2K, 2K-8K) on long
held-out documents; passkey retrieval at 1K / 4K / 8K tokens (greedy-exact under teacher forcing:
the answer counts if every answer token is the argmax given the prompt and the answer so far, which
is exactly when greedy decoding writes it).
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext

import numpy as np
import torch

from edge_lolcats.nn.model import base_attention, forward, sink_cache_budget

BUCKETS = ((0, 512), (512, 2048), (2048, 8192))
PASSKEY_LENGTHS = (1024, 4096, 8192)
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about it.\n\n")


def _context(model, name, sink_recent):
    if name == "teacher":
        return base_attention(model, "softmax")
    if name == "window":
        return base_attention(model, "window")
    if name == "sink":
        return base_attention(model, "sink", recent_tokens=sink_recent)
    return nullcontext()


@torch.inference_mode()
def compare_on(models: dict, ids: torch.Tensor, sink_recent: int, chunk: int = 1024) -> dict:
    """For each model name: per-token NLL of ``ids[1:]``, and top-1 / KL against the teacher."""
    hidden = {}
    for name, m in models.items():
        with _context(m, name, sink_recent):
            hidden[name], _ = forward(m, ids[None], with_state=False, return_hidden=True)
    n = ids.shape[0] - 1
    out = {name: {"nll": np.zeros(n), "top1": np.zeros(n, dtype=bool), "kl": np.zeros(n)} for name in models}
    target = ids[1:]
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logp = {name: models[name].lm_head(h[0, start:end]).float().log_softmax(-1) for name, h in hidden.items()}
        t = logp["teacher"]
        t_top = t.argmax(-1)
        for name, lp in logp.items():
            out[name]["nll"][start:end] = -lp.gather(-1, target[start:end, None])[:, 0].numpy()
            out[name]["top1"][start:end] = (lp.argmax(-1) == t_top).numpy()
            out[name]["kl"][start:end] = (t.exp() * (t - lp)).sum(-1).numpy()
    return out


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of about ``length`` tokens with the key at relative ``depth``."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\n\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer.encode(_INTRO + needle + question))
    per_filler = len(tokenizer.encode(_FILLER * 2)) - len(tokenizer.encode(_FILLER))  # in context
    n_fill = max(0, (length - fixed) // per_filler)
    while True:
        before = int(round(n_fill * depth))
        text = _INTRO + _FILLER * before + needle + _FILLER * (n_fill - before) + question
        if len(tokenizer.encode(text)) <= length or n_fill == 0:
            break
        n_fill -= 1
    return tokenizer.encode(text), tokenizer.encode(" " + key)


@torch.inference_mode()
def passkey_hits(models: dict, tokenizer, length: int, trials: int, sink_recent: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + length)
    hits = {name: 0 for name in models}
    for t in range(trials):
        key = str(rng.integers(10000, 99999))
        depth = (t + 0.5) / trials
        prompt, answer = passkey_prompt(tokenizer, length, depth, key)
        ids = torch.tensor(prompt + answer)
        for name, m in models.items():
            with _context(m, name, sink_recent):
                hidden, _ = forward(m, ids[None], with_state=False, return_hidden=True)
            logits = m.lm_head(hidden[0, len(prompt) - 1 : -1])
            hits[name] += int(torch.equal(logits.argmax(-1), torch.tensor(answer)))
    return {name: h / trials for name, h in hits.items()}


def evaluate(model, tokenizer, corpus, *, teacher=None, max_tokens: int = 32768, long_docs: int = 3,
             passkey_trials: int = 5, passkey_lengths=PASSKEY_LENGTHS, stage2_only=None, progress=True) -> dict:
    """All metrics as one dict. ``model`` is linearized; ``teacher`` (linearized too, only its softmax
    forms are used) defaults to ``model`` itself in teacher mode, i.e. its base weights without LoRA."""
    from tqdm import tqdm

    teacher = teacher if teacher is not None else model
    models = {"teacher": teacher, "linearized": model, "window": teacher, "sink": teacher}
    if stage2_only is not None:
        models["stage2_only"] = stage2_only
    sink_recent = sink_cache_budget(model)
    heldout = torch.from_numpy(corpus.heldout)
    n_seq = max(1, min(len(heldout), max_tokens // heldout.shape[1]))
    stats = {name: {"nll": [], "top1": [], "kl": []} for name in models}
    for seq in tqdm(heldout[:n_seq], desc="held-out", disable=not progress):
        for name, r in compare_on(models, seq, sink_recent).items():
            for key in r:
                stats[name][key].append(r[key])
    result = {"tokens": int(n_seq * (heldout.shape[1] - 1)), "seq_len": int(heldout.shape[1]),
              "sink_tokens": 4, "sink_recent_tokens": int(sink_recent),
              "ppl": {}, "top1_agreement": {}, "kl": {}, "ppl_by_position": {}, "passkey": {}}
    for name, s in stats.items():
        result["ppl"][name] = float(math.exp(np.concatenate(s["nll"]).mean()))
        result["top1_agreement"][name] = float(np.concatenate(s["top1"]).mean())
        result["kl"][name] = float(np.concatenate(s["kl"]).mean())

    docs = [d for _, d in corpus.long_docs][:long_docs]
    if docs:
        per_pos = {name: [] for name in models}
        for doc in tqdm(docs, desc="long documents", disable=not progress):
            ids = torch.from_numpy(doc[: BUCKETS[-1][1] + 1])
            for name, r in compare_on(models, ids, sink_recent).items():
                per_pos[name].append(r["nll"])
        for name, arrays in per_pos.items():
            buckets = {}
            for lo, hi in BUCKETS:
                parts = [a[lo:hi] for a in arrays if len(a) > lo]
                if parts:
                    buckets[f"{lo}-{hi}"] = float(math.exp(np.concatenate(parts).mean()))
            result["ppl_by_position"][name] = buckets
        result["long_documents"] = len(docs)
    for length in tqdm(passkey_lengths if passkey_trials else (), desc="passkey", disable=not progress):
        for name, acc in passkey_hits(models, tokenizer, length, passkey_trials, sink_recent).items():
            result["passkey"].setdefault(name, {})[str(length)] = acc
    result["passkey_trials"] = passkey_trials
    return result


def markdown_table(result: dict) -> str:
    names = list(result["ppl"])
    buckets = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    lengths = sorted({k for v in result["passkey"].values() for k in v}, key=int)
    head = (["model", "ppl", "ppl / teacher", "top-1 agree", "KL"] + [f"ppl {b}" for b in buckets]
            + [f"passkey {int(n) // 1024}K" for n in lengths])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher = result["ppl"]["teacher"]
    for name in names:
        pos = result["ppl_by_position"].get(name, {})
        cells = [name, f"{result['ppl'][name]:.2f}", f"{result['ppl'][name] / teacher:.3f}",
                 f"{100 * result['top1_agreement'][name]:.1f}%", f"{result['kl'][name]:.3f}"]
        cells += [f"{pos[b]:.2f}" if b in pos else "-" for b in buckets]
        cells += [f"{100 * result['passkey'][name][n]:.0f}%" for n in lengths]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_json(path: str, result: dict):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
