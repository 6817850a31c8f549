"""The compiled engine over a ``lolcats`` GGUF file: the whole model step as one compiled call per
token (or per block of prefill tokens) on the weights as the file stores them. No torch.

At load every matrix is repacked once into the kernels' flat buffers (:mod:`.compiled_kernels`):
q8_0 quants (int8) and q4_0 bytes as the file has them but interleaved 16 rows to a group, 4 bytes
of a row at a time (:func:`.int8_kernels.place_rows`, as llama.cpp repacks its q4_0 for int8 dot
products), their block scales as the file's float16, f16 matrices widened to float32; q/k/v and
gate/up joined along their rows, so each is one product.
A quantized matrix is never copied to float32. The state of a sequence is one flat float32 buffer
laid out as :class:`~edge_lolcats.arch.state.StateLayout` says; ``State.tensors`` are views of it,
so state files, the numpy engine and the ONNX engine read and write the same arrays.

Same interface as the numpy engine (``run``, ``empty_state``, ``state_bytes``, ``tokenizer``,
``fingerprint``, ``format``, ``weights``), which stays as the slow reference it is tested against.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import time

import numba
import numpy as np

from edge_lolcats.arch.hybrid import PRE_ROPE
from edge_lolcats.arch.ops import ACTIVATIONS
from edge_lolcats.arch.state import HYBRID
from edge_lolcats.converters import gguf_names as names
from edge_lolcats.formats.gguf_io import ModelFileError

from . import compiled_kernels as ck
from .gguf_model import FUSED, check_shapes, log_decay, open_lolcats_gguf
from .state import State

_KINDS = {names.GGML_TYPE_IDS["Q8_0"]: ck.Q8, names.GGML_TYPE_IDS["Q4_0"]: ck.Q4, names.GGML_TYPE_IDS["F16"]: ck.F32,
          names.GGML_TYPE_IDS["F32"]: ck.F32}


def _kind(tensor) -> int:
    if tensor.type_id not in _KINDS:
        raise ModelFileError(f"tensor {tensor.name}: {tensor.tensor_type.name} is not read by the compiled engine "
                             f"(it reads f32, f16, q8_0 and q4_0; the numpy engine reads the rest)")
    return _KINDS[tensor.type_id]


def weights_buffer(size: int, dtype) -> np.ndarray:
    """A zeroed array of ``size`` elements (at least 1) for the weights, in ordinary 4 KB pages where
    the system has transparent huge pages. numpy asks for huge pages on any array of 4 MB or more,
    and where the kernel finds them on demand ("madvise" mode, the default of many distributions) the
    first write to ~150 MB waited 0.01-0.4 s for them (bimodal; 4 KB pages: ~0.08 s every time, by
    hand on the 2-core VM). The load's copy is that first write: engine load -0.4 s (median of 5)."""
    count = max(1, size)
    if not hasattr(mmap, "MADV_NOHUGEPAGE"):  # no transparent huge pages to decline (not Linux)
        return np.empty(count, dtype)
    buffer = mmap.mmap(-1, count * np.dtype(dtype).itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype)


class _Packer:
    """Lays out matrices (each one or several GGUF tensors joined along rows) and small float32
    parameters in the kernels' flat buffers: sizes first, then one allocation per buffer, then
    the copies straight out of the mapped file."""

    def __init__(self):
        self.size = {ck.Q8: 0, ck.Q4: 0, "scales": 0, ck.F32: 0}
        self.matrices, self.params = [], []  # (entry, tensors); (offset, source, transposed)

    def matrix(self, tensors: list) -> int:
        kinds = {_kind(t) for t in tensors}
        if len(kinds) > 1:
            raise ModelFileError(f"tensors {', '.join(t.name for t in tensors)} are stored in different precisions; "
                                 f"the compiled engine joins them into one product")
        kind, k = kinds.pop(), int(tensors[0].shape[0])
        n = sum(int(t.shape[1]) for t in tensors)
        entry = [kind, self.size[kind], self.size["scales"], n, k]
        if kind == ck.F32:
            self.size[kind] += n * k
        else:  # rows in groups of 16, the last one padded
            quants, scales = ck.i8.interleaved_sizes(n, k, kind == ck.Q4)
            self.size[kind] += quants
            self.size["scales"] += scales
        self.matrices.append((entry, tensors))
        return len(self.matrices) - 1

    def param(self, values, transposed: bool = False) -> int:
        """A float32 parameter (an array, or a GGUF tensor read as float32 when the buffers are
        filled, so a model's parameters are never all copied at once); its offset in f32.
        ``transposed``: a stack of matrices [N, A, B] stored as [N, B, A]."""
        offset = self.size[ck.F32]
        self.size[ck.F32] += int(np.prod(values.shape))
        self.params.append((offset, values, transposed))
        return offset

    def fill(self, read_float32, release):
        self.q8 = weights_buffer(self.size[ck.Q8], np.int8)
        self.q4 = weights_buffer(self.size[ck.Q4], np.uint8)
        self.scales = weights_buffer(self.size["scales"], np.uint16)  # float16 bits
        self.f32 = weights_buffer(self.size[ck.F32], np.float32)
        for offset, values, transposed in self.params:
            values = values if isinstance(values, np.ndarray) else read_float32(values)
            if transposed:
                n, a, b = values.shape
                self.f32[offset : offset + values.size].reshape(n, b, a)[...] = values.swapaxes(1, 2)
            else:
                self.f32[offset : offset + values.size] = values.ravel()
        for entry, tensors in self.matrices:
            kind, off, soff, n, k = entry
            first = 0  # the tensor's first row in the joined matrix
            for t in tensors:
                rows = int(t.shape[1])
                if kind == ck.F32:
                    self.f32[off + first * k : off + (first + rows) * k] = np.asarray(t.data).ravel()  # f16 widened
                else:
                    raw = np.asarray(t.data).view(np.uint8).reshape(rows, k // ck.BLOCK, -1)  # blocks: f16 d, quants
                    target = self.q8 if kind == ck.Q8 else self.q4
                    quants, scales = ck.i8.interleaved_sizes(n, k, kind == ck.Q4)
                    # a block is 34 or 18 bytes, so as uint16 its first element is the float16 scale
                    ck.i8.place_rows(raw[..., 2:].view(target.dtype), raw.view(np.uint16)[..., 0],
                                     target[off : off + quants], self.scales[soff : soff + scales], first)
                first += rows
            release()
        self.entries = np.array([e for e, _ in self.matrices], np.int64)
        del self.matrices, self.params


@contextlib.contextmanager
def _cache_loads_without_registries(*dispatchers):
    """While inside, these numba functions load their machine code from numba's on-disk cache
    without refreshing numba's typing and lowering registries first. numba refreshes them before
    every cache lookup, importing its implementations of numpy's linear algebra, random numbers,
    typed containers and more (0.1-0.15 s of a process's start on the 2-core VM, by hand): what a
    compile needs, not the linking of cached object code, which needs only numba's runtime (NRT),
    initialised here. A miss still compiles as ever: numba's compiler refreshes the registries
    itself. A numba without these internals loads as it always does."""
    from numba.core.runtime import nrt

    patched = []
    for dispatcher in dispatchers:
        cache = getattr(dispatcher, "_cache", None)
        load = getattr(cache, "_load_overload", None)  # load_overload less its refresh
        if load is None or not hasattr(nrt, "rtsys"):
            continue

        def load_overload(sig, target_context, load=load):
            nrt.rtsys.initialize(target_context)
            return load(sig, target_context)

        cache.load_overload = load_overload
        patched.append(cache)
    try:
        yield
    finally:
        for cache in patched:
            del cache.load_overload


def compile_step() -> tuple[float, str]:
    """Compile the model step, or load it from numba's cache, by running it once on a dummy model
    of no layers (every model has the same argument types, so this is the step every model runs).
    Returns (seconds, where the machine code came from: "compiled" now, numba's "disk cache", or
    "memory" when this process already had it)."""
    if ck.forward.signatures:
        return 0.0, "memory"
    start = time.perf_counter()
    with _cache_loads_without_registries(ck.forward, ck.i8._place_rows):
        _run_step_and_repack_once()
    seconds = time.perf_counter() - start
    return seconds, "disk cache" if sum(ck.forward.stats.cache_hits.values()) else "compiled"


def _run_step_and_repack_once():
    width = ck.BLOCK
    dims = np.zeros(ck.DIMS, np.int64)
    dims[[ck.D_HIDDEN, ck.D_HEADS, ck.D_KV_HEADS, ck.D_HEAD_DIM, ck.D_INTERMEDIATE, ck.D_VOCAB]] = [width, 1, 1, width, width, 1]
    # one q8_0 matrix of 1 row, stored as its group of 16
    ck.forward(np.zeros(1, np.int64), 0, np.zeros(ck.GROUP * width, np.int8), np.zeros(1, np.uint8),
               np.ones(ck.GROUP, np.float16).view(np.uint16), np.ones(width, np.float32),
               np.array([[ck.Q8, 0, 0, 1, width]], np.int64),
               np.zeros((0, ck.LAYER_COLUMNS), np.int64), dims, np.ones(ck.CONSTS, np.float32),
               np.zeros((1, width // 2), np.float32), np.zeros(1, np.float32), np.zeros((1, 1), np.float32))
    # and the load's repack, with the argument types the load passes (GGUF blocks: scale, quants),
    # so loading its machine code happens before release_compiler_pages (after it, 8 MB more RSS)
    blocks = np.zeros((ck.GROUP, 1, 2 + width), np.uint8)
    blocks.setflags(write=False)  # as the file's read-only mapping
    ck.i8.place_rows(blocks[..., 2:], blocks.view(np.uint16)[..., 0], np.zeros(ck.GROUP * width, np.uint8),
                     np.zeros(ck.GROUP, np.uint16), 0)


def release_compiler_pages() -> int:
    """Drop LLVM's pages (libllvmlite's code and read-only data) from resident memory once the step
    is compiled and linked: about 50 MB of code and 16 MB of data on the 2-core machine that the
    engine never touches again. They are clean pages of a file, re-read on demand if numba ever
    compiles again (a new signature), so this is safe. A mapping is dropped only if it is not
    writable and none of its pages was ever written (smaps' Anonymous: 0): the dynamic loader
    writes relocations into one read-only mapping before protecting it, and dropping those copied
    pages would put the file's unrelocated bytes back. Linux only; returns the bytes advised, 0
    elsewhere."""
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/smaps"):
        return 0
    candidates, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: range, permissions, ...
                current = None
                if len(fields) > 5 and fields[1] in ("r-xp", "r--p") and os.path.basename(fields[5]).startswith("libllvmlite"):
                    current = [int(x, 16) for x in fields[0].split("-")]
            elif current is not None and fields[0] == "Anonymous:" and int(fields[1]) == 0:
                candidates.append(current)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end in candidates:
        if libc.madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            released += end - start
    return released


class ThreadTuner:
    """The thread count for each kind of step (decode, prefill block), chosen by timing them, so the
    engine stays fast when other processes share the cores: on the idle 2-core machine 2 threads
    decode in 15 ms against 27 for 1, but with another process holding a core 2 threads took 34-66
    ms against 25 for 1 (``python -m edge_lolcats.bench.runtime --compiled-threads FILE``).

    All threads until measured otherwise: each count keeps a moving average of its step time and
    the faster one is used; the other count is tried every ``period`` steps, and at once when a
    step's threads did not all get a core (its CPU time under ``crowded`` x wall time x threads;
    on the idle 2-core machine decode steps measured 0.91 (median; the lowest of 200 0.66),
    prefill blocks 0.92-0.94 (a process's first 0.75), and 0.50 with a busy process beside them),
    unless it was tried in the last ``period // 4`` steps. So an idle machine never pays for a
    look at 1 thread early on (a prefill of 8 blocks lost ~10% to it), and a busy one is noticed
    at its first step. The logits do not depend on the thread count (each output is summed by one
    thread), only the time."""

    def __init__(self, counts, period: int = 32, weight: float = 0.25, crowded: float = 0.65):
        self.counts = sorted(set(counts))
        self.period, self.weight, self.crowded = period, weight, crowded
        self.average = {}  # (kind, threads) -> seconds
        self.steps = {}  # kind -> steps run
        self.tried = {}  # (kind, threads) -> the step it last ran at
        self.look = set()  # kinds whose last step was crowded

    def choose(self, kind) -> int:
        n = self.steps.get(kind, 0)
        self.steps[kind] = n + 1
        known = {t: self.average[(kind, t)] for t in self.counts if (kind, t) in self.average}
        best = min(known, key=known.get) if known else self.counts[-1]
        chosen = best
        if len(self.counts) > 1:
            other = next(t for t in self.counts if t != best)
            recent = n - self.tried.get((kind, other), -self.period) < self.period // 4
            if n % self.period == self.period - 1 or (kind in self.look and not recent):
                chosen = other
        self.look.discard(kind)
        self.tried[(kind, chosen)] = n
        return chosen

    def record(self, kind, threads: int, seconds: float, cpu_seconds: float | None = None):
        """A step of ``kind`` ran on ``threads`` in ``seconds`` (wall) and ``cpu_seconds`` (the
        process's CPU time, all threads)."""
        key = (kind, threads)
        old = self.average.get(key)
        self.average[key] = seconds if old is None else (1 - self.weight) * old + self.weight * seconds
        if threads > 1 and cpu_seconds is not None and cpu_seconds < self.crowded * seconds * threads:
            self.look.add(kind)


class CompiledEngine:
    """``activations``: how products with quantized weights (q8_0, q4_0) take their input: "q8_0",
    quantized in blocks of 32 as the model definition says (:func:`edge_lolcats.arch.ops.quantize_activations`;
    int8 dot products where the CPU has them, as llama.cpp), or "float32" (slower; the float
    products of the earlier engines)."""
    format = "gguf"
    name = "compiled"
    # prompt tokens per block: its attention is O(T W), not O(T (T + W)), so a larger block only
    # reads the weights fewer times (256: +5% prefill at 1K over 128, medians of 4 alternating
    # processes by hand; the block's buffers share memory, so peak RSS is still below 128's before)
    prefill_chunk = 256

    def __init__(self, path: str, threads: int | None = None, activations: str = "q8_0"):
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}")
        self.activations = activations
        # compiled (or loaded from numba's cache) before the weights are read, and the compiler's code
        # pages let go: the process's peak memory is the weights plus the runtime, not LLVM besides
        self.compile_seconds, self.compiled = compile_step()
        release_compiler_pages()
        f = open_lolcats_gguf(path)
        self.path, self.args, self.lolcats, self.recurrence = path, f.args, f.lolcats, f.recurrence
        self.layout, self.tokenizer, self.fingerprint, self.weights = f.layout, f.tokenizer, f.fingerprint, f.weights
        self.max_position_embeddings = f.args.max_position_embeddings
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        self.tuner = ThreadTuner({1, self.threads})
        self._pack(f)
        self._offsets = self.layout.offsets()

    def _pack(self, f):
        args, layout, gguf = f.args, f.layout, f.gguf
        p = _Packer()
        tensor = lambda name: gguf.tensors[name] if name in gguf.tensors else self._missing(name)  # noqa: E731
        dims = np.zeros(ck.DIMS, np.int64)
        dims[ck.D_EMBED] = p.matrix([tensor("token_embd.weight")])
        dims[ck.D_HEAD] = p.matrix([tensor("output.weight")]) if "output.weight" in gguf.tensors else dims[ck.D_EMBED]
        dims[ck.D_FINAL_NORM] = p.param(tensor("output_norm.weight"))
        ropes = {t: args.rope[t].inv_freq() for t in sorted(set(args.layer_types))}
        if len({r.shape for r in ropes.values()}) > 1:
            raise ModelFileError(f"{self.path}: layer types rotate different numbers of dimensions")
        rope_row = {t: i for i, t in enumerate(ropes)}
        layers = np.full((args.num_layers, ck.LAYER_COLUMNS), -1, np.int64)
        offsets = layout.offsets()
        for i in range(args.num_layers):
            check_shapes(f, i)
            lay = layers[i]
            t = lambda ours, suffix="weight": tensor(names.layer_tensor(i, ours, suffix))  # noqa: E731
            has = lambda ours, suffix="bias": names.layer_tensor(i, ours, suffix) in gguf.tensors  # noqa: E731
            lay[ck.L_KIND] = ck.KIND_HYBRID if layout.kinds[i] == HYBRID else ck.KIND_WINDOW
            lay[ck.L_QKV] = p.matrix([t(f"self_attn.{n}") for n in FUSED["self_attn"]])
            lay[ck.L_O] = p.matrix([t("self_attn.o_proj")])
            lay[ck.L_GATE_UP] = p.matrix([t(f"mlp.{n}") for n in FUSED["mlp"]])
            lay[ck.L_DOWN] = p.matrix([t("mlp.down_proj")])
            if has("self_attn.q_proj"):
                lay[ck.L_QKV_BIAS] = p.param(np.concatenate([f.gguf.tensor(names.layer_tensor(i, f"self_attn.{n}", "bias"))
                                                             for n in FUSED["self_attn"]]))
            if has("self_attn.o_proj"):
                lay[ck.L_O_BIAS] = p.param(t("self_attn.o_proj", "bias"))
            if has("mlp.gate_proj"):
                lay[ck.L_GATE_UP_BIAS] = p.param(np.concatenate([f.gguf.tensor(names.layer_tensor(i, f"mlp.{n}", "bias"))
                                                                 for n in FUSED["mlp"]]))
            if has("mlp.down_proj"):
                lay[ck.L_DOWN_BIAS] = p.param(t("mlp.down_proj", "bias"))
            lay[ck.L_ATTN_NORM], lay[ck.L_FFN_NORM] = p.param(t("attn_norm")), p.param(t("ffn_norm"))
            if args.sandwich_norms:
                lay[ck.L_ATTN_POST_NORM], lay[ck.L_FFN_POST_NORM] = p.param(t("attn_post_norm")), p.param(t("ffn_post_norm"))
            if args.qk_norm:
                lay[ck.L_Q_NORM], lay[ck.L_K_NORM] = p.param(t("self_attn.q_norm")), p.param(t("self_attn.k_norm"))
            if layout.kinds[i] == HYBRID:
                # each head's [D, F] transposed: the kernels sum along D
                lay[ck.L_FMAP_Q] = p.param(t("self_attn.feature_map_q"), transposed=True)
                lay[ck.L_FMAP_K] = p.param(t("self_attn.feature_map_k"), transposed=True)
                lay[ck.L_WINDOW_FACTOR] = p.param(tensor(f"blk.{i}.{names.WINDOW_FACTOR_GGUF}.weight"))
                if self.recurrence.decay:
                    lay[ck.L_LOG_DECAY] = p.param(log_decay(f, i))
            lay[ck.L_STATE] = offsets[layout.layer_names(i)[0]][0]  # the layer's parts follow in order
            lay[ck.L_ROPE] = rope_row[args.layer_types[i]]
        p.fill(lambda tensor_: f.gguf.tensor(tensor_.name), gguf.release_pages)
        self.q8, self.q4, self.scales, self.f32, self.entries = p.q8, p.q4, p.scales, p.f32, p.entries
        self.layers = layers
        self.inv_freq = np.stack(list(ropes.values())).astype(np.float32)
        dims[[ck.D_HIDDEN, ck.D_HEADS, ck.D_KV_HEADS, ck.D_HEAD_DIM, ck.D_FEATURES, ck.D_WINDOW, ck.D_SINKS,
              ck.D_INTERMEDIATE, ck.D_VOCAB, ck.D_BASE_WINDOW]] = [
            args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, layout.feature_dim,
            layout.window_size, layout.sink_tokens, args.intermediate_size, args.vocab_size, layout.base_window]
        dims[ck.D_PRE_ROPE] = self.recurrence.feature_maps == PRE_ROPE
        dims[ck.D_QK_NORM] = args.qk_norm  # sandwich norms: the layers' post-norm offsets (-1: none)
        dims[ck.D_QUANTIZE] = self.activations == "q8_0"
        dims[ck.D_ACTIVATION] = {"silu": ck.ACT_SILU, "gelu_tanh": ck.ACT_GELU_TANH}[args.activation]
        self.dims = dims
        self.consts = np.array([args.norm_eps, args.norm_offset, args.attention_scale, args.embedding_scale,
                                args.attn_softcap or 0.0, args.final_softcap or 0.0], np.float32)
        self.state_size = layout.size_per_sequence

    def decode_bytes_per_token(self) -> int:
        """Bytes one decode step reads or writes: every matrix as stored with its scales (the
        embedding only its one row, unless it is also the vocabulary projection), the small float32
        parameters, and the state (S and z read and written, rings and sinks read, one slot written)."""
        size = {ck.Q8: 1.0, ck.Q4: 0.5, ck.F32: 4.0}
        matrix = lambda e: e[ck.ROWS] * e[ck.COLS] * (size[e[ck.KIND]] + (2 / ck.BLOCK if e[ck.KIND] != ck.F32 else 0))  # noqa: E731
        total = sum(matrix(e) for i, e in enumerate(self.entries) if i != self.dims[ck.D_EMBED])
        embed = self.entries[self.dims[ck.D_EMBED]]
        total += matrix(embed) if self.dims[ck.D_HEAD] == self.dims[ck.D_EMBED] else matrix(embed) / embed[ck.ROWS]
        total += 4 * self.f32.size - 4 * sum(e[ck.ROWS] * e[ck.COLS] for e in self.entries if e[ck.KIND] == ck.F32)
        for i in range(self.layout.num_layers):
            parts = {n: math.prod(shape) for n, shape in self.layout.part_shapes(i).items()}
            slot = 2 * self.args.num_kv_heads * self.args.head_dim
            if "kv" in parts:
                total += 4 * (2 * (parts["kv"] + parts["z"]) + parts["k_window"] + parts["v_window"]
                              + parts.get("k_sink", 0) + parts.get("v_sink", 0) + slot)
            else:
                total += 4 * (parts["k_ring"] + parts["v_ring"] + slot)
        return int(total)

    def _missing(self, name):
        raise ModelFileError(f"{self.path}: tensor {name!r} is missing")

    @property
    def state_bytes(self) -> int:
        return self.layout.bytes_per_sequence

    def empty_state(self, batch: int = 1) -> State:
        return self._views(np.zeros((batch, self.state_size), np.float32), 0)

    def _views(self, flat: np.ndarray, position: int) -> State:
        b = flat.shape[0]
        tensors = {n: flat[:, o : o + math.prod(s)].reshape(b, *s) for n, (o, s) in self._offsets.items()}
        return State(tensors, position, flat=flat)

    def _flat(self, state: State) -> np.ndarray:
        """The state's flat buffer; a state whose arrays are not its views (a copy, a state file,
        another engine's) is packed into one, and its tensors become the views."""
        flat = state.flat
        if flat is not None and all(a.base is flat for a in state.tensors.values()):
            return flat
        batch = len(next(iter(state.tensors.values())))
        packed = self._views(np.empty((batch, self.state_size), np.float32), state.position)
        for n, a in packed.tensors.items():
            a[...] = state.tensors[n]
        state.tensors, state.flat = packed.tensors, packed.flat
        return packed.flat

    def run(self, tokens, state: State, want_logits: bool = True):
        """Feed ``tokens`` ([T] or [B, T]) after ``state``, which is updated in place and returned
        with the logits of the last token [B, V] (None when ``want_logits`` is false)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[1] == 0:
            raise ValueError("no tokens to run")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.args.vocab_size}); got {ids.min()}..{ids.max()}")
        flat = self._flat(state)
        kind = "decode" if ids.shape[1] == 1 else "block"
        threads = self.tuner.choose(kind)
        numba.set_num_threads(threads)
        logits = np.zeros((ids.shape[0], self.args.vocab_size if want_logits else 0), np.float32)
        start, cpu = time.perf_counter(), time.process_time()
        for b in range(ids.shape[0]):
            ck.forward(ids[b], state.position, self.q8, self.q4, self.scales, self.f32, self.entries, self.layers,
                       self.dims, self.consts, self.inv_freq, flat[b], logits[b : b + 1])
        self.tuner.record(kind, threads, (time.perf_counter() - start) / ids.size, (time.process_time() - cpu) / ids.size)
        state.position += ids.shape[1]
        return (logits if want_logits else None), state
