"""The compiled engine against the numpy engine, which runs the one model definition
(arch.block, arch.hybrid) on numpy: every family, every stored precision, both recurrences, in
prefill blocks and token by token past the window, the sinks and the base's sliding window.

Tolerance: with float32 activations both engines multiply the same weights (the numpy engine
dequantizes the file's quants to float32, the compiled one multiplies by them in place) in
float32, summing in different orders; logits of magnitude ~1 then differ by ~1e-6 (measured:
2e-7). 1e-4, as test_families.py uses against transformers, is far below any real mistake (a
wrong scale, nibble order, ring slot or RoPE angle moves logits by 1e-2 or more). With quantized
activations (the default) see test_quantized_activations_are_the_definitions.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_model

from edge_lolcats.arch.hybrid import DEFAULT, Recurrence
from edge_lolcats.converters.gguf_export import export_gguf
from edge_lolcats.nn.model import linearize
from edge_lolcats.runtime.compiled_engine import CompiledEngine
from edge_lolcats.runtime.numpy_engine import GGUFEngine

TOL = 1e-4
DTYPES = ("f32", "q8_0", "q4_0")
BLOCKS = (5, 1, 1, 12, 18, 1, 1)  # past the window (4) + sinks (4), and past the base windows (16)


def _export(family, recurrence, dtype, folder, tokenizer) -> str:
    model = linearize(tiny_model(family), window_size=4, feature_dim=8, recurrence=recurrence or DEFAULT)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or "decay" in name:  # feature maps off the identity, decays below 1: both matter
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    path = str(folder / f"{family}-{dtype}.gguf")
    export_gguf(model, tokenizer, path, dtype=dtype)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family_files(request, tmp_path_factory, smol_tokenizer):
    """Each family linearized with the default recurrence, exported at every precision."""
    folder = tmp_path_factory.mktemp(f"compiled-{request.param}")
    return request.param, {d: _export(request.param, None, d, folder, smol_tokenizer) for d in DTYPES}


@pytest.fixture(scope="module")
def files(tmp_path_factory, smol_tokenizer):
    """One family (Gemma 2: kept window layers, soft-caps, sandwich norms) at every precision, for
    the tests of the engine's machinery rather than of a family."""
    folder = tmp_path_factory.mktemp("compiled-one")
    return {d: _export("gemma2", None, d, folder, smol_tokenizer) for d in DTYPES}


def _same_run(path, ids, blocks=BLOCKS, **compiled_options):
    reference = GGUFEngine(path, activations="float32")
    compiled = CompiledEngine(path, **{"activations": "float32", **compiled_options})
    states, pos = [reference.empty_state(), compiled.empty_state()], 0
    for size in blocks:
        (want, states[0]), (got, states[1]) = (e.run(ids[pos : pos + size], s) for e, s in zip((reference, compiled), states))
        pos += size
        diff = np.abs(got - want).max()
        assert diff < TOL, f"{path}: logits after {pos} tokens differ by {diff:.2e}"
    for name, want in states[0].tensors.items():
        np.testing.assert_allclose(states[1].tensors[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    return compiled


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(3, 49152, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_engine_equals_the_numpy_engine(family_files, dtype):
    family, files = family_files
    _same_run(files[dtype], _ids(sum(BLOCKS)))


@pytest.mark.parametrize("dtype", ["f32", "q4_0"])
def test_first_recurrence_equals_the_numpy_engine(tmp_path, smol_tokenizer, dtype):
    """Feature maps after RoPE, no decay, no sinks: the first models' files."""
    _same_run(_export("qwen2", Recurrence(), dtype, tmp_path, smol_tokenizer), _ids(sum(BLOCKS), 1))


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_activations_are_the_definitions(family_files, dtype):
    """Products with q8_0 / q4_0 weights on activations quantized as arch.ops.quantize_activations
    says (int8 dot products in the compiled engine's decode; its prefill, and the numpy engine,
    multiply the quantized values in float32), from the same state: prefill blocks of 4 tokens,
    then single tokens.

    Not every comparison can agree within TOL: an activation lands within ~1e-6 of a rounding
    boundary about once in 70,000 (measured on these models), and there the engines' float32 sums
    can round it to neighbouring steps, which moves logits by ~5e-3 (as much as quantizing at
    all: the hidden sizes here are 64). So each block starts from the reference's state (a flip
    stays in its block), and at most 40% of them may disagree: flips are ~1.5% of blocks (6 of
    400 over the families and both precisions, measured), so more than 10 of 25 would be a 1e-7
    chance, while a product multiplied the other way (not quantized, or quantized where the file
    has floats) makes every block disagree."""
    family, files = family_files
    path = files[dtype]
    reference, compiled = GGUFEngine(path), CompiledEngine(path)
    assert (reference.activations, compiled.activations) == ("q8_0", "q8_0")  # the default
    blocks = [4] * 5 + [1] * 20
    ids, pos, state, disagree = _ids(sum(blocks), 4), 0, reference.empty_state(), []
    for size in blocks:
        theirs = state.copy()
        want, state = reference.run(ids[pos : pos + size], state)
        got, _ = compiled.run(ids[pos : pos + size], theirs)
        pos += size
        disagree.append(float(np.abs(got - want).max()))
    bad = [d for d in disagree if d >= TOL]
    assert len(bad) <= 0.4 * len(blocks), f"{path}: {len(bad)} of {len(blocks)} blocks disagree: {bad}"
    # and quantizing changed the logits: the reference did quantize (by ~5e-3, as a flip does)
    plain = GGUFEngine(path, activations="float32")
    start = plain.empty_state()
    moved = np.abs(plain.run(ids[:4], start)[0] - reference.run(ids[:4], reference.empty_state())[0]).max()
    assert moved > 10 * TOL


def test_quantized_matrices_are_never_copied_to_float32(files):
    """The float32 buffer holds exactly the file's float tensors (norms, feature maps, f16/f32
    matrices); the q8_0 and q4_0 ones stay in their quant buffers, one byte or half a byte each."""
    from gguf import GGMLQuantizationType as QT

    from edge_lolcats.formats.gguf_io import read_gguf

    for dtype in ("q8_0", "q4_0"):
        engine = CompiledEngine(files[dtype])
        tensors = read_gguf(files[dtype]).tensors.values()
        count = lambda types: sum(int(np.prod(t.shape)) for t in tensors if t.tensor_type in types)  # noqa: E731
        assert engine.f32.size == count((QT.F32, QT.F16))
        assert engine.q8.size == max(1, count((QT.Q8_0,)))
        assert engine.q4.size == max(1, count((QT.Q4_0,)) // 2)


def _vm_flags(array) -> list:
    """The VmFlags of the mapping that holds ``array`` (/proc/self/smaps)."""
    address = array.__array_interface__["data"][0]
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_weights_are_in_memory_that_declines_huge_pages(files):
    """The weights' buffers are mappings advised against transparent huge pages ("nh"), unlike a
    numpy array of the same size (numpy advises the opposite); an empty one still has an element."""
    import mmap

    if not hasattr(mmap, "MADV_NOHUGEPAGE"):
        pytest.skip("this Python's mmap has no MADV_NOHUGEPAGE")
    from edge_lolcats.runtime.compiled_engine import weights_buffer

    engine = CompiledEngine(files["q8_0"])
    for buffer in (engine.q8, engine.scales, engine.f32):
        assert "nh" in _vm_flags(buffer)
    big = weights_buffer(8 << 20, np.float32)
    assert big.dtype == np.float32 and big.size == 8 << 20 and big.flags.writeable and not big.any()
    assert "nh" in _vm_flags(big)
    if np.lib.NumpyVersion(np.__version__) >= "1.20.0":
        assert "nh" not in _vm_flags(np.ones(8 << 20, np.float32))
    assert weights_buffer(0, np.int8).size == 1


def test_thread_counts_give_identical_logits(files):
    """Each output row is summed by one thread in one order, whatever the thread count."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: nothing to compare")
    ids = _ids(20, 2)
    out = []
    for threads in (1, 2):
        engine = CompiledEngine(files["q8_0"], threads=threads)
        logits, state = engine.run(ids[:12], engine.empty_state())
        out.append((logits, engine.run(ids[12:13], state)[0]))
    assert all(np.array_equal(a, b) for a, b in zip(*out))


def test_a_block_without_logits_updates_the_state_alone(files):
    """want_logits=False (a prompt's chunks before its last) skips the vocabulary product and writes
    nothing else: the same state as with logits, which then continue the same (it once wrote the
    logits past the end of an empty array)."""
    engine = CompiledEngine(files["q4_0"])
    ids = _ids(40, 5)
    with_logits = engine.run(ids[:33], engine.empty_state())[1]
    got, without = engine.run(ids[:33], engine.empty_state(), want_logits=False)
    assert got is None and without.position == with_logits.position == 33
    for name, want in with_logits.tensors.items():
        np.testing.assert_array_equal(without.tensors[name], want, err_msg=name)
    np.testing.assert_array_equal(engine.run(ids[33:], without)[0], engine.run(ids[33:], with_logits)[0])


def test_states_move_between_engines(files):
    """A state made by the numpy engine continues on the compiled one and the other way round (the
    same arrays, in the layout arch.state defines); a copied state runs like the original."""
    reference, compiled = GGUFEngine(files["f32"]), CompiledEngine(files["f32"])
    ids = _ids(30, 3)
    want, _ = compiled.run(ids, compiled.empty_state())
    _, state = reference.run(ids[:17], reference.empty_state())
    got, state = compiled.run(ids[17:], state)
    assert np.abs(got - want).max() < TOL
    _, state = compiled.run(ids[:17], compiled.empty_state())
    again = state.copy()
    got, _ = reference.run(ids[17:], state)
    assert np.abs(got - want).max() < TOL
    got, _ = compiled.run(ids[17:], again)
    assert np.abs(got - want).max() < TOL


def test_batch_rows_run_independently(files):
    engine = CompiledEngine(files["q4_0"])
    ids = np.stack([_ids(9, 4), _ids(9, 5)])
    both, _ = engine.run(ids, engine.empty_state(batch=2))
    for row in range(2):
        alone, _ = engine.run(ids[row], engine.empty_state())
        np.testing.assert_array_equal(both[row], alone[0])


def test_bad_token_ids_are_refused(files):
    engine = CompiledEngine(files["f32"])
    for bad in ([49152], [-1], []):
        with pytest.raises(ValueError):
            engine.run(bad, engine.empty_state())


def _run_in_fresh_process(code: str, cwd, cache_dir) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_released_compiler_pages_come_back_when_numba_compiles_again(tmp_path, files):
    """release_compiler_pages drops libllvmlite's code and its never-written read-only data, keeps the
    mapping the loader relocated (Anonymous > 0), and numba still compiles and runs new code after
    it (the dropped pages are re-read from the file), as does the engine."""
    code = ("import numpy as np\n"
            "from numba import njit\n"
            "from edge_lolcats.runtime.compiled_engine import CompiledEngine, release_compiler_pages\n"
            f"engine = CompiledEngine({files['q8_0']!r})\n"
            "maps, current = [], None\n"
            "for line in open('/proc/self/smaps'):\n"
            "    f = line.split()\n"
            "    if '-' in f[0] and len(f) >= 5:\n"
            "        current = {'perms': f[1]} if len(f) > 5 and 'libllvmlite' in f[5] else None\n"
            "        maps += [current] if current else []\n"
            "    elif current is not None and f[0] in ('Rss:', 'Anonymous:'):\n"
            "        current[f[0]] = int(f[1])\n"
            "read_only = [m for m in maps if m['perms'] in ('r-xp', 'r--p')]\n"
            "assert all(m['Rss:'] == 0 for m in read_only if m['Anonymous:'] == 0), maps\n"
            "assert any(m['Rss:'] > 0 for m in read_only if m['Anonymous:'] > 0), maps  # relocated: kept\n"
            "fresh = njit(lambda a: (a * 3).sum())\n"
            "assert fresh(np.arange(10)) == 135\n"
            "assert release_compiler_pages() > 0 and fresh(np.arange(4.0)) == 18.0\n"
            "logits, _ = engine.run(np.array([[1, 2, 3]]), engine.empty_state())\n"
            "print(bool(np.isfinite(logits).all()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-3000:]


def test_second_process_loads_the_compiled_code_from_disk_without_torch(tmp_path, files):
    """numba's cache: the first process compiles, the next one loads the machine code, without
    numba's registries for compiling (its linear algebra among them), and computes the same logits;
    neither imports torch (the runtime never does), nor gguf-py for a file of the types we write
    (its import was 45-90 ms of the time to a first token)."""
    code = ("import hashlib, sys; sys.modules['torch'] = sys.modules['gguf'] = None\n"
            "import numpy as np\n"
            "from edge_lolcats.runtime.api import load\n"
            f"m = load({files['q8_0']!r})\n"
            "registries = 'numba.np.linalg' in sys.modules\n"
            "logits, state = m.engine.run(np.array([[1, 2, 3, 4, 5]]), m.engine.empty_state())\n"
            "logits, state = m.engine.run(np.array([[6]]), state)\n"
            "print(m.engine.name, m.engine.compiled, registries, hashlib.sha256(logits.tobytes()).hexdigest(),"
            " m.generate('Hi', 5) is not None, sep='|')")
    first = _run_in_fresh_process(code, tmp_path, tmp_path / "numba-cache").split("|")
    second = _run_in_fresh_process(code, tmp_path, tmp_path / "numba-cache").split("|")
    assert first[:3] == ["compiled", "compiled", "True"] and second[:3] == ["compiled", "disk cache", "False"], (first, second)
    assert first[3] == second[3]  # the same machine code: the same bits
    assert first[-1] == second[-1] == "True"


def test_cache_loads_skip_the_registries_only_inside():
    """Inside the context a numba cache's lookup initialises numba's runtime and looks up without
    refreshing the registries; outside, the cache's own method is back (a later compile of any
    function refreshes them as numba always does); a dispatcher without a cache is left alone."""
    from types import SimpleNamespace

    from edge_lolcats.runtime import compiled_engine as ce

    class Cache:
        def __init__(self):
            self.looked_up = []

        def load_overload(self, sig, target_context):  # numba's: refresh, then the lookup
            raise AssertionError("the refreshing lookup was called")

        def _load_overload(self, sig, target_context):
            self.looked_up.append(sig)
            return None  # a miss

    cache, bare = Cache(), SimpleNamespace()
    from numba.core.registry import cpu_target

    with ce._cache_loads_without_registries(SimpleNamespace(_cache=cache), bare):
        assert cache.load_overload("sig", cpu_target.target_context) is None
    assert cache.looked_up == ["sig"] and "load_overload" not in vars(cache)
    with pytest.raises(AssertionError, match="refreshing"):
        cache.load_overload("sig", None)


def test_thread_tuner_moves_to_the_faster_count_and_back():
    """The engine's thread count follows the measured step times (a core taken by another process
    makes 2 threads slower than 1), keeps looking at the other count, never looks early on an idle
    machine, and looks at once when a step's threads did not all get a core."""
    from edge_lolcats.runtime.compiled_engine import ThreadTuner

    tuner = ThreadTuner({1, 2}, period=8)
    cost = {1: 28e-3, 2: 15e-3}  # idle machine
    busy = False
    used = []
    for step in range(200):
        if step == 100:
            cost, busy = {1: 28e-3, 2: 60e-3}, True  # another process takes a core
        t = tuner.choose("decode")
        # CPU time of the step: every thread on a core when idle; two threads share one when busy
        tuner.record("decode", t, cost[t], cost[t] * (t if not busy or t == 1 else 1.0))
        used.append(t)
    assert used[:7] == [2] * 7  # idle: no look at 1 thread before the period
    assert used[100:102] == [2, 1]  # the first crowded step makes the next one look
    assert used[40:100].count(2) > 0.8 * 60 and used[110:].count(1) > 0.8 * 90
    assert 1 in used[40:100] and 2 in used[150:]  # the other count is still tried now and then
    # crowded but 2 threads still faster: looks at 1 thread at most every period // 4 steps
    tuner, used = ThreadTuner({1, 2}, period=32), []
    for step in range(64):
        t = tuner.choose("block")
        tuner.record("block", t, {1: 30e-3, 2: 20e-3}[t], 20e-3 * 1.2 if t == 2 else 30e-3)
        used.append(t)
    assert 1 < used.count(1) <= 64 // 8 + 2
    assert ThreadTuner({1}).choose("decode") == 1
