"""Read a long text (16K tokens and more) into a linearized model in fixed memory, then show that it
still follows the text at the end: its perplexity on the text's last tokens, and its continuation
next to the text's own.

    python examples/long_text_demo.py lolcats.q8_0.gguf book.txt

MODEL is a lolcats .gguf file or an ONNX export folder (edge-lolcats export ...). No torch needed:
the memory printed as the text goes in is the runtime's, and it does not grow.
"""
import argparse
import math
import sys

import numpy as np

from edge_lolcats.runtime import load
from edge_lolcats.runtime.generation import current_rss_mb


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("text_file")
    p.add_argument("--score-tokens", type=int, default=512, help="last tokens scored one at a time (perplexity)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="continuation length")
    p.add_argument("--piece-tokens", type=int, default=2048, help="tokens fed per step while reading")
    args = p.parse_args()
    with open(args.text_file, encoding="utf-8") as f:
        text = f.read()

    model = load(args.model)
    ids = model.tokenizer.encode_long(text, add_special_tokens=True)
    cut = len(ids) - args.max_new_tokens  # the model continues from here; the text's own words follow
    read_until = cut - args.score_tokens
    if read_until < 1:
        sys.exit(f"{args.text_file}: {len(ids)} tokens; too short for --score-tokens {args.score_tokens}")
    print(f"model {args.model}: state {model.state_bytes / 2**20:.1f} MiB, RSS {current_rss_mb():.0f} MB; "
          f"text {len(ids):,} tokens", file=sys.stderr)
    session = model.session()
    for start in range(0, read_until, args.piece_tokens):
        session.feed(ids[start : min(read_until, start + args.piece_tokens)])
        print(f"  read {session.position:>7,} tokens ({session.stats.prefill_tokens_per_s:.0f} tok/s), "
              f"RSS {current_rss_mb():.0f} MB", file=sys.stderr)
    nll = []
    for token in ids[read_until:cut]:  # each next token's probability given everything before it
        logits = session.logits.astype(np.float64)
        top = logits.max()
        nll.append(top + math.log(np.exp(logits - top).sum()) - logits[token])
        session.feed([int(token)])
    print(f"perplexity on tokens {read_until:,}-{cut:,} (the text's last part): {math.exp(np.mean(nll)):.2f}")
    print(f"after {cut:,} tokens, state {session.stats.state_bytes / 2**20:.1f} MiB, peak RSS "
          f"{session.stats.peak_rss_mb:.0f} MB\n")
    print("the text goes on: " + model.tokenizer.decode(ids[cut:]).replace("\n", " "))
    print("the model writes: ", end="", flush=True)
    session.generate(args.max_new_tokens, on_text=lambda piece: print(piece.replace("\n", " "), end="", flush=True))
    s = session.stats
    print(f"\n[decode {s.decode_tokens_per_s or 0:.1f} tok/s, peak RSS {s.peak_rss_mb:.0f} MB]", file=sys.stderr)


if __name__ == "__main__":
    main()
