"""Analysis I against TransformerLens itself (``pytest -m reference``; skipped without transformer_lens).

The same synthetic weights are loaded by npgpt2 and by TransformerLens 4 (TransformerBridge over
Hugging Face GPT2LMHeadModel), both without weight processing, and both with fold_ln +
center_writing_weights + center_unembed. Compared on the same tokens: accumulated_resid (with and
without apply_ln), decompose_resid (apply_ln), stack_head_results (apply_ln, with remainder) and
logit_attrs of the head decomposition. Tolerance: 1e-4 absolute in float32.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tl_bridge = pytest.importorskip("transformer_lens.model_bridge")

import npgpt2  # noqa: E402
from npgpt2.testing import random_state_dict, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference
TOL = 1e-4
CFG = npgpt2.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_ctx=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tl-ref"), CFG, random_state_dict(CFG, seed=21))


def as_np(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "fold_ln+center"])
def test_cache_methods_match_transformer_lens(folder, processed):
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    bridge = tl_bridge.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok,
                                                          dtype=torch.float32)
    options = dict(fold_ln=processed, center_writing_weights=processed, center_unembed=processed)
    if processed:
        bridge.enable_compatibility_mode(disable_warnings=True, fold_value_biases=False, **options)
    model = npgpt2.from_pretrained(folder, **options)
    tokens = np.random.default_rng(5).integers(0, CFG.d_vocab, (2, 11))
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(torch.from_numpy(tokens))
    logits, cache = model.run_with_cache(tokens)

    answers, wrong = [17, 29], [31, 47]
    comparisons = {"logits": (logits, tl_logits)}
    for apply_ln in (False, True):
        comparisons[f"accumulated_resid(apply_ln={apply_ln})"] = (
            cache.accumulated_resid(apply_ln=apply_ln, incl_mid=True, return_labels=True),
            tl_cache.accumulated_resid(apply_ln=apply_ln, incl_mid=True, return_labels=True))
    comparisons["decompose_resid(apply_ln=True)"] = (
        cache.decompose_resid(apply_ln=True, return_labels=True), tl_cache.decompose_resid(apply_ln=True, return_labels=True))
    heads = cache.stack_head_results(apply_ln=True, incl_remainder=True, pos_slice=-1, return_labels=True)
    tl_heads = tl_cache.stack_head_results(apply_ln=True, incl_remainder=True, pos_slice=-1, return_labels=True)
    comparisons["stack_head_results(apply_ln=True)"] = (heads, tl_heads)
    raw_heads = cache.stack_head_results(pos_slice=-1)
    tl_raw_heads = tl_cache.stack_head_results(pos_slice=-1)
    comparisons["logit_attrs(heads)"] = (
        cache.logit_attrs(raw_heads, answers, wrong, pos_slice=-1),
        tl_cache.logit_attrs(tl_raw_heads, torch.tensor(answers), torch.tensor(wrong), pos_slice=-1))

    worst = {}
    for name, (ours, theirs) in comparisons.items():
        if isinstance(ours, tuple):  # (stack, labels)
            assert list(ours[1]) == list(theirs[1]), name
            ours, theirs = ours[0], theirs[0]
        theirs = as_np(theirs)
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        worst[name] = float(np.abs(ours - theirs).max())
    print(f"{'processed' if processed else 'unprocessed'}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    failing = {k: v for k, v in worst.items() if not v <= TOL}
    assert not failing, failing


def guide_from_pretrained_options() -> dict:
    """The keyword arguments of the porting guide's first ``npgpt2.from_pretrained`` call."""
    import ast
    import os
    import re

    guide = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "from-transformerlens.md")
    with open(guide, encoding="utf-8") as f:
        call = re.search(r"npgpt2\.from_pretrained\(.*?\)", f.read(), re.S).group(0)
    return {k.arg: ast.literal_eval(k.value) for k in ast.parse(call).body[0].value.keywords}


def test_the_guides_from_pretrained_gives_transformer_lens_processed_activations(folder):
    """The porting guide's loading line gives what TransformerLens's default processing gives:
    values, head outputs and per-head direct logit attribution, not only the logits."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    bridge = tl_bridge.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok,
                                                          dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True)  # from_pretrained's processing
    model = npgpt2.from_pretrained(folder, **guide_from_pretrained_options())
    tokens = np.random.default_rng(6).integers(0, CFG.d_vocab, (2, 9))
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(torch.from_numpy(tokens))
    logits, cache = model.run_with_cache(tokens)
    comparisons = {"logits": (logits, tl_logits)}
    for layer in range(CFG.n_layer):
        for name in ("v", "z"):
            hook = f"blocks.{layer}.attn.hook_{name}"
            comparisons[hook] = (cache[hook], tl_cache[hook])
    comparisons["per-head logit attribution"] = (
        cache.logit_attrs(cache.stack_head_results(pos_slice=-1), [17, 29], [31, 47], pos_slice=-1),
        tl_cache.logit_attrs(tl_cache.stack_head_results(pos_slice=-1), torch.tensor([17, 29]),
                             torch.tensor([31, 47]), pos_slice=-1))
    worst = {name: float(np.abs(ours - as_np(theirs)).max()) for name, (ours, theirs) in comparisons.items()}
    failing = {k: v for k, v in worst.items() if not v <= TOL}
    assert not failing, failing
