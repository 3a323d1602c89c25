"""Test set-up: no network, a private Hugging Face cache, synthetic checkpoints in the hub's layout.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so they are set here, before
any test module imports npgpt2. The user's real cache location is remembered first, for the one
test that checks the real GPT-2 when (and only when) it is already cached there.
"""

import os
import tempfile

REAL_HF_HUB_CACHE = os.environ.get("HF_HUB_CACHE") or os.path.join(
    os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
_TEST_HF_HOME = tempfile.mkdtemp(prefix="npgpt2-test-hf-home-")
os.environ["HF_HOME"] = _TEST_HF_HOME
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import npgpt2  # noqa: E402
from npgpt2.testing import add_to_hub_cache, random_state_dict, write_checkpoint  # noqa: E402

# Small enough to run in milliseconds, with GPT-2's real vocabulary so text works.
TINY = npgpt2.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64, vocab_size=50257)
REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


@pytest.fixture(scope="session")
def hf_home():
    return _TEST_HF_HOME


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny GPT-2 checkpoint folder in the hub's exact layout."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), TINY, random_state_dict(TINY, seed=0))


@pytest.fixture(scope="session")
def tiny_hub(tiny_dir, hf_home):
    """The tiny checkpoint filed in the (offline) hub cache as 'npgpt2-test/tiny-gpt2'."""
    add_to_hub_cache(os.path.join(hf_home, "hub"), "npgpt2-test/tiny-gpt2", tiny_dir)
    return "npgpt2-test/tiny-gpt2"


@pytest.fixture(scope="session")
def model(tiny_dir):
    return npgpt2.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def model64(tiny_dir):
    return npgpt2.from_pretrained(tiny_dir, dtype="float64")


@pytest.fixture
def tokens():
    return np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 12))
