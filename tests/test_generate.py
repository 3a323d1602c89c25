import numpy as np
import pytest

from npgpt2 import InputError, KeyValueCache
from npgpt2.generate import ContextLimitWarning, sample
from conftest import TINY
import by_hand


def test_incremental_logits_equal_full_forward(model):
    """Every step's logits with the key/value cache equal a full pass over the same prefix."""
    tokens = np.random.default_rng(2).integers(0, TINY.d_vocab, (2, 40))
    kv = KeyValueCache(model.cfg, batch=2, dtype=model.dtype)
    step_logits = [model(tokens[:, :10], past_kv=kv)]
    for p in range(10, 40):
        step_logits.append(model(tokens[:, p : p + 1], past_kv=kv))
    assert kv.length == 40 and kv.layer(1)[0].shape == (2, TINY.n_head, 40, TINY.d_head)
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), model(tokens), atol=1e-4)


def test_kv_cache_batch_must_match(model):
    kv = KeyValueCache(model.cfg, batch=2, dtype=model.dtype)
    with pytest.raises(InputError, match="holds a batch of 2; got 1 sequences"):
        model(np.array([[1, 2]]), past_kv=kv)


def test_kv_cache_holds_the_keys_and_values(model):
    tokens = np.array([[5, 6, 7, 8]])
    kv = KeyValueCache(model.cfg, 1, model.dtype)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_k", "blocks.0.attn.hook_v"])
    model(tokens, past_kv=kv)
    keys, values = kv.layer(0)
    np.testing.assert_array_equal(keys, cache["k", 0].transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(values, cache["v", 0].transpose(0, 2, 1, 3))


def test_greedy_generation_with_and_without_cache_agree(model):
    prompt = np.array([15496, 11, 616, 3290])
    with_kv = model.generate(prompt, max_new_tokens=25, return_type="tokens")
    without = model.generate(prompt, max_new_tokens=25, return_type="tokens", use_kv_cache=False)
    np.testing.assert_array_equal(with_kv, without)
    assert with_kv.shape == (29,) and with_kv[:4].tolist() == prompt.tolist()
    # greedy = argmax of the full forward pass at every step
    for p in range(4, 29):
        assert with_kv[p] == model(with_kv[:p])[0, -1].argmax()


def test_text_in_text_out(model):
    expected = by_hand.greedy(model, model.to_tokens("Hello, my dog")[0], 5)
    text = model.generate("Hello, my dog", max_new_tokens=5)
    assert isinstance(text, str) and text == model.to_string(expected)
    streamed = list(model.generate_stream("Hello, my dog", max_new_tokens=5))
    assert all(isinstance(t, int) for t in streamed) and streamed == expected[-5:].tolist()


def first_sampled_tokens(model, prompt, n, **kwargs):
    """The first sampled token of each of n copies of a prompt (one generation step of a batch)."""
    return model.generate(np.tile(prompt, (n, 1)), max_new_tokens=1, return_type="tokens", **kwargs)[:, -1]


def test_sampling_follows_temperature_top_k_top_p_and_seed(model):
    prompt = np.array([1, 2, 3])
    logits = model(prompt)[0, -1].astype(np.float64)
    ranked = np.argsort(-logits)
    # temperature: the frequencies of the three likeliest tokens (and of all the others) against
    # softmax(logits / T) worked out here, within four standard errors
    # (a few hundred draws: each costs a pass over the 50257-token vocabulary)
    n = 200
    probs = by_hand.softmax(logits / 0.5)[ranked[:3]]  # about 0.48, 0.18, 0.17 (at T = 1: 0.16, 0.10, 0.09)
    draws = first_sampled_tokens(model, prompt, n, temperature=0.5, seed=0)
    freq = [(draws == tok).mean() for tok in ranked[:3]]
    np.testing.assert_allclose(freq + [1 - sum(freq)], list(probs) + [1 - probs.sum()], atol=4 * 0.5 / np.sqrt(n))
    # seed: the same seed gives the same draws, another seed other draws
    a = first_sampled_tokens(model, prompt, 100, temperature=0.5, seed=1)
    np.testing.assert_array_equal(a, first_sampled_tokens(model, prompt, 100, temperature=0.5, seed=1))
    assert (a != first_sampled_tokens(model, prompt, 100, temperature=0.5, seed=2)).mean() > 0.4
    # top_k: only the k likeliest tokens, in proportion to their probabilities
    draws = first_sampled_tokens(model, prompt, 150, temperature=1.0, top_k=3, seed=3)
    assert set(draws) == set(ranked[:3])
    np.testing.assert_allclose([(draws == tok).mean() for tok in ranked[:3]],
                               by_hand.softmax(logits[ranked[:3]]), atol=4 * 0.5 / np.sqrt(150))
    # top_p: the smallest set of likeliest tokens whose probability reaches p
    nucleus = ranked[: np.searchsorted(np.cumsum(by_hand.softmax(logits)[ranked]), 0.3) + 1]
    assert 1 < len(nucleus) < 6
    assert set(first_sampled_tokens(model, prompt, 60, temperature=1.0, top_p=0.3, seed=4)) == set(nucleus)


def test_sample_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, 1.0, top_k=2, rng=rng)[0] for _ in range(2000)])
    assert set(draws) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.04
    draws = np.array([sample(logits, 1.0, top_p=0.79, rng=rng)[0] for _ in range(2000)])
    assert set(draws) == {0, 1}  # 0.5 < 0.79, 0.5 + 0.3 >= 0.79: the nucleus is {0, 1}
    draws = np.array([sample(logits, 1.0, top_p=0.1, rng=rng)[0] for _ in range(50)])
    assert set(draws) == {0}  # at least the most likely token is kept
    draws = np.array([sample(logits, 1.0, rng=rng)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert sample(logits, 0.0)[0] == 0
    # temperature T: probabilities proportional to p ** (1 / T); each row of a batch drawn on its own
    for t in (0.5, 2.0):
        expected = np.array([0.5, 0.3, 0.15, 0.05]) ** (1 / t)
        draws = sample(np.repeat(logits, 20000, axis=0), t, rng=rng)
        np.testing.assert_allclose(np.bincount(draws, minlength=4) / 20000, expected / expected.sum(), atol=0.015)


def test_stop_at_eos(model):
    # a hook that makes <|endoftext|> overwhelmingly likely after two steps
    state = {"step": 0}

    def push_eos(act, hook):
        state["step"] += 1
        if state["step"] >= 3:
            act = act.copy()
            act[..., :] = model.W_U[:, 50256] * 100
        return act

    out = model.generate([1, 2, 3], max_new_tokens=10, return_type="tokens",
                         fwd_hooks=[("ln_final.hook_normalized", push_eos)])
    assert out[-1] == 50256 and len(out) == 3 + 3
    state["step"] = 0
    out = model.generate([1, 2, 3], max_new_tokens=10, return_type="tokens", stop_at_eos=False,
                         fwd_hooks=[("ln_final.hook_normalized", push_eos)])
    assert len(out) == 13


def test_finished_rows_of_a_batch_are_filled_with_endoftext(model):
    """Row 0 is steered to emit <|endoftext|> at its third step and token 1234 at every other one;
    row 1 is steered to token 42 (and, in the second run, to <|endoftext|> at its fifth step)."""
    eos = 50256
    W_U = model.W_U

    def steer(row1_eos_step):
        calls = []

        def push(act, hook):  # ln_final.hook_normalized of the last position: [batch, 1, d_model]
            step = len(calls)
            calls.append(step)
            act = act.copy()
            act[0] = W_U[:, eos if step == 2 else 1234] * 100
            act[1] = W_U[:, eos if step == row1_eos_step else 42] * 100
            return act
        return [("ln_final.hook_normalized", push)]

    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompts, max_new_tokens=7, return_type="tokens", fwd_hooks=steer(None))
    assert out[0, 3:].tolist() == [1234, 1234, eos, eos, eos, eos, eos]  # finished: only <|endoftext|>
    assert out[1, 3:].tolist() == [42] * 7  # the other row goes on
    # once every row has finished, generation stops
    out = model.generate(prompts, max_new_tokens=7, return_type="tokens", fwd_hooks=steer(4))
    assert out[:, 3:].tolist() == [[1234, 1234, eos, eos, eos], [42, 42, 42, 42, eos]]
    # without stop_at_eos, a row goes on after <|endoftext|>
    out = model.generate(prompts, max_new_tokens=5, return_type="tokens", fwd_hooks=steer(None), stop_at_eos=False)
    assert out[0, 3:].tolist() == [1234, 1234, eos, 1234, 1234]


def test_hooks_apply_during_generation(model):
    seen = []
    model.generate([1, 2, 3], max_new_tokens=4,
                   fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, h: seen.append(a.shape))])
    # the prompt step, then one query at a time over a growing set of keys
    assert seen == [(1, TINY.n_head, 3, 3), (1, TINY.n_head, 1, 4), (1, TINY.n_head, 1, 5), (1, TINY.n_head, 1, 6)]
    assert model._hooks == {}


def test_steering_with_a_hook_changes_the_output(model):
    plain = model.generate([1, 2, 3], max_new_tokens=8, return_type="tokens")
    steered = model.generate([1, 2, 3], max_new_tokens=8, return_type="tokens",
                             fwd_hooks=[("blocks.1.hook_resid_post",
                                         lambda a, h: a + 50 * model.W_U[:, 1234] / np.linalg.norm(model.W_U[:, 1234]))])
    assert not np.array_equal(plain, steered)


def test_batch_of_equal_length_prompts(model):
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompts, max_new_tokens=6, return_type="tokens")
    assert out.shape == (2, 9)
    for i in range(2):
        np.testing.assert_array_equal(out[i], by_hand.greedy(model, prompts[i], 6))


def test_context_limit_stops_with_a_message(model):
    with pytest.warns(ContextLimitWarning, match="reached the context length n_ctx=64"):
        out = model.generate(np.arange(60), max_new_tokens=10, return_type="tokens")
    assert len(out) == 64
    with pytest.raises(InputError, match="leaving no room in the context of n_ctx=64"):
        model.generate(np.arange(64), max_new_tokens=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0: expected a positive integer"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=float("nan")), "temperature=nan: expected 0 .greedy. or a positive finite number"),
    (dict(temperature=float("inf"), do_sample=True), "temperature=inf"),
    (dict(top_p=0.0), r"top_p=0.0: expected a number in \(0, 1\]"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=0), "top_k=0: expected an integer >= 1"),
    (dict(return_type="probs"), "return_type='probs'"),
])
def test_bad_generation_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate([1, 2, 3], **kwargs)


def test_generate_takes_a_list_of_equal_length_texts(model):
    from by_hand import greedy

    texts = ["The dog", "A cat"]
    out = model.generate(texts, max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 2
    ids = model.generate(texts, max_new_tokens=4, return_type="tokens")
    for row, prompt in zip(ids, model.to_tokens(texts)):
        np.testing.assert_array_equal(row, greedy(model, prompt, 4))
    one = model.generate(["The dog"], max_new_tokens=4)
    assert isinstance(one, list) and one == [out[0]]


def test_top_k_keeps_exactly_k_tokens_among_ties():
    from npgpt2.generate import sample

    logits = np.array([[1.0, 5.0, 5.0, 5.0, 0.0]])
    draws = {int(sample(logits, 1.0, top_k=1, rng=np.random.default_rng(s))[0]) for s in range(50)}
    assert len(draws) == 1 and draws <= {1, 2, 3}
    draws = {int(sample(logits, 1.0, top_k=2, rng=np.random.default_rng(s))[0]) for s in range(200)}
    assert len(draws) == 2 and draws <= {1, 2, 3}
