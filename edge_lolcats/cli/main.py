"""The ``edge-lolcats`` command: its parser and dispatch. One module per command beside this one;
heavy imports (torch, transformers) happen inside the commands, so ``edge-lolcats --help`` and the
torch-free parts work without them."""
from __future__ import annotations

import argparse
import os
import sys

from . import bench, evaluate, export, generate, info, linearize
from .common import PROG, _user_errors, int_list, non_negative_int, positive_int
from edge_lolcats.runtime.api import ACTIVATIONS, GGUF_ENGINES


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
    lin.add_argument("--feature-maps", choices=("pre-rope", "post-rope"), default="pre-rope",
                     help="feature maps on q, k before RoPE (default: the linear branch sees no position) or after "
                          "(the first models')")
    lin.add_argument("--decay", action=argparse.BooleanOptionalAction, default=True,
                     help="a learned decay per head on the linear state (default on)")
    lin.add_argument("--sink-tokens", type=non_negative_int, default=4,
                     help="first tokens kept in the softmax set for ever (default 4)")
    lin.add_argument("--delta", action="store_true",
                     help="save only the new weights, on top of --base (a few MB instead of the whole model)")
    tr = lin.add_argument_group("training (both budgets 0: swap the attention only, no training)")
    tr.add_argument("--stage1-tokens", type=non_negative_int, default=0, help="attention-transfer budget in tokens")
    tr.add_argument("--stage2-tokens", type=non_negative_int, default=0, help="LoRA budget in tokens")
    tr.add_argument("--data", metavar="PATH", help=".txt/.md/.jsonl file or folder (default: the installed corpus)")
    tr.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per training sequence")
    tr.add_argument("--stage2-seq-len", type=positive_int, metavar="N",
                    help="stage 2's sequences, if longer or shorter than --seq-len (same text)")
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
    gen.add_argument("--prefill-chunk", type=positive_int, help="prompt tokens per prefill chunk (default: 1024 in PyTorch; on the runtime 256 for the compiled and ONNX engines, 128 for numpy)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    rt = gen.add_argument_group("on an export (lolcats .gguf file or ONNX folder: the torch-free runtime)")
    rt.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    rt.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    rt.add_argument("--save-state", metavar="FILE", help="save the session's state here at the end (a few MB)")
    rt.add_argument("--load-state", metavar="FILE", help="resume a saved session; the prompt continues it")
    rt.add_argument("--threads", type=positive_int, help="compute threads (default: all cores)")
    rt.add_argument("--gguf-engine", choices=GGUF_ENGINES, default="compiled",
                    help="a .gguf file's engine: compiled (default) or the numpy reference (numpy, numpy-stored)")
    rt.add_argument("--activations", choices=ACTIVATIONS, default="q8_0",
                    help="a .gguf file's products with q8_0 / q4_0 weights take their input quantized in blocks of 32 "
                         "(q8_0, the default, as llama.cpp: int8 dot products) or as float32 (slower)")

    ev = sub.add_parser("eval", help="a linearized model against its teacher and fixed-memory baselines")
    ev.add_argument("model", metavar="MODEL", help="linearized checkpoint")
    ev.add_argument("--teacher", metavar="NAME|PATH", help="softmax teacher (default: the checkpoint's base)")
    ev.add_argument("--data", metavar="PATH", help="held-out text: one .txt/.md file read whole, or a folder / .jsonl "
                    "to split as in training (default: the training data's held-out split)")
    ev.add_argument("--max-tokens", type=positive_int, default=32768, help="held-out tokens for perplexity")
    ev.add_argument("--seq-len", type=positive_int, help="held-out sequence length (default: as in training)")
    ev.add_argument("--seed", type=int, help="split seed (default: as in training)")
    ev.add_argument("--long-docs", type=non_negative_int, default=2, help="long texts for perplexity by position")
    ev.add_argument("--max-length", type=positive_int, default=32768,
                    help="positions read for perplexity by position (default 32768)")
    ev.add_argument("--passkey-trials", type=non_negative_int, default=5, help="trials per passkey length")
    ev.add_argument("--passkey-lengths", type=int_list, default=[1024, 4096, 8192, 16384, 32768])
    ev.add_argument("--plot", metavar="PNG", help="draw perplexity against position for every model")
    ev.add_argument("--stage2-only", metavar="CKPT", help="baseline: a linearization trained with LoRA alone")
    ev.add_argument("--json", metavar="OUT", help="write all results as one JSON object")
    ev.add_argument("--no-progress", action="store_true")

    ex = sub.add_parser("export", help="export to one GGUF file or an ONNX folder (explicit recurrent state)")
    ex.add_argument("model", metavar="MODEL")
    ex.add_argument("--format", choices=["gguf", "onnx"], default="gguf")
    ex.add_argument("--dtype", default="f32", help="GGUF: f32, f16, q8_0 or q4_0 for the weight matrices")
    ex.add_argument("--quantize", choices=["int8", "int4"],
                    help="ONNX: linear layers as MatMulNBits with the q8_0 (int8) or q4_0 (int4) GGUF file's weights")
    ex.add_argument("--out", required=True, metavar="FILE|DIR")
    ex.add_argument("--softmax-teacher", action="store_true",
                    help="write the weights (LoRA merged) as a plain llama file with softmax attention, for llama.cpp")
    ex.add_argument("--calibration", metavar="PATH|none",
                    help="q4_0 / int4: text whose activations weight the rounding (default: the installed corpus's "
                         "training split; 'none': gguf-py's plain rounding)")

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
    bm.add_argument("--engines", default="compiled,onnx",
                    help="our engines to measure: compiled (GGUF; 'gguf' says the same), numpy (GGUF, the reference), onnx")
    bm.add_argument("--baseline", choices=["llama.cpp"], help="also run llama.cpp on the softmax teacher")
    bm.add_argument("--baseline-max", type=positive_int, help="longest context to run the baseline at")
    bm.add_argument("--baseline-tile", type=positive_int, metavar="N",
                    help="above N tokens, time llama.cpp's decode after N tokens' KV cache tiled to the context "
                         "(no quadratic prefill: hours at 128K on 2 cores); its prefill and peak RSS are not measured")
    bm.add_argument("--dtype", default="q8_0",
                    help="GGUF weight precisions, ours and the teacher's, comma-separated (default q8_0)")
    bm.add_argument("--onnx-weights", choices=["f32", "int8", "int4"], default="int8")
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
    bf = bsub.add_parser("families", help="each family's tiny model: every backend's logits against transformers")
    bf.add_argument("--tokens", type=positive_int, default=48, help="text length (the base windows are 16)")
    bf.add_argument("--json", metavar="OUT")
    bex = bsub.add_parser("exports", help="export time, size, memory and quality per format and precision")
    bex.add_argument("model", metavar="MODEL", help="linearized checkpoint")
    bex.add_argument("--targets", default="gguf:f32,gguf:f16,gguf:q8_0,gguf:q4_0,onnx:f32,onnx:int8,onnx:int4")
    bex.add_argument("--tokens", type=positive_int, default=2048, help="held-out tokens for quality")
    bex.add_argument("--seq-len", type=positive_int, default=1024)
    bex.add_argument("--data", metavar="PATH")
    bex.add_argument("--out-dir", metavar="DIR", help="keep the exports here (default: a temporary folder)")
    bex.add_argument("--json", metavar="OUT")
    return p


# --- subcommands -------------------------------------------------------------------------------


COMMANDS = {"info": info.cmd_info, "linearize": linearize.cmd_linearize, "generate": generate.cmd_generate,
            "eval": evaluate.cmd_eval, "export": export.cmd_export, "verify": export.cmd_verify,
            "bench": bench.cmd_bench}


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
