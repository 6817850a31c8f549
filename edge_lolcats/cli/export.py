"""edge-lolcats export and verify: GGUF and ONNX files, checked against a model."""
from __future__ import annotations

import json
import os
import sys

from .common import CLIError


def cmd_export(args):
    from edge_lolcats.runtime.generation import peak_rss_mb
    import time

    from edge_lolcats.converters.gguf_export import DTYPES, export_gguf
    from edge_lolcats.converters.onnx_export import export_onnx
    from edge_lolcats.formats.loading import load_model

    if args.format == "gguf":
        if args.dtype not in DTYPES:
            raise CLIError(f"unsupported --dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
        if args.quantize:
            raise CLIError("--quantize is for ONNX; GGUF takes --dtype")
        if os.path.isdir(args.out):
            raise CLIError(f"--out {args.out} is a folder; give a file name")
    else:
        if args.dtype != "f32":
            raise CLIError("--dtype is for GGUF; ONNX takes --quantize int8 or int4")
        if args.softmax_teacher:
            raise CLIError("--softmax-teacher is for GGUF (llama.cpp)")
        if os.path.isfile(args.out):
            raise CLIError(f"--out {args.out} is a file; ONNX export writes a folder")
    four_bit = args.dtype == "q4_0" or args.quantize == "int4"
    if args.calibration and not four_bit:
        raise CLIError("--calibration is for q4_0 (GGUF) and int4 (ONNX): 8-bit and float weights round as they are")
    if args.calibration not in (None, "none") and not os.path.exists(args.calibration):
        raise CLIError(f"--calibration {args.calibration}: no such file or folder")
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    calibration = None
    if four_bit and args.calibration != "none":
        from edge_lolcats.training.data import calibration_tokens

        print("calibrating the 4-bit rounding on "
              f"{args.calibration or 'the installed corpus'}'s training text", file=sys.stderr)
        calibration = calibration_tokens(loaded.tokenizer, args.calibration)
    from tqdm import tqdm

    # a float32 ONNX export rounds nothing: no bar
    bar = tqdm(total=None, desc="rounding weights" if args.format == "onnx" else "writing tensors",
               unit="matrix" if args.format == "onnx" else "tensor",
               disable=not sys.stderr.isatty() or (args.format == "onnx" and not args.quantize))

    def progress(i, n):
        bar.total = n
        bar.update(1)

    if args.format == "onnx":
        summary = export_onnx(loaded.model, loaded.tokenizer, args.out, quantize=args.quantize, source=args.model,
                              calibration=calibration, progress=progress)
    else:
        summary = export_gguf(loaded.model, loaded.tokenizer, args.out, dtype=args.dtype, source=args.model,
                              progress=progress, as_softmax=args.softmax_teacher, calibration=calibration)
    bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(summary))


def cmd_verify(args):
    import torch

    from edge_lolcats.nn.generate import generate
    from edge_lolcats.formats.loading import load_gguf, load_model
    from edge_lolcats.nn.model import forward, is_linearized, state_bytes

    prompt_text = "The history of the city begins in the early middle ages, when"
    if os.path.isdir(args.file):
        from edge_lolcats.runtime.onnx_engine import OnnxEngine

        engine = OnnxEngine(args.file)  # checks model.json, the graph and its state inputs
        meta = engine.meta
        report = {"file": args.file, "format": "onnx", "weights": meta["weights"], "layers": meta["layers"],
                  "state_tensors": len(meta["state"]), "state_bytes": meta["state_bytes_per_sequence"],
                  "chat_template": meta.get("chat_template") is not None, "ok": True}
        prompt = engine.tokenizer.encode(prompt_text)
        if args.against:
            ref = load_model(args.against)
            from edge_lolcats.runtime.generation import greedy_tokens

            logits, _ = engine.run(prompt, engine.empty_state())
            with torch.no_grad():
                b, _ = forward(ref.model, torch.tensor([prompt]), with_state=False)
            ga = greedy_tokens(engine, prompt, args.tokens)
            gb = generate(ref.model, prompt, max_new_tokens=args.tokens).token_ids
            report.update(_compare(args, ref, engine.tokenizer, torch.from_numpy(logits[0]), b[0, -1], ga, gb))
    elif args.file.endswith(".gguf"):
        from edge_lolcats.formats.gguf_io import read_gguf

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
