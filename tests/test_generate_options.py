"""generate's TransformerLens options: do_sample, stop_at_eos with eos_token_id, return_type,
verbose, use_past_kv_cache."""

import numpy as np
import pytest

import by_hand

PROMPT = np.array([15496, 11, 616, 3290])


def test_do_sample(model):
    greedy = by_hand.greedy(model, PROMPT, 8)
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=8, do_sample=False, temperature=0.7), greedy)
    sampled = model.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=3)
    # do_sample=True without a temperature samples at 1.0, as TransformerLens does
    np.testing.assert_array_equal(sampled, model.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=3))
    np.testing.assert_array_equal(sampled, model.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=3))
    assert not np.array_equal(sampled, greedy)  # tiny random model: nearly flat distributions
    hot = model.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.5, seed=3)
    np.testing.assert_array_equal(hot, model.generate(PROMPT, max_new_tokens=8, temperature=0.5, seed=3))
    with pytest.raises(ValueError, match="do_sample=True with temperature=0"):
        model.generate(PROMPT, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="do_sample='yes'"):
        model.generate(PROMPT, do_sample="yes")


def _push_to(model, token):
    """A hook that makes ``token`` overwhelmingly likely from the second step on."""
    state = {"step": 0}

    def push(act, hook):
        state["step"] += 1
        if state["step"] >= 2:
            act = act.copy()
            act[..., :] = model.W_U[:, token] * 100
        return act
    return [("ln_final.hook_normalized", push)]


def test_eos_token_id(model):
    out = model.generate(PROMPT, max_new_tokens=10, eos_token_id=1234, fwd_hooks=_push_to(model, 1234))
    assert len(out) == 4 + 2 and out[-1] == 1234  # stopped at the chosen end token
    out = model.generate(PROMPT, max_new_tokens=10, eos_token_id=[42, 1234], fwd_hooks=_push_to(model, 1234))
    assert len(out) == 4 + 2 and out[-1] == 1234  # any of a list
    out = model.generate(PROMPT, max_new_tokens=6, eos_token_id=1234, stop_at_eos=False,
                         fwd_hooks=_push_to(model, 1234))
    assert len(out) == 10  # not without stop_at_eos
    out = model.generate(PROMPT, max_new_tokens=10, fwd_hooks=_push_to(model, 1234))
    assert len(out) == 14  # <|endoftext|> is the default end token, not 1234
    with pytest.raises(ValueError, match="eos_token_id=60000"):
        model.generate(PROMPT, eos_token_id=60000)


def test_a_finished_row_is_filled_and_its_text_ends_at_the_end_token(model):
    calls = []

    def push(act, hook):  # row 0 ends at its second step (token 1234); row 1 never ends
        calls.append(1)
        act = act.copy()
        act[0] = model.W_U[:, 1234 if len(calls) == 2 else 42] * 100
        act[1] = model.W_U[:, 42] * 100
        return act

    texts = ["The dog", "A cat sat on the"]
    hooks = [("ln_final.hook_normalized", push)]
    ids = model.generate(texts, max_new_tokens=4, eos_token_id=1234, return_type="tokens", fwd_hooks=hooks)
    assert ids[0, -4:].tolist() == [42, 1234, 1234, 1234] and ids[1, -4:].tolist() == [42] * 4
    calls.clear()
    strings = model.generate(texts, max_new_tokens=4, eos_token_id=1234, fwd_hooks=hooks)
    assert strings == ["The dog" + model.to_string([42]), "A cat sat on the" + model.to_string([42] * 4)]


def test_return_type(model):
    text = "Hello, my dog"
    ids = model.generate(text, max_new_tokens=3, return_type="tokens")
    assert ids.shape == (len(model.to_tokens(text)[0]) + 3,)
    assert model.generate(text, max_new_tokens=3) == model.to_string(ids)  # "input": text in, text out
    assert model.generate(text, max_new_tokens=3, return_type="str") == model.to_string(ids)
    np.testing.assert_array_equal(model.generate(ids[:-3], max_new_tokens=3), ids)  # "input": ids in, ids out
    assert model.generate(ids[:-3], max_new_tokens=3, return_type="str") == model.to_string(ids)
    with pytest.raises(ValueError, match="expected 'input', 'str' or 'tokens'"):
        model.generate(text, return_type="text")


def test_use_past_kv_cache_false_recomputes_the_same_tokens(model):
    texts = ["The dog", "A cat sat on the"]
    with_cache = model.generate(texts, max_new_tokens=10, return_type="tokens")
    np.testing.assert_array_equal(model.generate(texts, max_new_tokens=10, return_type="tokens",
                                                 use_past_kv_cache=False), with_cache)
    np.testing.assert_array_equal(model.generate(texts, max_new_tokens=10, return_type="tokens",
                                                 use_kv_cache=False), with_cache)  # the older name
    with pytest.raises(ValueError, match="disagree"):
        model.generate(texts, use_past_kv_cache=True, use_kv_cache=False)


def test_verbose_shows_a_progress_bar(model, capsys):
    model.generate(PROMPT, max_new_tokens=3, verbose=True, stop_at_eos=False)
    assert "3/3" in capsys.readouterr().err
    model.generate(PROMPT, max_new_tokens=3)
    assert capsys.readouterr().err == ""
