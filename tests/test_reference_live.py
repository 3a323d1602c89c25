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


def test_sae_gradients_match_torch_autograd():
    from npgpt2.sae_training import init_sae, sae_loss_and_grads

    rng = np.random.default_rng(0)
    params = init_sae(24, 96, 0, np.float64)
    params["b_enc"] = rng.standard_normal(96) * 0.1
    params["b_dec"] = rng.standard_normal(24) * 0.1
    x = rng.standard_normal((64, 24))
    loss, _, grads = sae_loss_and_grads(params, x, 3e-3)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x)
    f = torch.relu((tx - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    t_loss = ((f @ t["W_dec"] + t["b_dec"] - tx) ** 2).sum(-1).mean() + 3e-3 * f.sum(-1).mean()
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    for k in params:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


def test_toy_model_gradients_match_torch_autograd():
    from npgpt2.toy_models import generate_batch, loss_and_grads

    rng = np.random.default_rng(1)
    W, b = rng.standard_normal((3, 2, 5)), rng.standard_normal((3, 5)) * 0.1
    x = generate_batch(rng, 128, 5, np.array([0.0, 0.5, 0.9]))
    imp = 0.9 ** np.arange(5)
    loss, gW, gb = loss_and_grads(W, b, x, imp)
    tW, tb = torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)
    tx = torch.tensor(x)
    h = torch.einsum("imn,bin->bim", tW, tx)
    out = torch.relu(torch.einsum("imn,bim->bin", tW, h) + tb)
    t_loss = (torch.tensor(imp) * (out - tx) ** 2).sum() / x.shape[0]
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(gW, tW.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_parity_command_passes_on_a_hub_checkpoint(tmp_path):
    """`npgpt2 parity` as a user runs it: both implementations on the same cached files, a table of
    the largest differences, exit code 0."""
    import os
    import subprocess
    import sys

    from npgpt2.testing import add_to_hub_cache

    cfg = npgpt2.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64)
    folder = write_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg, seed=5))
    hf_home = tmp_path / "hf"
    add_to_hub_cache(hf_home / "hub", "npgpt2-test/parity-gpt2", folder)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    for dtype in ("float32", "float64"):
        proc = subprocess.run([sys.executable, "-m", "npgpt2", "parity", "--model", "npgpt2-test/parity-gpt2",
                               "--dtype", dtype], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "attention pattern 1" in proc.stdout and "FAIL" not in proc.stdout
        assert proc.stdout.strip().splitlines()[-1].endswith("passed, 0 failed")


@pytest.mark.parametrize("shape", [(2, 4, 64), (12, 12, 768)], ids=["tiny", "gpt2-small"])
def test_greedy_generation_equals_transformers(tmp_path, shape):
    """50 greedy new tokens, token for token the same as transformers' generate(do_sample=False)."""
    n_layer, n_head, n_embd = shape
    cfg = npgpt2.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=128)
    folder = write_checkpoint(tmp_path / "gen", cfg, random_state_dict(cfg, seed=17))
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    model = npgpt2.from_pretrained(folder)
    prompt = model.to_tokens("Alan Turing theorized that computers would one day become")
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                          max_new_tokens=50, min_new_tokens=50, do_sample=False, use_cache=True,
                          pad_token_id=50256)[0].numpy()
    ours = model.generate(prompt[0], max_new_tokens=50, stop_at_eos=False, return_type="tokens")
    assert len(ours) == len(ref) == prompt.shape[1] + 50
    np.testing.assert_array_equal(ours, ref)
