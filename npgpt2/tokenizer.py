"""GPT-2's byte-pair encoding, as a tiktoken ``Encoding`` built from the BPE files.

The files are GPT-2's ``vocab.json`` (token -> id) and ``merges.txt`` (merge ranks). The package ships
the published pair (see ``data/``), so tokenization works offline; a checkpoint that carries its own
pair can pass those paths instead.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
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


@lru_cache(maxsize=4)
def _encoding(vocab_path: str, merges_path: str):
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


class Tokenizer:
    """Text <-> token ids. ``<|endoftext|>`` in text is read as the special token 50256, as
    Hugging Face's GPT2Tokenizer does."""

    def __init__(self, vocab_path: str | None = None, merges_path: str | None = None):
        if vocab_path is None or merges_path is None:
            vocab_path, merges_path = bundled_files()
        self.vocab_path, self.merges_path = vocab_path, merges_path

    @property
    def encoding(self):
        """The tiktoken Encoding (built on first use, then shared)."""
        return _encoding(self.vocab_path, self.merges_path)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_token(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def token_str(self, token_id: int) -> str:
        """One token as text; a token that is part of a multi-byte character shows as U+FFFD."""
        return self.encoding.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")
