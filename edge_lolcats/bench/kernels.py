"""``edge-lolcats bench kernels``: the Triton hybrid attention on a GPU against the PyTorch chunked
form, the quadratic reference, and softmax attention through torch SDPA (flash backend).

Times are medians from ``triton.testing.do_bench``; memory is the peak CUDA allocation during one
call above what the inputs hold. B = 1, bfloat16 inputs, head shapes of SmolLM2-135M (9 heads,
3 kv heads, D = 64) and Llama-3-8B (32 heads, 8 kv heads, D = 128), feature dim 64, window 64.
"""
from __future__ import annotations

import json
import sys

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3-8b": (32, 8, 128)}
IMPLS = ("triton", "chunked", "sdpa-flash", "reference")


def _fn(impl: str, window: int, chunk: int):
    import torch
    import torch.nn.functional as F

    from edge_lolcats.nn.hybrid_attention import hybrid_attention_chunked, hybrid_attention_reference

    from edge_lolcats.kernels.hybrid_attention import hybrid_attention_triton

    if impl == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v, *_):
            h = q.shape[1]
            k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sdpa
    form = {"triton": hybrid_attention_triton, "chunked": hybrid_attention_chunked,
            "reference": hybrid_attention_reference}[impl]
    return lambda *xs: form(*xs, window_size=window, chunk_size=chunk)[0]


def measure(impl, n, heads, kv_heads, head_dim, feature_dim=64, window=64, chunk=64, backward=False):
    import torch
    from triton.testing import do_bench

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, heads, n, head_dim, device=dev, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, n, head_dim, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2))
    fq, fk = (torch.randn(heads, head_dim, feature_dim, device=dev, generator=g) / head_dim**0.5 for _ in range(2))
    wf = torch.full((heads,), -2.1972, device=dev)
    xs = [q, k, v, fq, fk, wf]
    if backward:
        for x in xs:
            x.requires_grad_()
    fn = _fn(impl, window, chunk)
    grad = torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16)

    def call():
        if backward:
            out = fn(*xs)
            out.backward(grad.to(out.dtype))
        else:
            with torch.no_grad():
                fn(*xs)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(call, warmup=5, rep=40, grad_to_none=xs if backward else None)
    except torch.cuda.OutOfMemoryError:
        return {"impl": impl, "n": n, "backward": backward, "error": "out of memory"}
    finally:
        for x in xs:
            x.grad = None
        torch.cuda.empty_cache()
    return {"impl": impl, "n": n, "backward": backward, "ms": ms, "peak_mb": peak / 2**20}


def run(args):
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU (the kernels' correctness is tested without one: "
                         "`pytest tests/test_kernels.py` under TRITON_INTERPRET=1)")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; choose from {', '.join(IMPLS)}")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; B=1, bfloat16, F=64, W=64, C=64")
    results = []
    for shape in args.shapes.split(","):
        heads, kv_heads, head_dim = SHAPES[shape]
        print(f"\n{shape}: H={heads} Hkv={kv_heads} D={head_dim}")
        print("| N | pass | " + " | ".join(f"{i} ms (MB)" for i in impls) + " |")
        print("|---|---|" + "---|" * len(impls))
        for n in args.lengths:
            for backward in (False, True):
                cells = []
                for impl in impls:
                    if impl == "reference" and n > args.reference_max:
                        cells.append("-")
                        continue
                    r = measure(impl, n, heads, kv_heads, head_dim, backward=backward)
                    r["shape"] = shape
                    results.append(r)
                    cells.append(r.get("error") or f"{r['ms']:.2f} ({r['peak_mb']:.0f})")
                print(f"| {n} | {'fwd+bwd' if backward else 'fwd'} | " + " | ".join(cells) + " |")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=2)
