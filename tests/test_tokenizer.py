"""Our tokenizer, built from the GGUF metadata, against ids from the reference tokenizer."""
import numpy as np
import pytest

from edge_lolcats.formats.tokenizer import Tokenizer, TokenizerError

# ids from transformers' GGUF tokenizer for SmolLM2 (which agrees with ours on these strings)
KNOWN = {
    "Hello world": [19556, 905],
    "In 2024, 12345 people": [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 701],
}


def test_known_ids(smol_tokenizer):
    for text, expected in KNOWN.items():
        assert smol_tokenizer.encode(text) == expected


def test_roundtrip_and_special_tokens(smol_tokenizer):
    for text in ["naïve café – “quotes” 日本語 🐱", "  leading and trailing  \n\n", "tabs\tand\r\nnewlines"]:
        assert smol_tokenizer.decode(smol_tokenizer.encode(text)) == text
    ids = smol_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # control tokens stay whole
    assert smol_tokenizer.decode(ids) == "user\nhi"
    assert smol_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template(smol_tokenizer):
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol_tokenizer.eos_token_ids == [2]


def test_save_and_load_folder(smol_tokenizer, tmp_path):
    smol_tokenizer.save(str(tmp_path))
    again = Tokenizer.from_folder(str(tmp_path))
    text = "In 2024, the cat sat. <|im_end|>"
    assert again.encode(text) == smol_tokenizer.encode(text)
    assert again.chat_template == smol_tokenizer.chat_template
    assert again.eos_token_ids == [2] and again.bos_token_id == 1


def test_unsupported_tokenizers_are_refused(smollm2_gguf):
    with pytest.raises(TokenizerError, match="supported: 'gpt2' .*'llama'"):
        Tokenizer.from_gguf_metadata({**smollm2_gguf.metadata, "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata({**smollm2_gguf.metadata, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder("/nonexistent")


def test_long_texts_encode_in_pieces_to_the_same_ids(smol_tokenizer, tmp_path):
    """encode_long cuts the text before single spaces: with pieces of ~300 characters over real
    prose plus awkward spacing (runs of spaces, newlines, digits, tabs, a special token), hundreds
    of cuts, the ids equal the whole-text encoding."""
    from edge_lolcats.training.data import default_corpus_documents

    prose = next(iter(default_corpus_documents())).text[:60_000]
    odd = "a  b   c\n\n d 12 345 6789\t x <|im_start|> y ( z ) 'll 's   \n"
    text = (odd * 20) + prose + (odd * 20)
    whole = smol_tokenizer.encode(text)
    pieces = smol_tokenizer.encode_long(text, piece_chars=300)
    assert pieces.dtype == np.int32 and pieces.tolist() == whole
    assert smol_tokenizer.encode_long(text, add_special_tokens=False, piece_chars=300).tolist() == \
        smol_tokenizer.encode(text, add_special_tokens=False)
    smol_tokenizer.save(str(tmp_path))  # the ONNX export's tokenizer.json path
    assert Tokenizer.from_folder(str(tmp_path)).encode_long(text, piece_chars=300).tolist() == whole
    assert smol_tokenizer.encode_long("").size == 0
    assert smol_tokenizer.encode_long("x" * 1000, piece_chars=10).tolist() == smol_tokenizer.encode("x" * 1000)


# --- SentencePiece vocabularies (llama.cpp's "llama" tokenizer model: Llama 2, Mistral v0.x, Gemma, Phi-3) --


@pytest.fixture(scope="module")
def spm_vocab(tmp_path_factory):
    """A SentencePiece BPE vocabulary trained here on real text (byte fallback, whitespace-only
    pieces, a user-defined and a control symbol), as llama.cpp's converter writes it to GGUF:
    pieces, scores and token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)."""
    import sentencepiece as spm

    from edge_lolcats.training.data import default_corpus_documents

    folder = tmp_path_factory.mktemp("spm")
    docs = default_corpus_documents()
    (folder / "train.txt").write_text("\n".join(d.text[:20_000] for d in docs[:12]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "m"), vocab_size=1500, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        user_defined_symbols=["<think>"], control_symbols=["<start_of_turn>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(folder / "m.model", "rb").read())
    kinds = {pb.ModelProto.SentencePiece.NORMAL: 1, pb.ModelProto.SentencePiece.UNKNOWN: 2,
             pb.ModelProto.SentencePiece.CONTROL: 3, pb.ModelProto.SentencePiece.USER_DEFINED: 4,
             pb.ModelProto.SentencePiece.UNUSED: 5, pb.ModelProto.SentencePiece.BYTE: 6}
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [p.score for p in proto.pieces],
            "tokenizer.ggml.token_type": [kinds[p.type] for p in proto.pieces],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True}, docs


SPM_AWKWARD = ["Hello world", "  two leading spaces", "trailing spaces   ", "a   run  of\tspaces",
               "lines\n\nand\r\nmore\n", "digits 1234567 and 3.14", "naïve café – “quotes” 日本語 🐱 ẞ",
               "<start_of_turn>user\nhi there<start_of_turn>", "<think>maybe</think> so", " x", "x ", ""]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_sentencepiece_gguf_vocabulary_matches_transformers(arch, spm_vocab, tmp_path):
    """Ids equal transformers' tokenizer for the same GGUF file (it builds each family's own space
    handling: Llama's prefix space, Gemma's none, Phi-3's normalizer), on real prose and awkward
    text; decoding gives the text back."""
    from conftest import ours_from_hf, hf_tiny_model
    from transformers import AutoTokenizer

    from edge_lolcats.converters.gguf_export import export_gguf

    meta, docs = spm_vocab
    vocab = len(meta["tokenizer.ggml.tokens"])
    family = {"llama": "llama", "gemma2": "gemma2", "phi3": "phi3"}[arch]
    model = ours_from_hf(hf_tiny_model(family, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    ours = Tokenizer.from_gguf_metadata({**meta, "general.architecture": arch})
    export_gguf(model, ours, str(tmp_path / "m.gguf"))  # the vocabulary written back as it was read
    from edge_lolcats.formats.gguf_io import read_gguf

    ours = Tokenizer.from_gguf_metadata(read_gguf(str(tmp_path / "m.gguf")).metadata)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    prose = docs[-1].text[5_000:9_000]
    for text in SPM_AWKWARD + [prose]:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, (arch, text[:60])
        assert ours.decode(ours.encode(text)) == theirs.decode(expected, skip_special_tokens=True), (arch, text[:60])
    assert ours.decode(ours.encode(prose)) == prose  # byte fallback: nothing is lost
    assert ours.encode_long(prose + " " + prose, piece_chars=500).tolist() == ours.encode(prose + " " + prose)
    assert ours.cuts_at_spaces == (arch != "phi3")  # Phi-3's normalizer adds a space to every call
    # a linearized export (architecture "lolcats") keeps the family's handling of spaces
    from edge_lolcats.nn.model import linearize

    export_gguf(linearize(model, window_size=4, feature_dim=4), ours, str(tmp_path / "lin.gguf"))
    again = Tokenizer.from_gguf_metadata(read_gguf(str(tmp_path / "lin.gguf")).metadata)
    for text in SPM_AWKWARD:
        assert again.encode(text) == ours.encode(text), (arch, text)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sentencepiece_vocabulary_from_tokenizer_json_writes_to_gguf(arch, spm_vocab, tmp_path):
    """A SentencePiece BPE tokenizer known only by its tokenizer.json (an HF folder of Llama 2 or
    Gemma) writes the GGUF vocabulary llama.cpp reads (pieces, scores from the merge order, byte
    and control types, and the merges), and reads back to the same ids."""
    meta, docs = spm_vocab
    ours = Tokenizer.from_gguf_metadata({**meta, "general.architecture": arch})
    ours.save(str(tmp_path))
    folder = Tokenizer.from_folder(str(tmp_path))
    assert folder.gguf_vocab is None  # nothing kept from a GGUF: the metadata is rebuilt
    written = folder.gguf_metadata()
    assert written["tokenizer.ggml.model"] == "llama"
    types = dict(zip(written["tokenizer.ggml.tokens"], written["tokenizer.ggml.token_type"]))
    assert types["<0x0A>"] == 6 and types["<start_of_turn>"] == 3 and types["<think>"] == 4
    again = Tokenizer.from_gguf_metadata({**written, "general.architecture": arch})
    for text in SPM_AWKWARD + [docs[-1].text[5_000:9_000]]:
        assert again.encode(text) == ours.encode(text), (arch, text[:60])
