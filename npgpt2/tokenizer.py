"""Text <-> token ids.

``Tokenizer``: GPT-2's byte-pair encoding, as a tiktoken ``Encoding`` built from the BPE files, GPT-2's
``vocab.json`` (token -> id) and ``merges.txt`` (merge ranks). The package ships the published pair
(see ``data/``), so tokenization works offline; a checkpoint that carries its own pair can pass those
paths instead.

``WordTokenizer``: a vocabulary of whole words, one token each, for the small models npgpt2 trains
itself (``npgpt2.zoo``). Stored as Hugging Face's ``tokenizer.json`` with a WordLevel model.

Both say which files they are written as (``file_writers``), so that ``save_pretrained`` stores
either.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
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

    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=merges_path,
            encoder_json_file=vocab_path,
            vocab_bpe_hash=_sha256(merges_path),
            encoder_json_hash=_sha256(vocab_path),
        )
    except (AssertionError, ValueError, KeyError, IndexError) as e:  # tiktoken checks the pair with assert
        raise ValueError(f"the BPE files {merges_path} and {vocab_path} do not make a tokenizer (damaged or "
                         f"truncated? {type(e).__name__}: {e or 'they disagree'}); copy or download them again") from None
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


class TransformersNames:
    """The names of a Hugging Face tokenizer that code written for TransformerLens reaches for
    (``model.tokenizer.eos_token_id``, ``model.tokenizer(texts, padding=True)["input_ids"]`` ...),
    on top of a tokenizer's ``encode``, ``decode``, ``eot_token``, ``n_vocab`` and ``_token_strings``.

    GPT-2 has one special token, ``<|endoftext|>``: it is the BOS, the EOS and the padding. Calling
    the tokenizer does what Hugging Face's GPT-2 tokenizer does: no BOS is added (TransformerLens's
    own tokenizer adds one; ``model.to_tokens(texts, prepend_bos=True)`` gives its tokens).
    """

    eos_token = bos_token = pad_token = unk_token = ENDOFTEXT

    @property
    def eos_token_id(self) -> int:
        """The id of ``<|endoftext|>`` (50256 for GPT-2)."""
        return self.eot_token

    bos_token_id = pad_token_id = unk_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        """The number of token ids (Hugging Face's name for ``n_vocab``)."""
        return self.n_vocab

    def __len__(self) -> int:
        return self.n_vocab

    @property
    def padding_side(self) -> str:
        """Where ``tokenizer(texts, padding=True)`` pads: always "right". npgpt2 takes the side per
        call instead (``model.to_tokens(texts, padding_side="left")``), so it cannot be set here."""
        return "right"

    @padding_side.setter
    def padding_side(self, value) -> None:
        raise AttributeError(f"tokenizer.padding_side = {value!r}: npgpt2 takes the padding side per call, e.g. "
                             f"model.to_tokens(texts, padding_side={value!r}), model(texts, padding_side={value!r}); "
                             "generate pads on the left by itself")

    def convert_ids_to_tokens(self, ids):
        """Token ids -> their strings as Hugging Face writes them (GPT-2's BPE: "Ġworld" for " world").
        An int -> a str; a list or array [n] -> a list of str."""
        strings = self._token_strings()
        if np.ndim(ids) == 0:
            return strings[self._check_id(ids)]
        return [strings[self._check_id(i)] for i in np.asarray(ids).reshape(-1)]

    def convert_tokens_to_ids(self, tokens):
        """``convert_ids_to_tokens`` undone: a str -> an int; a list of str -> a list of int."""
        index = self._token_index()
        def one(token):
            if token not in index:
                raise TokenizerError(f"token {token!r} is not in this vocabulary (write a leading space as 'Ġ' "
                                     "in GPT-2's BPE, or use tokenizer.encode(text))")
            return index[token]
        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def batch_decode(self, sequences) -> list[str]:
        """Rows of token ids [batch, pos] -> one text each."""
        return [self.decode(row) for row in sequences]

    def __call__(self, text, padding=False, return_tensors=None, return_attention_mask: bool = True):
        """Hugging Face's call: text (or a list of texts) -> {"input_ids", "attention_mask"} (also as
        attributes). One text: lists [pos]; several: lists of lists, or with ``padding=True``
        ("longest") padded on the right with ``<|endoftext|>`` and mask 0. ``return_tensors="np"``:
        int64 arrays [batch, pos] (needs equal lengths or ``padding``). No BOS is added."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: npgpt2 works with NumPy arrays; pass "
                             "return_tensors='np' (or use model.to_tokens(texts), which pads and returns them)")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ValueError(f"padding={padding!r}: expected True / 'longest' (pad to the longest text) or False")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a str or a list of str")
        ids = [self.encode(t) for t in texts]
        masks = [[1] * len(row) for row in ids]
        if padding in (True, "longest"):
            longest = max(map(len, ids), default=0)
            masks = [m + [0] * (longest - len(m)) for m in masks]
            ids = [row + [self.eot_token] * (longest - len(row)) for row in ids]
        if return_tensors == "np":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("texts of different lengths make no array: pass padding=True")
            ids, masks = np.array(ids, dtype=np.int64).reshape(len(ids), -1), np.array(masks, dtype=np.int64).reshape(len(ids), -1)
        elif single:
            ids, masks = ids[0], masks[0]
        out = Encoded(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = masks
        return out

    def _check_id(self, token_id) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} is out of range for a vocabulary of {self.n_vocab}")
        return token_id

    def _token_index(self) -> dict:
        return {s: i for i, s in enumerate(self._token_strings())}


class Encoded(dict):
    """What calling a tokenizer returns: a dict whose keys are attributes too (``.input_ids``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{name!r}: the tokenizer returned {', '.join(self)}") from None


class Tokenizer(TransformersNames):
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
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes (part of a character, for some tokens)."""
        return self.encoding.decode_single_token_bytes(int(token_id))

    def _token_strings(self) -> list[str]:
        """Each id's string in vocab.json (GPT-2's byte-to-unicode form: "Ġworld"), ``<|endoftext|>`` last."""
        if getattr(self, "_strings", None) is None:
            with open(self.vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            strings = [""] * self.n_vocab
            for token, i in vocab.items():
                if 0 <= i < len(strings):
                    strings[i] = token
            strings[self.eot_token] = ENDOFTEXT
            self._strings = strings
        return self._strings

    def file_writers(self) -> dict:
        """{file name: write(path)}: the files a saved checkpoint holds for this tokenizer."""
        return {"vocab.json": lambda path: shutil.copyfile(self.vocab_path, path),
                "merges.txt": lambda path: shutil.copyfile(self.merges_path, path)}


class TokenizerError(ValueError):
    """Text the tokenizer has no tokens for, or a tokenizer file it cannot read."""


class WordTokenizer(TransformersNames):
    """A vocabulary of whole words: text is split at white space and each word is one token.

    words: the vocabulary in id order; ``<|endoftext|>`` is added as the last id when it is not there
        (it is the BOS and the padding, as in GPT-2).
    A token is shown as GPT-2 shows a word, with the space in front: ``token_str(id) == " cat"``, and
    ``decode`` joins them (" cat dog"). A word outside the vocabulary is an error that names it.
    """

    def __init__(self, words):
        words = [str(w) for w in words]
        if ENDOFTEXT not in words:
            words.append(ENDOFTEXT)
        for w in words:
            if not w or (w != ENDOFTEXT and w.split() != [w]):
                raise TokenizerError(f"vocabulary word {w!r}: expected a non-empty word without white space")
        if len(set(words)) != len(words):
            twice = sorted({w for w in words if words.count(w) > 1})
            raise TokenizerError(f"vocabulary words {twice[:5]} appear more than once")
        self.words = tuple(words)
        self.ids = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_file(cls, path) -> "WordTokenizer":
        """Read Hugging Face's ``tokenizer.json`` with a WordLevel model."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            vocab = data["model"]["vocab"]
            kind = data["model"]["type"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: not a tokenizer.json with a model and its vocab ({e})") from None
        if kind != "WordLevel":
            raise TokenizerError(f"{path}: the tokenizer's model is {kind!r}; WordTokenizer reads 'WordLevel'")
        words = sorted(vocab, key=vocab.get)
        if [vocab[w] for w in words] != list(range(len(words))):
            raise TokenizerError(f"{path}: the vocabulary's ids are not 0..{len(words) - 1}")
        return cls(words)

    def to_json(self) -> dict:
        """Hugging Face's ``tokenizer.json`` for this vocabulary (``tokenizers.Tokenizer.from_file`` reads it)."""
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": self.eot_token, "content": ENDOFTEXT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": None,
            "model": {"type": "WordLevel", "vocab": dict(self.ids), "unk_token": ENDOFTEXT},
        }

    def file_writers(self) -> dict:
        def write(path):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=1)
        return {"tokenizer.json": write}

    def start_loading(self) -> "WordTokenizer":
        """Nothing to build (``Tokenizer`` builds its BPE tables in the background). Returns self."""
        return self

    @property
    def n_vocab(self) -> int:
        return len(self.words)

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>``."""
        return self.ids[ENDOFTEXT]

    def encode(self, text: str) -> list[int]:
        """Text -> token ids: one per white-space-separated word."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
        ids = []
        for word in text.replace(ENDOFTEXT, f" {ENDOFTEXT} ").split():
            if word not in self.ids:
                near = difflib.get_close_matches(word, self.words, n=3)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                raise TokenizerError(f"word {word!r} is not in this model's vocabulary of {self.n_vocab} "
                                     f"words (e.g. {', '.join(self.words[:5])}){hint}")
            ids.append(self.ids[word])
        return ids

    def decode(self, ids) -> str:
        """Token ids (any shape) -> text: " cat dog"."""
        return "".join(self.token_str(i) for i in np.asarray(ids).reshape(-1))

    def token_str(self, token_id: int) -> str:
        """One token as text: the word with a space in front (``<|endoftext|>`` without)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self.words):
            raise TokenizerError(f"token id {token_id} is out of range for a vocabulary of {len(self.words)}")
        word = self.words[token_id]
        return word if word == ENDOFTEXT else " " + word

    def token_bytes(self, token_id: int) -> bytes:
        return self.token_str(token_id).encode("utf-8")

    def _token_strings(self) -> list[str]:
        """The words, as Hugging Face's WordLevel tokenizer names its tokens (no space in front)."""
        return list(self.words)
