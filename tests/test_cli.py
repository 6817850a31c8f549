"""The command line: output fields, and bad input as one line with a non-zero exit, no traceback."""
import json

import pytest
from conftest import run_cli
from test_families import TINY_STATE_BYTES


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-lolcats: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, smol_tokenizer):
    """A linearized checkpoint of a tiny random llama, written by the CLI."""
    from conftest import hf_tiny_model

    folder = tmp_path_factory.mktemp("cli")
    base = folder / "tiny-base"
    hf_tiny_model().save_pretrained(base, safe_serialization=True)
    smol_tokenizer.save(str(base))
    out = folder / "tiny-lolcats"
    r = run_cli("linearize", "--base", str(base), "--out", str(out), "--window-size", "8", "--feature-dim", "8")
    assert r.returncode == 0, r.stderr
    return str(base), str(out)


def test_generate_json_fields(tiny_ckpt):
    base, ckpt = tiny_ckpt
    r = run_cli("generate", ckpt, "--prompt", "Hello there", "--max-new-tokens", "20", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 20 and isinstance(out["text"], str)
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0 and out["peak_rss_mb"] > 0
    # 2 layers x 4 heads x (2F*D + 2F + 2*W*D) floats, F=8, W=8, D=16
    assert out["state_bytes"] == TINY_STATE_BYTES
    r = run_cli("generate", base, "--prompt", "Hello there", "--max-new-tokens", "5", "--json",
                "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state_bytes"] is None


def test_generate_streams_text_and_reports_speed(tiny_ckpt, tmp_path):
    _, ckpt = tiny_ckpt
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    r = run_cli("generate", ckpt, "--prompt-file", str(prompt), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "state" in r.stderr and "peak RSS" in r.stderr


def test_info(tiny_ckpt):
    base, ckpt = tiny_ckpt
    r = run_cli("info", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["linearized"] and info["lolcats"]["window_size"] == 8 and info["kind"] == "lolcats-checkpoint"
    assert info["family"] == "llama" and info["layer_plan"] == ["hybrid", "hybrid"]
    assert len(set(info["state_bytes_at"].values())) == 1  # fixed at every context length
    r = run_cli("info", base, "--json")
    info = json.loads(r.stdout)
    assert not info["linearized"] and info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert info["layer_plan"] == ["softmax", "softmax"]
    assert info["state_bytes_at"]["8192"] == 8192 * info["kv_cache_bytes_per_token"]
    r = run_cli("info", base)  # the human-readable table names the plan in runs
    assert r.returncode == 0 and "softmax x2" in r.stdout


def test_info_shows_the_base_windows_of_gemma(tiny_model_dir):
    folder, _ = tiny_model_dir("gemma3_text")
    r = run_cli("info", folder, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "gemma3"
    assert info["layer_plan"] == ["softmax-window(16)", "softmax", "softmax-window(16)"]
    per_layer = info["kv_cache_bytes_per_token"] // 3
    assert info["state_bytes_at"]["8192"] == per_layer * (16 + 8192 + 16)


def test_bad_input(tiny_ckpt, tmp_path):
    base, ckpt = tiny_ckpt
    assert_one_line_error(run_cli("info", "no-such-model"), "unknown model", "smollm2-135m")
    assert_one_line_error(run_cli("generate", ckpt, "--prompt", "   "), "empty prompt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert_one_line_error(run_cli("generate", ckpt, "--prompt-file", str(bad)), "not UTF-8")
    assert_one_line_error(run_cli("generate", ckpt, "--prompt-file", str(tmp_path / "missing.txt")),
                          "cannot read prompt file")
    assert_one_line_error(run_cli("generate", ckpt, "--prompt", "hi", "--temperature", "0"), "temperature")
    assert_one_line_error(run_cli("generate", ckpt, "--prompt", "hi", "--temperature", "1", "--top-p", "2"), "top_p")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    assert_one_line_error(run_cli("info", str(corrupt)), "corrupt")
    assert_one_line_error(run_cli("linearize", "--base", ckpt, "--out", str(tmp_path / "x")), "already linearized")
    r = run_cli("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr  # argparse's own one-line usage error
