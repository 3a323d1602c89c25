"""What a position-by-token probability table measures, and the layer-by-layer view.

A common first experiment: run GPT-2 on a prompt, take softmax(logits) at every position j, look up
the probability of every prompt token i, and put it in a table. It is easy to label the columns
"layer_0 .. layer_n" and read them as the model's layers. They are not: every column comes from the
*final* layer, one column per *position* of the same forward pass. This script

1. prints that table with the right labels (``prompt_token_probs``) and says what it measures,
2. prints the per-position table of what the model actually predicts (``next_token_table``),
3. then shows the view that question was reaching for: how the prediction at each position builds
   up through the layers (``logit_lens``), as a table and as a heatmap.

Runs on the real gpt2 if it is in the local Hugging Face cache, otherwise on a small random model
(whose predictions are noise, but whose tables have the same shape and meaning).

    python examples/token_tables.py [--model gpt2] [--out-dir .]
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

import npgpt2
from npgpt2.analysis import logit_lens, next_token_table, prompt_token_probs
from npgpt2.testing import pretrained_or_synthetic

PROMPTS = ["Hello, my dog is cute", "Oh, I love ice cream so much!", "I am not sure what you are saying"]




def main(model: npgpt2.GPT2 | None = None, out_dir: str | None = None) -> dict:
    model = model if model is not None else pretrained_or_synthetic()
    pd.set_option("display.width", 200)
    results = {}
    for prompt in PROMPTS:
        print("=" * 100)
        print(f"prompt: {prompt!r}  tokens: {model.to_str_tokens(prompt)}")

        # 1. The table from the notebook, labelled by what it is. Column j = the model's output
        # distribution after reading tokens 0..j (the final layer, position j); row i = prompt token
        # i. Entry (i, j) = P(next token = token_i | tokens 0..j).
        #  - Row j+1 of column j is the probability of the token that really came next.
        #  - Rows i <= j: probability of repeating a token already seen (copying).
        #  - Rows i > j + 1: probability of a token that the prompt only uses later.
        # Correlating columns with one-hot position indicators measures how each *position's*
        # prediction loads on the prompt's tokens. It measures nothing about *layers*: every column
        # is read at the last layer.
        matrix = prompt_token_probs(model, prompt)
        print("\nP(next = token_i | prefix up to position j)   (rows: token i; columns: position j)")
        print(matrix.round(3).to_string())

        # 2. What the model predicts at each position, and how it rates the real next token.
        table = next_token_table(model, prompt, k=3)
        print("\nper position: the real next token's probability and rank, the entropy, the top 3")
        print(table[["position", "token", "next_token", "next_prob", "next_rank", "entropy",
                     "top1", "top1_prob", "top2", "top3"]].round(4).to_string(index=False))

        # 3. The layer-by-layer view: the residual stream after each block, read through the final
        # layer norm and the unembedding (the logit lens). Its last row is the model's own output.
        lens = logit_lens(model, prompt)
        grid = lens.pivot(index="layer", columns="position", values="next_prob")
        print("\nlogit lens: P(real next token) read off the residual stream after each layer")
        print(grid.round(3).to_string())
        if out_dir:
            from npgpt2.plot import logit_lens_heatmap

            path = os.path.join(out_dir, f"logit_lens_{len(results)}.png")
            logit_lens_heatmap(lens, path=path)
            print(f"heatmap: {path}")
        results[prompt] = {"matrix": matrix, "table": table, "lens": lens}
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--out-dir", help="write a logit-lens heatmap per prompt here (needs matplotlib)")
    args = ap.parse_args()
    main(pretrained_or_synthetic(args.model), args.out_dir)
