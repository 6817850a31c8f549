"""edge-lolcats bench: the benchmarks in edge_lolcats.bench."""
from __future__ import annotations


def cmd_bench(args):
    if args.bench == "attention":
        from edge_lolcats.bench.attention import run
    elif args.bench == "kernels":
        from edge_lolcats.bench.kernels import run
    elif args.bench == "families":
        from edge_lolcats.bench.families import run
    elif args.bench == "memory":
        from edge_lolcats.bench.memory import run
    else:
        from edge_lolcats.bench.exports import run
    run(args)
