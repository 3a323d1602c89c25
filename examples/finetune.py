# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tuning GPT-2 in NumPy: a nursery rhyme, AdamW, and the model before and after
#
# npgpt2 trains with the gradients of its hand-written backward pass (`backprop.py` follows one
# through the last block). This lesson fine-tunes a model on a four-line rhyme: it builds the data
# and holds part of it out, takes the first steps of AdamW slowly (the second one redone by hand),
# trains with a warm-up and cosine learning rate, watches the training loss and the held-out
# perplexity, samples before and after, and saves the result in the format transformers reads.
# The same loop, with progress bars, checkpoints and `--resume`, is `npgpt2 finetune` (see the
# documentation's training page, `docs/techniques/training.md`).
#
# It runs on the real gpt2 when it is cached (learning rate 1e-4; 12 steps, since a step of GPT-2
# small, 124M parameters, takes seconds in NumPy on a laptop), and otherwise on a small
# *untrained* GPT-2 (GPT-2's initialisation, 2 layers, d_model 64; learning rate 1e-2). That one
# starts knowing nothing, at a loss of ln(50257) = 10.8 nats per token (a uniform guess over the
# vocabulary), and learns the rhyme by heart in a few seconds.
#
# *Run time: about 50 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small untrained GPT-2 stands in when it is not cached
TRAIN_STEPS = None  # optimizer steps; None: 40 for the small untrained model, 12 for a pretrained one
BATCH_SIZE = 4  # windows per batch
SEQ_LEN = 48  # tokens per window (at most the model's n_ctx)
LR = None  # peak learning rate; None: 1e-4 for a pretrained model, 1e-2 for the untrained one
OUT_DIR = None  # a folder for the fine-tuned model, or None (a temporary folder)
COMPARE_WITH_TRANSFORMERS = True  # load the saved folder with transformers (when installed) and compare logits

# %%
import importlib.util
import tempfile

import numpy as np
from tqdm.auto import tqdm

import npgpt2
from npgpt2 import GPT2Config, OfflineError, plot, training
from npgpt2.display import show
from npgpt2.model import GPT2

TEXT = """Twinkle, twinkle, little star,
How I wonder what you are!
Up above the world so high,
Like a diamond in the sky.
"""
PROMPT = "Twinkle, twinkle, little star,\nHow I"


def load(name):
    """(model, default learning rate, default steps): ``name`` as given (a loaded model), or cached,
    or else a small untrained GPT-2."""
    if isinstance(name, GPT2):
        return name, 1e-4, 12
    try:
        return npgpt2.from_pretrained(name, local_files_only=True), 1e-4, 12
    except OfflineError:
        print(f"({name} is not cached: training a small untrained GPT-2 instead; `npgpt2 download {name}` "
              "fetches the real one)\n")
        return training.new_model(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64), seed=0), 1e-2, 40


def sample(model, n=24):
    """The model's greedy continuation of the prompt (the prompt itself left out)."""
    return model.generate(PROMPT, max_new_tokens=n)[len(PROMPT):]


model, default_lr, default_steps = load(MODEL)
lr = LR if LR is not None else default_lr
n_steps = TRAIN_STEPS if TRAIN_STEPS is not None else default_steps
show(model)

# %% [markdown]
# ## The data
#
# `TokenDataset.from_texts` tokenizes each text with the model's tokenizer and joins them with
# `<|endoftext|>` into one long array of token ids (here 12 copies of the rhyme). `split(0.1)`
# holds out the **last** 10% of those tokens: the model never trains on them, so the loss there
# says whether it learnt something that carries over, rather than the exact windows it saw. (With
# 12 copies of one rhyme the held-out part is the rhyme again, so here "carries over" means
# "learnt the rhyme"; on real text, the held-out loss is what tells learning from memorising.)
#
# A batch is `BATCH_SIZE` windows of `SEQ_LEN` consecutive tokens, starting at random places.
# Batch number i of a seed depends on (seed, i) only, so a run can be repeated or resumed exactly
# from any step (`batches(..., start=i)`), which is how `npgpt2 finetune --resume` ends with the
# same weights as a run never stopped.

# %%
data = training.TokenDataset.from_texts([TEXT] * 12, model.tokenizer)
train, val = data.split(0.1)
seq_len = min(SEQ_LEN, model.cfg.n_ctx, len(train))
print(f"{len(data)} tokens: {len(train)} for training, {len(val)} held out; "
      f"{n_steps} steps of {BATCH_SIZE} x {seq_len} tokens")
first = train.batch(0, BATCH_SIZE, seq_len, seed=0)  # [batch, seq_len] int64
print(f"batch 0: shape {list(first.shape)}; its first window begins {model.to_string(first[0, :8])!r}")
assert np.array_equal(first, next(train.batches(BATCH_SIZE, seq_len, seed=0)))  # the same batch, both ways

# %% [markdown]
# ## Before training: held-out loss, perplexity and a sample
#
# The loss is the mean cross-entropy of the next token, in nats; the **perplexity** is `exp(loss)`,
# the number of equally likely tokens the model is, in effect, choosing between. A uniform guess
# over GPT-2's vocabulary has perplexity 50257. `training.perplexity` slides windows over the
# held-out tokens and scores each token once (transformers' perplexity guide). The sample is
# greedy: the most likely token, each time.

# %%
window = min(seq_len, len(val))
before = training.perplexity(model, val, window=window)
sample_before = sample(model)
print(f"before: held-out loss {before.loss:.3f} nats, perplexity {before.perplexity:.1f} "
      f"({before.n_tokens} tokens scored)")
print(f"  {PROMPT!r} -> {sample_before!r}")

# %% [markdown]
# ## The optimizer and its learning-rate schedule
#
# `AdamW` is torch.optim.AdamW. It takes over the model's weights (writable copies, updated in
# place; the unembedding stays tied to the embedding). For each parameter `p` with gradient `g`, at
# step `t` (from 1):
#
# - the moments: `m = beta1 m + (1 - beta1) g` (a running mean of the gradient) and
#   `v = beta2 v + (1 - beta2) g^2` (of its square);
# - **bias correction**: both start at zero, so early on they are too small by the factors
#   `1 - beta1^t` and `1 - beta2^t`; dividing by them makes the first steps the right size;
# - the step: `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`, about `lr` per
#   parameter whatever the gradient's scale;
# - **decoupled weight decay**: `p *= 1 - lr * weight_decay`, applied to the weights directly
#   rather than added to the gradient (where Adam's division by `sqrt(v)` would make it strong
#   for parameters with small gradients and weak for the others).
#
# **Which parameters decay.** Decay pulls weights towards zero, a prior that a matrix should not
# grow larger than the data asks for. It is applied to the 2-D matrices (embeddings, attention and
# MLP weights: nanoGPT's convention), not to biases and layer-norm gains: a gain's natural value is
# 1, not 0, and decaying it would slowly switch the layer norm off; biases are few and shift rather
# than scale.
#
# **The schedule.** `warmup_cosine(lr, warmup, total)` (transformers'
# `get_cosine_schedule_with_warmup`) starts at 0, climbs linearly to `lr` over the warm-up, while
# Adam's `v` is still a poor estimate, then follows half a cosine down to 0 at the last step, so
# the last steps settle rather than jump around.

# %%
warmup = n_steps // 10
schedule = training.warmup_cosine(lr, warmup=warmup, total=n_steps)
opt = training.AdamW(model, lr=schedule, betas=(0.9, 0.95), weight_decay=0.1)
decayed = sorted(opt.decayed)
kept = [n for n in opt.params if n not in opt.decayed]
n_decayed = sum(opt.params[n].size for n in decayed)
print(f"weight decay on {len(decayed)} matrices ({n_decayed:,} numbers), e.g. {decayed[:3]}")
print(f"no decay on {len(kept)} biases and gains ({model.n_params() - n_decayed:,} numbers), e.g. {kept[:3]}")
print("\nlearning rate by step:", ", ".join(f"{t + 1}: {schedule(t):.2g}"
                                            for t in sorted({0, 1, warmup, n_steps // 2, n_steps - 1})))

# %% [markdown]
# ## One training step, and the second one redone by hand
#
# A step is: the **forward** pass and the loss on a batch, the **backward** pass
# (`value_and_grad` returns the loss and the gradient of every weight, from `npgpt2/backward.py`),
# **clipping** (if the norm of all gradients together is above 1, scale them all down to norm 1:
# one unlucky batch cannot throw the weights far), and the **AdamW update**.
#
# The first step's learning rate is 0 (the warm-up starts there), so it moves nothing; it still
# fills Adam's moments. For the second step we keep the weights and moments before it, redo the
# update by hand with the formulas above for one decayed matrix and one bias, and compare.

# %%
losses = []


def train_step(batch):
    loss, grads = model.value_and_grad(batch)  # forward and backward
    norm = training.clip_grad_norm(grads, 1.0)  # the norm before clipping; grads scaled in place
    used_lr = opt.step(grads)
    losses.append(loss)
    return loss, norm, used_lr, grads


loss, norm, used_lr, _ = train_step(train.batch(0, BATCH_SIZE, seq_len, seed=0))
print(f"step 1: loss {loss:.3f}, gradient norm {norm:.2f} before clipping, learning rate {used_lr}")

names = ["blocks.0.W_in", "ln_final_b"]  # a matrix (decayed) and a bias (not)
old = {n: (opt.params[n].copy(), opt.m[n].copy(), opt.v[n].copy()) for n in names}
loss, norm, used_lr, grads = train_step(train.batch(1, BATCH_SIZE, seq_len, seed=0))
print(f"step 2: loss {loss:.3f}, gradient norm {norm:.2f} before clipping, learning rate {used_lr:.3g}")

(beta1, beta2), t, wd, eps = opt.betas, opt.t, opt.weight_decay, opt.eps
g_by_name = dict(training.named_parameters(grads))  # the clipped gradients
by_hand_errors = {}
for n in names:
    p, m, v = (a.astype(np.float64) for a in old[n])
    g = g_by_name[n].astype(np.float64)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g ** 2
    decay = 1 - used_lr * wd if n in opt.decayed else 1.0
    new = p * decay - used_lr / (1 - beta1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - beta2 ** t) + eps)
    moved = np.abs(opt.params[n] - p).max()
    by_hand_errors[n] = float(np.abs(opt.params[n] - new).max() / moved)
    print(f"{n:<14} decay factor {decay:.6f}; largest change {moved:.2e}; "
          f"by hand vs AdamW: {by_hand_errors[n]:.1e} of it")

# %% [markdown]
# ## Training, and watching the loss
#
# The rest of the run continues with batch 2 of the same seed. The training loss is measured on
# each batch as it comes, before the update; it is noisy because each batch is different. On the
# untrained model it falls from 10.8 towards 0 as the rhyme is memorised; on the real gpt2, which
# knows English and has probably seen this rhyme, it starts low and falls further.

# %%
for step, batch in zip(tqdm(range(3, n_steps + 1), desc="training", unit="step", leave=False),
                       train.batches(BATCH_SIZE, seq_len, seed=0, start=2)):
    loss, norm, used_lr, _ = train_step(batch)
    if step % max(1, n_steps // 10) == 0 or step == n_steps:
        print(f"step {step:>4}  loss {loss:6.3f}  lr {used_lr:.2e}  {'#' * int(round(loss * 4))}")
plot.line(losses, x=np.arange(1, len(losses) + 1), xaxis="step", yaxis="training loss (nats)",
          title=f"{model.name}: fine-tuning on the rhyme");

# %% [markdown]
# ## After: the held-out loss and a sample again
#
# The held-out loss is the test that matters: a training loss can fall because the model learns
# its batches by heart. Here the held-out tokens are the rhyme too, so both fall together, and the
# greedy sample now continues the prompt with the rhyme as written.

# %%
after = training.perplexity(model, val, window=window)
sample_after = sample(model)
print(f"held-out loss {before.loss:.3f} -> {after.loss:.3f} nats; "
      f"perplexity {before.perplexity:.1f} -> {after.perplexity:.2f}")
print(f"before: {PROMPT!r} -> {sample_before!r}")
print(f"after:  {PROMPT!r} -> {sample_after!r}")

# %% [markdown]
# ## Saving, and loading it back (in npgpt2 and in transformers)
#
# `save_pretrained(folder)` writes `config.json`, `model.safetensors` (float32, the hub's layout,
# the tied unembedding not stored twice), `vocab.json` and `merges.txt`, each file written whole
# and renamed into place. `npgpt2.from_pretrained(folder)` reads it back with the same weights,
# and so does `transformers.GPT2LMHeadModel.from_pretrained(folder)`: the fine-tuned model can be
# used anywhere a GPT-2 checkpoint can.

# %%
folder = model.save_pretrained(OUT_DIR or tempfile.mkdtemp(prefix="finetuned-gpt2-"))
tokens = model.to_tokens(PROMPT)
reloaded = npgpt2.from_pretrained(folder)
reload_error = float(np.abs(reloaded(tokens) - model(tokens)).max())
reloaded_sample = sample(reloaded)
print(f"saved to {folder}; npgpt2 reloads it: largest logit difference {reload_error:.1e}, "
      f"sample {'the same' if reloaded_sample == sample_after else 'DIFFERENT'}")

transformers_error = None
if COMPARE_WITH_TRANSFORMERS and importlib.util.find_spec("transformers"):
    import torch
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(tokens)).logits.numpy()
    ours = model(tokens)
    transformers_error = float(np.abs(hf_logits - ours).max() / np.abs(ours).max())
    print(f"transformers loads it: logits agree to {transformers_error:.1e} (relative to the largest)")

results = {"losses": losses, "val_before": before.loss, "val_after": after.loss, "sample_before": sample_before,
           "sample_after": sample_after, "by_hand_errors": by_hand_errors, "reload_error": reload_error,
           "reloaded_sample": reloaded_sample, "transformers_error": transformers_error, "folder": folder}

# %% [markdown]
# ## How this is checked against torch
#
# The step above was redone by hand for two parameters; the tests go further, against an
# independent implementation (`tests/test_reference_training.py`). They take transformers'
# GPT2LMHeadModel (dropout off) and torch.optim.AdamW with the same decay groups, feed both the
# same batches, and run 10 steps of clipping, AdamW and the warm-up + cosine schedule. In float64,
# every step's loss agrees to 4e-16 and every parameter after the 10th step to 1e-11 (relative to
# the tensor's largest value): the forward pass, the hand-written backward pass, the clipping and
# the update are each the same computation as torch's. In float32 the losses agree to 5e-7, while
# the parameters drift further apart, because Adam divides gradients that are zero in exact
# arithmetic (the attention key bias's) by their own rounding noise; that is why float64
# (`from_pretrained(..., dtype="float64")`) is the mode for exact experiments.
#
# **Takeaways.** A training step is a forward pass, a backward pass, a clip and an update; AdamW's
# update is a few lines per parameter, with bias correction for the first steps and weight decay
# kept apart from the gradient, on the matrices only. Watch the held-out loss, not only the
# training loss. The saved folder is an ordinary GPT-2 checkpoint.
