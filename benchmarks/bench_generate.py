"""Generation speed of npgpt2 against Hugging Face transformers, in one run.

On randomly initialised gpt2-small-shaped weights, batch 1:
  * 100 greedy new tokens after a 10-token prompt: tokens per second of npgpt2's generate (key/value
    cache) and of transformers' generate(use_cache=True, do_sample=False); target ratio >= 1.0;
  * the cost of one new token after prompts of 10 and 900 tokens (prompt pass excluded), showing
    that it grows with the prefix only through attention;
  * that cost against the time to read every weight matrix once (``common.weight_read_floor``, a
    one-row product with each, measured in the same run): target <= 1.3x after 10 tokens.

    python benchmarks/bench_generate.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import npgpt2
from npgpt2 import KeyValueCache
from common import describe_machine, gpt2_small_folder, median_time, weight_read_floor


def per_token_cost(model, prompt_len, new=20, repeats=3):
    """Median seconds per new token after a prompt of ``prompt_len`` (the prompt pass not counted)."""
    tokens = np.random.default_rng(prompt_len).integers(0, model.cfg.d_vocab, (1, prompt_len))
    costs = []
    for _ in range(repeats):
        kv = KeyValueCache(model.cfg, 1, model.dtype)
        resid = model.forward(tokens, past_kv=kv, stop_at_layer=model.cfg.n_layer)
        nxt = model.unembed(resid[:, -1:])[:, 0].argmax(-1)[:, None]
        t = time.perf_counter()
        for _ in range(new):
            resid = model.forward(nxt, past_kv=kv, stop_at_layer=model.cfg.n_layer)
            nxt = model.unembed(resid)[:, 0].argmax(-1)[:, None]
        costs.append((time.perf_counter() - t) / new)
    return float(np.median(costs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--folder", help="reuse a checkpoint folder (written if missing)")
    args = ap.parse_args(argv)

    print(describe_machine())
    cfg = npgpt2.GPT2Config()
    model = npgpt2.from_pretrained(gpt2_small_folder(args.folder))
    prompt = np.random.default_rng(0).integers(0, cfg.d_vocab, (1, 10))
    n = args.new_tokens

    ours = median_time(lambda: model.generate(prompt, max_new_tokens=n, stop_at_eos=False,
                                         return_type="tokens"), args.repeats)
    print(f"npgpt2 generate: {n} tokens in {ours:.3f} s = {n / ours:.1f} tokens/s")
    try:
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_grad_enabled(False)
        hf = GPT2LMHeadModel.from_pretrained(gpt2_small_folder(args.folder)).eval()
        t_prompt = torch.from_numpy(prompt)

        def hf_generate():
            return hf.generate(t_prompt, attention_mask=torch.ones_like(t_prompt), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=50256)

        theirs = median_time(hf_generate, args.repeats)
        same = np.array_equal(hf_generate()[0].numpy(),
                              model.generate(prompt, max_new_tokens=n, stop_at_eos=False, return_type="tokens")[0])
        print(f"transformers generate: {n} tokens in {theirs:.3f} s = {n / theirs:.1f} tokens/s "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"ratio npgpt2 / transformers tokens per second = {theirs / ours:.2f} (target >= 1.0); "
              f"same tokens: {same}")
    except ImportError:
        print("transformers/torch not installed: no reference (pip install -e '.[reference]')")

    c10, c900 = per_token_cost(model, 10), per_token_cost(model, 900)
    floor = weight_read_floor(model, 2 * args.repeats)
    print(f"cost per new token: {c10 * 1e3:.1f} ms after 10 tokens, {c900 * 1e3:.1f} ms after 900 "
          f"({c900 / c10:.2f}x; only attention reads the longer prefix)")
    print(f"reading every weight matrix once: {floor * 1e3:.1f} ms; per-token cost / that floor = "
          f"{c10 / floor:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
