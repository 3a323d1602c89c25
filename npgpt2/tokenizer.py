"""GPT-2's byte-pair encoding, as a tiktoken ``Encoding`` built from the BPE files.

The files are GPT-2's ``vocab.json`` (token -> id) and ``merges.txt`` (merge ranks). The package ships
the published pair (see ``data/``), so tokenization works offline; a checkpoint that carries its own
pair can pass those paths instead.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from importlib import resources

import numpy as np

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def bundled_files() -> tuple[str, str]:
    """Paths of the shipped (vocab.json, merges.txt)."""
    data = resources.files("npgpt2") / "data"
    return str(data / "vocab.json"), str(data / "merges.txt")


def _build_encoding(vocab_path: str, merges_path: str):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=merges_path,
        encoder_json_file=vocab_path,
        vocab_bpe_hash=_sha256(merges_path),
        encoder_json_hash=_sha256(vocab_path),
    )
    return tiktoken.Encoding(
        name=f"gpt2-bpe-{os.path.basename(os.path.dirname(vocab_path))}",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
    )


# (vocab_path, merges_path) -> Future of its Encoding: each pair is built once, in a thread of its own
_ENCODINGS: dict[tuple[str, str], Future] = {}
_ENCODINGS_LOCK = threading.Lock()


def _encoding_future(vocab_path: str, merges_path: str) -> Future:
    def build(future: Future) -> None:
        try:
            future.set_result(_build_encoding(vocab_path, merges_path))
        except BaseException as e:  # handed to whoever waits for it
            future.set_exception(e)

    with _ENCODINGS_LOCK:
        future = _ENCODINGS.get((vocab_path, merges_path))
        if future is None:
            future = _ENCODINGS[(vocab_path, merges_path)] = Future()
            threading.Thread(target=build, args=(future,), name="npgpt2-tokenizer", daemon=True).start()
    return future


class Tokenizer:
    """Text <-> token ids. ``<|endoftext|>`` in text is read as the special token 50256, as
    Hugging Face's GPT2Tokenizer does."""

    def __init__(self, vocab_path: str | None = None, merges_path: str | None = None):
        if vocab_path is None or merges_path is None:
            vocab_path, merges_path = bundled_files()
        self.vocab_path, self.merges_path = vocab_path, merges_path

    def start_loading(self) -> "Tokenizer":
        """Start building the Encoding in a background thread (``from_pretrained`` does, so that it
        is built while the weights load). Returns self."""
        _encoding_future(self.vocab_path, self.merges_path)
        return self

    @property
    def encoding(self):
        """The tiktoken Encoding (built once per pair of files, then shared)."""
        return _encoding_future(self.vocab_path, self.merges_path).result()

    @property
    def n_vocab(self) -> int:
        """The vocabulary's size (50,257 for GPT-2)."""
        return self.encoding.n_vocab

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>`` (50256)."""
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (``<|endoftext|>`` written in the text is that token)."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        """Token ids (any shape) -> text."""
        return self.encoding.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def token_str(self, token_id: int) -> str:
        """One token as text; a token that is part of a multi-byte character shows as U+FFFD."""
        return self.encoding.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")
