"""Published facts of the real GPT-2 small, checked only when its files are already in the user's
Hugging Face cache (never downloaded: the test is skipped otherwise)."""

import numpy as np
import pytest

import npgpt2
from conftest import REAL_HF_HUB_CACHE


@pytest.fixture(scope="module")
def gpt2():
    try:
        return npgpt2.from_pretrained("gpt2", cache_dir=REAL_HF_HUB_CACHE, local_files_only=True)
    except npgpt2.OfflineError:
        pytest.skip(f"real gpt2 is not in the local Hugging Face cache ({REAL_HF_HUB_CACHE})")


def test_greedy_continuation_of_the_dog(gpt2):
    tokens = [464, 3290]
    while len(tokens) < 20:
        tokens.append(int(gpt2(np.array([tokens]))[0, -1].argmax()))
    assert tokens == [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688,
                      27262, 13, 198, 198, 464, 3290]


def test_logits_of_hello_my_dog_is_cute(gpt2):
    tokens = gpt2.to_tokens("Hello, my dog is cute")
    assert tokens[0].tolist() == [15496, 11, 616, 3290, 318, 13779]
    logits = gpt2(tokens)
    expected = [[-114.5832, -116.5725, -116.0830], [-89.8644, -93.1977, -94.4351],
                [-88.3380, -92.8703, -94.4454]]
    np.testing.assert_allclose(logits[0, 1:4, 1:4], expected, atol=1e-3)


def test_loss_of_hello_world(gpt2):
    assert gpt2.loss(gpt2.to_tokens("Hello world!", prepend_bos=True)) == pytest.approx(5.331855773925781, abs=1e-4)
