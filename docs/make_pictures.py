"""Make the pictures of the documentation and the README, from the trained induction model.

    python docs/make_pictures.py                 # writes docs/images/
    python docs/make_pictures.py --model FOLDER  # another checkpoint folder (e.g. one `npgpt2 zoo build` wrote)

The model is ``npgpt2.zoo.induction()``: a 2-layer GPT-2 trained here to copy runs of words recalled
from earlier in its context, with previous-token heads in layer 0 and induction heads in layer 1
(built on first use, then cached). The prompt is such a sequence; the heads drawn are the ones
that score highest as previous-token and induction heads on it, found here, not named by hand.

``pytest -m docs`` runs this script before it builds the site, so the pictures never go stale;
``pictures.json`` lists what was written, from which model and prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "images")
PICTURES = ("induction-heads.png", "head-scores.png", "logit-lens.png", "dla-heads.png", "saliency.png",
            "circuit.png", "attention-layer1.html", "circuit.html")


def head_scores(pattern: np.ndarray, start: int, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Previous-token and induction scores of every head of one layer's pattern [head, q, k]: the
    mean attention to the position before, and, on the repeat (from ``start``), to the position
    just after the same word's earlier occurrence (``period`` back, plus one)."""
    n = pattern.shape[-1]
    q = np.arange(1, n)
    previous = pattern[:, q, q - 1].mean(-1)
    r = np.arange(start, n)
    induction = pattern[:, r, r - period + 1].mean(-1)
    return previous, induction


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=IMAGES, help="folder for the pictures (default: docs/images)")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of npgpt2.zoo.induction()")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import npgpt2
    from npgpt2 import metrics, plot, zoo
    from npgpt2.analysis import direct_logit_attribution, logit_lens, token_saliency
    from npgpt2.analysis.edges import edge_attribution, smallest_circuit

    model = npgpt2.from_pretrained(args.model) if args.model else zoo.induction(progress=False)
    record_path = os.path.join(args.model or "", "training.json")
    if args.model and os.path.exists(record_path):  # a zoo build in a folder of its own: named as the zoo names it
        with open(record_path, encoding="utf-8") as f:
            model.name = f"induction-seed{json.load(f)['seed']}"
    name = model.name
    os.makedirs(args.out, exist_ok=True)
    out = lambda file: os.path.join(args.out, file)  # noqa: E731
    n_words, period, prefix = len(zoo.WORDS), 7, 2
    rng = np.random.default_rng(0)
    tokens = zoo.repeated_batch(rng, batch=1, period=period, prefix=prefix, n_words=n_words, bos=n_words)
    str_tokens = model.to_str_tokens(tokens[0])
    start = 1 + prefix + period  # the repeat's first position
    _, cache = model.run_with_cache(tokens)

    # which heads: the best previous-token head and the best induction head, by their scores
    scores = [head_scores(cache["pattern", l][0], start, period) for l in range(model.cfg.n_layer)]
    previous = np.stack([s[0] for s in scores])  # [layer, head]
    induction = np.stack([s[1] for s in scores])
    prev_head = tuple(int(i) for i in np.unravel_index(previous.argmax(), previous.shape))
    ind_head = tuple(int(i) for i in np.unravel_index(induction.argmax(), induction.shape))
    written = {}

    def keep(file, fig=None):
        if fig is not None:
            plt.close(fig)
        written[file] = os.path.getsize(out(file))

    fig = plot.attention_patterns(cache, str_tokens, [prev_head, ind_head], path=out("induction-heads.png"), model=name)
    keep("induction-heads.png", fig)
    fig = plot.heatmap(induction, [f"L{l}" for l in range(model.cfg.n_layer)], [f"H{h}" for h in range(model.cfg.n_head)],
                       title=f"{name} · induction score by head", xlabel="head", ylabel="layer", vmin=0, vmax=1,
                       annotations=np.vectorize(lambda v: f"{v:.2f}")(induction), path=out("head-scores.png"),
                       clabel="induction score (attention, 0..1)")
    keep("head-scores.png", fig)
    fig = plot.logit_lens_heatmap(logit_lens(model, tokens), path=out("logit-lens.png"), model=name)
    keep("logit-lens.png", fig)

    # the last word repeats the period's last word: the answer is what followed that, the first word
    # of the repeated segment; the wrong answer, a word the prompt never had
    answer = int(tokens[0, start])
    wrong = int(next(w for w in range(n_words) if w not in set(tokens[0].tolist())))
    dla = direct_logit_attribution(model, cache, tokens, answer, wrong, by="head")
    fig = plot.attribution_heatmap(dla, path=out("dla-heads.png"), model=name)
    keep("dla-heads.png", fig)
    answer_text = model.tokenizer.token_str(answer)
    sal = token_saliency(model, tokens[0], metrics.logprob(answer))
    fig = plot.saliency_plot(sal, path=out("saliency.png"), metric=f"log P({answer_text!r})", model=name)
    keep("saliency.png", fig)

    # the circuit: the clean repeat against a corrupted prompt whose first half is other words
    corrupted = tokens.copy()
    others = [w for w in range(n_words) if w not in set(tokens[0].tolist())]
    corrupted[0, 1 + prefix:start] = others[: period]
    metric = metrics.logit_diff(answer, wrong)
    scores = edge_attribution(model, tokens, corrupted, metric, method="eap-ig")
    edges, curve = smallest_circuit(model, tokens, corrupted, scores, metric, progress=False)  # steps of 10 edges, to 0.8
    faithfulness = float(curve["faithfulness"].iloc[-1])
    picture = dict(n_head=model.cfg.n_head, n_layer=model.cfg.n_layer, model=name)
    fig = plot.circuit(edges, path=out("circuit.png"), **picture)
    keep("circuit.png", fig)
    clean_value, corrupted_value = float(metric(model(tokens))), float(metric(model(corrupted)))
    plot.circuit_html(edges, path=out("circuit.html"), faithfulness=faithfulness,
                      prompts={"clean": " ".join(str_tokens), "corrupted": " ".join(model.to_str_tokens(corrupted[0]))},
                      metric=f"logit difference {answer_text!r} - {model.tokenizer.token_str(wrong)!r}: clean "
                             f"{clean_value:.3f}, corrupted {corrupted_value:.3f}", **picture)
    keep("circuit.html")
    plot.attention_html(cache["pattern", 1][0], str_tokens, 1, path=out("attention-layer1.html"), model=name)
    keep("attention-layer1.html")

    record = {"model": name, "prompt": str_tokens, "previous_token_head": f"L{prev_head[0]}H{prev_head[1]}",
              "previous_token_score": round(float(previous.max()), 4), "induction_head": f"L{ind_head[0]}H{ind_head[1]}",
              "induction_score": round(float(induction.max()), 4), "circuit_edges": len(edges),
              "faithfulness": round(float(faithfulness), 4), "files": written}
    with open(out("pictures.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    print(f"{len(written)} pictures of {name} written to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
