"""The exact patching sweeps against TransformerLens 4's own (``pytest -m reference``; skipped
without transformer_lens): the same synthetic weights, the same prompts and metric, float32
within 1e-4. TransformerLens runs one full forward pass per index; npgpt2 batches them (see
tests/test_patching_batched.py for the float64 comparison with one run at a time)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tl_bridge = pytest.importorskip("transformer_lens.model_bridge")
tl_patching = pytest.importorskip("transformer_lens.patching")

import npgpt2  # noqa: E402
from npgpt2.analysis import patching  # noqa: E402
from test_reference_transformer_lens import CFG, TOL, folder  # noqa: E402,F401  (the same weights: a fixture)

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def both(folder):
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    bridge = tl_bridge.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, dtype=torch.float32)
    model = npgpt2.from_pretrained(folder)
    rng = np.random.default_rng(8)
    clean = rng.integers(0, CFG.d_vocab, (2, 7))
    corrupted = clean.copy()
    corrupted[:, 3] = (clean[:, 3] + 5) % CFG.d_vocab
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(torch.from_numpy(clean))
    _, cache = model.run_with_cache(clean)
    answers, wrong = [17, 29], [31, 47]

    def tl_metric(logits):
        return (logits[[0, 1], -1, answers] - logits[[0, 1], -1, wrong]).mean()

    return (model, corrupted, cache, patching.logit_diff_metric(answers, wrong),
            bridge, torch.from_numpy(corrupted), tl_cache, tl_metric)


@pytest.mark.parametrize("sweep", ["resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos",
                                   "attn_head_pattern_all_pos", "attn_head_by_pos_every", "block_every"])
def test_sweep_matches_transformer_lens(both, sweep):
    model, corrupted, cache, metric, bridge, tl_corrupted, tl_cache, tl_metric = both
    ours = getattr(patching, f"get_act_patch_{sweep}")(model, corrupted, cache, metric, progress=False)
    with torch.no_grad():
        theirs = getattr(tl_patching, f"get_act_patch_{sweep}")(bridge, tl_corrupted, tl_cache, tl_metric).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
