"""The benchmark commands run end to end on small inputs (their figures go to docs/BENCHMARKS.md)."""
import json
import os

import pytest

from conftest import run_cli
from test_train import fake_documents
from test_families import TINY_STATE_BYTES


def test_bench_attention_small(tmp_path):
    r = run_cli("bench", "attention", "--lengths", "64,200", "--heads", "2", "--head-dim", "16", "--feature-dim", "8",
                "--window-size", "16", "--backward", "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "a.json").read_text())["results"]
    assert len(results) == 2 * 2 * 2 and all(x["tokens_per_s"] > 0 and x["peak_rss_mb"] > 0 for x in results)
    assert r.stdout.count("| chunked |") == 4


def test_bench_exports_small(tmp_path, tiny_model_dir):
    base, _ = tiny_model_dir()
    data = tmp_path / "data"
    data.mkdir()
    for d in fake_documents():
        (data / f"{d.name}.txt").write_text(d.text, encoding="utf-8")
    ckpt = tmp_path / "ckpt"
    assert run_cli("linearize", "--base", base, "--out", str(ckpt), "--window-size", "8", "--feature-dim", "8").returncode == 0
    r = run_cli("bench", "exports", str(ckpt), "--targets", "gguf:f32,gguf:q8_0,onnx:f32", "--tokens", "128",
                "--seq-len", "64", "--data", str(data), "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    rows = {(x["format"], x["precision"]): x for x in json.loads((tmp_path / "e.json").read_text())["results"]}
    for key in (("gguf", "f32"), ("onnx", "f32")):  # exact formats reproduce the model
        assert rows[key]["top1_agreement"] == 1.0 and abs(rows[key]["ppl_change"]) < 1e-4
    assert rows[("gguf", "q8_0")]["mb"] < rows[("gguf", "f32")]["mb"] / 2


def test_bench_memory_small_with_llama_cpp(tmp_path, tiny_model_dir):
    """Both engines and llama.cpp, each measurement in its own process; ours keep one state size.
    llama.cpp at 512 decodes after 64 tokens' KV cache tiled to 512 (--baseline-tile)."""
    base, _ = tiny_model_dir()
    ckpt = tmp_path / "ckpt"
    assert run_cli("linearize", "--base", base, "--out", str(ckpt), "--window-size", "8", "--feature-dim", "8").returncode == 0
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    r = run_cli("bench", "memory", str(ckpt), "--contexts", "64,512", "--baseline", "llama.cpp", "--baseline-tile", "64",
                "--dtype", "f32",
                "--onnx-weights", "f32", "--work-dir", str(tmp_path / "work"), "--decode-tokens", "8",
                "--text", str(text), "--threads", "1", "--json", str(tmp_path / "m.json"),
                "--plot", str(tmp_path / "m.png"), "--out", str(tmp_path / "m.md"))
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "m.json").read_text())["results"]
    by = {(x["engine"], x["context"]): x for x in results}
    assert set(by) == {(e, c) for e in ("compiled", "onnx", "llama.cpp") for c in (64, 512)}
    for x in results:
        assert x["decode_tokens_per_s"] > 0
        if os.path.exists("/proc/stat"):  # the machine's CPU time stolen while the run's process ran
            assert 0 <= x["steal_percent"] <= 100
        if x["kv_tiled_from"]:  # no prefill at the context, and the RSS after decode, not the peak
            assert (x["engine"], x["context"], x["kv_tiled_from"]) == ("llama.cpp", 512, 64)
            assert x["peak_rss_mb"] is x["prefill_tokens_per_s"] is x["first_token_s"] is None
            assert x["rss_after_decode_mb"] > 0
            continue
        assert x["peak_rss_mb"] > 0 and x["prefill_tokens_per_s"] > 0
        assert 0 < x["load_s"] < x["first_token_s"], x  # both from the process's start
    assert by[("llama.cpp", 512)]["kv_tiled_from"] == 64 and by[("llama.cpp", 64)]["kv_tiled_from"] is None
    assert by[("compiled", 64)]["compiled"] in ("compiled", "disk cache")
    for engine in ("compiled", "onnx"):  # fixed state
        assert by[(engine, 64)]["state_bytes"] == by[(engine, 512)]["state_bytes"] == TINY_STATE_BYTES
    assert by[("llama.cpp", 512)]["state_bytes"] > 4 * by[("llama.cpp", 64)]["state_bytes"]  # KV cache grows
    table = (tmp_path / "m.md").read_text()
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and "| llama.cpp |" in table
    assert "| llama.cpp (KV cache tiled from 64 tokens) |" in table
    # --merge: one report from several runs, the later file winning on the same engine and context
    later = {"results": [dict(by[("onnx", 512)], decode_tokens_per_s=123.0), dict(by[("onnx", 512)], context=4096)]}
    (tmp_path / "later.json").write_text(json.dumps(later))
    r = run_cli("bench", "memory", "--merge", str(tmp_path / "m.json"), str(tmp_path / "later.json"),
                "--json", str(tmp_path / "all.json"), "--plot", str(tmp_path / "all.png"))
    assert r.returncode == 0, r.stderr
    merged = {(x["engine"], x["context"]): x for x in json.loads((tmp_path / "all.json").read_text())["results"]}
    assert len(merged) == 7 and merged[("onnx", 512)]["decode_tokens_per_s"] == 123.0
    assert merged[("compiled", 64)] == {k: by[("compiled", 64)][k] for k in merged[("compiled", 64)]}
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("bench", "memory", "--merge", str(text))
    assert r.returncode == 2 and "not a bench memory --json report" in r.stderr


def test_runtime_targets_compare_the_right_rows():
    from edge_lolcats.bench.memory import bandwidth_fractions, runtime_targets

    def row(engine, weights, context, decode, prefill, rss, first=None):
        return {"engine": engine, "weights": weights, "context": context, "decode_tokens_per_s": decode,
                "prefill_tokens_per_s": prefill, "peak_rss_mb": rss, "first_token_s": first,
                "decode_bytes_per_token": 1e8}

    results = [row("compiled", "q8_0", 1024, 130.0, 400.0, 290, 2.0), row("llama.cpp", "q8_0", 1024, 100.0, 380.0, 295, 2.5),
               row("compiled", "q8_0", 16384, 120.0, 400.0, 300), row("llama.cpp", "q8_0", 16384, 20.0, 150.0, 1000),
               row("compiled", "q4_0", 1024, 150.0, 300.0, 250), row("llama.cpp", "q4_0", 1024, 140.0, 400.0, 200),
               row("onnx", "int8", 1024, 999.0, 999.0, 1)]
    rows = {r["target"]: r for r in runtime_targets(results)}
    assert rows["q8_0: decode at 1K >= 1.3 x llama.cpp"]["met"]  # 1.30
    assert rows["q8_0: decode at 16K >= 4 x llama.cpp"]["value"] == 6.0
    assert not rows["q8_0: prefill at 16K >= 3 x llama.cpp"]["met"]  # 400 / 150 = 2.67
    assert rows["q8_0: peak RSS at 1K <= llama.cpp's (MB)"]["met"]
    assert not rows["q8_0: peak RSS at 16K <= 1.02 x at 1K (MB)"]["met"]  # 300 > 295.8
    assert rows["q8_0: first token of a 1K prompt <= llama.cpp's (s)"]["met"]
    assert not rows["q4_0: decode at 1K >= 1.3 x llama.cpp"]["met"] and not rows["q4_0: peak RSS at 1K <= llama.cpp's (MB)"]["met"]
    assert "q4_0: decode at 16K >= 4 x llama.cpp" not in rows  # not measured: left out
    assert not any("int8" in t for t in rows)  # the ONNX rows have no llama.cpp at their precision
    fractions = bandwidth_fractions(results[:1], bandwidth=26e9)
    assert fractions[0]["fraction"] == 1e8 * 130.0 / 26e9


def test_repeated_measurements_report_their_median():
    from edge_lolcats.bench.memory import median_result

    runs = [{"engine": "onnx", "context": 1024, "state_bytes": 7, "peak_rss_mb": m, "prefill_tokens_per_s": p,
             "decode_tokens_per_s": d} for m, p, d in ((700, 500.0, 50.0), (690, 300.0, 58.0), (710, 520.0, 30.0))]
    row = median_result(runs)
    assert (row["peak_rss_mb"], row["prefill_tokens_per_s"], row["decode_tokens_per_s"]) == (700, 500.0, 50.0)
    assert row["repeats"] == 3 and row["state_bytes"] == 7 and row["engine"] == "onnx"
    assert median_result(runs[:1]) == dict(runs[0], repeats=1)
    # CPU time stolen by the hypervisor: the most any run had, not the median
    stolen = median_result([dict(r, steal_percent=p) for r, p in zip(runs, (0.5, 31.0, None))])
    assert stolen["steal_percent"] == 31.0 and stolen["decode_tokens_per_s"] == 50.0


def test_stolen_cpu_time_from_proc_stat(tmp_path):
    """/proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice;
    the share stolen between two readings, over all CPUs and all kinds of time."""
    from edge_lolcats.bench.runtime import cpu_times, steal_percent

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 20 300 5 0 1 14 7 0\ncpu0 50 0 10 150 2 0 0 7 0 0\n")
    before = cpu_times(str(stat))
    assert before == (14, 440)
    stat.write_text("cpu  160 0 30 330 5 0 1 34 9 0\n")
    after = cpu_times(str(stat))
    assert after == (34, 560)
    assert steal_percent(before, after) == 100.0 * 20 / 120
    assert steal_percent(None, after) is None and steal_percent(after, after) is None
    assert cpu_times(str(tmp_path / "missing")) is None
    stat.write_text("intr 1 2 3\n")
    assert cpu_times(str(stat)) is None


def test_llama_cpp_without_its_extra_buffer_types(tmp_path, smol_tokenizer):
    """The fallback the memory benchmark takes where llama.cpp's extra CPU buffer types crash (this
    machine's Xeon, SmolLM2 q8_0): the worker's --no-extra-bufts measures and says so in its row."""
    import subprocess
    import sys

    from conftest import tiny_model

    from edge_lolcats.bench.runtime import markdown
    from edge_lolcats.converters.gguf_export import export_gguf

    path = str(tmp_path / "teacher.gguf")
    export_gguf(tiny_model(), smol_tokenizer, path)
    r = subprocess.run([sys.executable, "-m", "edge_lolcats.bench.runtime", "--worker", "llama.cpp", path, "32", "4",
                        "--threads", "1", "--no-extra-bufts"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["extra_bufts"] is False and row["decode_tokens_per_s"] > 0
    assert "| llama.cpp (no extra buffer types) |" in markdown([row])
    # a merged report's rows of our engines carry the field as null: not llama.cpp's note
    assert "| compiled |" in markdown([{**row, "engine": "compiled", "extra_bufts": None}])


@pytest.mark.parametrize("flash_attn", [False, True], ids=["values-transposed", "values-by-row"])
def test_a_tiled_kv_state_is_what_llama_cpp_holds(tmp_path, smol_tokenizer, flash_attn):
    """The layout tiled_kv_state reads is this build's: llama.cpp takes the tiled state, holds the
    tiled positions, and gives back exactly the bytes it was given (every cell the one it repeats);
    then decodes after it. Both layouts of the values (transposed without flash attention)."""
    import ctypes

    import llama_cpp
    import numpy as np
    from conftest import tiny_model

    from edge_lolcats.bench.runtime import tiled_kv_state
    from edge_lolcats.converters.gguf_export import export_gguf

    path = str(tmp_path / "teacher.gguf")
    export_gguf(tiny_model(), smol_tokenizer, path)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, flash_attn=flash_attn, verbose=False)

    def state():
        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        raw = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(llm.ctx, raw, size, 0) == size
        return bytes(raw)

    llm.eval([5, 9, 200, 31, 7, 1000, 42, 3])
    short = state()
    tiled = tiled_kv_state(short, 30)  # 8 cells: three times and six more
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    assert llama_cpp.llama_state_seq_set_data(llm.ctx, tiled.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                              tiled.size, 0) == tiled.size
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0) == 29
    assert np.array_equal(np.frombuffer(state(), np.uint8), tiled)
    assert np.array_equal(tiled_kv_state(short, 8), np.frombuffer(short, np.uint8))  # tiled once: itself
    llm.n_tokens = 30
    llm.eval([11])
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0) == 30
    with pytest.raises(ValueError, match="cannot be tiled"):
        tiled_kv_state(short, 4)


def test_a_worker_peak_memory_is_its_own():
    """Benchmarks spawn a fresh process per measurement; its peak RSS must not include the parent's
    memory at the fork (getrusage's ru_maxrss does: it survives exec)."""
    import subprocess
    import sys

    import numpy as np

    parent = np.ones(300 * 2**20 // 8)  # 300 MB resident here
    code = "from edge_lolcats.runtime.generation import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 200, child  # an interpreter with numpy is ~30 MB; inherited, it would read 300+
    assert parent.sum() > 0


def test_bench_memory_engines_take_turns(monkeypatch, tmp_path):
    """Repeat by repeat each engine runs once, so a drifting machine (this VM's speed moves from
    minute to minute) weighs on every engine's median alike; llama.cpp past --baseline-max is skipped."""
    import argparse

    from edge_lolcats.bench import memory
    from edge_lolcats.bench import runtime as bench

    calls = []

    def run_one(engine, path, context, *rest, **options):
        calls.append((engine, context))
        return {"engine": engine, "context": context, "decode_tokens_per_s": float(len(calls)), "peak_rss_mb": 1.0,
                "state_bytes": 0, "prefill_tokens_per_s": 1.0, "first_token_s": 1.0}

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "bandwidth_in_fresh_process", lambda threads=None: 1e9)
    monkeypatch.setattr(memory, "_ensure_exports", lambda args: {"ours": ("compiled", "a.gguf"),
                                                                  "llama.cpp": ("llama.cpp", "t.gguf")})
    monkeypatch.setattr(memory, "_report", lambda args, results, paths, bandwidth: results)
    args = argparse.Namespace(merge=None, model="m", threads=None, text=str(tmp_path / "t.txt"), work_dir=str(tmp_path),
                              contexts=[1024, 4096], baseline_max=2048, repeats=3, decode_tokens=8, baseline_tile=None)
    results = memory.run(args)
    assert calls == [("compiled", 1024), ("llama.cpp", 1024)] * 3 + [("compiled", 4096)] * 3
    assert [(r["engine"], r["context"], r["decode_tokens_per_s"]) for r in results] == [
        ("compiled", 1024, 3.0), ("llama.cpp", 1024, 4.0), ("compiled", 4096, 8.0)]  # medians of 1,3,5 / 2,4,6 / 7,8,9


def test_workers_may_write_pythons_bytecode_cache(monkeypatch):
    """Each measurement's fresh process runs with the environment's settings except
    PYTHONDONTWRITEBYTECODE: a process start is timed with Python's bytecode cache as users have it
    (as numba's), not compiling the package's sources in every worker."""
    import subprocess

    from edge_lolcats.bench import runtime as bench

    seen = []

    def fake_run(cmd, env=None, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"engine": "compiled"}) + "\n", stderr="")

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("EDGE_LOLCATS_PROBE", "kept")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    row = bench.run_one("compiled", "a.gguf", 1024, 8)
    assert row["engine"] == "compiled" and len(seen) == 1
    assert "PYTHONDONTWRITEBYTECODE" not in seen[0] and seen[0]["EDGE_LOLCATS_PROBE"] == "kept"
