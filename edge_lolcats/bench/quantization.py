"""Which matrices at which bits: held-out perplexity of a linearized model and of its softmax
teacher with their weight matrices rounded as an export rounds them (q8_0; q4_0 plain or calibrated,
``converters/quantize.py``), run in PyTorch, so each rule is measured without writing a file.

    python -m edge_lolcats.bench.quantization [MODEL] [--tokens 4096] [--rules NAME,...]

It is how the exporters' 4-bit rule was chosen (docs/BENCHMARKS.md "Quality at 4 bits"): whether a
loss at q4_0 is the linearization's or the rounding's shows in the teacher's column.
"""
from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch

VOCABULARY = ("embed_tokens", "lm_head")  # 8 bits in every 4-bit file (gguf_export._encode)


def _four_bit(only=None, eight=()):
    """A rule: q4_0 for a Linear named with one of ``only`` (any when None) and none of ``eight``,
    q8_0 for the rest; the vocabulary matrices always q8_0."""
    def rule(name):
        if any(v in name for v in VOCABULARY) or any(e in name for e in eight):
            return "q8_0"
        return "q4_0" if only is None or any(o in name for o in only) else "q8_0"
    return rule


# name -> (rule: module name -> "q8_0" | "q4_0" | None (float32), calibrated)
RULES = {
    "f32": (lambda name: None, False),
    "q8_0": (lambda name: "q8_0", False),
    "q4_0": (_four_bit(), False),
    "q4_0 calibrated": (_four_bit(), True),
    "q4_0 calibrated + down_proj q8_0": (_four_bit(eight=("down_proj",)), True),
    "q4_0 calibrated + attention q8_0": (_four_bit(eight=("self_attn",)), True),
    "q4_0 calibrated gate/up only": (_four_bit(only=("gate_proj", "up_proj")), True),
}
BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "q4_0": 18 / 32, None: 4}


def _linears(model) -> dict:
    """{module name: Linear or Embedding} of the matrices an export quantizes (rows in blocks of 32),
    a tied matrix once (under the embedding's name)."""
    out, seen = {}, set()
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.shape[-1] % 32 == 0 \
                and "feature_map" not in n and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            out[n] = m
    return out


def _rounded(weight: np.ndarray, dtype: str | None, importance) -> torch.Tensor:
    from gguf import quants

    from edge_lolcats.converters import quantize

    if dtype is None:
        return torch.from_numpy(weight)
    blocks = quantize.quantize(weight, dtype, importance)
    return torch.from_numpy(quants.dequantize(blocks, quantize.qtype(dtype)).reshape(weight.shape))


def perplexity(model, seqs) -> float:
    from .exports import _reference_logits, _score

    logits = _reference_logits(model, seqs)
    return _score(logits, logits, seqs)[0]


def run(model_name: str, tokens: int, rules: list[str], seq_len: int = 1024) -> list[dict]:
    import contextlib

    from edge_lolcats.converters.quantize import input_importance
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.lora import lora_modules, merge_lora
    from edge_lolcats.nn.model import is_linearized, teacher_mode
    from edge_lolcats.training.data import CALIBRATION_SEQUENCES, load_corpus

    loaded = load_model(model_name)
    model = loaded.model
    if lora_modules(model):
        model = merge_lora(copy.deepcopy(model))
    corpus = load_corpus(loaded.tokenizer, None, seq_len=seq_len)
    seqs = [torch.from_numpy(s) for s in corpus.heldout[: max(1, tokens // seq_len)]]
    calibration = corpus.train[:CALIBRATION_SEQUENCES]  # as the exporters' calibration_tokens, from this corpus
    if is_linearized(model):
        kinds = {"linearized": contextlib.nullcontext, "teacher": lambda: teacher_mode(model)}
    else:
        kinds = {"softmax": contextlib.nullcontext}
    linears = _linears(model)
    original = {n: m.weight.detach().float().numpy().copy() for n, m in linears.items()}
    importance = {}
    for kind, mode in kinds.items():
        with mode():
            importance[kind] = input_importance(model, calibration)
    rows = []
    for name in rules:
        rule, calibrated = RULES[name]
        row = {"rule": name, "matrix_mb": sum(original[n].size * BYTES_PER_WEIGHT[rule(n)] for n in linears) / 1e6}
        for kind, mode in kinds.items():
            with torch.no_grad():
                for n, m in linears.items():
                    imp = importance[kind].get(n) if calibrated else None
                    m.weight.copy_(_rounded(original[n], rule(n), imp))
            with mode():
                row[kind] = perplexity(model, seqs)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in kinds), file=sys.stderr, flush=True)
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(torch.from_numpy(original[n]))
    return rows


def table(rows: list[dict]) -> str:
    kinds = [k for k in rows[0] if k not in ("rule", "matrix_mb")]
    base = {k: next((r[k] for r in rows if r["rule"] == "f32"), None) for k in kinds}
    lines = ["| rule | matrices (MB) | " + " | ".join(f"{k} ppl | vs f32" for k in kinds) + " |",
             "|---|---|" + "---|---|" * len(kinds)]
    for r in rows:
        cells = [f"{r[k]:.3f} | " + (f"{100 * (r[k] / base[k] - 1):+.1f}%" if base[k] else "-") for k in kinds]
        lines.append(f"| {r['rule']} | {r['matrix_mb']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edge_lolcats.bench.quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2-135m-lolcats")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens (sequences of 1,024)")
    p.add_argument("--rules", default=",".join(RULES), help=f"of: {', '.join(RULES)}")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",")]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        p.error(f"unknown rule(s) {unknown}; choose from {list(RULES)}")
    print(table(run(args.model, args.tokens, rules)))


if __name__ == "__main__":
    main()
