"""Our tokenizer, built from the GGUF metadata, against ids from the reference tokenizer."""
import numpy as np
import pytest

from edge_lolcats.tokenizer import Tokenizer, TokenizerError

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
    with pytest.raises(TokenizerError, match="supported: 'gpt2'"):
        Tokenizer.from_gguf_metadata({**smollm2_gguf.metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata({**smollm2_gguf.metadata, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder("/nonexistent")


def test_long_texts_encode_in_pieces_to_the_same_ids(smol_tokenizer, tmp_path):
    """encode_long cuts the text before single spaces: with pieces of ~300 characters over real
    prose plus awkward spacing (runs of spaces, newlines, digits, tabs, a special token), hundreds
    of cuts, the ids equal the whole-text encoding."""
    from edge_lolcats.data import default_corpus_documents

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
