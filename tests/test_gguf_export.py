"""GGUF export: round trips through our reader, transformers' reader and gguf-py's dump tool,
quantization error in the expected range, parity on the real SmolLM2, and bad files refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_model

from edge_lolcats.converters import gguf_names as names
from edge_lolcats.converters.gguf_export import ExportError, _add_value, export_gguf
from edge_lolcats.formats.gguf_io import ModelFileError, read_gguf
from edge_lolcats.formats.loading import load_gguf
from edge_lolcats.nn.lora import apply_lora, lora_modules
from edge_lolcats.nn.model import forward, linearize


def trained_looking(model_family="llama"):
    model = apply_lora(linearize(tiny_model(model_family), window_size=8, feature_dim=8), rank=2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.weight.normal_(std=0.3)
        for layer in model.model.layers:
            layer.self_attn.feature_map_q.weight.normal_()
            layer.self_attn.window_factor.normal_()
    return model


def test_lolcats_f32_roundtrip(tmp_path, smol_tokenizer):
    model = trained_looking()
    x = torch.randint(0, 49152, (1, 40))
    with torch.no_grad():
        expected, _ = forward(model, x)
    summary = export_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"))
    assert summary["architecture"] == "lolcats"
    again, tok = load_gguf(str(tmp_path / "m.gguf"))
    with torch.no_grad():
        got, _ = forward(again, x)
    # LoRA is merged on export: W + s*B@A is rounded once in float32, logits move by ~1e-6 relative
    assert (got - expected).abs().max() < 1e-4
    assert again.lolcats["window_size"] == 8 and again.lolcats["feature_dim"] == 8
    assert tok.encode("hello there 123") == smol_tokenizer.encode("hello there 123")
    assert tok.chat_template == smol_tokenizer.chat_template
    meta = read_gguf(str(tmp_path / "m.gguf")).metadata
    assert meta["lolcats.rope.qk_permuted"] is False and meta["lolcats.attention.feature_map"] == "hedgehog"


def test_softmax_export_is_a_llama_file_transformers_reads(tmp_path, smol_tokenizer):
    """transformers' own GGUF reader (an independent implementation of llama.cpp's layout,
    q/k permutation included) loads our llama export to the same logits."""
    import accelerate  # noqa: F401 - transformers needs it to read GGUF; it is in the dev extra
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    x = torch.randint(0, 49152, (1, 40))
    with torch.no_grad():
        expected, _ = forward(model, x)
    export_gguf(model, smol_tokenizer, str(tmp_path / "teacher.gguf"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="teacher.gguf", dtype=torch.float32)
    ours, _ = load_gguf(str(tmp_path / "teacher.gguf"))
    with torch.no_grad():
        assert (theirs(x).logits - expected).abs().max() < 1e-5
        assert (forward(ours, x)[0] - expected).abs().max() < 1e-5
    # a linearized model written as its softmax teacher: LoRA merged, feature maps dropped
    lin = trained_looking()
    summary = export_gguf(lin, smol_tokenizer, str(tmp_path / "t2.gguf"), as_softmax=True)
    assert summary["architecture"] == "llama"
    assert not any("fmap" in n or "window" in n for n in read_gguf(str(tmp_path / "t2.gguf")).tensors)


@pytest.mark.parametrize("dtype,max_rel_rms", [("f16", 1e-3), ("q8_0", 0.01), ("q4_0", 0.15)])
def test_quantized_weights_error(tmp_path, smol_tokenizer, dtype, max_rel_rms):
    """Q8_0 keeps ~0.5% relative RMS error (8-bit blocks of 32), Q4_0 ~10%; small tensors stay f32."""
    model = trained_looking()
    export_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), dtype=dtype)
    gguf = read_gguf(str(tmp_path / "m.gguf"))
    ref = {names.to_gguf(k): v for k, v in linearize(tiny_model(), window_size=8, feature_dim=8).state_dict().items()}
    for name, tensor in gguf.tensors.items():
        if any(p in name for p in names.LOLCATS_ONLY) or name.endswith("norm.weight"):
            assert tensor.tensor_type.name == "F32", name
        elif name in ("token_embd.weight", "blk.0.ffn_up.weight"):
            expected = "Q8_0" if (dtype, name) == ("q4_0", "token_embd.weight") else dtype.upper()
            assert tensor.tensor_type.name == expected, name
            a, b = gguf.tensor(name), ref[name].numpy()
            rel = np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean())
            assert rel < max_rel_rms, (name, rel)


def test_gguf_dump_reads_our_file(tmp_path, smol_tokenizer):
    export_gguf(trained_looking(), smol_tokenizer, str(tmp_path / "m.gguf"), dtype="q8_0")
    dump = os.path.join(os.path.dirname(sys.executable), "gguf-dump")
    r = subprocess.run([dump, "--json", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["metadata"]["general.architecture"]["value"] == "lolcats"
    assert "blk.1.attn_fmap_k.weight" in info["tensors"]


def _rewrite(src, dst, drop=None, reshape=None, arch=None):
    """Copy a f32 GGUF, dropping or reshaping a tensor or renaming the architecture."""
    import gguf

    f = read_gguf(src)
    arch = arch or f.architecture
    w = gguf.GGUFWriter(dst, arch)
    for k, v in f.metadata.items():
        if k in ("general.architecture",):
            continue
        _add_value(w, k.replace(f.architecture + ".", arch + ".", 1), v if not isinstance(v, tuple) else list(v))
    for name in f.tensors:
        if name == drop:
            continue
        a = f.tensor(name)
        if name == reshape:
            a = a.reshape(-1)[: a.size // 2].copy()
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_files_are_refused(tmp_path, smol_tokenizer):
    good = str(tmp_path / "good.gguf")
    export_gguf(trained_looking(), smol_tokenizer, good)
    data = open(good, "rb").read()
    cases = {}
    open(tmp_path / "truncated.gguf", "wb").write(data[: len(data) // 3])
    cases["truncated.gguf"] = "corrupt"
    open(tmp_path / "garbage.gguf", "wb").write(b"NOPE" + data[4:2000])
    cases["garbage.gguf"] = "not a GGUF"
    _rewrite(good, str(tmp_path / "mamba.gguf"), arch="mamba")
    cases["mamba.gguf"] = "architecture 'mamba' is not supported"
    _rewrite(good, str(tmp_path / "missing.gguf"), drop="blk.1.attn_fmap_q.weight")
    cases["missing.gguf"] = "missing"
    _rewrite(good, str(tmp_path / "shape.gguf"), reshape="blk.0.attn_v.weight")
    cases["shape.gguf"] = "shape"
    for name, message in cases.items():
        with pytest.raises(ModelFileError, match=message):
            load_gguf(str(tmp_path / name))
        r = run_cli("verify", str(tmp_path / name))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (name, r.stderr)


def test_failed_export_keeps_the_old_file(tmp_path, smol_tokenizer, monkeypatch):
    path = str(tmp_path / "m.gguf")
    export_gguf(trained_looking(), smol_tokenizer, path)
    before = open(path, "rb").read()
    with pytest.raises(ExportError, match="unsupported"):
        export_gguf(trained_looking(), smol_tokenizer, path, dtype="q3_k")
    import gguf

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(trained_looking(), smol_tokenizer, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_real_smollm2_gguf_parity(tmp_path):
    """f32 export of a linearized SmolLM2 (window 64: the prompt + 64 tokens go past it) gives the
    PyTorch model's greedy continuation, logits within 1e-3 (float32 over 30 layers, see test_real_model)."""
    ckpt, gguf_path = tmp_path / "ckpt", tmp_path / "smol.gguf"
    assert run_cli("linearize", "--base", "smollm2-135m", "--out", str(ckpt), "--delta").returncode == 0
    r = run_cli("export", str(ckpt), "--format", "gguf", "--dtype", "f32", "--out", str(gguf_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["architecture"] == "lolcats" and summary["peak_rss_mb"] > 0
    r = run_cli("verify", str(gguf_path), "--against", str(ckpt), "--tokens", "64", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["greedy_tokens_equal"] == 64 and report["max_logit_diff"] < 1e-3
    r = run_cli("export", str(ckpt), "--dtype", "q3_k", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "unsupported --dtype" in r.stderr


# llama.cpp's own quantizer (through llama-cpp-python's C API) writes the files people download;
# bits per weight of each type's main format -> the relative RMS error its uniform quantizer
# makes on Gaussian weights: step = (block range ~ 2 x 2.5 sigma) / (2^bits - 1), error step / sqrt(12),
# times 1.25 for blocks with a wider range. Float formats: half an ulp, 2^-(mantissa bits + 1).
LLAMA_CPP_TYPES = {"Q4_K_M": (["Q4_K", "Q6_K"], 4), "Q5_K_M": (["Q5_K", "Q6_K"], 5), "Q6_K": (["Q6_K"], 6),
                   "Q8_0": (["Q8_0"], 8), "F16": (["F16"], None), "BF16": (["BF16"], None)}
FLOAT_ERROR = {"F16": 2.0 ** -11, "BF16": 2.0 ** -8}


def test_llama_cpp_quantizations_load_dequantized(tmp_path, smol_tokenizer):
    """Files quantized by llama.cpp itself (K-quants included) load to the weights they encode."""
    import ctypes

    import llama_cpp

    from conftest import hf_tiny_model, ours_from_hf

    # rows of 256: K-quant super-blocks (llama.cpp falls back to other types for narrower rows)
    ours = ours_from_hf(hf_tiny_model("qwen2", hidden_size=256, intermediate_size=512, head_dim=64,
                                      num_attention_heads=4, num_key_value_heads=2))
    src = str(tmp_path / "f32.gguf")
    export_gguf(ours, smol_tokenizer, src)
    reference = {k: v for k, v in ours.state_dict().items() if v.dim() == 2}
    for ftype, (types, bits) in LLAMA_CPP_TYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
        out = str(tmp_path / f"{ftype}.gguf")
        assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) == 0, ftype
        stored = {t.tensor_type.name for t in read_gguf(out).tensors.values()}
        assert set(types) <= stored, (ftype, stored)  # the test exercises the formats it names
        loaded = load_gguf(out)[0].state_dict()
        bound = FLOAT_ERROR[ftype] if bits is None else 1.25 * 5 / (2 ** bits - 1) / 12 ** 0.5
        for name, want in reference.items():
            rel = float(((loaded[name] - want).pow(2).mean() / want.pow(2).mean()).sqrt())
            assert rel < bound, f"{ftype} {name}: relative RMS error {rel:.4f} > {bound:.4f}"


def test_our_table_of_tensor_types_is_gguf_pys():
    """read_gguf sizes the types we write from names.GGML_TYPES (the runtime loads without gguf-py),
    the rest from gguf-py's table (the llama.cpp-quantized files above): the two must agree."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (type_id, block, size) in names.GGML_TYPES.items():
        assert GGMLQuantizationType[name] == type_id, name
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, size), name


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_our_reader_equals_gguf_py(tmp_path, smol_tokenizer, dtype):
    """read_gguf parses the format itself (gguf-py's reader takes seconds over a vocabulary);
    on the embedded model (llama.cpp's own converter wrote it) and on our export (mixed f32, f16
    and quantized tensors, bools, lists), every value and tensor equals gguf-py's."""
    from gguf import GGUFReader

    from edge_lolcats.formats.loading import embedded_model_path

    ours_path = str(tmp_path / "m.gguf")
    export_gguf(linearize(tiny_model("qwen2"), window_size=8, feature_dim=8), smol_tokenizer, ours_path, dtype=dtype)
    for path in (embedded_model_path("smollm2-135m"), ours_path):
        ours, theirs = read_gguf(path), GGUFReader(path)
        expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert list(ours.metadata) == list(expected)
        for key, value in expected.items():
            assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
        assert list(ours.tensors) == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            mine = ours.tensors[t.name]
            assert mine.tensor_type == t.tensor_type and list(mine.shape) == list(t.shape), t.name
            assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape, t.name
            np.testing.assert_array_equal(mine.data, t.data, err_msg=t.name)
