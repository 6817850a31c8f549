"""Read a long text file into a linearized model and answer a question about it, printing memory
as the document goes in: the state stays the same size however long the file is.

    python examples/long_document_qa.py smol.q8_0.gguf book.txt "Who is the narrator?"

MODEL is a lolcats .gguf file or an ONNX export folder (edge-lolcats export ...). No torch needed.
"""
import argparse
import sys

from edge_lolcats.runtime import load
from edge_lolcats.runtime.generation import current_rss_mb

MARK = "\x00DOCUMENT\x00"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("text_file")
    p.add_argument("question")
    p.add_argument("--piece-chars", type=int, default=20000, help="characters fed per step")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()
    with open(args.text_file, encoding="utf-8") as f:
        document = f.read()

    model = load(args.model)
    print(f"model {args.model}: state {model.state_bytes / 2**20:.1f} MiB, RSS {current_rss_mb():.0f} MB", file=sys.stderr)
    # the chat template around the document: feed what comes before it, the document in pieces, then the rest
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Read this text.\n\n{MARK}\n\nQuestion: {args.question}"}])
    before, after = prompt.split(MARK)
    session = model.session().feed(before)
    for start in range(0, len(document), args.piece_chars):
        session.feed(document[start : start + args.piece_chars])
        print(f"  read {min(start + args.piece_chars, len(document)):>9,} chars = {session.position:>7,} tokens "
              f"({session.stats.prefill_tokens_per_s:.0f} tok/s), RSS {current_rss_mb():.0f} MB", file=sys.stderr)
    session.feed(after)
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    session.generate(args.max_new_tokens, on_text=lambda piece: print(piece, end="", flush=True))
    s = session.stats
    print(f"\n[{s.context_tokens:,} tokens of context, decode {s.decode_tokens_per_s or 0:.1f} tok/s, "
          f"state {s.state_bytes / 2**20:.1f} MiB, peak RSS {s.peak_rss_mb:.0f} MB]", file=sys.stderr)


if __name__ == "__main__":
    main()
