"""Reading user data, the deterministic split by document, and packing."""
import json

import numpy as np
import pytest

from edge_lolcats.training.data import DataError, Document, build_corpus, clean_markdown, read_documents


def docs(n, words, seed=0):
    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta river stone light window garden letter".split()
    return [Document(f"d{i}", " ".join(rng.choice(vocab, size=words[i] if isinstance(words, list) else words)))
            for i in range(n)]


def test_split_is_by_document_deterministic_and_keeps_long_documents_out_of_training(smol_tokenizer):
    documents = docs(20, [3000 if i % 7 == 0 else 300 for i in range(20)])
    a = build_corpus(smol_tokenizer, documents, seq_len=64, long_tokens=2000, n_long_heldout=2, heldout_fraction=0.2)
    b = build_corpus(smol_tokenizer, list(reversed(documents)), seq_len=64, long_tokens=2000, n_long_heldout=2,
                     heldout_fraction=0.2)
    assert a.fingerprint() == b.fingerprint()  # input order does not matter
    assert not set(a.train_names) & set(a.heldout_names)
    assert set(a.train_names) | set(a.heldout_names) == {d.name for d in documents}
    assert len(a.long_docs) >= 2 and all(len(ids) >= 2000 for _, ids in a.long_docs)
    assert {n for n, _ in a.long_docs} <= set(a.heldout_names)
    assert a.train.shape[1] == 64 and a.train.dtype == np.int64
    c = build_corpus(smol_tokenizer, documents, seq_len=64, long_tokens=2000, heldout_fraction=0.2, seed=1)
    assert c.heldout_names != a.heldout_names


def test_packing_keeps_every_token_in_order_with_eos_between_documents(smol_tokenizer):
    documents = docs(3, 200)
    corpus = build_corpus(smol_tokenizer, documents, seq_len=16, heldout_fraction=0.0001)
    by_name = {d.name: smol_tokenizer.encode(d.text) for d in documents}
    expected = sum((by_name[n] + [2] for n in corpus.train_names), [])
    flat = corpus.train.reshape(-1).tolist()
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 16


def test_read_txt_folder_and_jsonl(tmp_path, smol_tokenizer):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document", encoding="utf-8")
    got = read_documents(str(tmp_path))
    assert [(d.name, d.text) for d in got] == [("a.txt", "first document"), ("sub/b.md", "second document")]
    records = tmp_path / "data.jsonl"
    records.write_text(json.dumps({"text": "plain"}) + "\n\n" +
                       json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n", encoding="utf-8")
    plain, chat = read_documents(str(records), smol_tokenizer)
    assert plain.text == "plain"
    assert "<|im_start|>user\nAdd\n\n2 and 3<|im_end|>" in chat.text and "<|im_start|>assistant\n5<|im_end|>" in chat.text


def test_bad_data_gives_clear_errors(tmp_path, smol_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_documents(str(bad))
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="not JSON"):
        read_documents(str(bad))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_documents(str(latin))
    with pytest.raises(DataError, match="no such file"):
        read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="at least 2 documents"):
        build_corpus(smol_tokenizer, [Document("one", "short text")], seq_len=4)


def test_markdown_cleaning():
    text = "A [link](x.md) and _emphasis_ and **bold**.\n> quoted\n> line\n\n# Heading"
    assert clean_markdown(text) == "A link and emphasis and bold. quoted line\n\nHeading"
