"""Checks on the real SmolLM2-135M-Instruct (the embedded GGUF).

Tolerance: logits reach |37|; float32 rounding (~1e-7 relative per op) compounded over 30 layers
puts legitimate differences near 1e-4 (measured: 7e-5 between our hybrid with a large window and
transformers' SDPA). We allow 1e-3 absolute; a wrong mask or a lost window factor moves logits by > 1.
"""
import copy
import json
import os

import pytest
import torch
from conftest import run_cli

from edge_lolcats.nn.generate import generate
from edge_lolcats.nn.model import forward, linearize, state_bytes

LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def chat_prompt(smollm2):
    tok = smollm2.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))


def test_gguf_loader_matches_transformers(smollm2):
    """Our gguf-py loader (q/k rows un-permuted) gives the same weights as transformers' GGUF loader."""
    import accelerate  # noqa: F401 - transformers needs it to read GGUF; it is in the dev extra
    from transformers import AutoModelForCausalLM

    path = smollm2.path
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
    from edge_lolcats.arch import weights_from_hf

    ours = smollm2.model.state_dict()
    for name, tensor in weights_from_hf(smollm2.model.args, "llama", ref.state_dict()).items():
        assert torch.equal(ours[name], tensor), name
    # and our one definition of the block computes what transformers' Llama does
    x = torch.randint(3, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (forward(smollm2.model, x)[0] - ref(x).logits).abs().max().item()
    assert diff < LOGIT_ATOL, f"max logit difference {diff}"


def test_teacher_answers_sensibly(smollm2, chat_prompt):
    result = generate(smollm2.model, chat_prompt, max_new_tokens=12, stop_token_ids=smollm2.tokenizer.eos_token_ids)
    assert "Paris" in smollm2.tokenizer.decode(result.token_ids)


def test_large_window_linearized_smollm2_equals_teacher(smollm2, chat_prompt):
    teacher = smollm2.model
    student = linearize(copy.deepcopy(teacher), window_size=128)  # prompt (37) + 64 new tokens fit
    x = torch.tensor([chat_prompt])
    with torch.no_grad():
        expected, _ = forward(teacher, x)
        got, _ = forward(student, x)
    diff = (got - expected).abs().max().item()
    assert diff < LOGIT_ATOL, f"max logit difference {diff}"
    t = generate(teacher, chat_prompt, max_new_tokens=64)
    s = generate(student, chat_prompt, max_new_tokens=64)
    assert s.token_ids == t.token_ids
    assert s.state.nbytes == state_bytes(student)


def test_cli_generate_greedy_same_tokens_for_teacher_and_linearized(tmp_path):
    ckpt = tmp_path / "smollm2-w128"
    r = run_cli("linearize", "--base", "smollm2-135m", "--out", str(ckpt), "--window-size", "128", "--delta")
    assert r.returncode == 0, r.stderr
    assert "decode state" in r.stdout
    args = ["--prompt", "Name three colors.", "--chat", "--greedy", "--max-new-tokens", "40", "--json"]
    teacher = run_cli("generate", "smollm2-135m", *args)
    student = run_cli("generate", str(ckpt), *args)
    assert teacher.returncode == 0 and student.returncode == 0, teacher.stderr + student.stderr
    t, s = json.loads(teacher.stdout), json.loads(student.stdout)
    assert t["token_ids"] == s["token_ids"] and t["text"] == s["text"]
    for key in ("text", "token_ids", "prefill_tokens_per_s", "decode_tokens_per_s", "state_bytes", "peak_rss_mb"):
        assert key in t and key in s
    assert t["state_bytes"] is None and s["state_bytes"] > 0 and s["peak_rss_mb"] > 100
