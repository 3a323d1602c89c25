"""Training data: one flat array of token ids, and batches of windows drawn from it.

    data = TokenDataset.from_text_files(["notes.txt"], model.tokenizer)   # or .from_folder(dir)
    data = TokenDataset.from_texts(texts, model.tokenizer)                # any iterable of str
    data = TokenDataset.from_bin("train.bin")                             # nanoGPT / llm.c, mapped
    train, val = data.split(0.1)                                          # the last 10% held out
    for batch in train.batches(batch_size=4, seq_len=256, seed=0): ...    # [4, 256] int64

Documents are tokenized with the model's tokenizer and joined with ``<|endoftext|>`` between them, as
GPT-2 saw its training documents. A batch is ``batch_size`` windows of ``seq_len`` consecutive tokens
at random starts; the model predicts tokens 1..seq_len-1 of each window from those before them
(``model.value_and_grad(batch)``). Batch ``i`` of seed ``s`` depends on (s, i) only, so a run that
stops after batch k continues with ``batches(..., start=k)`` exactly as it would have.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

import numpy as np

from ..inputs import read_text_file

# llm.c's token files start with a 256 x int32 header: magic, version, token count, ...
_LLMC_MAGIC, _LLMC_HEADER_BYTES = 20240520, 256 * 4


class DataError(ValueError):
    """Training data that cannot be used: missing, empty, or too short for the windows asked for."""


class TokenDataset:
    """A 1-D array of token ids (in memory, or a read-only memory map of a ``.bin`` file)."""

    def __init__(self, tokens, source: str = "tokens"):
        tokens = np.asanyarray(tokens)  # a memory map stays one
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{source}: expected a 1-D array of integer token ids, got {tokens.dtype} "
                            f"shape {list(tokens.shape)}")
        if tokens.size == 0:
            raise DataError(f"{source} holds no tokens: expected some text")
        self.tokens, self.source = tokens, source

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __repr__(self):
        return f"TokenDataset({self.source}: {len(self)} tokens)"

    # ------------------------------------------------------------------------------ making one
    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, source: str = "texts") -> "TokenDataset":
        """Tokenize each text; join them with <|endoftext|> between documents. Empty texts are skipped."""
        parts = []
        for text in texts:
            if not isinstance(text, str):
                raise DataError(f"{source}: expected texts (str), got {type(text).__name__}")
            if text.strip():
                if parts:
                    parts.append([tokenizer.eot_token])
                parts.append(tokenizer.encode(text))
        if not parts:
            raise DataError(f"{source} holds no text: every document is empty")
        return cls(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]).astype(_id_dtype(tokenizer)), source)

    @classmethod
    def from_text_files(cls, paths, tokenizer) -> "TokenDataset":
        """One document per file (UTF-8)."""
        paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not paths:
            raise DataError("no text files given")
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"text file {p} does not exist")
        return cls.from_texts((_read_text(p) for p in paths), tokenizer, source=", ".join(paths))

    @classmethod
    def from_folder(cls, folder, tokenizer, suffixes=(".txt", ".md")) -> "TokenDataset":
        """Every file under ``folder`` ending in one of ``suffixes``, in sorted path order."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise DataError(f"folder {folder} does not exist")
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                       for name in names if name.endswith(tuple(suffixes)))
        if not paths:
            raise DataError(f"folder {folder} has no files ending in {', '.join(suffixes)}")
        return cls.from_texts((_read_text(p) for p in paths), tokenizer, source=folder)

    @classmethod
    def from_bin(cls, path) -> "TokenDataset":
        """A flat file of uint16 token ids (nanoGPT's ``train.bin``; llm.c's header is recognised and
        skipped), memory-mapped: nothing is read until a batch needs it."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"token file {path} does not exist")
        size = os.path.getsize(path)
        offset = 0
        if size >= _LLMC_HEADER_BYTES and int(np.fromfile(path, np.int32, 1)[0]) == _LLMC_MAGIC:
            offset = _LLMC_HEADER_BYTES
        if (size - offset) % 2:
            raise DataError(f"token file {path} has {size - offset} bytes: expected uint16 ids (an even size)")
        if size - offset == 0:
            raise DataError(f"token file {path} holds no tokens")
        return cls(np.memmap(path, dtype=np.uint16, mode="r", offset=offset), source=path)

    @classmethod
    def from_paths(cls, paths, tokenizer) -> "TokenDataset":
        """What the command line takes: ``.bin`` token files, folders, or text files."""
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise DataError("no data given: expected text files, a folder, or a .bin token file")
        if any(p.endswith(".bin") for p in paths):
            if len(paths) != 1:
                raise DataError(f"{', '.join(paths)}: a .bin token file must be given alone")
            return cls.from_bin(paths[0])
        if len(paths) == 1 and os.path.isdir(paths[0]):
            return cls.from_folder(paths[0], tokenizer)
        return cls.from_text_files(paths, tokenizer)

    def to_bin(self, path) -> None:
        """Write the ids as a flat uint16 file (nanoGPT's format)."""
        if len(self) and int(self.tokens.max()) > np.iinfo(np.uint16).max:
            raise DataError(f"token id {int(self.tokens.max())} does not fit in uint16")
        self.tokens.astype(np.uint16).tofile(os.fspath(path))

    def fingerprint(self) -> str:
        """sha256 of the ids (as int64): a resumed run checks it is given the same data."""
        h = hashlib.sha256()
        for start in range(0, len(self), 1 << 22):
            h.update(np.asarray(self.tokens[start:start + (1 << 22)], dtype=np.int64).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------- using one
    def split(self, val_fraction: float = 0.1) -> tuple["TokenDataset", "TokenDataset"]:
        """(train, val): the last ``val_fraction`` of the tokens is held out (at least one token each)."""
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction}: expected a number between 0 and 1")
        n_val = max(1, int(round(len(self) * val_fraction)))
        if n_val >= len(self):
            raise DataError(f"{self.source} holds {len(self)} tokens: too few to hold out {val_fraction:.0%}")
        cut = len(self) - n_val
        return (TokenDataset(self.tokens[:cut], f"{self.source} [train]"),
                TokenDataset(self.tokens[cut:], f"{self.source} [val]"))

    def check_window(self, seq_len: int) -> None:
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
            raise DataError(f"seq_len={seq_len}: expected at least 2 tokens (one to predict from, one to predict)")
        if seq_len > len(self):
            raise DataError(f"{self.source} holds {len(self)} tokens: too few for windows of seq_len={seq_len}")

    def batch(self, index: int, batch_size: int, seq_len: int, seed: int = 0) -> np.ndarray:
        """Batch number ``index`` of ``batches(batch_size, seq_len, seed)``: [batch_size, seq_len] int64."""
        self.check_window(seq_len)
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: expected at least 1")
        rng = np.random.default_rng([seed, index])  # depends on (seed, index) only
        starts = rng.integers(0, len(self) - seq_len + 1, size=batch_size)  # [batch]
        return np.stack([np.asarray(self.tokens[s:s + seq_len], dtype=np.int64) for s in starts])

    def batches(self, batch_size: int, seq_len: int, seed: int = 0, start: int = 0) -> Iterator[np.ndarray]:
        """Endless random batches [batch_size, seq_len]; ``start`` skips to batch number ``start``."""
        self.check_window(seq_len)
        index = start
        while True:
            yield self.batch(index, batch_size, seq_len, seed)
            index += 1


def _read_text(path: str) -> str:
    return read_text_file(path, DataError, "text file ")


def _id_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tokenizer.n_vocab <= 65536 else np.dtype(np.int32)
