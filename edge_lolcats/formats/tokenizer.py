"""A small tokenizer: a `tokenizers` backend plus BOS/EOS handling and the chat template.

Built from GGUF metadata (byte-level BPE and SentencePiece BPE vocabularies) or from an HF folder's
tokenizer.json. No torch, no transformers: the runtime uses it as it is.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from edge_lolcats.converters import gguf_names as names

# Pre-tokenizer regexes for the `tokenizer.ggml.pre` values of byte-level vocabularies, as llama.cpp
# uses them (llama-vocab.cpp). A vocabulary split differently from how it was trained gives other ids.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split: str, digits_first: bool = False):
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits_first else []
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps)


PRE_TOKENIZERS = {
    "default": lambda: _byte_level(_GPT2_SPLIT),
    "gpt2": lambda: _byte_level(_GPT2_SPLIT),
    "smollm": lambda: _byte_level(_GPT2_SPLIT, digits_first=True),  # SmolLM splits every digit
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
}

_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6  # llama.cpp token types


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_ids: list[int],
                 chat_template: str | None = None, add_bos_token: bool = False, pre: str | None = None,
                 pad_token_id: int | None = None):
        self.backend = backend
        self.pre = pre  # llama.cpp's name for the pre-tokenizer, when known (needed to write GGUF)
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_long(self, text: str, add_special_tokens: bool = True, piece_chars: int = 1 << 12) -> np.ndarray:
        """:meth:`encode` for a text of any length in bounded memory, as an int32 array.

        A whole-text encoding holds offsets and token strings for every token (tens of MB at 128K
        tokens, which showed as RSS growing with the context); here the text is encoded in pieces
        of about ``piece_chars``, cut before a single space between two non-space characters.
        Every pre-tokenizer above starts a new pre-token there (no pattern continues a match from
        a non-space character into a space), so the ids are those of :meth:`encode` (tested).
        A SentencePiece vocabulary is cut there only when no token joins a character to the space
        after it (SentencePiece runs over the whole text) and no normalizer adds a space to each
        call (Phi-3's); otherwise the text is encoded whole. Pieces of 4K characters: after 786K
        characters (128K tokens) in pieces of 32K the process kept 5.9 MB more resident, in 4K
        pieces 0.9 MB (SmolLM2's tokenizer, by hand, 2026-12-02)."""
        if not self.cuts_at_spaces:
            return np.asarray(self.encode(text, add_special_tokens), np.int32)
        parts, start = [], 0
        while start < len(text):
            end = _piece_end(text, start + piece_chars)
            parts.append(np.asarray(self.encode(text[start:end], add_special_tokens and start == 0), np.int32))
            start = end
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the model's chat template (Jinja, sandboxed, as transformers renders it)."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        tok = lambda i: self.token(i) if i is not None else None  # noqa: E731
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok(self.bos_token_id) or "", eos_token=tok(self.eos_token_ids[0]) if self.eos_token_ids else "")

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "Tokenizer":
        kind = metadata.get(names.KEY_TOKENIZER_MODEL)
        if kind == "llama":
            return cls._from_gguf_sentencepiece(metadata)
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level "
                                 f"BPE), 'llama' (SentencePiece BPE)")
        pre = metadata.get(names.KEY_TOKENIZER_PRE, "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        tokens = list(metadata[names.KEY_TOKENS])
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in metadata.get(names.KEY_MERGES, [])]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        return cls._from_gguf_backend(backend, tokens, metadata, add_bos_default=False, pre=pre)

    @classmethod
    def _from_gguf_backend(cls, backend: Backend, tokens: list, metadata: dict, add_bos_default: bool,
                           pre: str | None = None) -> "Tokenizer":
        """What both kinds of GGUF vocabulary share: control tokens kept whole as special tokens,
        user-defined ones as plain added tokens, the special ids and the chat template."""
        types = metadata.get(names.KEY_TOKEN_TYPE) or [1] * len(tokens)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
        eos = metadata.get(names.KEY_EOS_ID)
        return cls(backend, bos_token_id=metadata.get(names.KEY_BOS_ID),
                   eos_token_ids=[eos] if eos is not None else [],
                   chat_template=metadata.get(names.KEY_CHAT_TEMPLATE),
                   add_bos_token=bool(metadata.get(names.KEY_ADD_BOS, add_bos_default)), pre=pre,
                   pad_token_id=metadata.get(names.KEY_PAD_ID))

    @classmethod
    def _from_gguf_sentencepiece(cls, metadata: dict) -> "Tokenizer":
        """A SentencePiece BPE vocabulary (llama.cpp's "llama": Llama 1/2, Mistral v0.x, Gemma, Phi-3),
        built as transformers builds it from the same file, so that the ids are the same: BPE with
        byte fallback, merges from the file or recovered from the scores (for Gemma from the order
        of the vocabulary), and the family's handling of spaces."""
        tokens = list(metadata[names.KEY_TOKENS])
        arch = metadata.get(names.KEY_ARCHITECTURE, "llama")
        if arch == names.LOLCATS_ARCH:  # our exports: the spacing of the family they came from
            described = metadata.get(names.KEY_MODEL_ARGS.format(arch=arch))
            arch = json.loads(described)["family"] if described else "llama"
        style = "gemma" if arch.startswith("gemma") else ("phi3" if arch == "phi3" else "llama")
        if style == "gemma":  # Gemma stores its runs of spaces as spaces; its merges use "▁"
            tokens = [SPM_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        if metadata.get(names.KEY_MERGES):
            merges = [tuple(m.split(" ", 1)) for m in metadata[names.KEY_MERGES]]
        else:
            priority = ({t: -i for i, t in enumerate(tokens)} if style == "gemma"
                        else dict(zip(tokens, metadata.get(names.KEY_SCORES) or [0.0] * len(tokens))))
            merges = merges_from_scores(vocab, priority)
        unk = metadata.get(names.KEY_UNK_ID)
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                     unk_token=tokens[unk] if style == "gemma" and unk is not None else None))
        spm_decoders = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if style == "llama":  # a "▁" before the first word, stripped again when decoding
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="first",
                                                             split=False)
            spm_decoders.append(decoders.Strip(content=" ", left=1))
        elif style == "phi3":  # the prefix from a normalizer: "  hi" -> "▁▁▁hi"
            backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE),
                                                       normalizers.Replace(" ", SPM_SPACE)])
            spm_decoders.append(decoders.Strip(content=" ", left=1))
        else:  # Gemma: no prefix space
            backend.normalizer = normalizers.Replace(" ", SPM_SPACE)
            backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(spm_decoders)
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to
        tokenizer = cls._from_gguf_backend(backend, tokens, metadata, add_bos_default=True)
        tokenizer.cuts_at_spaces = style != "phi3" and not any(
            re.search(f"[^{SPM_SPACE}]{SPM_SPACE}", t) for t in tokens)
        tokenizer.gguf_vocab = {k: v for k, v in metadata.items() if k.startswith(names.TOKENIZER_PREFIX)}
        return tokenizer

    gguf_vocab: dict | None = None  # a SentencePiece vocabulary's GGUF keys, to write back as read
    cuts_at_spaces = True  # whether encode_long may encode in pieces (see there)

    def gguf_metadata(self) -> dict:
        """The ``tokenizer.*`` GGUF keys that :meth:`from_gguf_metadata` reads back."""
        if self.gguf_vocab is not None:
            meta = dict(self.gguf_vocab)
            if self.chat_template:
                meta[names.KEY_CHAT_TEMPLATE] = self.chat_template
            return meta
        model = json.loads(self.backend.to_str())["model"]
        sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
        if model.get("type") != "BPE" or not (sentencepiece or isinstance(self.backend.decoder, decoders.ByteLevel)):
            raise TokenizerError("only byte-level BPE and SentencePiece BPE (byte fallback) tokenizers can be "
                                 "written to GGUF")
        size = self.vocab_size
        tokens = [self.backend.id_to_token(i) for i in range(size)]
        if any(t is None for t in tokens):
            raise TokenizerError("the vocabulary has holes; cannot write it to GGUF")
        added = {t.content: t for t in self.backend.get_added_tokens_decoder().values()}
        types = [(_CONTROL if added[t].special else _USER_DEFINED) if t in added else 1 for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if sentencepiece:  # llama.cpp's "llama" vocabulary (Llama 2, Gemma, Phi-3 from a tokenizer.json)
            meta = {names.KEY_TOKENIZER_MODEL: "llama", names.KEY_TOKENIZER_PRE: "default",
                    names.KEY_SCORES: sentencepiece_scores(tokens, merges),
                    names.KEY_TOKEN_TYPE: [_BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) and ty == 1 else ty
                                           for t, ty in zip(tokens, types)]}
            if model.get("unk_token") in tokens:
                meta[names.KEY_UNK_ID] = tokens.index(model["unk_token"])
        else:
            meta = {names.KEY_TOKENIZER_MODEL: "gpt2", names.KEY_TOKENIZER_PRE: self.pre or self._detect_pre(),
                    names.KEY_TOKEN_TYPE: types}
        meta.update({names.KEY_TOKENS: tokens, names.KEY_MERGES: merges, names.KEY_ADD_BOS: self.add_bos_token})
        if self.bos_token_id is not None:
            meta[names.KEY_BOS_ID] = self.bos_token_id
        if self.eos_token_ids:
            meta[names.KEY_EOS_ID] = self.eos_token_ids[0]
        if self.pad_token_id is not None:
            meta[names.KEY_PAD_ID] = self.pad_token_id
        if self.chat_template:
            meta[names.KEY_CHAT_TEMPLATE] = self.chat_template
        return meta

    def _detect_pre(self) -> str:
        current = json.loads(self.backend.to_str()).get("pre_tokenizer")
        for name, build in PRE_TOKENIZERS.items():
            probe = Backend(models.BPE())
            probe.pre_tokenizer = build()
            if json.loads(probe.to_str())["pre_tokenizer"] == current:
                return name
        raise TokenizerError("this tokenizer's pre-tokenizer has no llama.cpp name; cannot write it to GGUF")

    @classmethod
    def from_folder(cls, folder: str, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        """An HF-style folder: tokenizer.json, tokenizer_config.json (and chat_template.jinja)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{folder}: no tokenizer.json")
        backend = Backend.from_file(path)
        config = {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        template_path = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = f.read()

        def token_id(name):
            value = config.get(name)
            if isinstance(value, dict):  # older files store AddedToken dicts
                value = value.get("content")
            return backend.token_to_id(value) if value else None

        if eos_token_ids is None:
            eos = token_id("eos_token")
            eos_token_ids = [eos] if eos is not None else []
        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_ids=eos_token_ids,
                   chat_template=template, add_bos_token=bool(config.get("add_bos_token", False)),
                   pre=config.get("gguf_pre"), pad_token_id=token_id("pad_token"))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "gguf_pre": self.pre,
            "pad_token": self.token(self.pad_token_id) if self.pad_token_id is not None else None,
            "bos_token": self.token(self.bos_token_id) if self.bos_token_id is not None else None,
            "eos_token": self.token(self.eos_token_ids[0]) if self.eos_token_ids else None,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
        }
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


SPM_SPACE = "\u2581"  # SentencePiece's visible space


def sentencepiece_scores(tokens: list, merges: list) -> list:
    """Scores for a SentencePiece vocabulary known by its merges (a tokenizer.json): llama.cpp merges
    the best-scored pair first, so the token a merge makes scores minus the merge's rank; a longer
    token no merge makes (added, special) can never be merged into, single characters need no score."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -1e9) for t in tokens]


def merges_from_scores(vocab: dict, priority: dict) -> list:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best merged token first (higher ``priority``), then longer left and right parts; pairs of one
    token in vocabulary order. The order transformers derives (tokenization_utils_base.generate_merges),
    so that both tokenize alike."""
    merges = []
    for token, score in priority.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _piece_end(text: str, i: int) -> int:
    """The first j >= i with a single space at text[j] between two non-space characters; else len(text)."""
    n = len(text)
    while i < n - 1:
        j = text.find(" ", max(i, 1))
        if j < 0 or j >= n - 1:
            break
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        i = j + 1
    return n
