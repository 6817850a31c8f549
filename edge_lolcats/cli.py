"""The ``edge-lolcats`` command. Heavy imports (torch, transformers) happen inside the subcommands,
so ``edge-lolcats --help`` and the torch-free parts work without them."""
from __future__ import annotations

import argparse
import json
import os
import sys

PROG = "edge-lolcats"


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def _user_errors():
    """Exception types that mean bad input (printed as one line), imported lazily."""
    from .gguf_io import ModelFileError
    from .tokenizer import TokenizerError

    return (CLIError, ModelFileError, TokenizerError, ValueError, OSError, UnicodeDecodeError)  # incl. subclasses


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Linearize LLMs (LoLCATs) and run them in fixed memory.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="describe a model or checkpoint")
    info.add_argument("model", metavar="MODEL", help="model name, .gguf file, HF folder or linearized checkpoint")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    lin = sub.add_parser("linearize", help="swap a model's attention for the hybrid and save a checkpoint")
    lin.add_argument("--base", required=True, metavar="NAME|PATH", help="base model (e.g. smollm2-135m)")
    lin.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    lin.add_argument("--window-size", type=positive_int, default=64, help="sliding window length (default 64)")
    lin.add_argument("--feature-dim", type=positive_int, default=64, help="feature map size F (default 64)")
    lin.add_argument("--sliding-layers", choices=("keep", "linearize"), default="keep",
                     help="layers that are sliding-window softmax in the base (Gemma's local layers, Mistral): "
                          "keep them, exact, on a fixed ring of their own window (default), or linearize them too")
    lin.add_argument("--delta", action="store_true",
                     help="save only the new weights, on top of --base (a few MB instead of the whole model)")
    tr = lin.add_argument_group("training (both budgets 0: swap the attention only, no training)")
    tr.add_argument("--stage1-tokens", type=non_negative_int, default=0, help="attention-transfer budget in tokens")
    tr.add_argument("--stage2-tokens", type=non_negative_int, default=0, help="LoRA budget in tokens")
    tr.add_argument("--data", metavar="PATH", help=".txt/.md/.jsonl file or folder (default: the installed corpus)")
    tr.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per training sequence")
    tr.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step")
    tr.add_argument("--stage1-lr", type=float, default=1e-2)
    tr.add_argument("--stage2-lr", type=float, default=1e-4)
    tr.add_argument("--lora-rank", type=positive_int, default=8)
    tr.add_argument("--lora-alpha", type=float, default=16.0)
    tr.add_argument("--lora-dropout", type=float, default=0.0)
    tr.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated projections")
    tr.add_argument("--kd", action="store_true", help="stage 2: add KL(teacher || student) on the logits")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=positive_int, default=25, help="checkpoint every N steps")
    tr.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    tr.add_argument("--work-dir", metavar="DIR", help="training checkpoints and metrics (default: OUT.train)")
    tr.add_argument("--resume", action="store_true", help="continue the run in the work dir")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")

    gen = sub.add_parser("generate", help="generate text from a model or checkpoint")
    gen.add_argument("model", metavar="MODEL")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT")
    src.add_argument("--prompt-file", metavar="FILE", help="UTF-8 text file holding the prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=non_negative_int, default=128)
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature (> 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (0, 1]")
    gen.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k best (0: off)")
    gen.add_argument("--seed", type=int, help="random seed for sampling")
    gen.add_argument("--prefill-chunk", type=positive_int, help="prompt tokens per prefill chunk (default: 1024 in PyTorch, 128 on the runtime)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    rt = gen.add_argument_group("on an export (lolcats .gguf file or ONNX folder: the torch-free runtime)")
    rt.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    rt.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    rt.add_argument("--save-state", metavar="FILE", help="save the session's state here at the end (a few MB)")
    rt.add_argument("--load-state", metavar="FILE", help="resume a saved session; the prompt continues it")
    rt.add_argument("--threads", type=positive_int, help="onnxruntime threads (default: all cores)")

    ev = sub.add_parser("eval", help="a linearized model against its teacher and fixed-memory baselines")
    ev.add_argument("model", metavar="MODEL", help="linearized checkpoint")
    ev.add_argument("--teacher", metavar="NAME|PATH", help="softmax teacher (default: the checkpoint's base)")
    ev.add_argument("--data", metavar="PATH", help="text to hold out from (default: as in training)")
    ev.add_argument("--max-tokens", type=positive_int, default=32768, help="held-out tokens for perplexity")
    ev.add_argument("--seq-len", type=positive_int, help="held-out sequence length (default: as in training)")
    ev.add_argument("--seed", type=int, help="split seed (default: as in training)")
    ev.add_argument("--long-docs", type=non_negative_int, default=3, help="long documents for position buckets")
    ev.add_argument("--passkey-trials", type=non_negative_int, default=5, help="trials per passkey length")
    ev.add_argument("--passkey-lengths", type=int_list, default=[1024, 4096, 8192])
    ev.add_argument("--stage2-only", metavar="CKPT", help="baseline: a linearization trained with LoRA alone")
    ev.add_argument("--json", metavar="OUT", help="write all results as one JSON object")
    ev.add_argument("--no-progress", action="store_true")

    ex = sub.add_parser("export", help="export to one GGUF file or an ONNX folder (explicit recurrent state)")
    ex.add_argument("model", metavar="MODEL")
    ex.add_argument("--format", choices=["gguf", "onnx"], default="gguf")
    ex.add_argument("--dtype", default="f32", help="GGUF: f32, f16, q8_0 or q4_0 for the weight matrices")
    ex.add_argument("--quantize", choices=["int8"], help="ONNX: dynamic int8 quantization of MatMul weights")
    ex.add_argument("--out", required=True, metavar="FILE|DIR")
    ex.add_argument("--softmax-teacher", action="store_true",
                    help="write the weights (LoRA merged) as a plain llama file with softmax attention, for llama.cpp")

    ver = sub.add_parser("verify", help="check an exported file or folder, optionally against a reference model")
    ver.add_argument("file", metavar="FILE|DIR")
    ver.add_argument("--against", metavar="MODEL", help="reference model: compare logits and a greedy generation")
    ver.add_argument("--tokens", type=positive_int, default=32, help="greedy tokens to compare")
    ver.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    att = bsub.add_parser("attention", help="chunked hybrid attention vs the quadratic reference on the CPU")
    att.add_argument("--lengths", type=int_list, default=[1024, 4096, 16384], help="sequence lengths")
    att.add_argument("--forms", default="reference,chunked", help="forms to time (reference, chunked)")
    att.add_argument("--heads", type=positive_int, default=9)
    att.add_argument("--head-dim", type=positive_int, default=64)
    att.add_argument("--feature-dim", type=positive_int, default=64)
    att.add_argument("--window-size", type=positive_int, default=64)
    att.add_argument("--backward", action="store_true", help="time forward + backward too")
    att.add_argument("--memory-limit-gb", type=float, default=18.0, help="address-space cap per measurement")
    att.add_argument("--json", metavar="OUT", help="write the results as JSON")
    bk = bsub.add_parser("kernels", help="Triton kernels vs PyTorch chunked, SDPA flash and the reference (GPU)")
    bk.add_argument("--lengths", type=int_list, default=[1024, 2048, 4096, 8192, 16384, 32768])
    bk.add_argument("--shapes", default="smollm2-135m,llama-3-8b", help="head shapes: smollm2-135m, llama-3-8b")
    bk.add_argument("--impls", default="triton,chunked,sdpa-flash,reference")
    bk.add_argument("--reference-max", type=positive_int, default=8192, help="longest N for the quadratic reference")
    bk.add_argument("--json", metavar="OUT")
    bm = bsub.add_parser("memory", help="peak RSS and speed against context: our runtime vs llama.cpp")
    bm.add_argument("model", metavar="MODEL", nargs="?",
                    help="linearized model (name, checkpoint), a lolcats .gguf or an ONNX folder")
    bm.add_argument("--merge", metavar="JSON", nargs="+",
                    help="measure nothing: one report from earlier --json files (later files win on the same engine, weights, context)")
    bm.add_argument("--contexts", type=int_list, default=[1024, 4096, 16384, 65536, 131072])
    bm.add_argument("--engines", default="gguf,onnx", help="our engines to measure: gguf, onnx")
    bm.add_argument("--baseline", choices=["llama.cpp"], help="also run llama.cpp on the softmax teacher")
    bm.add_argument("--baseline-max", type=positive_int, help="longest context to run the baseline at")
    bm.add_argument("--dtype", default="q8_0", help="GGUF weight precision, ours and the teacher's (default q8_0)")
    bm.add_argument("--onnx-weights", choices=["f32", "int8"], default="int8")
    bm.add_argument("--gguf-weights", choices=["float32", "stored"], default="float32",
                    help="the numpy engine's weights: dequantized to float32 at load, or q8_0 kept as stored")
    bm.add_argument("--onnx", metavar="DIR", help="an ONNX export to measure (default: exported into --work-dir)")
    bm.add_argument("--teacher-gguf", metavar="FILE", help="the llama.cpp baseline's file (default: exported)")
    bm.add_argument("--work-dir", default="out/bench-memory", help="exports are made and kept here")
    bm.add_argument("--decode-tokens", type=positive_int, default=64)
    bm.add_argument("--repeats", type=positive_int, default=1, help="fresh processes per row; the row is their median")
    bm.add_argument("--threads", type=positive_int, help="threads per engine (default: all cores)")
    bm.add_argument("--text", metavar="FILE", help="UTF-8 text to build contexts from (default: the corpus)")
    bm.add_argument("--out", metavar="REPORT.md")
    bm.add_argument("--plot", metavar="PNG")
    bm.add_argument("--json", metavar="OUT")
    bex = bsub.add_parser("exports", help="export time, size, memory and quality per format and precision")
    bex.add_argument("model", metavar="MODEL", help="linearized checkpoint")
    bex.add_argument("--targets", default="gguf:f32,gguf:f16,gguf:q8_0,gguf:q4_0,onnx:f32,onnx:int8")
    bex.add_argument("--tokens", type=positive_int, default=2048, help="held-out tokens for quality")
    bex.add_argument("--seq-len", type=positive_int, default=1024)
    bex.add_argument("--data", metavar="PATH")
    bex.add_argument("--out-dir", metavar="DIR", help="keep the exports here (default: a temporary folder)")
    bex.add_argument("--json", metavar="OUT")
    return p


# --- subcommands -------------------------------------------------------------------------------


def cmd_info(args):
    from .loading import load_model
    from .model import is_linearized, layer_plan, lolcats_config, state_bytes

    loaded = load_model(args.model)
    model, a = loaded.model, loaded.model.args
    linear = is_linearized(model)
    kv_per_token = 2 * a.num_kv_heads * a.head_dim * 4  # float32 keys and values, one layer
    plan = layer_plan(model)
    info = {
        "model": args.model, "path": loaded.path, "kind": loaded.kind, "family": a.family,
        "layers": a.num_layers, "hidden_size": a.hidden_size, "heads": a.num_heads, "kv_heads": a.num_kv_heads,
        "head_dim": a.head_dim, "vocab_size": a.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_plan": _plan_text(plan),
        "linearized": linear,
        "lolcats": lolcats_config(model) if linear else None,
        "state_bytes": state_bytes(model),
        "kv_cache_bytes_per_token": None if linear else a.num_layers * kv_per_token,
        # what the attention keeps at each context length: fixed for hybrid layers and base
        # windows, growing for full softmax layers
        "state_bytes_at": {n: state_bytes(model) if linear else sum(
            kv_per_token * (n if a.window_of(i) is None else min(n, a.window_of(i))) for i in range(a.num_layers))
            for n in (1024, 8192, 32768, 131072)},
        "chat_template": loaded.tokenizer.chat_template is not None,
    }
    if args.json:
        info["layer_plan"] = plan
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "state_bytes_at":
            value = ", ".join(f"{n // 1024}K: {b / 2**20:.1f} MiB" for n, b in value.items())
        print(f"{key:26s} {value}")


def _plan_text(plan: list) -> str:
    """Runs of equal layer kinds: "hybrid x30" or "softmax-window(4096) x5, softmax x1, ..."."""
    runs = []
    for kind in plan:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", ".join(f"{k} x{n}" for k, n in runs)


def cmd_linearize(args):
    from .checkpoint import save_checkpoint
    from .loading import load_model
    from .model import linearize, state_bytes

    loaded = load_model(args.base)
    if loaded.kind == "lolcats-checkpoint":
        raise CLIError(f"{args.base} is already linearized")
    model = linearize(loaded.model, window_size=args.window_size, feature_dim=args.feature_dim,
                      sliding_layers=args.sliding_layers)
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
    from .data import load_corpus
    from .train import TrainConfig, train

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    config = TrainConfig(stage1_tokens=args.stage1_tokens, stage2_tokens=args.stage2_tokens, seq_len=args.seq_len,
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
        from .gguf_io import read_gguf_architecture

        return read_gguf_architecture(path) == "lolcats"
    return False


def cmd_generate(args):
    if _is_export(args.model):
        return _generate_on_runtime(args)
    if args.save_state or args.load_state or args.stop or args.repetition_penalty != 1.0:
        raise CLIError("--save-state, --load-state, --stop and --repetition-penalty need an export "
                       "(a lolcats .gguf file or an ONNX folder: edge-lolcats export)")
    from .generate import SamplingConfig, generate
    from .runtime.generation import peak_rss_mb
    from .loading import load_model
    from .model import state_bytes

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
        from .runtime.generation import TextStream

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
    from .runtime import load

    text = _read_prompt(args)
    temperature = 0.0 if args.temperature is None else args.temperature
    if args.temperature is not None and not args.temperature > 0:
        raise CLIError(f"--temperature must be > 0; got {args.temperature}")
    options = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    from .runtime.generation import PREFILL_CHUNK
    from .runtime.sampling import Sampling

    Sampling(temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)  # bad values fail before loading
    model = load(args.model, threads=args.threads)
    session = model.restore(args.load_state) if args.load_state else model.session()
    if args.chat:  # a resumed chat continues its conversation with only the new turn
        text = session.turn_text(text)
    session.feed(text, chunk_size=args.prefill_chunk or PREFILL_CHUNK, progress=not args.json)
    prefill = session.stats
    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    out = session.generate(args.max_new_tokens, on_text=stream, **options)
    stats = session.stats.as_dict()
    stats.update(prompt_tokens=prefill.prompt_tokens, prefill_seconds=prefill.prefill_seconds,
                 prefill_tokens_per_s=prefill.prefill_tokens_per_s, kv_cache_bytes=None,
                 engine=model.engine.format, weights=model.engine.weights)
    if args.save_state:
        stats["state_file_bytes"] = session.save(args.save_state)
    if args.json:
        print(json.dumps({"text": out, "token_ids": session.last_token_ids, **stats}))
        return
    sys.stdout.write("\n")
    print(f"[{stats['engine']} {stats['weights']}: prefill {stats['prompt_tokens']} tok at "
          f"{_rate(stats['prefill_tokens_per_s'])}, decode {stats['new_tokens']} tok at {_rate(stats['decode_tokens_per_s'])}, "
          f"context {stats['context_tokens']} tok, state {stats['state_bytes'] / 2**20:.2f} MiB (fixed), "
          f"peak RSS {stats['peak_rss_mb']:.0f} MB" + (f", state saved to {args.save_state}" if args.save_state else "")
          + "]", file=sys.stderr)


def cmd_eval(args):
    from .data import load_corpus
    from .evaluate import evaluate, markdown_table, write_json
    from .loading import load_model
    from .model import is_linearized, linearize

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
    teacher = None
    if args.teacher:
        t = load_model(args.teacher)
        if t.kind == "lolcats-checkpoint":
            raise CLIError(f"--teacher {args.teacher} is linearized; give the softmax base model")
        teacher = linearize(t.model, window_size=lolcats["window_size"], feature_dim=lolcats["feature_dim"],
                            sliding_layers=lolcats.get("sliding_layers", "linearize"))
    elif lolcats.get("lora_merged"):
        raise CLIError("LoRA is merged into this checkpoint, so its teacher cannot be recovered: pass --teacher")
    corpus = load_corpus(loaded.tokenizer, data, seq_len=seq_len, seed=seed)
    if training.get("data_fingerprint") and training["data_fingerprint"] != corpus.fingerprint():
        print(f"{PROG}: warning: this data differs from the training data; held-out text may have been trained on",
              file=sys.stderr)
    stage2_only = None
    if args.stage2_only:
        stage2_only = load_model(args.stage2_only).model
    result = evaluate(loaded.model, loaded.tokenizer, corpus, teacher=teacher, max_tokens=args.max_tokens,
                      long_docs=args.long_docs, passkey_trials=args.passkey_trials,
                      passkey_lengths=args.passkey_lengths if args.passkey_trials else (),
                      stage2_only=stage2_only, progress=not args.no_progress)
    result["model"] = args.model
    print(markdown_table(result))
    if args.json:
        write_json(args.json, result)


def cmd_export(args):
    import resource
    import time

    from .converters.gguf_export import DTYPES, export_gguf
    from .converters.onnx_export import export_onnx
    from .loading import load_model

    if args.format == "gguf":
        if args.dtype not in DTYPES:
            raise CLIError(f"unsupported --dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
        if args.quantize:
            raise CLIError("--quantize is for ONNX; GGUF takes --dtype")
        if os.path.isdir(args.out):
            raise CLIError(f"--out {args.out} is a folder; give a file name")
    else:
        if args.dtype != "f32":
            raise CLIError("--dtype is for GGUF; ONNX takes --quantize int8")
        if args.softmax_teacher:
            raise CLIError("--softmax-teacher is for GGUF (llama.cpp)")
        if os.path.isfile(args.out):
            raise CLIError(f"--out {args.out} is a file; ONNX export writes a folder")
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    if args.format == "onnx":
        summary = export_onnx(loaded.model, loaded.tokenizer, args.out, quantize=args.quantize, source=args.model)
    else:
        from tqdm import tqdm

        bar = tqdm(total=None, desc="writing tensors", unit="tensor", disable=not sys.stderr.isatty())

        def progress(i, n):
            bar.total = n
            bar.update(1)

        summary = export_gguf(loaded.model, loaded.tokenizer, args.out, dtype=args.dtype, source=args.model,
                              progress=progress, as_softmax=args.softmax_teacher)
        bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(summary))


def cmd_verify(args):
    import torch

    from .generate import generate
    from .loading import load_gguf, load_model
    from .model import forward, is_linearized, state_bytes

    prompt_text = "The history of the city begins in the early middle ages, when"
    if os.path.isdir(args.file):
        from .runtime.onnx_engine import OnnxEngine

        engine = OnnxEngine(args.file)  # checks model.json, the graph and its state inputs
        meta = engine.meta
        report = {"file": args.file, "format": "onnx", "weights": meta["weights"], "layers": meta["layers"],
                  "state_tensors": len(meta["state"]), "state_bytes": meta["state_bytes_per_sequence"],
                  "chat_template": meta.get("chat_template") is not None, "ok": True}
        prompt = engine.tokenizer.encode(prompt_text)
        if args.against:
            ref = load_model(args.against)
            from .runtime.generation import greedy_tokens

            logits, _ = engine.run(prompt, engine.empty_state())
            with torch.no_grad():
                b, _ = forward(ref.model, torch.tensor([prompt]), with_state=False)
            ga = greedy_tokens(engine, prompt, args.tokens)
            gb = generate(ref.model, prompt, max_new_tokens=args.tokens).token_ids
            report.update(_compare(args, ref, engine.tokenizer, torch.from_numpy(logits[0]), b[0, -1], ga, gb))
    elif args.file.endswith(".gguf"):
        from .gguf_io import read_gguf

        gguf = read_gguf(args.file)
        model, tokenizer = load_gguf(args.file)  # checks architecture, keys, every tensor's name and shape
        report = {"file": args.file, "format": "gguf", "architecture": gguf.architecture, "tensors": len(gguf.tensors),
                  "types": sorted({t.tensor_type.name for t in gguf.tensors.values()}),
                  "layers": model.args.num_layers, "linearized": is_linearized(model),
                  "state_bytes": state_bytes(model), "chat_template": tokenizer.chat_template is not None, "ok": True}
        if args.against:
            ref = load_model(args.against)
            prompt = tokenizer.encode(prompt_text)
            with torch.no_grad():
                a, _ = forward(model, torch.tensor([prompt]), with_state=False)
                b, _ = forward(ref.model, torch.tensor([prompt]), with_state=False)
            ga = generate(model, prompt, max_new_tokens=args.tokens).token_ids
            gb = generate(ref.model, prompt, max_new_tokens=args.tokens).token_ids
            report.update(_compare(args, ref, tokenizer, a[0, -1], b[0, -1], ga, gb))
    else:
        raise CLIError(f"{args.file}: expected a .gguf file or an ONNX export folder")
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:20s} {v}")
    if not report["ok"]:
        raise CLIError(f"greedy generation differs from {args.against} at token {report['greedy_tokens_equal']}")


def _compare(args, ref, tokenizer, logits, ref_logits, tokens, ref_tokens) -> dict:
    probe = "The history of the city"
    if ref.tokenizer.encode(probe) != tokenizer.encode(probe):
        raise CLIError("the export's tokenizer does not match the reference model's")
    same = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y), len(tokens))
    return {"against": args.against, "max_logit_diff": float((logits - ref_logits).abs().max()),
            "greedy_tokens_equal": same, "greedy_tokens": len(tokens), "ok": same == len(tokens)}


def cmd_bench(args):
    if args.bench == "attention":
        from .bench_attention import run
    elif args.bench == "kernels":
        from .kernels.bench import run
    elif args.bench == "memory":
        from .bench_memory import run
    else:
        from .bench_exports import run
    run(args)


COMMANDS = {"info": cmd_info, "linearize": cmd_linearize, "generate": cmd_generate, "eval": cmd_eval,
            "export": cmd_export, "verify": cmd_verify, "bench": cmd_bench}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        if os.environ.get("EDGE_LOLCATS_DEBUG"):
            raise
        known = isinstance(e, _user_errors())
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not known:
            message = f"internal error ({type(e).__name__}): {message} (set EDGE_LOLCATS_DEBUG=1 for a traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2 if known else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
