"""Long-context memory and speed: our runtime (both engines) against llama.cpp on the softmax teacher.

Every measurement runs in a fresh process (``python -m edge_lolcats.bench.runtime --worker ...``),
so peak RSS is that of one model at one context length and nothing else. A measurement: tokenize
real text (the default corpus, or ``--text``) to exactly ``context`` tokens, prefill them (timed),
then decode ``decode_tokens`` greedy tokens after them (timed), then report the process's peak RSS.
No torch here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from edge_lolcats.converters.gguf_names import KEY_FILE_TYPE, file_type_name
from edge_lolcats.runtime.generation import current_rss_mb, peak_rss_mb, prefill_chunk

# our engines (compiled and numpy read a GGUF file, onnx an ONNX folder) and the baseline
ENGINES = ("compiled", "numpy", "onnx", "llama.cpp")
ALIASES = {"gguf": "compiled"}  # the GGUF engine's name before the compiled one (older reports keep it)
FIELDS = ("engine", "context", "peak_rss_mb", "state_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
          "load_s", "first_token_s", "compile_seconds", "compiled", "extra_bufts", "kv_tiled_from", "rss_after_decode_mb",
          "steal_percent")
_TEXT_CACHE = {}


def context_text(min_chars: int, text_file: str | None = None) -> str:
    """Real prose of at least ``min_chars`` characters (repeated if the source is shorter)."""
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        from edge_lolcats.training.data import default_corpus_documents

        text = "\n\n".join(d.text for d in default_corpus_documents())
    if not text.strip():
        raise ValueError("no text to build the context from")
    # no copy when the text is long enough: at 128K tokens the repeated copy and its slice were
    # ~2 MB of the run's peak RSS, which the engine's was measured with
    return text if len(text) >= min_chars else text * (min_chars // len(text) + 1)


def context_ids(tokenize, context: int, text_file: str | None = None):
    text = context_text(context * 6, text_file)  # ~4 characters per token in English: ample
    ids = tokenize(text[: context * 6])
    if len(ids) < context:
        raise ValueError(f"could not build {context} tokens of context")
    return ids[:context]


def measure_runtime(path: str, context: int, decode_tokens: int, text_file=None, threads=None, chunk_size=None,
                    gguf_engine: str = "compiled", spawned_at: float | None = None) -> dict:
    """One model at one context. ``spawned_at`` (``time.time()`` in the parent just before it
    started this process) turns load and first-token times into times from process start."""
    import numpy as np

    from edge_lolcats.runtime.api import load

    spawned_at = spawned_at or time.time()
    model = load(path, threads=threads, gguf_engine=gguf_engine)
    loaded = time.time()
    ids = context_ids(lambda t: model.tokenizer.encode_long(t, add_special_tokens=False), context, text_file)
    session = model.session()
    session.feed(ids, chunk_size=chunk_size)
    int(np.argmax(session.logits))  # the first new token, greedy, as the decode below takes it
    first_token = time.time()
    prefill = session.stats
    session.generate(decode_tokens + 1, stop_at_eos=False)  # the first new token comes from the prefill
    engine = model.engine
    return {"engine": getattr(engine, "name", engine.format), "format": engine.format, "context": context,
            "weights": engine.weights, "peak_rss_mb": peak_rss_mb(), "state_bytes": engine.state_bytes,
            "prefill_tokens_per_s": prefill.prefill_tokens_per_s,
            "decode_tokens_per_s": session.stats.decode_tokens_per_s,
            "load_s": loaded - spawned_at, "first_token_s": first_token - spawned_at,
            "compile_seconds": getattr(engine, "compile_seconds", None), "compiled": getattr(engine, "compiled", None),
            "decode_bytes_per_token": engine.decode_bytes_per_token() if hasattr(engine, "decode_bytes_per_token") else None}


def tiled_kv_state(state, cells: int):
    """llama.cpp's state of one sequence (``llama_state_seq_get_data``) of n cells, as this build's
    KV cache writes it (llama-kv-cache.cpp; one stream), with its cells repeated up to ``cells`` at
    positions 0 .. cells - 1 (the last repeat cut short where n does not divide it): what a prefill
    of ``cells`` tokens would leave, but the keys and values of the first n repeated. The content
    does not change a decode step's work (its attention reads every cell), so the step's time after
    it is llama.cpp's decode at ``cells`` tokens of context, without the hours of quadratic prefill. Returns a uint8 array; ValueError where the
    layout is not the one this reads.

    Layout: 8 bytes (kept), u32 streams (1), u32 n, n x (i32 pos, u32 seq count, i32 seq id),
    u32 v_trans, u32 layers, per layer the keys (i32 type, u64 row bytes, n rows), then per layer
    the values (likewise; transposed: i32 type, u32 element bytes, u32 width, width x n elements)."""
    import struct

    import numpy as np

    src = np.frombuffer(state, np.uint8)
    head = 8
    streams, n = struct.unpack_from("<II", state, head)
    if streams != 1 or n == 0 or cells < n:
        raise ValueError(f"a state of {streams} streams and {n} cells cannot be tiled to {cells}")
    meta = np.frombuffer(state, "<i4", 3 * n, head + 8).reshape(n, 3)
    if not (np.array_equal(meta[:, 0], np.arange(n)) and (meta[:, 1] == 1).all()):
        raise ValueError("the state's cells are not positions 0..n-1 of one sequence")
    pos = head + 8 + 12 * n
    v_trans, layers = struct.unpack_from("<II", state, pos)
    pos += 8
    cell = np.arange(cells) % n  # the cell each tiled cell repeats
    parts = [src[:head], np.frombuffer(struct.pack("<II", 1, cells), np.uint8),
             np.column_stack([np.arange(cells, dtype="<i4"), np.ones(cells, "<i4"), np.full(cells, meta[0, 2], "<i4")])
             .view(np.uint8).ravel(), np.frombuffer(struct.pack("<II", v_trans, layers), np.uint8)]
    for kind in ("k", "v"):
        for _ in range(layers):
            if kind == "k" or not v_trans:
                _, row = struct.unpack_from("<iQ", state, pos)
                parts.append(src[pos : pos + 12])
                pos += 12
                parts.append(src[pos : pos + n * row].reshape(n, row)[cell].ravel())
                pos += n * row
            else:
                _, element, width = struct.unpack_from("<iII", state, pos)
                parts.append(src[pos : pos + 12])
                pos += 12
                parts.append(src[pos : pos + width * n * element].reshape(width, n, element)[:, cell].ravel())
                pos += width * n * element
    if pos != len(src):
        raise ValueError(f"{len(src) - pos} bytes of the state not read: not the layout this build writes")
    return np.concatenate(parts)


def measure_llama_cpp(path: str, context: int, decode_tokens: int, text_file=None, threads=None,
                      chunk_size=512, extra_bufts: bool = True, spawned_at: float | None = None,
                      tile_from: int | None = None) -> dict:
    """llama.cpp on one model at one context. ``tile_from`` (below ``context``): prefill that many
    tokens, then decode after their KV cache tiled to ``context`` cells (:func:`tiled_kv_state`);
    the row then has decode speed only, and the RSS after decode instead of the peak (the tiled
    state was built in this process's memory first)."""
    spawned_at = spawned_at or time.time()
    tiled = tile_from is not None and tile_from < context
    import llama_cpp
    from llama_cpp import Llama

    if not extra_bufts:  # Llama() has no argument for it: change the defaults it starts from
        defaults = llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts
    n_ctx = context + decode_tokens + 8
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=chunk_size, n_threads=threads or os.cpu_count(),
                logits_all=False, verbose=False)
    loaded = time.time()
    prefilled = tile_from if tiled else context
    ids = context_ids(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), prefilled, text_file)
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    token = llm.sample(top_k=1, temp=0.0)
    t2, first_token = time.perf_counter(), time.time()
    if tiled:
        _tile_llama_cpp_cache(llm, llama_cpp, context)
        t2 = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([token])
        token = llm.sample(top_k=1, temp=0.0)
    t3 = time.perf_counter()
    # the f16 KV cache llama.cpp allocates for n_ctx (2 x layers x kv heads x head size x 2 bytes per token)
    kv_per_token = 2 * int(llm.metadata["llama.block_count"]) * _kv_width(llm) * 2
    row = {"engine": "llama.cpp", "context": context, "weights": file_type_name(llm.metadata.get(KEY_FILE_TYPE)),
           "peak_rss_mb": peak_rss_mb(), "state_bytes": kv_per_token * n_ctx, "prefill_tokens_per_s": context / (t1 - t0),
           "decode_tokens_per_s": decode_tokens / (t3 - t2), "extra_bufts": extra_bufts,
           "load_s": loaded - spawned_at, "first_token_s": first_token - spawned_at,
           "decode_bytes_per_token": llama_cpp_bytes_per_token(path, context)}
    if tiled:
        row.update(peak_rss_mb=None, prefill_tokens_per_s=None, first_token_s=None, rss_after_decode_mb=current_rss_mb(),
                   kv_tiled_from=tile_from)
    return row


def _tile_llama_cpp_cache(llm, llama_cpp, cells: int):
    """Replace ``llm``'s one sequence by its cells tiled to ``cells`` (:func:`tiled_kv_state`) and
    move its position there; the tiled buffer is freed before returning."""
    import ctypes

    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    raw = (ctypes.c_uint8 * size)()
    if llama_cpp.llama_state_seq_get_data(llm.ctx, raw, size, 0) != size:
        raise RuntimeError("llama.cpp did not give its sequence state")
    state = tiled_kv_state(bytes(raw), cells)
    del raw
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    if llama_cpp.llama_state_seq_set_data(llm.ctx, pointer, state.size, 0) != state.size:
        raise RuntimeError(f"llama.cpp refused the KV state tiled to {cells} cells")
    del state, pointer
    last = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0)
    if last != cells - 1:
        raise RuntimeError(f"after the tiled state llama.cpp's last position is {last}, not {cells - 1}")
    llm.n_tokens = cells  # where llama-cpp-python's eval puts the next token


def llama_cpp_bytes_per_token(path: str, context: int) -> int:
    """What llama.cpp's decode step reads at ``context`` tokens: its file's tensors (the embedding
    table only one row, unless it is also the output projection) and the f16 KV cache."""
    from edge_lolcats.formats.gguf_io import read_gguf

    f = read_gguf(path)
    total = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight" and "output.weight" in f.tensors:
            total += t.data.nbytes // t.data.shape[0]
        else:
            total += t.data.nbytes
    arch = f.architecture
    layers, heads = int(f.metadata[f"{arch}.block_count"]), int(f.metadata[f"{arch}.attention.head_count"])
    kv_heads = int(f.metadata.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(f.metadata.get(f"{arch}.attention.key_length", int(f.metadata[f"{arch}.embedding_length"]) // heads))
    return int(total + 2 * layers * kv_heads * head_dim * 2 * context)


# how the compiled engine's threads wait between parallel regions: (label, environment, thread counts)
THREAD_SETTINGS = [("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, [2]),
                   ("OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, [2]),
                   ("GOMP_SPINCOUNT=1000", {"GOMP_SPINCOUNT": "1000"}, [2]),
                   ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}, [2]),
                   ("GOMP_SPINCOUNT=300000", {"GOMP_SPINCOUNT": "300000"}, [2]),
                   ("one thread", {}, [1]),
                   ("the engine's default (SPIN_COUNT spins, tuner over 1 and 2)", {}, [1, 2])]


def compiled_step_times(path: str, counts: list, tokens: int = 1024, decode_steps: int = 48) -> dict:
    """Prefill tokens/s over ``tokens`` (blocks of 128) and median decode ms per token after them,
    on the compiled engine with its tuner limited to ``counts`` threads."""
    import numpy as np

    from edge_lolcats.runtime.compiled_engine import CompiledEngine, ThreadTuner

    engine = CompiledEngine(path)
    engine.tuner = ThreadTuner(counts)
    ids = np.random.default_rng(0).integers(100, 40000, tokens)
    state, start = engine.empty_state(), time.perf_counter()
    chunk = prefill_chunk(engine)
    for i in range(0, tokens, chunk):
        engine.run(ids[i : i + chunk], state)
    prefill = tokens / (time.perf_counter() - start)
    times = []
    for token in ids[:decode_steps]:
        start = time.perf_counter()
        engine.run([int(token)], state)
        times.append(time.perf_counter() - start)
    return {"prefill_tokens_per_s": prefill, "decode_ms": 1e3 * float(np.median(times))}


def compiled_threads(path: str) -> list:
    """:data:`THREAD_SETTINGS` each in a fresh process, on an idle machine and with another process
    spinning on one core: [(label, busy, prefill tok/s, decode ms)]."""
    rows = []
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for label, env, counts in THREAD_SETTINGS:
                clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                cmd = [sys.executable, "-m", "edge_lolcats.bench.runtime", "--compiled-step", path, ",".join(map(str, counts))]
                r = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**clean, **env})
                out = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append((label, busy, out["prefill_tokens_per_s"], out["decode_ms"]))
        finally:
            if hog:
                hog.kill()
    return rows


def bandwidth_in_fresh_process(threads: int | None = None) -> float:
    """:func:`bandwidth_probe` in its own process: the benchmark's parent keeps neither its 256 MB
    nor numba's thread pool (whose settings its children would inherit)."""
    cmd = [sys.executable, "-m", "edge_lolcats.bench.runtime", "--bandwidth"] + ([str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def write_context_text(path: str, min_chars: int) -> str:
    """The default corpus's first ``min_chars`` characters into ``path``, for the workers' ``--text``:
    a worker that loaded the whole corpus (31M characters) to cut its context held 100+ MB of text,
    which its peak RSS counted as the engine's."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(context_text(min_chars)[:min_chars])
    return path


def bandwidth_probe(megabytes: int = 256, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory: a float32 sum over an array far larger than
    the caches, a contiguous part per thread, all threads (the plainest streaming read there is;
    2 threads read ~38 GB/s on the 2-core machine). The ceiling a decode step's traffic is held to.
    (Until session 10 it was the compiled q8_0 product itself, which then ran at half of this: a
    ceiling that measured the engine, not the machine.)"""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, nogil=True)
    def read(values, sums):
        width = values.shape[0] // sums.shape[0]
        for part in numba.prange(sums.shape[0]):
            chunk = values[part * width : (part + 1) * width]
            total = np.float32(0.0)
            for i in range(width):
                total += chunk[i]
            sums[part] = total

    values = np.random.default_rng(0).random(megabytes * 2**20 // 4, dtype=np.float32)
    numba.set_num_threads(threads or numba.config.NUMBA_NUM_THREADS)
    sums = np.zeros(64, np.float32)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call compiles
        t0 = time.perf_counter()
        read(values, sums)
        best = min(best, time.perf_counter() - t0)
    return values.nbytes / best


def _kv_width(llm) -> int:
    md = llm.metadata
    heads = int(md["llama.attention.head_count"])
    kv_heads = int(md.get("llama.attention.head_count_kv", heads))
    return kv_heads * (int(md["llama.embedding_length"]) // heads)


def cpu_times(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) of the machine's CPU time so far in clock ticks, all CPUs (Linux's /proc/stat;
    None elsewhere). Steal is time a virtual machine's CPUs were ready to run but the hypervisor ran
    something else: on the 2-core VM a run with one vCPU stolen half the time measured half its
    speed, and the thread tuner rightly moved to one thread (by hand, 2026-12-02)."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest time is in user)
    return ticks[7], sum(ticks)


def steal_percent(before, after) -> float | None:
    """The share of the machine's CPU time stolen between two :func:`cpu_times` readings (%)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def run_one(engine: str, path: str, context: int, decode_tokens: int, text_file=None, threads=None,
            timeout: float | None = None, tile_from: int | None = None) -> dict:
    """One measurement in a fresh Python process (``engine`` one of :data:`ENGINES`; ``tile_from``:
    llama.cpp's decode after a KV cache tiled from that many tokens, see :func:`tiled_kv_state`)."""
    engine = ALIASES.get(engine, engine)
    cmd = [sys.executable, "-m", "edge_lolcats.bench.runtime", "--worker", engine, path, str(context),
           str(decode_tokens)]
    if text_file:
        cmd += ["--text", text_file]
    if tile_from and engine == "llama.cpp" and tile_from < context:
        cmd += ["--tile-from", str(tile_from)]
    if threads:
        cmd += ["--threads", str(threads)]
    # Python's bytecode cache may be written, as numba's is: an installed package has its bytecode
    # (pip compiles it) and an editable one writes it on first import, so a process start is timed
    # as users see it; where PYTHONDONTWRITEBYTECODE is set (these machines set it) every worker
    # compiled the package's sources again (engine imports 0.08-0.12 -> 0.05-0.07 s, by hand)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    before = cpu_times()
    r = subprocess.run(cmd + ["--spawned-at", repr(time.time())], capture_output=True, text=True, timeout=timeout, env=env)
    if engine == "llama.cpp" and r.returncode < 0:
        # llama-cpp-python 0.3.36 built for this CPU crashes (SIGSEGV) in its extra CPU buffer types
        # (AMX / repacked weights) on SmolLM2's q8_0 file on some Xeons: measure without them, and
        # say so in the row (see docs/BENCHMARKS.md)
        r = subprocess.run(cmd + ["--no-extra-bufts", "--spawned-at", repr(time.time())], capture_output=True, text=True,
                           timeout=timeout, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} at {context} tokens failed: {last}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["steal_percent"] = steal_percent(before, cpu_times())
    return row


def num(x, fmt: str) -> str:
    """A figure of a row, or "-" where it was not measured (a tiled KV cache's prefill)."""
    return "-" if x is None else format(x, fmt)


def tiled_note(r: dict) -> str:
    return f" (KV cache tiled from {r['kv_tiled_from']} tokens)" if r.get("kv_tiled_from") else ""


def markdown(results: list[dict]) -> str:
    rows = ["| engine | weights | context | peak RSS (MB) | state / KV cache (MiB) | prefill tok/s | decode tok/s | "
            "first token (s) | CPU stolen (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        engine = r["engine"] + (" (no extra buffer types)" if r.get("extra_bufts") is False else "") + tiled_note(r)
        rows.append(f"| {engine} | {r.get('weights', '?')} | {r['context']} | {num(r['peak_rss_mb'], '.0f')} | "
                    f"{r['state_bytes'] / 2**20:.1f} | {num(r['prefill_tokens_per_s'], '.1f')} | "
                    f"{num(r['decode_tokens_per_s'], '.1f')} | {num(r.get('first_token_s'), '.2f')} | "
                    f"{num(r.get('steal_percent'), '.1f')} |")
    return "\n".join(rows)


def plot(results: list[dict], path: str, bandwidth: float | None = None):
    """Peak RSS, decode and prefill speed against context length (log x): a colour per engine, a line
    style per weight precision; on the decode panel, each engine's bandwidth ceiling (``bandwidth``
    over its bytes read per token) dashed and thin, where both are known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    precisions = list(dict.fromkeys(r.get("weights") for r in results))
    colours = {e: f"C{i}" for i, e in enumerate(engines)}
    styles = {w: s for w, s in zip(precisions, ("-", "--", ":", "-."))}
    panels = (("peak_rss_mb", "peak RSS (MB)"), ("decode_tokens_per_s", "decode (tokens/s) after the context"),
              ("prefill_tokens_per_s", "prefill (tokens/s) of the context"))
    for engine in engines:
        for weights in precisions:
            rs = sorted((r for r in results if r["engine"] == engine and r.get("weights") == weights),
                        key=lambda r: r["context"])
            if not rs:
                continue
            label = f"{engine} ({weights})" if weights else engine
            xs = [r["context"] for r in rs]
            for ax, (key, _) in zip(axes, panels):  # a figure not measured (a tiled KV cache's prefill) left out
                measured = [r for r in rs if r.get(key) is not None]
                ax.plot([r["context"] for r in measured], [r[key] for r in measured], marker="o", color=colours[engine],
                        linestyle=styles[weights], label=label)
            ceiling = [bandwidth / r["decode_bytes_per_token"] if bandwidth and r.get("decode_bytes_per_token") else None
                       for r in rs]
            if all(ceiling):
                axes[1].plot(xs, ceiling, color=colours[engine], linestyle=styles[weights], linewidth=0.8, alpha=0.5,
                             label=f"{label}: bandwidth ceiling")
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}K"))
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quantized_matvec(rows: int = 1536, cols: int = 576, repeats: int = 50) -> dict:
    """ms per matrix-vector product of one SmolLM2 MLP matrix, float32 vs using q8_0 / f16 weights
    as stored: why the numpy engine expands weights to float32 at load."""
    import numpy as np
    from gguf import GGMLQuantizationType as T, quants

    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal((1, cols), dtype=np.float32)
    q = quants.quantize(w, T.Q8_0)
    w_t = np.ascontiguousarray(w.T)
    w16_t = w_t.astype(np.float16)
    blocks = q.view(np.uint8).reshape(rows, -1, 34)  # q8_0 block: f16 scale + 32 int8
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:].view(np.int8)
    xb = x.reshape(-1, 32)

    def ms(f):
        f()
        t0 = time.perf_counter()
        for _ in range(repeats):
            f()
        return 1e3 * (time.perf_counter() - t0) / repeats

    return {"float32": ms(lambda: x @ w_t),
            "q8_0 dequantize per call (gguf-py)": ms(lambda: x @ quants.dequantize(q, T.Q8_0).T),
            "q8_0 int8 blocks (einsum)": ms(lambda: (np.einsum("rbk,bk->rb", qs, xb) * scale).sum(1)),
            "f16 upcast per call": ms(lambda: x @ w16_t.astype(np.float32))}


def context_drift(path: str, context: int, decode_tokens: int = 64) -> list[tuple[str, int, float]]:
    """Decode speed in one process after 1K and after ``context`` tokens, a fresh 1K session, and
    the long session with its position set back: separates a context-dependent cost from noise."""
    from edge_lolcats.runtime.api import load

    model = load(path)
    ids = context_ids(lambda t: model.tokenizer.encode_long(t, add_special_tokens=False), context)
    rows = []

    def decode(session, label):
        session.generate(decode_tokens + 1, stop_at_eos=False)
        rows.append((label, session.position, session.stats.decode_tokens_per_s))

    long = model.session().feed(ids[:1024])
    decode(long, "after 1K")
    long.feed(ids[1024:])
    decode(long, f"after {context}")
    decode(model.session().feed(ids[:1024]), "fresh session, after 1K")
    long.state.position = 1100
    decode(long, "long session, position set to 1100")
    return rows


def onnx_decode_profile(folder: str, steps: int = 32) -> list[tuple[str, int, int, float]]:
    """Where an ONNX export's decode step goes: per op type, (op, nodes in the graph as written,
    nodes after onnxruntime's optimizations, ms per token in onnxruntime's profile of ``steps``
    decode steps after 512 tokens), the most time first. The compact decode graph's to-do list."""
    import collections
    import glob
    import json as json_
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    from edge_lolcats.runtime.onnx_engine import OnnxEngine

    engine = OnnxEngine(folder)
    written = collections.Counter(n.op_type for n in onnx.load(os.path.join(folder, engine.meta["decode_graph"]),
                                                                load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        for name, value in engine._weights.get(engine.meta["decode_graph"], {}).items():
            options.add_initializer(name, value)
        session = ort.InferenceSession(os.path.join(folder, engine.meta["decode_graph"]), options,
                                       providers=["CPUExecutionProvider"])
        optimized = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath,
                                                                      load_external_data=False).graph.node)
        state = engine.empty_state()
        engine.run(np.arange(100, 612) % engine.meta["vocab_size"], state)
        for t in range(steps):
            out = session.run(None, {"input_ids": np.array([[200 + t]], np.int64),
                                     "position": np.array(state.position, np.int64), **state.tensors})
            state.tensors = dict(zip(engine.state_names, out[1:]))
            state.position += 1
        session.end_profiling()
        with open(glob.glob(os.path.join(tmp, "profile*.json"))[0], encoding="utf-8") as f:
            events = json_.load(f)
    spent = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    ops = set(written) | set(optimized)
    return sorted(((op, written[op], optimized[op], spent[op]) for op in ops), key=lambda r: -r[3])


def onnx_decode_paths(folder: str, steps: int = 64, repeats: int = 3) -> dict:
    """ms per decode step (one token, one sequence, after 512 tokens) of an ONNX export along three
    paths on the same states: the block graph at T = 1, the decode graph through ``session.run``
    (inputs and outputs bound by name each call, new output arrays) and the engine's own step (the
    decode graph with bindings made once, its arrays taking turns). Best of ``repeats`` (this VM is
    noisy). Raises if the engine's path leaves another state than the decode graph's."""
    import numpy as np

    from edge_lolcats.runtime.onnx_engine import OnnxEngine

    engine = OnnxEngine(folder)
    start = engine.empty_state()
    engine.run(np.arange(100, 612) % engine.meta["vocab_size"], start)
    names = engine.state_names

    def via_run(session):
        def step(state, token):
            out = session.run(None, {"input_ids": np.array([[token]], np.int64),
                                     "position": np.array(state.position, np.int64), **state.tensors})
            state.tensors = dict(zip(names, out[1:]))
            state.position += 1
        return step

    def via_engine(state, token):
        engine.run([token], state)

    paths = {"block graph, T = 1": via_run(engine.session), "decode graph": via_run(engine.decode_session),
             "engine (bound once)": via_engine}
    best, final = {name: float("inf") for name in paths}, {}
    for _ in range(repeats):
        for name, step in paths.items():
            state = start.copy()
            t0 = time.perf_counter()
            for t in range(steps):
                step(state, 200 + t)
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t0) / steps)
            final[name] = state
    a, b = final["decode graph"], final["engine (bound once)"]
    if a.position != b.position or any(not np.array_equal(a.tensors[n], b.tensors[n]) for n in names):
        raise AssertionError("the engine's bound step left another state than the decode graph's")
    return best


def _worker(argv):
    p = argparse.ArgumentParser(prog="edge_lolcats.bench.runtime --worker")
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("path")
    p.add_argument("context", type=int)
    p.add_argument("decode_tokens", type=int)
    p.add_argument("--text")
    p.add_argument("--threads", type=int)
    p.add_argument("--spawned-at", type=float, help="time.time() when the parent started this process")
    p.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp without its extra CPU buffer types")
    p.add_argument("--tile-from", type=int, help="llama.cpp: prefill this many tokens, decode after their KV tiled to the context")
    a = p.parse_args(argv)
    if a.engine == "llama.cpp":
        result = measure_llama_cpp(a.path, a.context, a.decode_tokens, a.text, a.threads,
                                   extra_bufts=not a.no_extra_bufts, spawned_at=a.spawned_at, tile_from=a.tile_from)
    else:
        fmt = "onnx" if a.engine == "onnx" else "gguf"
        result = measure_runtime(a.path, a.context, a.decode_tokens, a.text, a.threads,
                                 gguf_engine="compiled" if a.engine == "onnx" else a.engine, spawned_at=a.spawned_at)
        if result["format"] != fmt:
            raise SystemExit(f"{a.path} is a {result['format']} model, not what the {a.engine} engine reads ({fmt})")
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--quantized-matvec"]:
        for name, value in quantized_matvec().items():
            print(f"{name:38s} {value:.3f} ms")
        raise SystemExit(0)
    if sys.argv[1:2] == ["--context-drift"]:
        for label, position, rate in context_drift(sys.argv[2], int(sys.argv[3])):
            print(f"{label:38s} position {position:>7d}  decode {rate:.1f} tok/s")
        raise SystemExit(0)
    if sys.argv[1:2] == ["--onnx-profile"]:
        rows = onnx_decode_profile(sys.argv[2])
        print("| op | nodes written | after onnxruntime's fusions | ms per token |\n|---|---|---|---|")
        for op, written, optimized, ms in rows:
            print(f"| {op} | {written} | {optimized} | {ms:.2f} |")
        print(f"| all | {sum(r[1] for r in rows)} | {sum(r[2] for r in rows)} | {sum(r[3] for r in rows):.2f} |")
        raise SystemExit(0)
    if sys.argv[1:2] == ["--onnx-decode"]:
        for name, ms in onnx_decode_paths(sys.argv[2]).items():
            print(f"{name:28s} {ms:.2f} ms per token")
        raise SystemExit(0)
    if sys.argv[1:2] == ["--compiled-step"]:
        print(json.dumps(compiled_step_times(sys.argv[2], [int(c) for c in sys.argv[3].split(",")])))
        raise SystemExit(0)
    if sys.argv[1:2] == ["--compiled-threads"]:
        print("| threads | machine | prefill tok/s | decode ms per token |\n|---|---|---|---|")
        for label, busy, prefill, decode in compiled_threads(sys.argv[2]):
            print(f"| {label} | {'one core busy' if busy else 'idle'} | {prefill:.0f} | {decode:.1f} |")
        raise SystemExit(0)
    if sys.argv[1:2] == ["--bandwidth"]:
        print(bandwidth_probe(threads=int(sys.argv[2]) if sys.argv[2:] else None))
        raise SystemExit(0)
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("usage: python -m edge_lolcats.bench.runtime --worker ENGINE PATH CONTEXT DECODE "
                         "(the benchmark itself is `edge-lolcats bench memory`)")
    _worker(sys.argv[2:])
