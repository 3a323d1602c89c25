"""``realistic_state_dict`` has real GPT-2's extremes, measured on the loaded model.

Measured twice: on the committed checkpoint the stored-reference tests use (tests/reference/
realistic-gpt2, width 64) and on a fresh one at gpt2-small's width (768, 12 heads), as the live
reference suite builds it. If a change to the weights loses one of them, this says which.
"""

import json
import os

import numpy as np
import pytest

import npgpt2
from npgpt2.testing import (FLOAT32_EXP_OVERFLOW, GPT2_SMALL_POS0_NORM, outlier_dims, random_state_dict,
                            realistic_state_dict, realistic_statistics, write_checkpoint)
from conftest import REFERENCE_DIR

SMALL_WIDTH = npgpt2.GPT2Config(n_layer=3, n_head=12, n_embd=768, n_ctx=256, vocab_size=8192)


def committed():
    folder = os.path.join(REFERENCE_DIR, "realistic-gpt2")
    with open(os.path.join(REFERENCE_DIR, "realistic_gpt2_reference.json")) as f:
        seed = json.load(f)["weights_seed"]
    tokens = np.load(os.path.join(REFERENCE_DIR, "realistic_gpt2_reference.npz"))["tokens"]
    return npgpt2.from_pretrained(folder), seed, tokens


def fresh_small_width(tmp_path):
    folder = write_checkpoint(tmp_path / "realistic", SMALL_WIDTH, realistic_state_dict(SMALL_WIDTH, seed=0),
                              tokenizer_files=False)
    tokens = np.random.default_rng(0).integers(0, SMALL_WIDTH.vocab_size, (2, 160))
    return npgpt2.from_pretrained(folder), 0, tokens


@pytest.fixture(scope="module", params=["committed width 64", "gpt2-small width"])
def measured(request, tmp_path_factory):
    if request.param == "committed width 64":
        model, seed, tokens = committed()
    else:
        model, seed, tokens = fresh_small_width(tmp_path_factory.mktemp("realistic"))
    stats = realistic_statistics(model, tokens)
    print(request.param, stats)
    return model.cfg, seed, stats


def test_position_0_residual_is_huge(measured):
    cfg, _, s = measured
    target = GPT2_SMALL_POS0_NORM * np.sqrt(cfg.d_model / 768)
    assert 0.8 * target < s["pos0_resid_norm"] < 1.3 * target, \
        f"position 0's residual norm {s['pos0_resid_norm']:.0f}; expected about {target:.0f}"
    assert s["pos0_resid_norm"] > 15 * s["other_resid_norm"], \
        f"position 0 {s['pos0_resid_norm']:.0f} against {s['other_resid_norm']:.1f} elsewhere"


def test_three_outlier_dimensions(measured):
    cfg, seed, s = measured
    assert s["outlier_dims"] == outlier_dims(cfg, seed).tolist()
    assert s["outlier_ratio"] > 10, f"outlier dimensions only {s['outlier_ratio']:.1f}x the others"


def test_attention_sinks_on_position_0(measured):
    _, _, s = measured
    assert s["attention_to_first"] > 0.6, f"mean attention on position 0 is {s['attention_to_first']:.2f}"
    assert s["sink_head_fraction"] >= 0.6, f"only {s['sink_head_fraction']:.0%} of heads are sinks"
    # as in real GPT-2, after the first layer most heads put most of their attention on position 0
    assert s["sink_heads_after_layer_0"] >= 0.6, \
        f"only {s['sink_heads_after_layer_0']:.0%} of the heads after layer 0 are sinks"
    # what makes float32 softmax need its max shift
    assert s["max_score_to_first"] > FLOAT32_EXP_OVERFLOW, \
        f"largest score on position 0 is {s['max_score_to_first']:.1f}, below exp's float32 overflow"


def test_logits_near_minus_100(measured):
    _, _, s = measured
    assert -110 < s["mean_logit"] < -90, f"mean logit {s['mean_logit']:.1f}"
    assert s["min_logit_spread"] > 8, f"a position's logits spread over only {s['min_logit_spread']:.1f}"


def test_plain_random_weights_lack_them(tmp_path):
    """The statistics separate the two builders: random_state_dict has none of the extremes."""
    cfg = npgpt2.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=256, vocab_size=512)
    model = npgpt2.from_pretrained(write_checkpoint(tmp_path, cfg, random_state_dict(cfg, seed=0),
                                                    tokenizer_files=False))
    s = realistic_statistics(model, np.random.default_rng(0).integers(0, 512, (1, 160)))
    assert s["pos0_resid_norm"] < 3 * s["other_resid_norm"]
    assert s["attention_to_first"] < 0.3 and s["max_score_to_first"] < FLOAT32_EXP_OVERFLOW
    assert abs(s["mean_logit"]) < 10


def test_layouts_and_width_check():
    cfg = npgpt2.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=32, vocab_size=64)
    hub = realistic_state_dict(cfg, seed=1)
    tf = realistic_state_dict(cfg, seed=1, layout="transformers")
    assert set(random_state_dict(cfg)) == set(hub) and "h.0.attn.bias" in hub
    assert set(tf) == {"transformer." + k for k in hub if not k.endswith(".attn.bias")}
    np.testing.assert_array_equal(tf["transformer.wte.weight"], hub["wte.weight"])
    assert all(v.dtype == np.float32 for v in hub.values())
    with pytest.raises(ValueError, match="n_embd >= 16"):
        realistic_state_dict(npgpt2.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_ctx=8, vocab_size=64))
    with pytest.raises(ValueError, match="layout"):
        realistic_state_dict(cfg, layout="torch")
