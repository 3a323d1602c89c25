"""Memory told before it is spent (npgpt2.memory): a call that would hold more than the machine has
is refused before it allocates, with the estimate and what to ask for instead."""

import resource

import numpy as np
import pytest

import npgpt2
from npgpt2 import memory
from npgpt2.analysis import patching
from npgpt2.harvest import harvest
from npgpt2.config import GPT2Config
from npgpt2.model import GPT2
from npgpt2.weights import BlockWeights, GPT2Weights


def zero_weights_model(cfg: GPT2Config, name: str) -> GPT2:
    """A model of ``cfg``'s shape whose weights are broadcast zeros: gpt2-xl's shape without its 6 GB."""
    z = lambda *shape: np.broadcast_to(np.float32(0), shape)  # noqa: E731 (no memory behind it)
    d, m = cfg.d_model, cfg.d_mlp
    blocks = [BlockWeights(z(d), z(d), z(d, 3 * d), z(3 * d), z(d, d), z(d), z(d), z(d), z(d, m), z(m), z(m, d), z(d))
              for _ in range(cfg.n_layer)]
    W_E = z(cfg.vocab_size, d)
    return GPT2(cfg, GPT2Weights(W_E, z(cfg.n_ctx, d), blocks, z(d), z(d), W_E.T, None), name=name)


@pytest.fixture(scope="module")
def xl():
    return zero_weights_model(GPT2Config(n_layer=48, n_head=25, n_embd=1600, n_ctx=1024), "gpt2-xl-shaped")


def too_many_rows(model, per_row_bytes) -> int:
    """A batch size whose estimate is over four times the memory this machine has available."""
    available = memory.available_bytes()
    assert available is not None, "this machine's available memory cannot be read"
    return max(1, int(4 * available // per_row_bytes) + 1)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux: KiB)


def test_a_full_cache_at_gpt2_xl_shape_beyond_the_machine_is_refused_before_allocating(xl):
    one = memory.estimate(xl, 1, 1024, keep=xl._computed_anyway).total
    batch = too_many_rows(xl, one)
    tokens = np.zeros((batch, 1024), dtype=np.int64)
    before = peak_rss()
    with pytest.raises(memory.NotEnoughMemory) as e:
        xl.run_with_cache(tokens)
    assert peak_rss() - before < 200e6  # refused before anything large was made
    text = str(e.value)
    assert f"{batch} x 1024 tokens" in text and "gpt2-xl-shaped" in text and "available" in text
    assert "names_filter" in text and "blocks.*.attn.hook_pattern" in text and "fewer tokens" in text
    assert isinstance(e.value, MemoryError)


def test_gradients_at_gpt2_xl_shape_beyond_the_machine_are_refused(xl):
    one = memory.estimate(xl, 1, 1024, save=xl._saved_for_backward, param_grads=True).total
    tokens = np.zeros((too_many_rows(xl, one), 1024), dtype=np.int64)
    with pytest.raises(memory.NotEnoughMemory, match="micro-batches") as e:
        xl.value_and_grad(tokens)
    assert "the weights' gradients" in str(e.value) and "saved for the backward pass" in str(e.value)


def test_a_names_filter_brings_the_estimate_down(xl):
    everything = memory.estimate(xl, 8, 1024, keep=xl._computed_anyway)
    one_hook = memory.estimate(xl, 8, 1024, keep=[f"blocks.{l}.hook_resid_post" for l in range(48)])
    # 48 layers x 8 x 1024 x 1600 float32, the cache of one hook point per layer
    assert one_hook.parts["cached activations"] == 48 * 8 * 1024 * 1600 * 4
    assert everything.total > 20 * one_hook.parts["cached activations"]


@pytest.fixture(scope="module")
def small():
    return npgpt2.testing.synthetic_model(n_layer=2, n_head=4, n_embd=64, n_ctx=64, seed=1)


def test_the_cache_estimate_is_the_cache_it_keeps(small):
    tokens = np.random.default_rng(0).integers(0, 50257, (3, 40))
    for names_filter in (None, lambda n: n.endswith(("hook_pattern", "mlp.hook_post")), "blocks.1.attn.hook_result"):
        _, cache = small.run_with_cache(tokens, names_filter=names_filter)
        keep = small._computed_anyway if names_filter is None else small.resolve_hook_names(names_filter)
        e = memory.estimate(small, 3, 40, keep=keep)
        assert e.parts["cached activations"] == sum(a.nbytes for a in cache.values())


def test_the_weights_gradients_estimate_is_their_size(small):
    _, grads = small.value_and_grad(np.random.default_rng(0).integers(0, 50257, (1, 10)))
    e = memory.estimate(small, 1, 10, param_grads=True)
    assert e.parts["the weights' gradients"] == sum(a.nbytes for name, a in grads.arrays() if name != "W_U")


def test_sweeps_and_harvests_go_through_the_check(small, monkeypatch):
    tokens = np.random.default_rng(0).integers(0, 50257, (1, 12))
    _, clean_cache = small.run_with_cache(tokens)
    monkeypatch.setattr(memory, "_CHECK_FROM", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)  # a machine with 1 kB to give
    with pytest.raises(memory.NotEnoughMemory, match="1 x 12 tokens"):
        small.run_with_cache(tokens)
    with pytest.raises(memory.NotEnoughMemory):
        patching.get_act_patch_resid_pre(small, tokens, clean_cache, lambda logits: float(logits.sum()))
    with pytest.raises(memory.NotEnoughMemory):
        harvest(np.tile(tokens[0], 4), model=small, hook="blocks.0.mlp.hook_post", ctx=12, progress=False)
    monkeypatch.setattr(memory, "enabled", False)
    small.run_with_cache(tokens)  # the check can be turned off


def test_available_memory_is_read():
    available = memory.available_bytes()
    assert available is not None and 1e8 < available < 1e14
