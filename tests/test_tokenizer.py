import os

import numpy as np
import pytest

import npgpt2
from npgpt2 import InputError, Tokenizer

# Published tokenizations (../shared/gpt2-tokenizer/README.md and the GPT-2 papers' examples)
KNOWN = {
    "Hello, my dog is cute": [15496, 11, 616, 3290, 318, 13779],
    "I am not sure what you are saying": [40, 716, 407, 1654, 644, 345, 389, 2282],
    "Oh, I love ice cream so much!": [5812, 11, 314, 1842, 4771, 8566, 523, 881, 0],
    "The dog": [464, 3290],
    "hello world": [31373, 995],
    "hello <|endoftext|>": [31373, 220, 50256],
}


@pytest.mark.parametrize("text,ids", KNOWN.items())
def test_known_tokenizations(text, ids):
    tok = Tokenizer()
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_vocabulary_size_and_endoftext():
    tok = Tokenizer()
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.token_str(50256) == "<|endoftext|>"


def test_round_trip_of_awkward_text():
    tok = Tokenizer()
    for text in ["naïve café — 東京 🙂", "  spaces\t\ttabs\n\nnewlines ", "it's we've I'd 1234567"]:
        assert tok.decode(tok.encode(text)) == text


def test_to_tokens_shapes_and_bos(model):
    toks = model.to_tokens("Hello, my dog is cute")
    assert toks.dtype == np.int64 and toks.shape == (1, 6)
    assert toks[0].tolist() == KNOWN["Hello, my dog is cute"]
    with_bos = model.to_tokens("Hello, my dog is cute", prepend_bos=True)
    assert with_bos[0].tolist() == [50256] + KNOWN["Hello, my dog is cute"]


def test_to_tokens_pads_right_and_reports_mask(model):
    toks, mask = model.to_tokens(["The dog", "Hello, my dog is cute"], return_mask=True)
    assert toks.shape == (2, 6)
    assert toks[0].tolist() == [464, 3290, 50256, 50256, 50256, 50256]
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]


def test_str_tokens_and_string(model):
    assert model.to_str_tokens("Hello, my dog") == ["Hello", ",", " my", " dog"]
    assert model.to_str_tokens(np.array([[464, 3290], [31373, 995]])) == [["The", " dog"], ["hello", " world"]]
    assert model.to_string(np.array([464, 3290])) == "The dog"
    assert model.to_string(np.array([[464, 3290], [31373, 995]])) == ["The dog", "hello world"]


def test_tokenizer_bad_input(model):
    with pytest.raises(InputError, match="no tokens"):
        model.to_tokens("")
    with pytest.raises(InputError, match="str or a list of str"):
        model.to_tokens(123)
    with pytest.raises(TypeError, match="expected a str"):
        Tokenizer().encode(b"bytes")


def test_checkpoint_tokenizer_files_are_used(tiny_dir):
    m = npgpt2.from_pretrained(tiny_dir)
    assert m.tokenizer.vocab_path.startswith(str(tiny_dir))
    assert m.to_tokens("The dog")[0].tolist() == [464, 3290]


def test_hugging_face_names_give_its_tokenizers_answers():
    # what a port from TransformerLens reads off model.tokenizer, against transformers' GPT-2
    # tokenizer built from the same files (pad set to <|endoftext|>, as TransformerLens sets it)
    transformers = pytest.importorskip("transformers")
    from npgpt2.tokenizer import bundled_files

    vocab, merges = bundled_files()
    hf = transformers.GPT2TokenizerFast.from_pretrained(os.path.dirname(vocab))
    assert hf.vocab_size == 50257 and hf.eos_token_id == 50256  # the files were read
    hf.pad_token = hf.eos_token
    tok = Tokenizer()
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "vocab_size", "eos_token", "bos_token",
                 "pad_token", "padding_side"):
        assert getattr(tok, name) == getattr(hf, name), name
    assert len(tok) == len(hf) == 50257
    ids = [15496, 995, 50256, 0, 1849, 50255]
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(995) == hf.convert_ids_to_tokens(995) == "Ġworld"
    strings = hf.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_ids(strings) == ids and tok.convert_tokens_to_ids("Ġworld") == 995
    assert tok.batch_decode([[15496, 995], [31373]]) == hf.batch_decode([[15496, 995], [31373]])
    texts = ["Hello world, and more", "Hi"]
    assert dict(tok("Hello world")) == dict(hf("Hello world"))
    assert tok(texts).input_ids == hf(texts)["input_ids"]
    ours, theirs = tok(texts, padding=True, return_tensors="np"), hf(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours.attention_mask, theirs["attention_mask"])


def test_hugging_face_names_that_npgpt2_does_otherwise_say_what_to_do():
    tok = Tokenizer()
    with pytest.raises(AttributeError, match=r"padding_side='left'"):
        tok.padding_side = "left"
    with pytest.raises(ValueError, match="return_tensors='np'"):
        tok(["a", "b"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a b c", "d"], return_tensors="np")
    with pytest.raises(npgpt2.tokenizer.TokenizerError, match="50257"):
        tok.convert_ids_to_tokens([50257])
    with pytest.raises(npgpt2.tokenizer.TokenizerError, match="'world_x'.*Ġ"):
        tok.convert_tokens_to_ids("world_x")
