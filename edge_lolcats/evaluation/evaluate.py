"""``edge-lolcats eval``: a linearized model against its softmax teacher and fixed-memory baselines
on held-out text, to 32K tokens.

Models compared (all from one set of weights where possible):
- ``teacher``: the base model, softmax attention over every key on a growing KV cache (past its
  trained positions too: what it does there is reported, not hidden);
- ``linearized``: the model under evaluation, on its fixed state;
- ``window``: the teacher's weights with softmax over the last W keys only (no linear part);
- ``sink``: the teacher's weights with a StreamingLLM cache, 4 sink tokens + recent tokens sized
  to the same bytes as the linearized model's state (float32 both), sinks at positions just before
  the recent keys as StreamingLLM places them;
- ``stage2_only`` (with ``--stage2-only CKPT``): a linearization trained with LoRA alone.

Every model reads a text in blocks (:data:`BLOCK` tokens) on its own state, as a user's would, so
memory stays bounded by the models' states however long the text.

Metrics: perplexity on held-out sequences; top-1 next-token agreement with the teacher and
KL(teacher || model), per token; perplexity by position (buckets to 32K, and a curve for the plot)
on long held-out texts; passkey retrieval at 1K / 4K / 8K / 16K / 32K tokens (greedy-exact under
teacher forcing: the answer counts if every answer token is the argmax given the prompt and the
answer so far, which is exactly when greedy decoding writes it).
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext

import numpy as np
import torch

from edge_lolcats.bench.targets import check, table
from edge_lolcats.nn.model import base_attention, forward, sink_cache_budget

BUCKETS = ((0, 512), (512, 2048), (2048, 8192), (8192, 16384), (16384, 32768))
PASSKEY_LENGTHS = (1024, 4096, 8192, 16384, 32768)
BLOCK = 1024  # tokens per forward call when a model streams a text
SINK_TOKENS = 4
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about it.\n\n")


def _context(model, name, sink_recent):
    if name == "teacher":
        return base_attention(model, "softmax")
    if name == "window":
        return base_attention(model, "window")
    if name == "sink":
        return base_attention(model, "sink", sink_tokens=SINK_TOKENS, recent_tokens=sink_recent)
    return nullcontext()


def _blocks(model, name, ids: torch.Tensor, sink_recent: int, block: int = BLOCK):
    """Yield (start, hidden [T, hidden]) as ``model`` (as ``name``) reads ``ids`` [N] in blocks on
    its own state."""
    state = None
    for start in range(0, ids.shape[0], block):
        with _context(model, name, sink_recent):
            hidden, state = forward(model, ids[None, start : start + block], state, return_hidden=True)
        yield start, hidden[0]


@torch.inference_mode()
def compare_on(models: dict, ids: torch.Tensor, sink_recent: int, block: int = BLOCK) -> dict:
    """For each model name: per-token NLL of ``ids[1:]``, and top-1 / KL against the teacher. The
    models read the text side by side, a block at a time, so no [N, V] matrix is ever held."""
    n = ids.shape[0] - 1
    out = {name: {"nll": np.zeros(n), "top1": np.zeros(n, dtype=bool), "kl": np.zeros(n)} for name in models}
    streams = {name: _blocks(m, name, ids, sink_recent, block) for name, m in models.items()}
    for start in range(0, ids.shape[0], block):
        end = min(n, start + block)  # the text's last token has no target
        if end <= start:
            break
        target = ids[start + 1 : end + 1]
        logp = {}
        for name, stream in streams.items():
            _, hidden = next(stream)
            logp[name] = models[name].lm_head(hidden[: end - start]).float().log_softmax(-1)
        t = logp["teacher"]
        t_top = t.argmax(-1)
        for name, lp in logp.items():
            out[name]["nll"][start:end] = -lp.gather(-1, target[:, None])[:, 0].numpy()
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
            tail = [h for start, h in _blocks(m, name, ids, sink_recent)]
            hidden = torch.cat(tail)[len(prompt) - 1 : -1]
            hits[name] += int(torch.equal(m.lm_head(hidden).argmax(-1), torch.tensor(answer)))
    return {name: h / trials for name, h in hits.items()}


def long_texts(docs: list, length: int, sep: int | None) -> tuple[list, bool]:
    """Held-out texts of ``length`` + 1 tokens for the position buckets: documents that long, or,
    where none is, held-out documents joined end to end (separated by ``sep``). Returns
    ([(name, ids)], joined)."""
    whole = [(name, ids[: length + 1]) for name, ids in docs if len(ids) > length]
    if whole or not docs:
        return whole, False
    parts, names, total = [], [], 0
    for name, ids in docs:
        parts += [np.asarray(ids)] + ([np.asarray([sep])] if sep is not None else [])
        names.append(name)
        total += len(ids) + (sep is not None)
        if total > length:
            break
    return [(" + ".join(names), np.concatenate(parts)[: length + 1])], True


def ppl_curve(nll: np.ndarray, points: int = 40, first: int = 64) -> list:
    """[(position, ppl)] over log-spaced position bins from ``first`` to len(nll)."""
    edges = np.unique(np.geomspace(first, len(nll), points + 1).astype(int))
    return [(int(np.sqrt(a * b)), float(math.exp(nll[a:b].mean()))) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def evaluate(model, tokenizer, heldout: np.ndarray, texts: list, *, teacher=None, max_tokens: int = 32768,
             passkey_trials: int = 5, passkey_lengths=PASSKEY_LENGTHS, stage2_only=None, progress=True) -> dict:
    """All metrics as one dict. ``model`` is linearized; ``teacher`` (linearized too, only its softmax
    forms are used) defaults to ``model`` itself in teacher mode, i.e. its base weights without LoRA.
    ``heldout``: sequences [n, seq_len] for perplexity, agreement and KL (up to ``max_tokens``);
    ``texts``: long held-out texts [(name, ids)] for perplexity by position."""
    from tqdm import tqdm

    teacher = teacher if teacher is not None else model
    models = {"teacher": teacher, "linearized": model, "window": teacher, "sink": teacher}
    if stage2_only is not None:
        models["stage2_only"] = stage2_only
    sink_recent = sink_cache_budget(model, SINK_TOKENS)
    heldout = torch.from_numpy(np.asarray(heldout))
    n_seq = max(1, min(len(heldout), max_tokens // heldout.shape[1]))
    stats = {name: {"nll": [], "top1": [], "kl": []} for name in models}
    for seq in tqdm(heldout[:n_seq], desc="held-out", disable=not progress):
        for name, r in compare_on(models, seq, sink_recent).items():
            for key in r:
                stats[name][key].append(r[key])
    result = {"tokens": int(n_seq * (heldout.shape[1] - 1)), "seq_len": int(heldout.shape[1]),
              "sink_tokens": SINK_TOKENS, "sink_recent_tokens": int(sink_recent),
              "ppl": {}, "top1_agreement": {}, "kl": {}, "ppl_by_position": {}, "ppl_curve": {}, "passkey": {}}
    for name, s in stats.items():
        result["ppl"][name] = float(math.exp(np.concatenate(s["nll"]).mean()))
        result["top1_agreement"][name] = float(np.concatenate(s["top1"]).mean())
        result["kl"][name] = float(np.concatenate(s["kl"]).mean())

    if texts:
        per_pos = {name: [] for name in models}
        for _, ids in tqdm(texts, desc="long texts", disable=not progress):
            for name, r in compare_on(models, torch.from_numpy(np.asarray(ids, dtype=np.int64)), sink_recent).items():
                per_pos[name].append(r["nll"])
        shortest = min(len(a) for a in per_pos["teacher"])
        for name, arrays in per_pos.items():
            buckets = {}
            for lo, hi in BUCKETS:
                parts = [a[lo:hi] for a in arrays if len(a) > lo]
                if parts:
                    buckets[f"{lo}-{hi}"] = float(math.exp(np.concatenate(parts).mean()))
            result["ppl_by_position"][name] = buckets
            result["ppl_curve"][name] = ppl_curve(np.mean([a[:shortest] for a in arrays], 0))
        result["long_texts"] = [name for name, _ in texts]
        result["long_text_tokens"] = [int(len(ids)) for _, ids in texts]
    for length in tqdm(passkey_lengths if passkey_trials else (), desc="passkey", disable=not progress):
        for name, acc in passkey_hits(models, tokenizer, length, passkey_trials, sink_recent).items():
            result["passkey"].setdefault(name, {})[str(length)] = acc
    result["passkey_trials"] = passkey_trials
    return result


def markdown_table(result: dict) -> str:
    names = list(result["ppl"])
    buckets = [b for b in (f"{lo}-{hi}" for lo, hi in BUCKETS) if b in result["ppl_by_position"].get("teacher", {})]
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


def long_context_targets(result: dict) -> list[dict]:
    """The long-context targets (issue 14) checked on one evaluation: each row names the target, the
    measured value, the limit it must stay under (or reach) and whether it does. A bucket the texts
    did not reach is left out rather than counted as met."""
    pos = result["ppl_by_position"]
    lin, teacher, sink = pos.get("linearized", {}), pos.get("teacher", {}), pos.get("sink", {})
    rows = []

    def row(target, value, limit, at_most=True):
        check(rows, target, value, limit, at_most, percent="%" in target)

    if "2048-8192" in lin:
        row("ppl 2K-8K <= 1.25 x teacher", lin["2048-8192"], 1.25 * teacher["2048-8192"])
        if "2048-8192" in sink:
            row("ppl 2K-8K <= StreamingLLM at equal bytes", lin["2048-8192"], sink["2048-8192"])
        for bucket in ("8192-16384", "16384-32768"):
            if bucket in lin:
                lo, hi = (int(b) // 1024 for b in bucket.split("-"))
                row(f"ppl {lo}K-{hi}K <= 1.05 x own 2K-8K", lin[bucket], 1.05 * lin["2048-8192"])
    if "0-512" in lin:
        row("ppl 0-512 <= 1.10 x teacher", lin["0-512"], 1.10 * teacher["0-512"])
    row("held-out ppl <= 1.10 x teacher", result["ppl"]["linearized"], 1.10 * result["ppl"]["teacher"])
    row("top-1 agreement >= 85%", result["top1_agreement"]["linearized"], 0.85, at_most=False)
    return rows


def targets_table(targets: list[dict]) -> str:
    """:func:`long_context_targets`' rows as a markdown table."""
    return table(targets)


def plot(result: dict, path: str, title: str = ""):
    """Perplexity against position (log-log) for every model with a curve: the picture of whether
    a fixed-memory model holds up as the context grows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"teacher": ("black", "-"), "linearized": ("tab:red", "-"), "sink": ("tab:blue", "--"),
              "window": ("tab:gray", ":"), "stage2_only": ("tab:orange", ":")}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, curve in result["ppl_curve"].items():
        if curve:
            x, y = zip(*curve)
            color, line = styles.get(name, (None, "-"))
            label = {"sink": f"StreamingLLM ({result['sink_tokens']} + {result['sink_recent_tokens']} tokens)",
                     "window": "sliding window"}.get(name, name)
            ax.plot(x, y, line, color=color, label=label, linewidth=1.6)
    trained = result.get("teacher_positions")
    if trained:
        ax.axvline(trained, color="black", alpha=0.3, linewidth=1)
        ax.text(trained, ax.get_ylim()[1], " teacher's trained length", va="top", fontsize=8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel("perplexity (log-spaced bins)")
    ax.set_title(title or "perplexity by position")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: str, result: dict):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
