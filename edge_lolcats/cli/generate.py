"""edge-lolcats generate: PyTorch models, or exports on the torch-free runtime."""
from __future__ import annotations

import json
import os
import sys

from .common import CLIError


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CLIError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"prompt file {args.prompt_file} is not UTF-8 (byte {e.start})") from None
    else:
        text = args.prompt
    if not text.strip():
        raise CLIError("empty prompt")
    return text


def _rate(tokens_per_s) -> str:
    return f"{tokens_per_s:.1f} tok/s" if tokens_per_s else "n/a"


def _is_export(path: str) -> bool:
    """A lolcats GGUF file or an ONNX export folder: what the torch-free runtime runs."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "model.json"))
    if path.endswith(".gguf") and os.path.isfile(path):
        from edge_lolcats.formats.gguf_io import read_gguf_architecture

        return read_gguf_architecture(path) == "lolcats"
    return False


def cmd_generate(args):
    if _is_export(args.model):
        return _generate_on_runtime(args)
    if args.save_state or args.load_state or args.stop or args.repetition_penalty != 1.0:
        raise CLIError("--save-state, --load-state, --stop and --repetition-penalty need an export "
                       "(a lolcats .gguf file or an ONNX folder: edge-lolcats export)")
    from edge_lolcats.nn.generate import SamplingConfig, generate
    from edge_lolcats.runtime.generation import peak_rss_mb
    from edge_lolcats.formats.loading import load_model
    from edge_lolcats.nn.model import state_bytes

    text = _read_prompt(args)
    if args.temperature is not None:
        sampling = SamplingConfig(greedy=False, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=args.seed)
    else:
        sampling = SamplingConfig(greedy=True)
    sampling.validate()
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt_ids = tok.encode(text)

    stream = None
    if not args.json:
        from edge_lolcats.runtime.generation import TextStream

        text_stream = TextStream(tok)  # the runtime's: new text once it decodes to whole characters

        def print_new_text(token_id):
            sys.stdout.write(text_stream.push(token_id))
            sys.stdout.flush()

        stream = print_new_text

    result = generate(loaded.model, prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                      stop_token_ids=tok.eos_token_ids, prefill_chunk_size=args.prefill_chunk or 1024, on_token=stream)
    out_text = tok.decode(result.token_ids)
    stats = {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(result.token_ids),
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "state_bytes": state_bytes(loaded.model),
        "kv_cache_bytes": None if result.state.fixed_size else result.state.nbytes,
        "peak_rss_mb": peak_rss_mb(),
        "stop_reason": result.stop_reason,
    }
    if args.json:
        print(json.dumps({"text": out_text, "token_ids": result.token_ids, **stats}))
        return
    sys.stdout.write(text_stream.flush() + "\n")
    memory = (f"state {stats['state_bytes'] / 2**20:.2f} MiB (fixed)" if stats["state_bytes"] is not None
              else f"KV cache {stats['kv_cache_bytes'] / 2**20:.2f} MiB (grows with context)")
    print(f"[prefill {len(prompt_ids)} tok at {_rate(stats['prefill_tokens_per_s'])}, "
          f"decode {len(result.token_ids)} tok at {_rate(stats['decode_tokens_per_s'])}, {memory}, "
          f"peak RSS {stats['peak_rss_mb']:.0f} MB]", file=sys.stderr)


def _generate_on_runtime(args):
    """``generate`` on an export, through the runtime's Python API (no torch)."""
    from edge_lolcats.runtime import load

    text = _read_prompt(args)
    temperature = 0.0 if args.temperature is None else args.temperature
    if args.temperature is not None and not args.temperature > 0:
        raise CLIError(f"--temperature must be > 0; got {args.temperature}")
    options = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    from edge_lolcats.runtime.sampling import Sampling

    Sampling(temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)  # bad values fail before loading
    model = load(args.model, threads=args.threads, gguf_engine=args.gguf_engine, activations=args.activations)
    session = model.restore(args.load_state) if args.load_state else model.session()
    if args.chat:  # a resumed chat continues its conversation with only the new turn
        text = session.turn_text(text)
    session.feed(text, chunk_size=args.prefill_chunk, progress=not args.json)
    prefill = session.stats
    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    out = session.generate(args.max_new_tokens, on_text=stream, **options)
    stats = session.stats.as_dict()
    stats.update(prompt_tokens=prefill.prompt_tokens, prefill_seconds=prefill.prefill_seconds,
                 prefill_tokens_per_s=prefill.prefill_tokens_per_s, kv_cache_bytes=None,
                 engine=model.engine.format, weights=model.engine.weights,
                 runtime=getattr(model.engine, "name", model.engine.format))
    if hasattr(model.engine, "compile_seconds"):  # the compiled engine: where its machine code came from
        stats.update(compile_seconds=model.engine.compile_seconds, compiled=model.engine.compiled)
    if args.save_state:
        stats["state_file_bytes"] = session.save(args.save_state)
    if args.json:
        print(json.dumps({"text": out, "token_ids": session.last_token_ids, **stats}))
        return
    sys.stdout.write("\n")
    if stats.get("compiled") == "compiled":
        print(f"[compiled the engine in {stats['compile_seconds']:.1f} s; later runs load it from numba's cache]",
              file=sys.stderr)
    print(f"[{stats['runtime']} {stats['weights']}: prefill {stats['prompt_tokens']} tok at "
          f"{_rate(stats['prefill_tokens_per_s'])}, decode {stats['new_tokens']} tok at {_rate(stats['decode_tokens_per_s'])}, "
          f"context {stats['context_tokens']} tok, state {stats['state_bytes'] / 2**20:.2f} MiB (fixed), "
          f"peak RSS {stats['peak_rss_mb']:.0f} MB" + (f", state saved to {args.save_state}" if args.save_state else "")
          + "]", file=sys.stderr)
