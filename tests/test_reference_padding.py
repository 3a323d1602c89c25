"""Left padding against transformers (``pytest -m reference``; needs the reference extra).

The same synthetic weights in both; a left-padded batch of three prompts. transformers is given the
attention mask and ``position_ids = cumsum(mask) - 1`` (padding at 1), as its own generate does.
Compared at the real tokens: the logits, then every parameter gradient of the mean next-token loss
over the real predictions (a prediction counts when both the token predicting and the token
predicted are real), and of a logit difference at the last position. Tolerance: float64 1e-10,
float32 1e-4, relative to the largest magnitude of the tensor compared. Then greedy generation of
the batch equals transformers' ``generate`` with the same left padding, token for token.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import npgpt2  # noqa: E402
from npgpt2 import metrics  # noqa: E402
from npgpt2.testing import random_state_dict, write_checkpoint  # noqa: E402
from test_reference_backward import _ours  # noqa: E402  (transformers' parameter name -> our gradient)

pytestmark = pytest.mark.reference
TOL = {"float32": 1e-4, "float64": 1e-10}
TEXTS = ["When John and Mary went to the shops, John gave the bag to", "The Eiffel Tower is in", "Hello"]
CFG = npgpt2.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_ctx=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("pad-ref"), CFG, random_state_dict(CFG, seed=13))


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _hf_positions(mask):
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("metric_name", ["loss", "logit_diff"])
@pytest.mark.parametrize("impl", ["blockwise", "eager"])
def test_left_padding_equals_transformers(folder, dtype, metric_name, impl):
    model = npgpt2.from_pretrained(folder, dtype=dtype, attn_implementation=impl)
    tokens, mask = model.to_tokens(TEXTS, padding_side="left", return_mask=True)
    assert not mask.all() and mask[:, -1].all()
    t_tokens, t_mask = torch.from_numpy(tokens), torch.from_numpy(mask)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager",
                                                      dtype=getattr(torch, dtype)).eval()
    hf_logits = hf(t_tokens, attention_mask=t_mask, position_ids=_hf_positions(t_mask)).logits
    if metric_name == "loss":  # the real predictions only
        both = (t_mask[:, 1:] > 0) & (t_mask[:, :-1] > 0)
        labels = torch.where(both, t_tokens[:, 1:], -100)
        hf_value = torch.nn.functional.cross_entropy(hf_logits[:, :-1].reshape(-1, hf_logits.shape[-1]),
                                                     labels.reshape(-1))
        metric = metrics.loss(tokens, mask)
    else:
        hf_value = (hf_logits[:, -1, 5335] - hf_logits[:, -1, 1757]).mean()
        metric = metrics.logit_diff(" Mary", " John")
    hf_value.backward()
    hf_grads = {k[len("transformer."):] if k.startswith("transformer.") else k: v.grad.numpy()
                for k, v in hf.named_parameters()}

    logits = model(tokens, attention_mask=mask)
    real = mask > 0
    assert _rel(logits[real], hf_logits.detach().numpy()[real]) <= TOL[dtype]
    value, grads = model.value_and_grad(tokens, metric=metric, attention_mask=mask)
    assert value == pytest.approx(float(hf_value.detach()), rel=TOL[dtype])
    worst = {key: _rel(_ours(grads, key), grad) for key, grad in hf_grads.items()}
    top = max(worst, key=worst.get)
    print(f"\n{dtype} {impl} {metric_name}: logits {_rel(logits[real], hf_logits.detach().numpy()[real]):.1e}, "
          f"{len(worst)} gradients, largest relative difference {worst[top]:.2e} ({top})")
    assert not {k: v for k, v in worst.items() if not v <= TOL[dtype]}, worst


def test_batched_greedy_generation_equals_transformers(folder):
    model = npgpt2.from_pretrained(folder, dtype="float64")
    tokens, mask = model.to_tokens(TEXTS, padding_side="left", return_mask=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask), max_new_tokens=12,
                          do_sample=False, pad_token_id=50256, eos_token_id=None).numpy()
    ours = model.generate(TEXTS, max_new_tokens=12, stop_at_eos=False, return_type="tokens")
    np.testing.assert_array_equal(ours, ref)


def test_generation_equals_transformer_lens_prompt_by_prompt(folder):
    """TransformerLens 4's generate, greedy, prepend_bos=False (npgpt2's default), prompt by prompt:
    the same tokens and the same text; and npgpt2's batch of the three gives each of them.

    TransformerLens is not asked for the batch itself, nor for its key/value-cached loop: on the
    installed versions (transformer_lens 4.3, transformers 5.24) its cached loop passes
    ``past_key_values``, which transformers no longer reads, and its batched loop treats some of
    the left padding as real tokens; neither gives a prompt what it gives alone."""
    tl_bridge = pytest.importorskip("transformer_lens.model_bridge")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    bridge = tl_bridge.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, dtype=torch.float32)
    model = npgpt2.from_pretrained(folder)
    options = dict(max_new_tokens=8, stop_at_eos=False)
    ours = model.generate(TEXTS, return_type="tokens", **options)
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            tl_ids = bridge.generate(text, do_sample=False, prepend_bos=False, return_type="tokens", verbose=False,
                                     use_past_kv_cache=False, **options).numpy()[0]
            tl_text = bridge.generate(text, do_sample=False, prepend_bos=False, verbose=False,
                                      use_past_kv_cache=False, **options)
        np.testing.assert_array_equal(model.generate(text, return_type="tokens", **options), tl_ids)
        assert model.generate(text, **options) == tl_text
        np.testing.assert_array_equal(ours[i, -len(tl_ids):], tl_ids)
