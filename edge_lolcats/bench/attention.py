"""``edge-lolcats bench attention``: the chunked hybrid attention against the quadratic reference
on the CPU, one fresh process per measurement so that peak RSS is honest."""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time

from edge_lolcats.runtime.generation import peak_rss_mb


def worker(form: str, n: int, heads: int, head_dim: int, feature_dim: int, window: int, backward: bool,
           limit_gb: float) -> dict:
    limit = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from edge_lolcats.nn.hybrid_attention import FORMS

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
    fq, fk = (torch.randn(heads, head_dim, feature_dim, generator=g) / head_dim**0.5 for _ in range(2))
    wf = torch.full((heads,), -2.1972)
    tensors = [q, k, v, fq, fk, wf]
    if backward:
        for t in tensors:
            t.requires_grad_()
    fn = FORMS[form]
    before_mb = peak_rss_mb()

    def run_once():
        if backward:
            out, _ = fn(*tensors, window_size=window, chunk_size=64)
            out.sum().backward()
        else:
            with torch.no_grad():
                fn(*tensors, window_size=window, chunk_size=64)

    repeats = 3 if n <= 4096 else 1
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_once()
            times.append(time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as e:
        return {"form": form, "n": n, "backward": backward, "error": f"out of memory under {limit_gb:g} GB cap"
                if "alloc" in str(e).lower() or isinstance(e, MemoryError) else str(e).splitlines()[0]}
    peak_mb = peak_rss_mb()
    return {"form": form, "n": n, "backward": backward, "seconds": min(times),
            "tokens_per_s": n / min(times), "peak_rss_mb": peak_mb, "extra_rss_mb": peak_mb - before_mb}


def run(args):
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    for f in forms:
        if f not in ("reference", "chunked"):
            raise ValueError(f"unknown form {f!r}; choose from reference, chunked")
    modes = [False, True] if args.backward else [False]
    results = []
    print(f"hybrid attention, B=1 H={args.heads} D={args.head_dim} F={args.feature_dim} W={args.window_size}, "
          f"float32, {platform.machine()} CPU, torch threads default", file=sys.stderr)
    header = "| form | N | pass | time (s) | tokens/s | peak RSS (MB) | RSS above inputs (MB) |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        for form in forms:
            for backward in modes:
                cmd = [sys.executable, "-m", "edge_lolcats.bench.attention", json.dumps(
                    [form, n, args.heads, args.head_dim, args.feature_dim, args.window_size, backward,
                     args.memory_limit_gb])]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                    r = {"form": form, "n": n, "backward": backward, "error": f"exit {proc.returncode}: {tail}"}
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(r)
                mode = "fwd+bwd" if backward else "fwd"
                if "error" in r:
                    print(f"| {form} | {n} | {mode} | {r['error']} | | | |")
                else:
                    print(f"| {form} | {n} | {mode} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                          f"{r['peak_rss_mb']:.0f} | {r['extra_rss_mb']:.0f} |")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "machine": platform.node()}, f, indent=2)


if __name__ == "__main__":
    print(json.dumps(worker(*json.loads(sys.argv[1]))))
