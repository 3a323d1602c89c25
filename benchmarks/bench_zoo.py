"""The zoo's induction model: how long it takes to build here, and one training step against torch.

Measures, in one run:
  * the build of ``npgpt2.zoo.induction`` from its seed (training to the recipe's target, then saving),
    wall time; target <= 120 s on 2 cores;
  * one training step of that model on the recipe's batches (forward, backward, clipping, AdamW),
    npgpt2 against torch: transformers' GPT2LMHeadModel of the same config and weights, the same
    batches and loss weights (the copyable words), ``clip_grad_norm_`` and ``torch.optim.AdamW`` with
    the recipe's settings. The two sides take turns in ``--rounds`` short rounds on the same
    batches (which side goes first alternates), each round after ``common.SETTLE`` seconds of quiet
    (the other side's idle threads spin for a while after its last operation: OpenBLAS's about
    0.1 s) and without its first tenth of steps; a round's ratio is the median step of npgpt2 over
    torch's in that round, and the ratio reported is the median of the rounds' ratios (with their
    quartiles): this machine's speed drifts by up to 2x within minutes, and steps taken a second
    apart see the same speed. Target: npgpt2 / torch <= 1.0.

    python benchmarks/bench_zoo.py [--steps 400] [--rounds 20] [--no-build]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time

import numpy as np

from common import SETTLE, describe_machine
from npgpt2 import training, zoo


def batches(recipe, seed: int, n: int):
    """The recipe's first ``n`` batches: (tokens, metric)."""
    return list(itertools.islice(zoo.training_batches(recipe, seed), n))


def npgpt2_steps(recipe, data):
    model = training.new_model(recipe.config(), seed=0, tokenizer=zoo.induction_tokenizer())
    opt = training.AdamW(model, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    times = []
    for tokens, metric in data:
        t = time.perf_counter()
        _, grads = model.value_and_grad(tokens, metric=metric)
        training.clip_grad_norm(grads, recipe.grad_clip)
        opt.step(grads)
        times.append(time.perf_counter() - t)
    return times


def torch_steps(recipe, data):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = recipe.config()
    model = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                       n_positions=cfg.n_ctx, n_inner=cfg.n_inner, vocab_size=cfg.vocab_size,
                                       bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    times = []
    for tokens, metric in data:
        t = time.perf_counter()
        ids = torch.from_numpy(tokens)
        weights = torch.from_numpy(metric.weights.astype(np.float32))  # [batch, pos - 1], summing to 1
        logits = model(ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none")
        loss = (nll * weights.reshape(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps timed for each (default: 400)")
    parser.add_argument("--rounds", type=int, default=20, help="turns each side takes (default: 20)")
    parser.add_argument("--no-build", action="store_true", help="skip the full build")
    args = parser.parse_args()
    print(describe_machine())
    recipe = zoo.InductionRecipe()
    print(f"recipe: {dataclasses.asdict(recipe)}")

    data = batches(recipe, seed=0, n=args.steps)
    npgpt2_steps(recipe, data[:30])  # warm-up: the first steps of a process allocate and fault in its memory
    # in rounds, each side's steps after the other's, so that a machine whose speed drifts (other
    # work on its host) weighs on both alike; the first steps of a round warm caches and allocator
    try:
        import torch  # noqa: F401
        theirs = []
    except ImportError:
        theirs = None
    ours, ratios = [], []
    per_round = max(2, args.steps // args.rounds)
    skip = max(1, per_round // 10)
    if theirs is not None:
        torch_steps(recipe, data[:30])  # (its warm-up)
    for r in range(args.rounds):
        part = data[(r * per_round) % len(data):][:per_round]
        sides = ["npgpt2", "torch"] if theirs is not None else ["npgpt2"]
        times = {}
        for side in (sides if r % 2 == 0 else sides[::-1]):
            time.sleep(SETTLE)  # the other side's idle threads stop spinning before this side's turn
            times[side] = (npgpt2_steps if side == "npgpt2" else torch_steps)(recipe, part)[skip:]
        ours += times["npgpt2"]
        if theirs is not None:
            theirs += times["torch"]
            ratios.append(float(np.median(times["npgpt2"]) / np.median(times["torch"])))
    ours_ms = 1e3 * float(np.median(ours))
    line = f"training step, {len(ours)} steps in {args.rounds} rounds: npgpt2 median {ours_ms:.1f} ms"
    if theirs:
        theirs_ms = 1e3 * float(np.median(theirs))
        q1, mid, q3 = np.percentile(ratios, [25, 50, 75])
        line += (f", torch {theirs_ms:.1f} ms; npgpt2 / torch, median of the rounds' ratios {mid:.3f}x "
                 f"(quartiles {q1:.3f}-{q3:.3f}; target <= 1.0)")
    print(line, flush=True)

    if not args.no_build:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            folder = zoo.build_induction(out, seed=0, progress=False)
            seconds = time.perf_counter() - t
            record = zoo.json.load(open(zoo.os.path.join(folder, "training.json")))
        print(f"build of the induction model (seed 0): {seconds:.1f} s for {record['steps']} steps, copyable "
              f"words' loss {record['final_copy_loss']:.4f}, weights sha256 {record['weights_sha256'][:16]} "
              f"(target <= 120 s)")


if __name__ == "__main__":
    main()
