"""Where the time goes in one forward+backward of the Triton hybrid attention (torch profiler, GPU).

    python -m edge_lolcats.bench.kernel_profile [N] [H] [Hkv] [D]
"""
import sys

import torch

from .kernels import measure  # noqa: F401  (same inputs as the benchmark)
from edge_lolcats.kernels.hybrid_attention import hybrid_attention_triton


def main(n=16384, heads=9, kv_heads=3, head_dim=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, n, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, n, head_dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    fq, fk = (torch.randn(heads, head_dim, 64, device="cuda", generator=g) / head_dim**0.5 for _ in range(2))
    wf = torch.full((heads,), -2.1972, device="cuda")
    xs = [x.requires_grad_() for x in (q, k, v, fq, fk, wf)]
    grad = torch.randn_like(q)

    def step():
        out, _ = hybrid_attention_triton(*xs, window_size=64, chunk_size=64)
        out.backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
