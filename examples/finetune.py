"""Fine-tuning GPT-2 in NumPy: a nursery rhyme, AdamW, and the model before and after.

Tokenizes a text, holds its last part out, and trains with AdamW (weight decay on the weight
matrices, warm-up then cosine decay of the learning rate, gradient clipping). Prints the loss curve,
the held-out loss and perplexity before and after, and a greedy sample before and after. The same
loop, with checkpoints and ``--resume``, is ``npgpt2 finetune``.

Runs on the real gpt2 when it is cached (learning rate 1e-4), else on a small untrained GPT-2
(GPT-2's initialisation, 2 layers, d_model 64; learning rate 1e-2), which starts knowing nothing
and learns the rhyme by heart.

    python examples/finetune.py [--model gpt2] [--steps 40]
"""

from __future__ import annotations

import argparse

from npgpt2 import GPT2Config, OfflineError, from_pretrained, training

TEXT = """Twinkle, twinkle, little star,
How I wonder what you are!
Up above the world so high,
Like a diamond in the sky.
"""
PROMPT = "Twinkle, twinkle, little star,\nHow I"


def sample(model, n: int = 24) -> str:
    return model.generate(PROMPT, max_new_tokens=n)[len(PROMPT):]


def load(name: str = "gpt2"):
    """(model, learning rate): the cached ``name``, else a small untrained GPT-2."""
    try:
        return from_pretrained(name, local_files_only=True), 1e-4
    except OfflineError:
        print(f"({name} is not cached: training a small untrained GPT-2 instead; `npgpt2 download {name}` "
              "fetches the real one)\n")
        return training.new_model(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64), seed=0), 1e-2


def main(model=None, steps: int = 40, batch_size: int = 4, seq_len: int = 48, lr: float | None = None) -> dict:
    if model is None:
        model, default_lr = load()
        lr = lr if lr is not None else default_lr
    lr = lr if lr is not None else 1e-4
    data = training.TokenDataset.from_texts([TEXT] * 12, model.tokenizer)  # 12 copies, <|endoftext|> between
    train, val = data.split(0.1)
    seq_len = min(seq_len, model.cfg.n_ctx, len(train))
    print(f"{model.name}: {len(train)} training tokens, {len(val)} held out; {steps} steps of "
          f"{batch_size} x {seq_len} tokens")

    before = training.perplexity(model, val, window=min(seq_len, len(val)))
    sample_before = sample(model)
    print(f"\nbefore: held-out loss {before.loss:.3f}, perplexity {before.perplexity:.1f}")
    print(f"  {PROMPT!r} -> {sample_before!r}")

    opt = training.AdamW(model, lr=training.warmup_cosine(lr, warmup=steps // 10, total=steps),
                         betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    print("\nstep   loss")
    for step, batch in zip(range(1, steps + 1), train.batches(batch_size, seq_len, seed=0)):
        loss, grads = model.value_and_grad(batch)
        training.clip_grad_norm(grads, 1.0)
        opt.step(grads)
        losses.append(loss)
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            print(f"{step:>4}  {loss:6.3f}  {'#' * int(round(loss * 4))}")

    after = training.perplexity(model, val, window=min(seq_len, len(val)))
    sample_after = sample(model)
    print(f"\nafter: held-out loss {after.loss:.3f}, perplexity {after.perplexity:.1f}")
    print(f"  {PROMPT!r} -> {sample_after!r}")
    return {"losses": losses, "val_before": before.loss, "val_after": after.loss,
            "sample_before": sample_before, "sample_after": sample_after}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    model, lr = load(args.model)
    main(model, steps=args.steps, lr=lr)
