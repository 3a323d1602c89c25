"""A corpus -> documents -> one token stream -> contexts of ``ctx`` tokens, deterministically.

    stream   = doc_0 <|endoftext|> doc_1 <|endoftext|> doc_2 ...        (a token file: its tokens as they are)
    context i = <|endoftext|> + stream[i * (ctx - 1) : (i + 1) * (ctx - 1)]          [ctx] uint16

Every context starts with <|endoftext|> (what GPT-2 saw at the start of its training documents and
what SAEs on gpt2 are trained with), so a context id names the same tokens on every run and on every
machine, and a shard of contexts can be handed to any worker. Tokens that do not fill a last context
are left out.

Sources (``open_corpus``): a text file (one document), a folder of ``.txt`` files (one document each)
and ``.jsonl`` files (one document per line, its ``text`` field), in sorted path order; an iterable of
texts; a flat uint16 token file (``.bin``, ``.u16``, ``.tokens`` or a 1-D ``.npy``); a Hugging Face
dataset, ``hf:NAME`` or ``hf:NAME:CONFIG``, streamed (needs the ``datasets`` extra).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..inputs import read_text_file

TOKEN_FILE_SUFFIXES = (".bin", ".u16", ".tokens", ".npy")
_EXPECTED = ("a text file, a folder of .txt/.jsonl files, a uint16 token file (.bin/.u16/.tokens/.npy), "
             "hf:DATASET, or an iterable of texts")


class CorpusError(ValueError):
    """A corpus that does not exist, holds nothing, or cannot be read."""


class HarvestError(ValueError):
    """Bad arguments to a harvest, or an output folder that does not fit the run asked for (raised by
    run.py and cluster.py; defined here, below both)."""


@dataclass
class Corpus:
    """Where the documents come from. ``kind`` is "text", "folder", "texts", "tokens" or "hf"."""

    kind: str
    source: object
    description: str
    options: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------ documents
    def documents(self) -> Iterator[str]:
        """The documents, in a fixed order (not for token files)."""
        if self.kind == "text":
            yield _read_text(self.source)
        elif self.kind == "folder":
            for path in self.source:
                if path.endswith(".jsonl"):
                    yield from _jsonl_texts(path, self.options.get("text_field", "text"))
                else:
                    yield _read_text(path)
        elif self.kind == "texts":
            for i, text in enumerate(self.source):
                if not isinstance(text, str):
                    raise CorpusError(f"item {i} of the corpus is a {type(text).__name__}; expected a str")
                yield text
        elif self.kind == "hf":
            yield from _hf_texts(self.source, **self.options)
        else:
            raise CorpusError(f"a {self.kind} corpus has no documents")

    def stream(self, tokenizer, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """The token stream in pieces: each document's tokens then <|endoftext|>; a token file's
        tokens as stored.  -> 1-D int64 arrays"""
        if self.kind == "tokens":
            data = self.source if isinstance(self.source, np.ndarray) else _token_file(self.source)
            for start in range(0, len(data), chunk):
                yield np.asarray(data[start : start + chunk], dtype=np.int64)
            return
        eot = tokenizer.eot_token
        for text in self.documents():
            if text:  # an empty document adds nothing, not even a separator
                yield np.asarray(tokenizer.encode(text) + [eot], dtype=np.int64)


def open_corpus(source, text_field: str = "text", split: str = "train", **hf_kwargs) -> Corpus:
    """A path, ``hf:NAME[:CONFIG]``, an array of token ids, or an iterable of texts -> a ``Corpus``.

    A one-shot iterator of texts is kept in a list (the contexts quoted by a harvest are read again
    at its end)."""
    if isinstance(source, Corpus):
        return source
    if isinstance(source, np.ndarray):
        if source.ndim != 1 or not np.issubdtype(source.dtype, np.integer):
            raise CorpusError(f"a token array must be 1-D integers; got {source.dtype} of shape {list(source.shape)}")
        return Corpus("tokens", source, f"token array of {len(source)} tokens")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("hf:"):
            name, _, config = text[3:].partition(":")
            if not name:
                raise CorpusError(f"corpus {text!r}: expected hf:DATASET or hf:DATASET:CONFIG")
            options = {"config": config or None, "split": split, "text_field": text_field, **hf_kwargs}
            return Corpus("hf", name, text, options)
        if not os.path.exists(text):
            raise CorpusError(f"corpus {text!r} does not exist; expected {_EXPECTED}")
        if os.path.isdir(text):
            files = sorted(os.path.join(root, n) for root, _, names in os.walk(text) for n in names
                           if n.endswith((".txt", ".jsonl")))
            if not files:
                raise CorpusError(f"corpus folder {text!r} holds no .txt or .jsonl files")
            return Corpus("folder", files, f"folder {text} ({len(files)} files)", {"text_field": text_field})
        if text.endswith(TOKEN_FILE_SUFFIXES):
            _token_file(text)  # checked now, not half-way through a harvest
            return Corpus("tokens", text, f"token file {text}")
        if text.endswith(".jsonl"):
            return Corpus("folder", [text], f"jsonl file {text}", {"text_field": text_field})
        return Corpus("text", text, f"text file {text}")
    if isinstance(source, Iterable):
        texts = source if isinstance(source, (list, tuple)) else list(source)
        return Corpus("texts", texts, f"{len(texts)} texts")
    raise CorpusError(f"corpus of type {type(source).__name__}; expected {_EXPECTED}")


# ---------------------------------------------------------------------------------- packing
@dataclass
class Shard:
    """Contexts [start, start + len(tokens)) of the packed corpus."""

    index: int
    start: int
    tokens: np.ndarray  # [n_contexts, ctx] uint16

    @property
    def digest(self) -> str:
        """sha256 of the shard's tokens (and its place): what a resumed run checks it re-read."""
        h = hashlib.sha256(f"{self.index}:{self.start}:{self.tokens.shape}".encode())
        h.update(np.ascontiguousarray(self.tokens, dtype="<u2").tobytes())
        return h.hexdigest()[:16]


def iter_contexts(corpus: Corpus, tokenizer, ctx: int, max_contexts: int | None = None) -> Iterator[np.ndarray]:
    """The packed contexts one at a time, each [ctx] uint16 starting with <|endoftext|>."""
    if ctx < 2:
        raise CorpusError(f"ctx={ctx}: a context needs at least 2 tokens (<|endoftext|> and one more)")
    body = ctx - 1
    eot = tokenizer.eot_token
    pending: list[np.ndarray] = []
    n_pending = made = 0
    if max_contexts is not None and max_contexts <= 0:
        return
    for piece in corpus.stream(tokenizer):
        if len(piece) and (piece.min() < 0 or piece.max() > np.iinfo(np.uint16).max):
            raise CorpusError(f"token id {int(piece.max())} does not fit in uint16")
        pending.append(piece)
        n_pending += len(piece)
        if n_pending < body:
            continue
        flat = np.concatenate(pending)
        n_full = len(flat) // body
        for i in range(n_full):
            out = np.empty(ctx, dtype=np.uint16)
            out[0] = eot
            out[1:] = flat[i * body : (i + 1) * body]
            yield out
            made += 1
            if max_contexts is not None and made >= max_contexts:
                return
        rest = flat[n_full * body :]
        pending, n_pending = [rest], len(rest)


def iter_shards(corpus: Corpus, tokenizer, ctx: int, shard_contexts: int,
                max_contexts: int | None = None) -> Iterator[Shard]:
    """Consecutive shards of ``shard_contexts`` contexts (the last may be shorter)."""
    block: list[np.ndarray] = []
    index = 0
    for context in iter_contexts(corpus, tokenizer, ctx, max_contexts):
        block.append(context)
        if len(block) == shard_contexts:
            yield Shard(index, index * shard_contexts, np.stack(block))
            block, index = [], index + 1
    if block:
        yield Shard(index, index * shard_contexts, np.stack(block))


def read_contexts(corpus: Corpus, tokenizer, ctx: int, ids, max_contexts: int | None = None) -> dict[int, np.ndarray]:
    """The tokens of the contexts ``ids`` (packing the corpus again): {id: [ctx] uint16}."""
    wanted = sorted({int(i) for i in ids})
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    for i, context in enumerate(iter_contexts(corpus, tokenizer, ctx, min(max_contexts or wanted[-1] + 1, wanted[-1] + 1))):
        if i in wanted:
            found[i] = context
    missing = [i for i in wanted if i not in found]
    if missing:
        raise CorpusError(f"the corpus has no context {missing[0]}: it changed since the harvest")
    return found


def fingerprint(ctx: int, shard_digests: list[str]) -> str:
    """The corpus as packed: sha256 over ctx and every shard's digest, in order."""
    return hashlib.sha256(json.dumps([ctx, shard_digests]).encode()).hexdigest()


# ---------------------------------------------------------------------------------- readers
def _read_text(path: str) -> str:
    return read_text_file(path, CorpusError)


def _jsonl_texts(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise CorpusError(f"{path}:{n} has no string field {text_field!r}")
            yield row[text_field]


def _token_file(path: str) -> np.ndarray:
    """A flat uint16 token file, memory-mapped. ``.npy`` must hold a 1-D uint16 array."""
    if path.endswith(".npy"):
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        if data.ndim != 1 or data.dtype != np.uint16:
            raise CorpusError(f"{path} holds {data.dtype} of shape {list(data.shape)}; expected 1-D uint16 token ids")
        return data
    size = os.path.getsize(path)
    if size % 2:
        raise CorpusError(f"{path} has {size} bytes, an odd number; expected flat uint16 token ids")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r")


def _hf_texts(name: str, config=None, split: str = "train", text_field: str = "text", **kwargs) -> Iterator[str]:
    """A Hugging Face dataset, streamed (nothing is downloaded ahead of what is read)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus hf:{name} needs the datasets library: pip install 'npgpt2[datasets]'") from None
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    except Exception as e:  # the library's errors have many types; the message is what matters
        raise CorpusError(f"could not open dataset {name!r} (split {split!r}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for n, row in enumerate(rows):
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise CorpusError(f"row {n} of dataset {name!r} has no string field {text_field!r}")
        yield text
