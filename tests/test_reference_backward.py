"""The backward pass against torch autograd (``pytest -m reference``; needs the reference extra).

gpt2-small-shaped random weights, a batch of two prompts with right padding. Parameter gradients
are compared with transformers' GPT2LMHeadModel (eager attention, eval mode: no dropout) after
``loss.backward()``. Activation gradients need tensors transformers does not expose, so they come
from GPT-2 written again in torch (``npgpt2.torch_gpt2``), each activation kept with
``retain_grad`` under its hook name; that torch model is first checked against transformers
(logits and every parameter gradient). Tolerance: float64 1e-9, float32 1e-4, each relative to the
largest magnitude of the tensor compared.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import npgpt2  # noqa: E402
from npgpt2 import metrics  # noqa: E402
from npgpt2.testing import random_state_dict, write_checkpoint  # noqa: E402
from npgpt2.torch_gpt2 import torch_gpt2  # noqa: E402

pytestmark = pytest.mark.reference
TOL = {"float32": 1e-4, "float64": 1e-9}
TEXTS = ["When John and Mary went to the shops, John gave the bag to", "The Eiffel Tower is in"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = npgpt2.GPT2Config()  # gpt2-small: 12 layers, 12 heads, d_model 768
    return write_checkpoint(tmp_path_factory.mktemp("gpt2-grad"), cfg, random_state_dict(cfg, seed=21))


def _torch_loss(logits, tokens, mask):
    labels = torch.where(mask > 0, tokens, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _logit_diff(logits, last=None):
    """" Mary" - " John" at each row's last real token."""
    last = torch.full((logits.shape[0],), logits.shape[1] - 1) if last is None else torch.as_tensor(last)
    rows = torch.arange(logits.shape[0])
    return (logits[rows, last, 5335] - logits[rows, last, 1757]).mean()


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("metric_name", ["loss", "logit_diff"])
def test_gradients_equal_torch_autograd(folder, dtype, metric_name):
    tdtype = getattr(torch, dtype)
    model = npgpt2.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    tokens, mask = model.to_tokens(TEXTS, return_mask=True)
    assert not mask.all()  # there is padding
    t_tokens, t_mask = torch.from_numpy(tokens), torch.from_numpy(mask)

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=tdtype).eval()
    hf_logits = hf(t_tokens, attention_mask=t_mask).logits
    last = mask.sum(1) - 1  # each prompt's last real token
    hf_value = _torch_loss(hf_logits, t_tokens, t_mask) if metric_name == "loss" else _logit_diff(hf_logits, last)
    hf_value.backward()
    hf_grads = {k[len("transformer."):] if k.startswith("transformer.") else k: v.grad.numpy()
                for k, v in hf.named_parameters()}

    params = {k: v.detach().clone().requires_grad_(True) for k, v in hf.transformer.state_dict().items()
              if k.split(".")[-2:] not in (["attn", "bias"], ["attn", "masked_bias"])}
    acts = {}
    logits = torch_gpt2(params, t_tokens, model.cfg.n_head, model.cfg.eps, acts)
    value = _torch_loss(logits, t_tokens, t_mask) if metric_name == "loss" else _logit_diff(logits, last)
    value.backward()
    # the torch model is GPT-2: its logits (at the real tokens: transformers treats padded queries
    # differently, which no loss sees) and parameter gradients are transformers'
    real = mask > 0
    difference = _rel(logits.detach().numpy()[real], hf_logits.detach().numpy()[real])
    assert difference <= TOL[dtype], difference
    for key, grad in hf_grads.items():
        assert _rel(params[key].grad.numpy(), grad) <= TOL[dtype] * 10, key

    metric = metrics.loss(tokens, mask) if metric_name == "loss" else metrics.logit_diff(" Mary", " John", pos=last)
    ours, cache = model.run_with_cache(tokens, attention_mask=mask, metric=metric, incl_bwd=True)
    # a logit difference is a small difference of large logits: its error scales with the logits
    scale = max(abs(float(value)), float(np.abs(hf_logits.detach().numpy()[real]).max()))
    assert abs(ours - float(value)) <= TOL[dtype] * scale, (ours, float(value))
    _, grads = model.value_and_grad(tokens, metric=metric, attention_mask=mask)

    worst = {}
    for name, t in acts.items():
        worst[name] = _rel(cache[name + "_grad"], t.grad.numpy())
    for key, grad in hf_grads.items():  # every parameter against transformers' own
        worst[key] = _rel(_ours(grads, key), grad)
    top = max(worst, key=worst.get)
    print(f"\n{dtype} {metric_name}: {len(worst)} gradients, largest relative difference {worst[top]:.2e} ({top})")
    failing = {k: v for k, v in worst.items() if not v <= TOL[dtype]}
    assert not failing, failing


def _ours(grads, key):
    """transformers' parameter name -> npgpt2's gradient of it."""
    top = {"wte.weight": "W_E", "wpe.weight": "W_pos", "ln_f.weight": "ln_final_w", "ln_f.bias": "ln_final_b",
           "lm_head.weight": "W_E"}
    if key in top:
        return getattr(grads, top[key])
    from npgpt2.weights import _BLOCK_KEYS

    _, l, rest = key.split(".", 2)
    return getattr(grads.blocks[int(l)], _BLOCK_KEYS[rest][0])


def test_a_zeroing_backward_hook_equals_torch_with_the_same_cut(folder):
    model = npgpt2.from_pretrained(folder, dtype="float64")
    tokens = model.to_tokens(TEXTS[0])
    t_tokens = torch.from_numpy(tokens)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in hf.transformer.state_dict().items()
              if k.split(".")[-2:] not in (["attn", "bias"], ["attn", "masked_bias"])}
    logits = torch_gpt2(params, t_tokens, model.cfg.n_head, model.cfg.eps, {}, cut="blocks.5.hook_resid_mid")
    _logit_diff(logits).backward()

    zero = [("blocks.5.hook_resid_mid", lambda grad, hook: grad * 0)]
    with model.hooks(bwd_hooks=zero):
        _, grads = model.value_and_grad(tokens, metric=metrics.logit_diff(" Mary", " John"))
    worst = {key: _rel(_ours(grads, key), p.grad.numpy()) for key, p in params.items()}
    assert not {k: v for k, v in worst.items() if not v <= 1e-9}, worst
    assert np.abs(grads.blocks[3].W_in).max() == 0 and np.abs(grads.blocks[7].W_in).max() > 0


@pytest.fixture(scope="module")
def realistic_folder(tmp_path_factory):
    from npgpt2.testing import realistic_state_dict

    cfg = npgpt2.GPT2Config()  # gpt2-small's shape, with real GPT-2's extremes (outliers, a huge position 0)
    return write_checkpoint(tmp_path_factory.mktemp("gpt2-realistic-grad"), cfg, realistic_state_dict(cfg, seed=0))


def test_parameter_gradients_at_real_magnitudes_are_as_accurate_as_torch(realistic_folder):
    """At real GPT-2's magnitudes float32 rounding grows for torch and npgpt2 alike: both are measured
    against torch in float64. npgpt2's float64 gradients stay within 1e-9 of it; its float32 ones
    within twice torch's own float32 error (each relative to the tensor's largest magnitude)."""
    tokens = npgpt2.from_pretrained(realistic_folder).to_tokens(TEXTS[1])

    def torch_grads(dtype):
        hf = transformers.GPT2LMHeadModel.from_pretrained(realistic_folder, attn_implementation="eager",
                                                          dtype=getattr(torch, dtype)).eval()
        t = torch.from_numpy(tokens)
        _torch_loss(hf(t).logits, t, torch.ones_like(t)).backward()
        return {k[len("transformer."):] if k.startswith("transformer.") else k: v.grad.numpy().astype(np.float64)
                for k, v in hf.named_parameters()}

    reference, torch32 = torch_grads("float64"), torch_grads("float32")
    errors = {}
    for dtype in ("float64", "float32"):
        _, grads = npgpt2.from_pretrained(realistic_folder, dtype=dtype).value_and_grad(tokens)
        errors[dtype] = max(_rel(_ours(grads, k), g) for k, g in reference.items())
    errors["torch float32"] = max(_rel(torch32[k], g) for k, g in reference.items())
    print("\nlargest relative gradient error against torch float64: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors["float64"] <= 1e-9, errors
    assert errors["float32"] <= 2 * errors["torch float32"], errors
