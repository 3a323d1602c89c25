"""Training against torch (``pytest -m reference``; needs the reference extra).

The same weights and batches in transformers' GPT2LMHeadModel (eval mode: no dropout) and in
npgpt2: 10 steps of AdamW (same hyperparameters, same decay groups: 2-D matrices decayed), global
gradient clipping at 1.0, and a warm-up + cosine learning rate (transformers'
get_cosine_schedule_with_warmup in a LambdaLR). float64: every step's loss and every parameter after
step 10 agree within 1e-9 relative to the tensor's largest magnitude; float32: the losses within
1e-4 relative. Then save_pretrained -> transformers loads it -> the same logits, and the perplexity
of ``npgpt2 eval`` against transformers' loop of its perplexity guide.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import npgpt2  # noqa: E402
from npgpt2 import training  # noqa: E402
from npgpt2.save import hub_state_dict  # noqa: E402
from npgpt2.training.evaluate import sliding_windows  # noqa: E402

pytestmark = pytest.mark.reference

STEPS, BATCH, SEQ = 10, 2, 24
LR, WD, BETAS, EPS, CLIP, WARMUP = 3e-3, 0.1, (0.9, 0.95), 1e-8, 1.0, 3


def batches(n=STEPS):
    data = training.TokenDataset(np.random.default_rng(5).integers(0, 50257, 3000))
    return [data.batch(i, BATCH, SEQ, seed=1) for i in range(n)]


def causal_lm_loss(logits, labels):
    """transformers' ForCausalLMLoss (shift, mean over labels that are not -100) in the logits' own
    dtype: transformers' version casts the logits to float32 first, which would make float64 moot."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def torch_train(folder, dtype, steps):
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.eval()  # no dropout
    params = dict(model.named_parameters())  # the tied lm_head.weight is listed once, as wte
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    sched = transformers.get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
    losses, norms = [], []
    for batch in steps:
        ids = torch.tensor(batch)
        loss = causal_lm_loss(model(ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    state = {k.removeprefix("transformer."): v.detach().numpy() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    return losses, norms, state


def npgpt2_train(folder, dtype, steps):
    model = npgpt2.from_pretrained(folder, dtype=dtype)
    opt = training.AdamW(model, lr=training.warmup_cosine(LR, WARMUP, STEPS), betas=BETAS, eps=EPS, weight_decay=WD)
    losses, norms = [], []
    for batch in steps:
        loss, grads = model.value_and_grad(batch)
        norms.append(training.clip_grad_norm(grads, CLIP))
        opt.step(grads)
        losses.append(loss)
    return losses, norms, hub_state_dict(model.weights, model.cfg.n_layer, dtype=dtype), model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ten_adamw_steps_equal_torch(tiny_dir, dtype):
    steps = batches()
    t_losses, t_norms, t_state = torch_train(tiny_dir, getattr(torch, dtype), steps)
    n_losses, n_norms, n_state, _ = npgpt2_train(tiny_dir, dtype, steps)
    assert min(t_norms) > CLIP  # clipping is active on every step
    loss_err = np.max(np.abs(np.subtract(n_losses, t_losses)) / np.abs(t_losses))
    norm_err = np.max(np.abs(np.subtract(n_norms, t_norms)) / np.abs(t_norms))
    print(f"\n{dtype}: losses {t_losses[0]:.4f} -> {t_losses[-1]:.4f}; max relative error: loss {loss_err:.2e}, "
          f"grad norm {norm_err:.2e}")
    assert t_losses[-1] < t_losses[0] - 0.5  # the steps did train
    if dtype == "float32":
        assert loss_err <= 1e-4
        return
    assert loss_err <= 1e-9 and norm_err <= 1e-9
    assert set(n_state) == {k for k in t_state if not re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k)}
    worst = max((np.max(np.abs(n_state[k] - t_state[k])) / np.max(np.abs(t_state[k])), k) for k in n_state)
    initial = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    moved = hub_state_dict(initial.weights, initial.cfg.n_layer, dtype=np.float64)
    print(f"parameters after {STEPS} steps: worst relative error {worst[0]:.2e} ({worst[1]}); "
          f"largest change {max(np.max(np.abs(n_state[k] - moved[k])) for k in n_state):.3f}")
    assert worst[0] <= 1e-9, worst


def test_save_pretrained_loads_in_transformers_with_the_same_logits(tiny_dir, tmp_path):
    _, _, _, model = npgpt2_train(tiny_dir, "float32", batches(3))  # a trained model, not the file's
    out = model.save_pretrained(tmp_path / "trained")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.dtype == torch.float32
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    tokens = batches(1)[0]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = model(tokens)
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    print(f"\nsave_pretrained -> transformers: logits max relative error {err:.2e}")
    assert err <= 1e-5
    tok = transformers.GPT2Tokenizer.from_pretrained(str(out))  # the saved vocab.json and merges.txt
    assert tok("Hello, world")["input_ids"] == model.tokenizer.encode("Hello, world")


def test_schedule_equals_transformers():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    for min_lr, sched in [(0.0, transformers.get_cosine_schedule_with_warmup(opt, WARMUP, 40)),
                          (LR * 0.1, transformers.get_cosine_with_min_lr_schedule_with_warmup(
                              torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR), WARMUP, 40,
                              min_lr=LR * 0.1))]:
        ours = training.warmup_cosine(LR, WARMUP, 40, min_lr=min_lr)
        for step in range(41):
            assert ours(step) == pytest.approx(sched.get_last_lr()[0], rel=1e-12, abs=1e-15), step
            sched.optimizer.step()
            sched.step()


@pytest.mark.parametrize("stride", [64, 40, 17])
def test_perplexity_equals_transformers_guide(tiny_dir, stride):
    """transformers' perplexity guide, on the same windows: each window's loss (labels -100 before
    the window's new tokens) times the number of labels it scored."""
    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64,
                                                      attn_implementation="eager").eval()
    ids = torch.tensor(np.random.default_rng(9).integers(0, 50257, 200))[None]
    nll_sum, n_scored = 0.0, 0
    for begin, end, trg_len in sliding_windows(ids.shape[1], 64, stride):
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = causal_lm_loss(hf(input_ids).logits, target_ids)
        n = int((target_ids[:, 1:] != -100).sum())  # the labels scored after the shift
        nll_sum += float(loss) * n
        n_scored += n
    ref = nll_sum / n_scored
    ours = training.perplexity(model, ids[0].numpy(), window=64, stride=stride)
    assert ours.n_tokens == n_scored
    assert abs(ours.loss - ref) <= 1e-10 * ref
    assert ours.perplexity == pytest.approx(np.exp(ref), rel=1e-10)
