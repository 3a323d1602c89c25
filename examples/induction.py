"""Induction heads and previous-token heads, found on repeated random tokens.

A sequence of random tokens, then the same sequence again. The first copy cannot be predicted; the
second can, by a two-head circuit: a previous-token head writes "the token before me was A" at each
position, and an induction head at a later position holding A looks for where that was written and
copies the token that followed. This script measures the loss on each copy, scores every head as
an induction head and as a previous-token head, and draws the best of each.

Runs on the real gpt2 when it is cached (induction heads 5.1, 5.5, 6.9, 7.2, 7.10 ...; previous-
token head 4.11), else on a small random model.

    python examples/induction.py [--model gpt2] [--seq-len 50] [--out-dir induction-output]
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from npgpt2.analysis.head_detector import detect_head, induction_scores, repeated_tokens
from npgpt2.testing import pretrained_or_synthetic



def main(model=None, seq_len: int = 50, out_dir: str | None = None) -> dict:
    model = model if model is not None else pretrained_or_synthetic()
    seq_len = min(seq_len, (model.cfg.n_ctx - 1) // 2)

    scores, loss = induction_scores(model, seq_len=seq_len, n_repeats=2, batch=4, seed=0)
    by_copy = loss.groupby("copy")["loss"].mean()
    print(f"loss per token on {seq_len} random tokens, then the same again:")
    print(f"  first copy {by_copy[0]:.3f} nats, repeat {by_copy[1]:.3f} nats")

    tokens = repeated_tokens(model, seq_len, 2, batch=1, seed=1)
    prev = detect_head(model, tokens, "previous_token_head")
    induct = detect_head(model, tokens, "induction_head")
    heads = pd.DataFrame([{"head": f"L{l}H{h}", "layer": l, "head_index": h, "induction_score": scores[l, h],
                           "induction_detector": induct[l, h], "previous_token_detector": prev[l, h]}
                          for l in range(model.cfg.n_layer) for h in range(model.cfg.n_head)])
    pd.set_option("display.width", 200)
    print("\ntop induction heads (mean attention to the token after the previous occurrence):")
    print(heads.sort_values("induction_score", ascending=False).head(5).round(3).to_string(index=False))
    print("\ntop previous-token heads:")
    print(heads.sort_values("previous_token_detector", ascending=False).head(5).round(3).to_string(index=False))

    if out_dir:
        from npgpt2 import plot

        os.makedirs(out_dir, exist_ok=True)
        best = heads.sort_values("induction_score", ascending=False).iloc[0]
        best_prev = heads.sort_values("previous_token_detector", ascending=False).iloc[0]
        short = tokens[:, : 1 + 2 * min(seq_len, 12)]  # a readable stretch
        _, cache = model.run_with_cache(short, names_filter=lambda n: n.endswith("hook_pattern"))
        plot.attention_patterns(cache, model.to_str_tokens(short), [
            (int(best.layer), int(best.head_index)), (int(best_prev.layer), int(best_prev.head_index))],
            path=os.path.join(out_dir, "induction_heads.png"))
        plot.heatmap(scores, [f"layer {l}" for l in range(model.cfg.n_layer)],
                     [f"H{h}" for h in range(model.cfg.n_head)], title="induction score",
                     path=os.path.join(out_dir, "induction_scores.png"))
        print(f"\npictures written to {out_dir}")
    return {"scores": scores, "loss": loss, "heads": heads}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--out-dir")
    args = ap.parse_args()
    main(pretrained_or_synthetic(args.model), args.seq_len, args.out_dir)
