"""Live parity with Hugging Face transformers (``pytest -m reference``; needs the reference extra).

Randomly initialised models of gpt2 and gpt2-medium shape, written in the hub's layout, run by
transformers' GPT2LMHeadModel (eager attention) and by npgpt2 on the same tokens, in float32 and
float64. Compared: logits, every hidden state, every attention pattern.
Tolerances: float32 within 1e-4 absolute, float64 within 1e-9.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import npgpt2  # noqa: E402
from npgpt2.config import KNOWN_SIZES  # noqa: E402
from npgpt2.testing import random_state_dict, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference
TOL = {"float32": 1e-4, "float64": 1e-9}


@pytest.fixture(scope="module", params=["gpt2", "gpt2-medium"])
def checkpoint(request, tmp_path_factory):
    n_layer, n_head, n_embd = KNOWN_SIZES[request.param]
    cfg = npgpt2.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), cfg, random_state_dict(cfg, seed=11))
    return request.param, folder


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_hidden_states_and_patterns(checkpoint, dtype):
    name, folder = checkpoint
    tol = TOL[dtype]
    hf = transformers.GPT2LMHeadModel.from_pretrained(
        folder, attn_implementation="eager", dtype=getattr(torch, dtype)).eval()
    model = npgpt2.from_pretrained(folder, dtype=dtype)
    tokens = np.random.default_rng(3).integers(0, model.cfg.d_vocab, (2, 33))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens), output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(tokens)

    ref_logits = ref.logits.numpy()
    spread = (ref_logits.max(-1) - ref_logits.min(-1)).min()
    assert spread >= 10, f"weights too small to test: logits spread over only {spread:.1f}"
    worst = {"logits": np.abs(logits - ref_logits).max()}
    for l in range(model.cfg.n_layer):
        worst[f"resid_pre {l}"] = np.abs(cache["resid_pre", l] - ref.hidden_states[l].numpy()).max()
        worst[f"pattern {l}"] = np.abs(cache["pattern", l] - ref.attentions[l].numpy()).max()
    final = cache["ln_final.hook_normalized"] * model.weights.ln_final_w + model.weights.ln_final_b
    worst["ln_final out"] = np.abs(final - ref.hidden_states[-1].numpy()).max()
    print(f"{name} {dtype}: largest difference {max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    failing = {k: v for k, v in worst.items() if not v <= tol}
    assert not failing, f"over {tol}: {failing}"


def test_tokenizer_agrees_with_transformers_on_varied_text(tmp_path):
    import shutil

    from npgpt2.tokenizer import Tokenizer, bundled_files

    for path in bundled_files():  # vocab.json, merges.txt: as a hub repository holds them
        shutil.copy(path, tmp_path)
    hf = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    assert hf.encode("hello world") == [31373, 995]
    ours = Tokenizer()
    rng = np.random.default_rng(0)
    pieces = ["Hello", " world", "!", "  ", "\n", "\t", "it's", " we'll", "I'd", " they're", "12345",
              " 3.14159", "naïve", " café", "東京", "🙂", "Ünïcödé", "---", "   spaces   ", "<|endoftext|>",
              " don't", "CAPS", " mixedCase", "\r\n", "$100", " e-mail@example.com", "😀😀", "ß", "\u200b"]
    texts = ["".join(rng.choice(pieces, size=rng.integers(1, 12))) for _ in range(300)]
    texts += ["", " ", "a" * 200, "The quick brown fox jumps over the lazy dog."]
    for t in texts:
        assert ours.encode(t) == hf.encode(t), repr(t)
