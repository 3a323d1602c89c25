"""The zoo's induction model, as built (without training it to the end: see test_trained.py for what
training makes of it): its word vocabulary, the hub layout it is saved in, determinism from the seed,
and the command line."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import npgpt2
from npgpt2 import zoo
from npgpt2.tokenizer import Tokenizer, TokenizerError, WordTokenizer

SHORT = dataclasses.replace(zoo.InductionRecipe(), max_steps=6, check_every=3)  # a few steps: the procedure, not the result


def test_every_word_is_one_gpt2_token_with_its_space():
    gpt2 = Tokenizer()
    assert len(zoo.WORDS) == 299 and len(set(zoo.WORDS)) == 299
    for word in zoo.WORDS:
        assert len(gpt2.encode(" " + word)) == 1, word


def test_word_tokenizer_round_trip_and_strings():
    tok = zoo.induction_tokenizer()
    assert tok.n_vocab == 300 and tok.eot_token == 299
    ids = tok.encode("cat dog  tree\ncat")
    assert ids == [zoo.WORDS.index(w) for w in ("cat", "dog", "tree", "cat")]
    assert tok.decode(ids) == " cat dog tree cat"
    assert tok.token_str(ids[0]) == " cat" and tok.token_str(299) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>cat") == [299, ids[0]]


def test_word_tokenizer_refuses_unknown_words_by_name():
    tok = zoo.induction_tokenizer()
    with pytest.raises(TokenizerError, match="'cats' is not in this model's vocabulary.*did you mean 'cat'"):
        tok.encode("big cats")
    with pytest.raises(TokenizerError, match="token id 300 is out of range"):
        tok.token_str(300)
    with pytest.raises(TokenizerError, match="more than once"):
        WordTokenizer(["cat", "dog", "cat"])


def test_tokenizer_json_is_read_by_hugging_face_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = zoo.induction_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.file_writers()["tokenizer.json"](str(path))
    theirs = tokenizers.Tokenizer.from_file(str(path))
    text = "king queen cat <|endoftext|> dog"
    assert theirs.encode(text).ids == tok.encode(text)
    assert WordTokenizer.from_file(path).words == tok.words


def test_repeated_batch_repeats_distinct_words_after_a_prefix():
    rng = np.random.default_rng(0)
    tokens = zoo.repeated_batch(rng, batch=5, period=7, prefix=3, n_words=299, bos=299)
    assert tokens.shape == (5, 1 + 3 + 14)
    assert (tokens[:, 0] == 299).all()
    assert (tokens[:, 4:11] == tokens[:, 11:]).all()
    for row in tokens:
        assert len(set(row[1:11])) == 10 and row[1:].max() < 299


def test_repeat_pair_differs_only_in_the_first_copy():
    clean, corrupted, answers = zoo.repeat_pair(np.random.default_rng(1), batch=4, period=8, prefix=2, cut=3,
                                                n_words=299, bos=299)
    assert clean.shape == corrupted.shape == (4, 1 + 2 + 8 + 3) and answers.shape == (4,)
    first = slice(3, 11)
    assert (clean[:, :3] == corrupted[:, :3]).all() and (clean[:, 11:] == corrupted[:, 11:]).all()
    for c, x, answer in zip(clean, corrupted, answers):
        assert (c[11:] == c[3:6]).all() and answer == c[6]  # the repeat so far, and the word it copies next
        assert not set(x[first]) & set(c[1:])  # the corrupted copy shares no word with the clean row
        assert answer not in x  # nothing in the corrupted row says what comes next
    with pytest.raises(ValueError, match="cut=8"):
        zoo.repeat_pair(np.random.default_rng(1), 2, period=8, prefix=2, cut=8, n_words=299, bos=299)


def test_build_is_a_function_of_the_seed(tmp_path):
    a = zoo.build_induction(tmp_path / "a", seed=3, recipe=SHORT, progress=False)
    b = zoo.build_induction(tmp_path / "b", seed=3, recipe=SHORT, progress=False)
    c = zoo.build_induction(tmp_path / "c", seed=4, recipe=SHORT, progress=False)
    assert zoo.weights_sha256(a) == zoo.weights_sha256(b) != zoo.weights_sha256(c)
    record = json.load(open(os.path.join(a, "training.json")))
    assert record["weights_sha256"] == zoo.weights_sha256(a) and record["steps"] == 6 and record["seed"] == 3


def test_saved_in_the_hub_layout_and_loaded_back(tmp_path):
    folder = zoo.build_induction(tmp_path / "m", seed=0, recipe=SHORT, progress=False)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "tokenizer.json", "training.json"]
    model = npgpt2.from_pretrained(folder)
    assert isinstance(model.tokenizer, WordTokenizer) and model.cfg.d_vocab == 300 and model.cfg.n_layer == 2
    assert model.to_str_tokens("cat dog cat") == [" cat", " dog", " cat"]
    again, _ = zoo.train_induction(seed=0, recipe=SHORT, progress=False)  # the same steps, in memory
    tokens = model.to_tokens("<|endoftext|>cat dog tree cat dog")
    np.testing.assert_array_equal(model(tokens), again(tokens))
    # saving the loaded model again keeps the word vocabulary
    model.save_pretrained(tmp_path / "again")
    assert npgpt2.from_pretrained(str(tmp_path / "again")).tokenizer.words == model.tokenizer.words


def test_a_config_and_tokenizer_that_disagree_are_refused(tmp_path):
    folder = zoo.build_induction(tmp_path / "m", seed=0, recipe=SHORT, progress=False)
    with open(os.path.join(folder, "tokenizer.json")) as f:
        data = json.load(f)
    del data["model"]["vocab"]["cat"]
    data["model"]["vocab"] = {w: i for i, w in enumerate(sorted(data["model"]["vocab"], key=data["model"]["vocab"].get))}
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(npgpt2.ConfigError, match="299 words but config.json says vocab_size=300"):
        npgpt2.from_pretrained(folder)


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items()}
    return subprocess.run([sys.executable, "-m", "npgpt2", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_command_line_builds_into_a_folder(tmp_path):
    out = tmp_path / "induction"
    done = _cli("zoo", "build", "induction", "--out", str(out), "--max-steps", "4", "--seed", "1", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert json.load(open(out / "training.json"))["steps"] == 4
    assert "copyable words' loss" in done.stderr


def test_command_line_refuses_a_file_as_out_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    done = _cli("zoo", "build", "induction", "--out", str(tmp_path / "file"), cwd=tmp_path)
    assert done.returncode == 2 and "is a file: expected a folder" in done.stderr
    done = _cli("zoo", "build", "parrot", cwd=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'parrot'" in done.stderr
