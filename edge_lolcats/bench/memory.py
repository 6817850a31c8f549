"""``edge-lolcats bench memory``: peak RSS, state size, prefill and decode speed against context
length for our runtime (GGUF / numpy and ONNX / onnxruntime engines) and, with ``--baseline
llama.cpp``, llama.cpp on the softmax teacher at the same weight precision. The measurements
themselves are in :mod:`edge_lolcats.bench.runtime` (torch-free, one fresh process each); this
module makes the exports a model name needs (that part uses torch) and writes the report.
"""
from __future__ import annotations

import json
import os
import sys

from edge_lolcats.converters.gguf_names import KEY_FILE_TYPE, file_type_name
from edge_lolcats.formats.gguf_io import read_gguf

from . import runtime as bench


OURS = ("compiled", "numpy", "onnx")


def _ensure_exports(args) -> dict:
    """{label: (engine, path)} to measure, one per engine and GGUF precision (``--dtype`` may list
    several); exports the model (and its teacher per precision) into --work-dir when needed."""
    engines = [bench.ALIASES.get(e.strip(), e.strip()) for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in OURS]
    if bad:
        raise ValueError(f"unknown engine {bad[0]!r}; choose from {', '.join(OURS)}")
    if args.baseline not in (None, "llama.cpp"):
        raise ValueError(f"unknown baseline {args.baseline!r}; the baseline is llama.cpp")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    gguf_engines = [e for e in engines if e != "onnx"]
    model, work, paths = args.model, args.work_dir, {}
    if os.path.isfile(model) and model.endswith(".gguf"):
        if "onnx" in engines and not args.onnx:
            raise ValueError("a .gguf MODEL measures the GGUF engines; give --onnx DIR for the ONNX one")
        dtypes = [file_type_name(read_gguf(model).value(KEY_FILE_TYPE))]  # the file's own precision
        paths.update({(e, dtypes[0]): model for e in gguf_engines})
    elif os.path.isdir(model) and os.path.isfile(os.path.join(model, "model.json")):
        if gguf_engines:
            raise ValueError("an ONNX MODEL measures the onnx engine; use --engines onnx (or pass the .gguf file)")
        paths[("onnx", None)] = model
    if args.onnx:
        paths[("onnx", None)] = args.onnx
    if args.teacher_gguf and len(dtypes) > 1:
        raise ValueError("--teacher-gguf is one precision; give one --dtype with it")
    for engine in engines:
        for dtype in (dtypes if engine != "onnx" else [None]):
            if (engine, dtype) in paths:
                continue
            target = os.path.join(work, f"model.{dtype}.gguf" if dtype else f"onnx-{args.onnx_weights}")
            if not os.path.exists(target):
                _export(model, "onnx" if engine == "onnx" else "gguf", target, args, dtype)
            paths[(engine, dtype)] = target
    if args.baseline == "llama.cpp":
        for dtype in dtypes:
            teacher = args.teacher_gguf or os.path.join(work, f"teacher.{dtype}.gguf")
            if not os.path.exists(teacher):
                if os.path.isfile(model) or os.path.isfile(os.path.join(model, "model.json")):
                    raise ValueError("the llama.cpp baseline needs --teacher-gguf FILE (edge-lolcats export BASE "
                                     "--format gguf --dtype ... --softmax-teacher) when MODEL is an export")
                _export(model, "teacher", teacher, args, dtype)
            paths[("llama.cpp", dtype)] = teacher
    return {f"{engine}:{dtype}" if dtype else engine: (engine, path) for (engine, dtype), path in paths.items()}


def _export(model_name, kind, path, args, dtype):
    from edge_lolcats.converters.gguf_export import export_gguf
    from edge_lolcats.converters.onnx_export import export_onnx
    from edge_lolcats.formats.loading import load_model

    print(f"exporting {model_name} ({kind}) to {path} ...", file=sys.stderr)
    loaded = load_model(model_name)
    if kind == "onnx":
        export_onnx(loaded.model, loaded.tokenizer, path, quantize=None if args.onnx_weights == "f32" else "int8",
                    source=model_name)
    else:
        export_gguf(loaded.model, loaded.tokenizer, path, dtype=dtype, source=model_name,
                    as_softmax=kind == "teacher")


def median_result(runs: list[dict]) -> dict:
    """One row from repeated fresh-process measurements of one engine at one context: the median
    of each figure (this VM's fresh processes spread by about 15%), with the number of runs."""
    import statistics

    row = dict(runs[0], repeats=len(runs))
    for key in ("peak_rss_mb", "prefill_tokens_per_s", "decode_tokens_per_s", "load_s", "first_token_s"):
        if key not in row:
            continue
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    return row


def merged_results(files: list[str]) -> list[dict]:
    """The results of several ``--json`` reports, one row per (engine, weights, context), later files first."""
    rows = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a bench memory --json report ({e})") from None
        for r in results:
            rows[(r["engine"], r.get("weights"), r["context"])] = r
    order = {e: i for i, e in enumerate(bench.ENGINES)}
    return sorted(rows.values(), key=lambda r: (r["context"], order.get(r["engine"], len(order))))


def run(args):
    if args.merge:
        results, paths = merged_results(args.merge), {"merged": args.merge}
        args.model = args.model or ", ".join(args.merge)
        return _report(args, results, paths)
    if not args.model:
        raise ValueError("give a MODEL to measure (or --merge earlier --json reports)")
    paths = _ensure_exports(args)
    results = []
    for context in args.contexts:
        for label, (engine, path) in paths.items():
            if engine == "llama.cpp" and args.baseline_max and context > args.baseline_max:
                print(f"llama.cpp at {context}: skipped (--baseline-max {args.baseline_max})", file=sys.stderr)
                continue
            r = median_result([bench.run_one(engine, path, context, args.decode_tokens, args.text, args.threads)
                               for _ in range(args.repeats)])
            results.append(r)
            print(f"{label:14s} {context:>7d} tok: peak RSS {r['peak_rss_mb']:.0f} MB, state {r['state_bytes'] / 2**20:.1f} "
                  f"MiB, prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s, "
                  f"first token after {r['first_token_s']:.2f} s", file=sys.stderr)
    return _report(args, results, {label: path for label, (_, path) in paths.items()})


def _report(args, results: list[dict], paths: dict) -> list[dict]:
    table = bench.markdown(results)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"# bench memory: {args.model}\n\n{table}\n")
    if args.plot:
        bench.plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "decode_tokens": args.decode_tokens, "paths": paths,
                       "results": [{k: r.get(k) for k in (*bench.FIELDS, "weights", "repeats")} for r in results]}, f, indent=2)
    return results
