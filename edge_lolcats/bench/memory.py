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
from .targets import check
from .targets import table as target_table


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
    calibration = None
    if (dtype if kind != "onnx" else args.onnx_weights) in ("q4_0", "int4"):  # as `edge-lolcats export` rounds them
        from edge_lolcats.training.data import calibration_tokens

        calibration = calibration_tokens(loaded.tokenizer)
    if kind == "onnx":
        export_onnx(loaded.model, loaded.tokenizer, path, quantize=None if args.onnx_weights == "f32" else args.onnx_weights,
                    source=model_name, calibration=calibration)
    else:
        export_gguf(loaded.model, loaded.tokenizer, path, dtype=dtype, source=model_name,
                    as_softmax=kind == "teacher", calibration=calibration)


def median_result(runs: list[dict]) -> dict:
    """One row from repeated fresh-process measurements of one engine at one context: the median
    of each figure (this VM's fresh processes spread by about 15%), with the number of runs, and
    the largest share of CPU time any of them had stolen by the hypervisor."""
    import statistics

    row = dict(runs[0], repeats=len(runs))
    for key in ("peak_rss_mb", "prefill_tokens_per_s", "decode_tokens_per_s", "load_s", "first_token_s",
                "rss_after_decode_mb"):
        if key not in row:
            continue
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    if "steal_percent" in row:  # the most any run lost to the hypervisor: whether any figure was taken contended
        stolen = [r["steal_percent"] for r in runs if r.get("steal_percent") is not None]
        row["steal_percent"] = max(stolen) if stolen else None
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


def merged_bandwidth(files: list[str]) -> float | None:
    """The highest bandwidth any of the reports measured: the machine reached it (a lower reading is
    a moment the machine was slower, not a lower ceiling)."""
    values = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            values.append(json.load(f).get("bandwidth_bytes_per_s"))
    return max((v for v in values if v), default=None)


def run(args):
    if args.merge:
        results, paths = merged_results(args.merge), {"merged": args.merge}
        args.model = args.model or ", ".join(args.merge)
        return _report(args, results, paths, merged_bandwidth(args.merge))
    if not args.model:
        raise ValueError("give a MODEL to measure (or --merge earlier --json reports)")
    paths = _ensure_exports(args)
    # the machine's read bandwidth before and after the runs, the larger kept: one probe read half
    # of it once (17 against 29-37 GB/s, 2026-12-02), and a ceiling is what the machine can reach
    bandwidth = bench.bandwidth_in_fresh_process(threads=args.threads)
    if not args.text:
        os.makedirs(args.work_dir, exist_ok=True)
        args.text = bench.write_context_text(os.path.join(args.work_dir, "context.txt"), 6 * max(args.contexts))
    results = []
    for context in args.contexts:
        measured = {}
        for label, (engine, path) in paths.items():
            if engine == "llama.cpp" and args.baseline_max and context > args.baseline_max:
                print(f"llama.cpp at {context}: skipped (--baseline-max {args.baseline_max})", file=sys.stderr)
            else:
                measured[label] = []
        # the engines take turns, repeat by repeat: this VM's speed drifts from minute to minute
        # (decode of one engine 64-97 tok/s within a batch), so each engine's median spans the same minutes
        for _ in range(args.repeats):
            for label, runs in measured.items():
                engine, path = paths[label]
                runs.append(bench.run_one(engine, path, context, args.decode_tokens, args.text, args.threads,
                                          tile_from=args.baseline_tile))
        for label, runs in measured.items():
            r = median_result(runs)
            results.append(r)
            num = bench.num
            print(f"{label:14s} {context:>7d} tok{bench.tiled_note(r)}: peak RSS {num(r['peak_rss_mb'], '.0f')} MB, state "
                  f"{r['state_bytes'] / 2**20:.1f} MiB, prefill {num(r['prefill_tokens_per_s'], '.1f')} tok/s, decode "
                  f"{r['decode_tokens_per_s']:.1f} tok/s, first token after {num(r['first_token_s'], '.2f')} s, "
                  f"CPU stolen {num(r.get('steal_percent'), '.1f')}%", file=sys.stderr)
    bandwidth = max(bandwidth, bench.bandwidth_in_fresh_process(threads=args.threads))
    print(f"memory read bandwidth (a streaming float32 sum, the larger of before and after the runs): "
          f"{bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    return _report(args, results, {label: path for label, (_, path) in paths.items()}, bandwidth)


# the compiled runtime's targets against llama.cpp on the teacher at the same precision (issue 15):
# decode speed ratio at least this at each context; prefill likewise
DECODE_RATIOS = {1024: 1.3, 16384: 4.0, 131072: 15.0}
PREFILL_RATIOS = {1024: 1.0, 16384: 3.0}
RSS_GROWTH = 1.02  # our peak RSS at the longest context over 1K


def runtime_targets(results: list[dict], engine: str = "compiled") -> list[dict]:
    """The targets checked on one report, per weight precision where llama.cpp ran at the same one;
    a context not measured is left out, not counted as met (bandwidth: :func:`bandwidth_fractions`)."""
    rows = []
    for weights in dict.fromkeys(r.get("weights") for r in results if r["engine"] == engine):
        ours = {r["context"]: r for r in results if r["engine"] == engine and r.get("weights") == weights}
        base = {r["context"]: r for r in results if r["engine"] == "llama.cpp" and r.get("weights") == weights}
        tag = f"{weights}:"
        for ctx, ratio in DECODE_RATIOS.items():
            if ctx in ours and ctx in base:
                check(rows, f"{tag} decode at {ctx // 1024}K >= {ratio:g} x llama.cpp",
                      ours[ctx]["decode_tokens_per_s"] / base[ctx]["decode_tokens_per_s"], ratio, at_most=False)
        for ctx, ratio in PREFILL_RATIOS.items():
            if ctx in ours and ctx in base:
                check(rows, f"{tag} prefill at {ctx // 1024}K >= {ratio:g} x llama.cpp",
                      ours[ctx]["prefill_tokens_per_s"] / base[ctx]["prefill_tokens_per_s"], ratio, at_most=False)
        if 1024 in ours and 1024 in base:
            check(rows, f"{tag} peak RSS at 1K <= llama.cpp's (MB)", ours[1024]["peak_rss_mb"], base[1024]["peak_rss_mb"])
            if ours[1024].get("first_token_s") and base[1024].get("first_token_s"):
                check(rows, f"{tag} first token of a 1K prompt <= llama.cpp's (s)", ours[1024]["first_token_s"],
                      base[1024]["first_token_s"])
        longest = max(ours, default=None)
        if 1024 in ours and longest and longest > 1024:
            check(rows, f"{tag} peak RSS at {longest // 1024}K <= {RSS_GROWTH:g} x at 1K (MB)", ours[longest]["peak_rss_mb"],
                  RSS_GROWTH * ours[1024]["peak_rss_mb"])
    return rows


def bandwidth_fractions(results: list[dict], bandwidth: float) -> list[dict]:
    """Each row's decode traffic (bytes per token x tokens per second) as a fraction of ``bandwidth``."""
    return [{"engine": r["engine"], "weights": r.get("weights"), "context": r["context"],
             "fraction": r["decode_bytes_per_token"] * r["decode_tokens_per_s"] / bandwidth}
            for r in results if r.get("decode_bytes_per_token") and r.get("decode_tokens_per_s")]


def _report(args, results: list[dict], paths: dict, bandwidth: float | None = None) -> list[dict]:
    table = bench.markdown(results)
    print(table)
    targets = runtime_targets(results)
    if targets:
        print("\n" + target_table(targets))
    fractions = bandwidth_fractions(results, bandwidth) if bandwidth else []
    if fractions:
        print(f"\ndecode traffic as a share of this machine's {bandwidth / 1e9:.1f} GB/s (a streaming "
              f"read of 256 MB): " + ", ".join(
                  f"{f['engine']} {f['weights']} {f['context'] // 1024}K {100 * f['fraction']:.0f}%" for f in fractions))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"# bench memory: {args.model}\n\n{table}\n")
    if args.plot:
        bench.plot(results, args.plot, bandwidth)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "decode_tokens": args.decode_tokens, "paths": paths,
                       "bandwidth_bytes_per_s": bandwidth, "targets": targets, "bandwidth_fractions": fractions,
                       "results": [{k: r.get(k) for k in (*bench.FIELDS, "weights", "repeats", "decode_bytes_per_token")}
                                   for r in results]}, f, indent=2)
    return results
