"""Evaluation: the teacher row is the real teacher, baselines see the keys they should, and the
command writes the documented JSON."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_model
from test_train import fake_documents

from edge_lolcats.training.data import build_corpus
from edge_lolcats.evaluation.evaluate import (evaluate, long_context_targets, markdown_table, passkey_prompt,
                                              targets_table)
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
    r = evaluate(student, smol_tokenizer, corpus.heldout, [], max_tokens=64 * 3, passkey_trials=0, progress=False)
    expected = reference_ppl(teacher, corpus, 3)
    for name in ("teacher", "linearized", "window"):
        assert abs(r["ppl"][name] - expected) < 1e-3 * expected, (name, r["ppl"][name], expected)
    assert r["top1_agreement"]["linearized"] == 1.0 and abs(r["kl"]["linearized"]) < 1e-5
    assert r["tokens"] == 3 * 63


def test_small_window_student_differs_and_baselines_are_ordered(smol_tokenizer):
    corpus = build_corpus(smol_tokenizer, fake_documents(n_docs=10, words=400), seq_len=128, heldout_fraction=0.3)
    student = linearize(tiny_model(), window_size=8, feature_dim=8)
    r = evaluate(student, smol_tokenizer, corpus.heldout, [], max_tokens=128 * 2, passkey_trials=0, progress=False)
    assert r["top1_agreement"]["linearized"] < 1.0 and r["kl"]["linearized"] > 1e-4
    assert r["top1_agreement"]["teacher"] == 1.0 and r["kl"]["teacher"] == 0.0
    assert r["sink_recent_tokens"] == sink_cache_budget(student) > 8  # a bigger cache than the window
    table = markdown_table(r)
    assert table.count("\n") == 2 + 4 - 1 and "| teacher | " in table


@pytest.mark.parametrize("kind", ["window", "sink"])
def test_fixed_memory_baselines_are_the_hybrid_softmax_set(kind):
    """The baselines on the teacher's weights: "window" is softmax over the last W keys, "sink" is
    StreamingLLM (sinks at positions just before the recent keys), both the hybrid attention's
    softmax set without its linear branch, against the brute-force loop; fed in blocks on their
    fixed state they equal one call."""
    from test_hybrid_attention import TOL, assert_close, brute_force

    from edge_lolcats.arch.block import rotations
    from edge_lolcats.arch.ops import TorchOps

    model = linearize(tiny_model(), window_size=3, feature_dim=4)
    attn = model.model.layers[0].self_attn
    attn.form, attn.baseline_sinks, attn.baseline_recent = kind, 2, 5
    q, k, v = torch.randn(1, 4, 30, 16, dtype=torch.float64), torch.randn(2, 30, 16, dtype=torch.float64)[None], \
        torch.randn(1, 2, 30, 16, dtype=torch.float64)
    rotate = rotations(TorchOps(), model.args, torch.arange(30))["full_attention"]
    out, state = attn.fixed_memory_baseline(q, k, v, rotate, None)
    window, sinks = (3, 0) if kind == "window" else (5, 2)
    rope = rotate.inv_freq.double()
    expected = brute_force(q, k, v, None, None, torch.zeros(4), window, scale=attn.scale, rope=rope,
                           sink_tokens=sinks, linear=False)
    assert_close(out, expected, kind, **TOL[torch.float64])
    assert state.nbytes == 2 * (window + sinks) * 2 * 16 * 8  # the rings and sinks, nothing else
    state, outs = None, []
    for lo, hi in ((0, 4), (4, 11), (11, 30)):
        r = rotations(TorchOps(), model.args, torch.arange(lo, hi))["full_attention"]
        o, state = attn.fixed_memory_baseline(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], r, state)
        outs.append(o)
    assert_close(torch.cat(outs, 2), expected, f"{kind} in blocks", **TOL[torch.float64])


def test_reading_in_blocks_equals_one_pass():
    """Every model of the comparison reads a text in blocks on its own state (the teacher on a KV
    cache, the baselines on their rings and sinks): the same per-token results as one pass."""
    from edge_lolcats.evaluation.evaluate import compare_on

    model = linearize(tiny_model(), window_size=8, feature_dim=8)
    models = {"teacher": model, "linearized": model, "window": model, "sink": model}
    ids = torch.randint(0, 49152, (150,))
    whole = compare_on(models, ids, sink_recent=11, block=1000)
    blocks = compare_on(models, ids, sink_recent=11, block=23)
    for name in models:
        np.testing.assert_allclose(blocks[name]["nll"], whole[name]["nll"], rtol=1e-4, atol=1e-4, err_msg=name)
    assert (whole["sink"]["nll"] != whole["window"]["nll"]).any() and (whole["sink"]["nll"] != whole["teacher"]["nll"]).any()


def test_long_texts_joins_documents_only_when_none_is_long_enough():
    from edge_lolcats.evaluation.evaluate import long_texts

    docs = [("a", np.arange(10)), ("b", np.arange(100, 130)), ("c", np.arange(200, 260))]
    texts, joined = long_texts(docs, 40, sep=-1)
    assert not joined and [n for n, _ in texts] == ["c"] and len(texts[0][1]) == 41
    texts, joined = long_texts(docs, 100, sep=-1)
    assert joined and texts[0][0] == "a + b + c" and len(texts[0][1]) == 101 and texts[0][1][10] == -1


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
    r = run_cli("eval", str(out), "--max-tokens", "256", "--long-docs", "1", "--max-length", "4096",
                "--passkey-trials", "1", "--passkey-lengths", "1024", "--json", str(tmp_path / "eval.json"),
                "--plot", str(tmp_path / "ppl.png"), "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["ppl"]) == {"teacher", "linearized", "window", "sink"}
    assert all(np.isfinite(v) and v > 1 for v in result["ppl"].values())
    assert set(result["ppl_by_position"]["linearized"]) == {"0-512", "512-2048", "2048-8192"}
    assert result["long_text_tokens"] == [4097]
    assert len(result["ppl_curve"]["sink"]) > 10 and result["ppl_curve"]["sink"][-1][0] > 3000
    assert set(result["passkey"]["sink"]) == {"1024"}
    assert "| linearized |" in r.stdout
    assert result["targets"] == long_context_targets(result) and "| top-1 agreement >= 85% |" in r.stdout
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tmp_path / "one.txt"
    text.write_text(fake_documents(n_docs=1, words=3000, seed=9)[0].text, encoding="utf-8")
    r = run_cli("eval", str(out), "--data", str(text), "--max-tokens", "128", "--long-docs", "1", "--max-length",
                "1000", "--passkey-trials", "0", "--json", str(tmp_path / "text.json"), "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "text.json").read_text())
    assert result["long_texts"] == ["one.txt"] and result["long_text_tokens"] == [1001] and result["data"] == str(text)
    r = run_cli("eval", base)
    assert r.returncode == 2 and "not a linearized checkpoint" in r.stderr


def test_long_context_targets_compare_the_right_numbers():
    result = {"ppl": {"teacher": 20.0, "linearized": 21.0},
              "top1_agreement": {"teacher": 1.0, "linearized": 0.84},
              "ppl_by_position": {"teacher": {"0-512": 18.0, "512-2048": 20.0, "2048-8192": 22.0},
                                  "sink": {"0-512": 18.0, "2048-8192": 26.0},
                                  "linearized": {"0-512": 19.9, "2048-8192": 27.0, "8192-16384": 28.0,
                                                 "16384-32768": 28.5}}}
    rows = {r["target"]: r for r in long_context_targets(result)}
    assert rows["ppl 2K-8K <= 1.25 x teacher"]["limit"] == pytest.approx(27.5)
    assert rows["ppl 2K-8K <= 1.25 x teacher"]["met"]
    assert not rows["ppl 2K-8K <= StreamingLLM at equal bytes"]["met"]  # 27 > 26
    assert rows["ppl 8K-16K <= 1.05 x own 2K-8K"]["met"]  # 28 <= 28.35
    assert not rows["ppl 16K-32K <= 1.05 x own 2K-8K"]["met"]  # 28.5 > 28.35
    assert not rows["ppl 0-512 <= 1.10 x teacher"]["met"]  # 19.9 > 19.8
    assert rows["held-out ppl <= 1.10 x teacher"]["met"]
    assert not rows["top-1 agreement >= 85%"]["met"] and rows["top-1 agreement >= 85%"]["value"] == 0.84
    table = targets_table(long_context_targets(result))
    assert "| top-1 agreement >= 85% | 84.0% | 85.0% | no (by 1.0 points) |" in table
    assert "| ppl 2K-8K <= StreamingLLM at equal bytes | 27.00 | 26.00 | no (by 3.8%) |" in table
    assert table.count("\n") == 1 + len(rows)
    # buckets the texts did not reach are not targets met by default
    del result["ppl_by_position"]["linearized"]["16384-32768"]
    assert "ppl 16K-32K <= 1.05 x own 2K-8K" not in {r["target"] for r in long_context_targets(result)}
