"""ONNX export: a block graph and a decode graph with explicit state over one weights file, equal
to the PyTorch model for any block sizes, parity on the real SmolLM2, int8 weights, and bad exports
refused."""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli, tiny_model

from edge_lolcats.converters.onnx_export import ExportError, export_onnx
from edge_lolcats.formats.gguf_io import ModelFileError
from edge_lolcats.nn.lora import apply_lora, lora_modules
from edge_lolcats.nn.model import forward, linearize
from edge_lolcats.runtime.onnx_engine import OnnxEngine
from test_families import TINY_STATE_BYTES


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, smol_tokenizer):
    model = apply_lora(linearize(tiny_model("qwen2"), window_size=8, feature_dim=8), rank=2)  # biases, GQA
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.weight.normal_(std=0.3)
        for layer in model.model.layers:
            layer.self_attn.feature_map_k.weight.normal_()
    folder = str(tmp_path_factory.mktemp("onnx") / "export")
    export_onnx(model, smol_tokenizer, folder)
    return model, folder


@pytest.mark.parametrize("batch", [1, 2])  # one sequence: single tokens run the decode graph
def test_graphs_equal_pytorch_for_any_block_sizes(tiny_export, batch):
    model, folder = tiny_export
    engine = OnnxEngine(folder)
    x = torch.randint(0, 49152, (batch, 41))
    with torch.no_grad():
        ref, ref_state = forward(model, x)  # LoRA unmerged here, merged in the graph
    state, pos = engine.empty_state(batch=batch), 0
    for size in (1, 7, 8, 9, 1, 15):  # before, at and past the window of 8
        logits, state = engine.run(x[:, pos : pos + size].numpy(), state)
        pos += size
        # float32: LoRA merged once in the graph (~1e-7 relative), other ops in another order
        assert np.abs(logits - ref[:, pos - 1].numpy()).max() < 1e-4, (size, pos)
    assert state.position == 41
    for i, layer_state in enumerate(ref_state.layers):
        for part in ("kv", "z", "k_window", "v_window"):
            # kv and z are sums over tokens with entries up to ~30: an element that cancels to ~0
            # keeps the rounding of its terms, so the absolute bound scales with the tensor's size
            # (float32 eps 1.2e-7 x a few dozen terms summed in another order)
            ref_part = getattr(layer_state, part).numpy()
            np.testing.assert_allclose(state.tensors[f"state.{i}.{part}"], ref_part,
                                       rtol=1e-4, atol=4e-6 * max(1.0, np.abs(ref_part).max()))


def test_model_json_describes_the_graph(tiny_export):
    model, folder = tiny_export
    meta = json.load(open(os.path.join(folder, "model.json")))
    assert meta["inputs"][:2] == ["input_ids", "position"]
    assert meta["state"]["state.1.k_window"]["shape"] == ["batch", 2, 8, 16]  # per KV head
    assert meta["state"]["state.1.k_sink"]["shape"] == ["batch", 2, 4, 16]
    assert meta["recurrence"] == {"feature_maps": "pre_rope", "decay": True, "sink_tokens": 4}
    assert meta["state"]["state.0.kv"]["shape"] == ["batch", 4, 16, 16]
    assert meta["state_bytes_per_sequence"] == TINY_STATE_BYTES
    import onnx

    for graph_file in ("model.onnx", "decode.onnx"):
        graph = onnx.load(os.path.join(folder, graph_file), load_external_data=False).graph
        assert [i.name for i in graph.input] == meta["inputs"]
        assert [o.name for o in graph.output] == meta["outputs"]
    decode_inputs = {i.name: i for i in graph.input}
    assert [d.dim_value for d in decode_inputs["input_ids"].type.tensor_type.shape.dim] == [1, 1]
    assert sorted(os.listdir(folder)) == ["decode.onnx", "model.json", "model.onnx", "tokenizer.json",
                                          "tokenizer_config.json", "weights.bin"]
    # the two graphs share their weights: every tensor the decode graph reads from weights.bin
    # is one the block graph reads too, and the file holds each once
    tables = meta["external_initializers"]
    block = {e["offset"] for e in tables["model.onnx"].values()}
    assert {e["offset"] for e in tables["decode.onnx"].values()} <= block
    unique = {e["offset"]: e["length"] for e in tables["model.onnx"].values()}
    assert sum(unique.values()) <= os.path.getsize(os.path.join(folder, "weights.bin")) < sum(unique.values()) + 64 * len(unique)
    assert max(unique.values()) >= 49152 * 64 * 4  # the embedding matrix is among them


@pytest.mark.parametrize("quantize,dtype", [("int8", "q8_0"), ("int4", "q4_0")])
def test_quantized_export_holds_the_gguf_weights(tmp_path, smol_tokenizer, quantize, dtype):
    """--quantize int8 / int4 write MatMulNBits with the q8_0 / q4_0 GGUF file's own weights: with
    float32 activations (accuracy_level 1) both runtimes compute the same logits, token by token
    past the window and in a prefill block; with int8 activations (level 4, the default, the fast
    kernels) the argmax still agrees on nearly every token of a random model."""
    import onnx

    from edge_lolcats.converters.gguf_export import export_gguf
    from edge_lolcats.runtime.compiled_engine import CompiledEngine

    model = linearize(tiny_model("qwen2"), window_size=8, feature_dim=8)
    # int4 rounded with calibration text, as `edge-lolcats export` does: the same text gives the same blocks
    calibration = np.random.default_rng(1).integers(0, 49152, (2, 16)) if quantize == "int4" else None
    export_onnx(model, smol_tokenizer, str(tmp_path / "exact"), quantize=quantize, accuracy_level=1,
                calibration=calibration)
    calls = []
    export_onnx(model, smol_tokenizer, str(tmp_path / "fast"), quantize=quantize, calibration=calibration,
                progress=lambda i, n: calls.append((i, n)))
    # one call per distinct matrix rounded: q|k|v, o, gate|up and down of each of 2 layers, and the head
    assert calls == [(i + 1, 4 * 2 + 1) for i in range(4 * 2 + 1)], calls
    export_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), dtype=dtype, calibration=calibration)

    def packs(session):  # MatMulNBits multiplies in int8 from packed weights only
        return not _packing_disabled(session)
    graph = onnx.load(str(tmp_path / "exact" / "decode.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = sorted({a.i for n in nbits for a in n.attribute if a.name == "bits"})
    assert len(nbits) == 2 * 4 + 1 and bits == ([8] if quantize == "int8" else [4, 8])  # the head stays 8-bit
    # float32 activations on both sides of the exact comparison; onnxruntime's int8 activations are
    # not rounded as arch.ops.quantize_activations (measured: its decode logits differ from the
    # compiled engine's quantized ones by as much as from the float32 ones), so the fast export is
    # held to the argmax only
    reference, exact, fast = (CompiledEngine(str(tmp_path / "m.gguf"), activations="float32"), OnnxEngine(str(tmp_path / "exact")),
                              OnnxEngine(str(tmp_path / "fast")))
    assert exact.meta["weights"] == quantize
    assert packs(fast.session) and packs(fast.decode_session)  # the block graph too (prefill +45-75%)
    ids = np.random.default_rng(0).integers(0, 49152, 30)
    states = [e.empty_state() for e in (reference, exact, fast)]
    agree = 0
    for start, size in [(0, 12)] + [(i, 1) for i in range(12, 30)]:
        (want, states[0]), (got, states[1]), (quick, states[2]) = (
            e.run(ids[start : start + size], s) for e, s in zip((reference, exact, fast), states))
        assert np.abs(got - want).max() < 1e-4, (start, np.abs(got - want).max())
        agree += int(quick[0].argmax() == want[0].argmax())
    assert agree >= 17  # of 19: int8 activations move the argmax on a few near-ties of a random model


def test_stacked_decode_weights_are_the_block_graphs_per_layer_tensors(tmp_path, smol_tokenizer):
    """The decode graph reads the leaving keys' feature-map weights of all layers as one stacked
    tensor: weights.bin holds it once, each layer's slice being the block graph's tensor of that
    layer (4 KB slices and up leave the graphs; the tiny export's are inline)."""
    model = linearize(tiny_model("llama"), window_size=8, feature_dim=32).eval()  # [4, 16, 32] = 8 KB a layer
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.feature_map_k.weight.normal_()
    folder = str(tmp_path / "o")
    export_onnx(model, smol_tokenizer, folder)
    with open(os.path.join(folder, "model.json"), encoding="utf-8") as f:
        tables = json.load(f)["external_initializers"]
    stacked = [e for n, e in tables["decode.onnx"].items() if n.startswith("layers.")]
    assert len(stacked) == 1 and stacked[0]["shape"][0] == model.args.num_layers
    block = {(e["offset"], e["length"]) for e in tables["model.onnx"].values()}
    size = stacked[0]["length"] // model.args.num_layers
    assert all((stacked[0]["offset"] + i * size, size) in block for i in range(model.args.num_layers))
    unique = dict(block)
    assert os.path.getsize(os.path.join(folder, "weights.bin")) < sum(unique.values()) + 64 * len(unique)
    engine = OnnxEngine(folder)  # and the decode graph still reads them right
    with torch.no_grad():
        want, _ = forward(model, torch.tensor([[5, 9, 2, 7, 1, 3, 8, 4, 6, 0, 11]]))
    state = engine.empty_state()
    for p, token in enumerate([5, 9, 2, 7, 1, 3, 8, 4, 6, 0, 11]):
        logits, state = engine.run([token], state)
    np.testing.assert_allclose(logits[0], want[0, -1].numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_bad_exports_are_refused(tiny_export, tmp_path, smol_tokenizer):
    import shutil

    _, folder = tiny_export
    bad = str(tmp_path / "bad")
    shutil.copytree(folder, bad)
    meta = json.load(open(os.path.join(bad, "model.json")))
    meta["state"]["state.0.kv"]["shape"] = ["batch", 4, 99, 16]
    json.dump(meta, open(os.path.join(bad, "model.json"), "w"))
    with pytest.raises(ModelFileError, match="state.0.kv"):
        OnnxEngine(bad)
    r = run_cli("verify", bad)
    assert r.returncode == 2 and "state.0.kv" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    shutil.copytree(folder, str(tmp_path / "cut"))
    data = open(os.path.join(folder, "model.onnx"), "rb").read()
    open(str(tmp_path / "cut" / "model.onnx"), "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cannot load"):
        OnnxEngine(str(tmp_path / "cut"))
    shutil.copy(os.path.join(folder, "model.onnx"), str(tmp_path / "cut" / "model.onnx"))
    weights = str(tmp_path / "cut" / "weights.bin")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(ModelFileError, match="truncated"):
        OnnxEngine(str(tmp_path / "cut"))
    os.remove(str(tmp_path / "cut" / "model.json"))
    with pytest.raises(ModelFileError, match="no model.json"):
        OnnxEngine(str(tmp_path / "cut"))
    engine = OnnxEngine(folder)
    state = engine.empty_state()
    state.tensors["state.0.z"] = np.zeros((1, 4, 5), np.float32)
    with pytest.raises(ValueError, match="state.0.z"):
        engine.check_state(state)
    with pytest.raises(ExportError, match="linearized"):
        export_onnx(tiny_model(), smol_tokenizer, str(tmp_path / "x"))


def test_failed_export_keeps_the_old_folder(tmp_path, smol_tokenizer, monkeypatch):
    model = linearize(tiny_model(), window_size=8, feature_dim=8)
    out = str(tmp_path / "o")
    export_onnx(model, smol_tokenizer, out)
    before = open(os.path.join(out, "model.onnx"), "rb").read()
    import onnx.checker

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("broken")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(model, smol_tokenizer, out)
    assert open(os.path.join(out, "model.onnx"), "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_real_smollm2_onnx_parity(tmp_path):
    """f32 ONNX of a linearized SmolLM2 gives the PyTorch greedy continuation (64 tokens, past the
    64-token window) with last-token logits within 1e-3 (float32 over 30 layers, see test_real_model)."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "onnx"
    assert run_cli("linearize", "--base", "smollm2-135m", "--out", str(ckpt), "--delta").returncode == 0
    r = run_cli("export", str(ckpt), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = run_cli("verify", str(out), "--against", str(ckpt), "--tokens", "64", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["greedy_tokens_equal"] == 64 and report["max_logit_diff"] < 1e-3
    r = run_cli("export", str(ckpt), "--format", "onnx", "--dtype", "q8_0", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--dtype is for GGUF" in r.stderr


def test_decode_graph_equals_the_block_graph(tiny_export):
    """Token by token across the window of 8, from a random state: the static T = 1 graph and the
    block graph at T = 1 agree (same math, float32, different op order)."""
    _, folder = tiny_export
    engine = OnnxEngine(folder)
    rng = np.random.default_rng()
    state = {n: np.abs(rng.standard_normal(a.shape)).astype(np.float32) for n, a in engine.empty_state().tensors.items()}
    for position, token in enumerate(rng.integers(0, 49152, 12).tolist(), start=3):
        feeds = {"input_ids": np.array([[token]], np.int64), "position": np.array(position, np.int64), **state}
        decode, block = engine.decode_session.run(None, feeds), engine.session.run(None, feeds)
        for a, b in zip(decode, block):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        state = dict(zip(engine.state_names, decode[1:]))


def test_decode_path_diagnostic_runs_the_same_math(tiny_export):
    """`python -m edge_lolcats.bench.runtime --onnx-decode`: the engine's path (bindings made once)
    must leave exactly the decode graph's state (it raises otherwise)."""
    from edge_lolcats.bench.runtime import onnx_decode_paths

    _, folder = tiny_export
    ms = onnx_decode_paths(folder, steps=3, repeats=1)
    assert set(ms) == {"block graph, T = 1", "decode graph", "engine (bound once)"}
    assert all(0 < v < float("inf") for v in ms.values())


def test_bound_decode_steps_equal_the_decode_graph(tiny_export):
    """The engine's decode step runs the decode graph through bindings made once for two sets of
    arrays that take turns: token for token it gives the decode graph's logits and state exactly,
    reads the token and position written in place, follows a state whose arrays are replaced
    (a copy, an edited dict) and keeps a logits array the next step does not overwrite."""
    _, folder = tiny_export
    engine = OnnxEngine(folder)
    rng = np.random.default_rng()
    tokens = rng.integers(0, engine.meta["vocab_size"], 14).tolist()
    state = engine.empty_state()
    engine.run(tokens[:3], state)  # the block graph: arrays made by onnxruntime
    reference = state.copy()

    def plain_step(s, token):
        out = engine.decode_session.run(None, {"input_ids": np.array([[token]], np.int64),
                                               "position": np.array(s.position, np.int64), **s.tensors})
        s.tensors, s.position = dict(zip(engine.state_names, out[1:])), s.position + 1
        return out[0]

    kept = []
    for i, token in enumerate(tokens[3:]):
        if i == 4:  # a copy resumed and edited (the arrays last bound keep the old numbers)
            state = state.copy()
            state.tensors[engine.state_names[0]] *= 0.5
            reference.tensors[engine.state_names[0]] = reference.tensors[engine.state_names[0]] * 0.5
        if i == 7:  # one array of the dict replaced
            name = engine.state_names[2]
            state.tensors[name] = state.tensors[name] * 0.5
            reference.tensors[name] = reference.tensors[name] * 0.5
        logits, state = engine.run([token], state)
        want = plain_step(reference, token)
        np.testing.assert_array_equal(logits, want)
        kept.append((logits, want.copy()))
        for n in engine.state_names:
            np.testing.assert_array_equal(state.tensors[n], reference.tensors[n])
        assert state.position == reference.position
    assert all(np.array_equal(a, b) for a, b in kept)
    assert len({a.tobytes() for a, _ in kept}) == len(kept)


def test_decode_graph_floors_are_cut_from_the_decode_graph(tiny_export):
    """`python -m edge_lolcats.bench.onnx_floors`: the "upkeep" graph (no readout) updates S and z
    exactly as the decode graph does; the "products" graph reads no state; both have fewer nodes,
    and the three time."""
    import onnx

    from edge_lolcats.bench.onnx_floors import cut_decode_graph, decode_floors

    _, folder = tiny_export
    engine = OnnxEngine(folder)
    model = onnx.load(os.path.join(folder, "decode.onnx"))
    parts = {p: cut_decode_graph(model, p) for p in ("products", "upkeep", "decode")}
    assert len(parts["products"].graph.node) < len(parts["upkeep"].graph.node) < len(model.graph.node)
    assert len(parts["decode"].graph.node) == len(model.graph.node)
    assert [o.name for o in parts["products"].graph.output] == ["logits"]
    assert not any(i.name.startswith("state.") for i in parts["products"].graph.input)
    assert [o.name for o in parts["upkeep"].graph.output] == engine.meta["outputs"]
    assert not any(n.name.endswith(("linear_num", "phi_q", "scores")) for n in parts["upkeep"].graph.node)
    rng = np.random.default_rng()
    state = {n: np.abs(rng.standard_normal(a.shape)).astype(np.float32) for n, a in engine.empty_state().tensors.items()}
    feeds = {"input_ids": np.array([[7]], np.int64), "position": np.array(13, np.int64), **state}
    full = engine.decode_session.run(None, feeds)
    sess = ort.InferenceSession(parts["upkeep"].SerializeToString(), providers=["CPUExecutionProvider"])
    upkeep = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    for name, a, b in zip(engine.state_names, full[1:], upkeep[1:]):
        # S and z come from the input state alone, and layer 0's rings from the input token; past
        # layer 0 the new keys and values follow a residual stream without attention
        if name.startswith("state.0.") or name.endswith((".kv", ".z")):
            np.testing.assert_array_equal(a, b)
        else:
            assert a.shape == b.shape
    with pytest.raises(ValueError, match="part"):
        cut_decode_graph(model, "attention")
    result = decode_floors(folder, rounds=2, block=2)
    assert set(result) == {"products", "upkeep", "decode"} and all(r["ms"] > 0 for r in result.values())


def _packing_disabled(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    except RuntimeError:  # onnxruntime raises for a key never set
        return False


def _resident_bytes_of(path: str) -> int:
    """RSS of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_weights_are_mapped_and_embedding_rows_do_not_stay_resident(tiny_export):
    """The engine maps weights.bin (nothing copied for the block graph) and drops the embedding's
    pages after each call, so the rows read for a long context do not pile up in RSS."""
    from edge_lolcats.runtime.onnx_engine import RELEASE_EVERY

    _, folder = tiny_export
    path = os.path.realpath(os.path.join(folder, "weights.bin"))
    tokens = np.random.default_rng(0).permutation(49152)[:3072]  # 3072 distinct rows of 256 bytes
    resident = {}
    for release in (True, False):
        engine = OnnxEngine(folder)
        # a float32 export's block graph packs nothing (a packed copy would be another 500 MB on SmolLM2)
        assert _packing_disabled(engine.session)
        offset, length = engine._embedding_pages
        assert length == 49152 * 64 * 4
        if not release:
            engine._embedding_pages = None
        state = engine.empty_state()
        for start in range(0, len(tokens), 128):
            engine.run(tokens[start : start + 128], state)
        resident[release] = _resident_bytes_of(path)
        del engine, state
    size = os.path.getsize(path)
    # everything but the embedding (24 blocks of 128 = RELEASE_EVERY: the last call released)
    assert RELEASE_EVERY == 128
    assert 0 < resident[True] <= size - length + 2 * 4096
    assert resident[False] > resident[True] + 2_000_000  # the rows' pages (and their neighbours) stay


def test_rope_constants_are_apply_rope():
    """The compact decode graph's rotary embedding, x @ (E cos + S sin + P), equals the block's
    apply_rope (float64, random positions and head dims, full and partial rotary)."""
    from edge_lolcats.arch import block
    from edge_lolcats.arch.ops import NUMPY
    from edge_lolcats.converters.onnx_decode import _rope_constants

    rng = np.random.default_rng()
    for d, rot in ((8, 8), (64, 64), (16, 8)):
        inv_freq = 1.0 / 10000 ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
        angles = rng.integers(0, 100_000) * inv_freq
        cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
        pad = np.zeros(d - rot)
        e, s, p = (c.astype(np.float64) for c in _rope_constants(rot, d))
        matrix = e * np.concatenate([cos, pad]) + s * np.concatenate([sin, pad]) + p
        for x in (rng.standard_normal((1, 3, 1, d)), rng.standard_normal((1, 2, 1, d))):
            np.testing.assert_allclose(x @ matrix, block.apply_rope(NUMPY, x, cos, sin), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family,options", [
    ("llama", dict(feature_maps="post_rope")),  # the first models: phi after RoPE, no decay, no sinks
    ("llama", dict(feature_maps="pre_rope", decay=True, sink_tokens=0)),
    ("qwen3", dict(feature_maps="pre_rope", decay=False, sink_tokens=4)),  # qk norms
    ("gemma2", dict(feature_maps="pre_rope", decay=True, sink_tokens=4)),  # soft-caps, sandwich norms, kept windows
    ("mistral", dict(feature_maps="post_rope", decay=True, sink_tokens=2)),  # its own sliding window everywhere
    ("phi3", dict(feature_maps="pre_rope", decay=True, sink_tokens=4)),  # partial rotary
])
def test_compact_decode_graph_equals_pytorch(family, options):
    """The compact decode graph, token by token past the window, equals the PyTorch model (the one
    definition) for each family and recurrence option: logits and the state it leaves (float32;
    the graph folds the scale into the rotation and sums in another order)."""
    import onnx
    import onnxruntime as ort

    from edge_lolcats.arch.hybrid import Recurrence
    from edge_lolcats.converters.onnx_decode import build_decode_graph
    from edge_lolcats.nn.model import state_layout

    model = linearize(tiny_model(family), window_size=8, feature_dim=8, recurrence=Recurrence(**options)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "feature_map_k"):
                layer.self_attn.feature_map_k.weight.normal_()
    graph = build_decode_graph(model)
    onnx.checker.check_model(graph)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    layout = state_layout(model)
    names = layout.names()
    state = {n: np.zeros(s, np.float32) for n, s in layout.shapes(1).items()}
    x = torch.randint(0, model.args.vocab_size, (1, 20))
    with torch.no_grad():
        ref, ref_state = forward(model, x)
    for p in range(20):  # the window is 8 and the sinks 4: keys enter S from position 12
        out = session.run(None, {"input_ids": x[:, p : p + 1].numpy(), "position": np.array(p, np.int64), **state})
        state = dict(zip(names, out[1:]))
        want = ref[:, p].numpy()
        assert np.abs(out[0] - want).max() < 1e-4 * max(1.0, np.abs(want).max()), p
    for i, layer_state in enumerate(ref_state.layers):
        for part in layout.part_shapes(i):
            want = getattr(layer_state, part).numpy()
            np.testing.assert_allclose(state[f"state.{i}.{part}"], want, rtol=1e-4, atol=4e-6 * max(1.0, np.abs(want).max()))


def test_compact_decode_graph_stays_compact():
    """A graph pays per node (the traced decode graph had ~125 a layer after onnxruntime's fusions):
    a budget per layer, so the compact graph cannot grow back unnoticed. Counted on the options
    that need the most nodes (feature maps before RoPE, decay, sinks; a kept sliding window)."""
    from collections import Counter

    from edge_lolcats.converters.onnx_decode import build_decode_graph

    from edge_lolcats.arch.state import HYBRID
    from edge_lolcats.nn.model import state_layout

    model = linearize(tiny_model("gemma2"), window_size=8, feature_dim=8)  # local and global layers
    graph = build_decode_graph(model, bits=8)
    kinds = state_layout(model).kinds
    per_layer = Counter(n.name.split(".")[0] for n in graph.graph.node if n.name.split(".")[0][1:].isdigit())
    assert len(per_layer) == len(kinds) and len(set(kinds)) == 2
    for name, count in per_layer.items():
        assert count <= (80 if kinds[int(name[1:])] == HYBRID else 32), (name, count)
    assert len(graph.graph.node) - sum(per_layer.values()) <= 80  # the per-step tables, embedding and head
