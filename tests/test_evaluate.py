"""Evaluation: the teacher row is the real teacher, baselines see the keys they should, and the
command writes the documented JSON."""
import copy
import json
import math

import numpy as np
import torch
from conftest import run_cli, tiny_model
from test_train import fake_documents

from edge_lolcats.training.data import build_corpus
from edge_lolcats.evaluation.evaluate import evaluate, markdown_table, passkey_prompt
from edge_lolcats.nn.model import HybridAttention, base_attention, forward, linearize, sink_cache_budget


def reference_ppl(model, corpus, n_seq):
    nll = []
    with torch.no_grad():
        for seq in torch.from_numpy(corpus.heldout[:n_seq]):
            logp = forward(model, seq[None])[0][0, :-1].log_softmax(-1)
            nll.append(-logp.gather(-1, seq[1:, None])[:, 0])
    return math.exp(torch.cat(nll).mean().item())


def test_teacher_row_and_large_window_agree_with_the_softmax_model(smol_tokenizer):
    corpus = build_corpus(smol_tokenizer, fake_documents(n_docs=10, words=400), seq_len=64, heldout_fraction=0.3)
    teacher = tiny_model()
    student = linearize(copy.deepcopy(teacher), window_size=64, feature_dim=8)  # window covers each sequence
    with torch.no_grad():
        for layer in student.model.layers:
            layer.self_attn.feature_map_k.weight.normal_()
    r = evaluate(student, smol_tokenizer, corpus, max_tokens=64 * 3, long_docs=0, passkey_trials=0, progress=False)
    expected = reference_ppl(teacher, corpus, 3)
    for name in ("teacher", "linearized", "window"):
        assert abs(r["ppl"][name] - expected) < 1e-3 * expected, (name, r["ppl"][name], expected)
    assert r["top1_agreement"]["linearized"] == 1.0 and abs(r["kl"]["linearized"]) < 1e-5
    assert r["tokens"] == 3 * 63


def test_small_window_student_differs_and_baselines_are_ordered(smol_tokenizer):
    corpus = build_corpus(smol_tokenizer, fake_documents(n_docs=10, words=400), seq_len=128, heldout_fraction=0.3)
    student = linearize(tiny_model(), window_size=8, feature_dim=8)
    r = evaluate(student, smol_tokenizer, corpus, max_tokens=128 * 2, long_docs=0, passkey_trials=0, progress=False)
    assert r["top1_agreement"]["linearized"] < 1.0 and r["kl"]["linearized"] > 1e-4
    assert r["top1_agreement"]["teacher"] == 1.0 and r["kl"]["teacher"] == 0.0
    assert r["sink_recent_tokens"] == sink_cache_budget(student) > 8  # a bigger cache than the window
    table = markdown_table(r)
    assert table.count("\n") == 2 + 4 - 1 and "| teacher | " in table


def test_baseline_masks():
    attn = linearize(tiny_model(), window_size=3, feature_dim=4).model.layers[0].self_attn
    assert isinstance(attn, HybridAttention)
    model = attn
    model.form = "window"
    m = model.baseline_mask(6, "cpu")
    assert m[5].tolist() == [False, False, False, True, True, True]
    model.form, model.sink_tokens, model.recent_tokens = "sink", 1, 2
    m = model.baseline_mask(6, "cpu")
    assert m[5].tolist() == [True, False, False, False, True, True] and m[1].tolist() == [True, True] + [False] * 4


def test_base_attention_restores_the_model():
    model = linearize(tiny_model(), window_size=4, feature_dim=4)
    x = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        before, _ = forward(model, x)
        with base_attention(model, "sink", recent_tokens=3):
            during, _ = forward(model, x, with_state=False)
        after, _ = forward(model, x)
    assert torch.equal(before, after) and not torch.equal(before, during)


def test_passkey_prompt(smol_tokenizer):
    for length in (1024, 4096):
        prompt, answer = passkey_prompt(smol_tokenizer, length, 0.5, "71432")
        assert length - 25 <= len(prompt) <= length  # filled up to within one filler sentence (~20 tokens)
        assert smol_tokenizer.decode(answer) == " 71432"
        assert "71432" in smol_tokenizer.decode(prompt)


def test_eval_command_json(tmp_path, tiny_model_dir):
    base, _ = tiny_model_dir()
    data = tmp_path / "data"
    data.mkdir()
    for d in fake_documents(n_docs=8, words=700) + fake_documents(n_docs=2, words=9000, seed=5):
        (data / f"{d.name}-{len(d.text)}.txt").write_text(d.text, encoding="utf-8")
    out = tmp_path / "ckpt"
    r = run_cli("linearize", "--base", base, "--out", str(out), "--window-size", "16", "--feature-dim", "8",
                "--stage1-tokens", "256", "--seq-len", "64", "--data", str(data), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(out), "--max-tokens", "256", "--long-docs", "1", "--passkey-trials", "1",
                "--passkey-lengths", "1024", "--json", str(tmp_path / "eval.json"), "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["ppl"]) == {"teacher", "linearized", "window", "sink"}
    assert all(np.isfinite(v) and v > 1 for v in result["ppl"].values())
    assert set(result["ppl_by_position"]["linearized"]) == {"0-512", "512-2048", "2048-8192"}
    assert set(result["passkey"]["sink"]) == {"1024"}
    assert "| linearized |" in r.stdout
    r = run_cli("eval", base)
    assert r.returncode == 2 and "not a linearized checkpoint" in r.stderr
