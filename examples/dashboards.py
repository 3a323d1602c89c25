"""From one prompt to a corpus: harvest every MLP neuron of a layer over a corpus, read the tables,
and write feature dashboards (static HTML that opens offline).

With the real gpt2 in the local Hugging Face cache it reads blocks.8.mlp.hook_post; otherwise a
small random model's last layer (its neurons have no meaning, but every table and page has its real
shape). The corpus is synthetic either way (a folder of .jsonl files written here: sentences about
places, numbers, code and animals), since nothing can be downloaded.

    python examples/dashboards.py [--out-dir dashboards-output] [--workers 2] [--tokens 20000]

then open dashboards-output/site/index.html. ``--workers 2`` runs the same harvest on a local Dask
cluster (needs the dask extra); the tables come out identical.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pandas as pd

from npgpt2.harvest import harvest
from npgpt2.harvest.dashboard import build_dashboard
from npgpt2.testing import pretrained_or_synthetic

TEMPLATES = {
    "places": ["{city} is the capital of {country}.", "We flew from {city} to {city2} last {month}.",
               "The museum in {city} opens at {n} in the morning."],
    "numbers": ["In {year}, the population was {n},000.", "The total came to {n} dollars and {n2} cents.",
                "Chapter {n}: the year {year}."],
    "code": ["def {name}(x):\n    return x + {n}\n", "for i in range({n}):\n    print({name}(i))\n",
             "if {name} is None:\n    raise ValueError('{name}')\n"],
    "animals": ["The {animal} chased the {animal2} across the {place}.", "A {animal} sleeps in the {place} all day.",
                "Every {month}, the {animal}s return to the {place}."],
}
FILL = {"city": ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna"], "country": ["France", "Germany", "Spain", "Italy"],
        "month": ["January", "March", "June", "October"], "name": ["parse", "load", "total", "step"],
        "animal": ["cat", "dog", "fox", "horse", "owl"], "place": ["garden", "field", "barn", "river bank"]}


def synthetic_corpus(folder: str, n_docs: int = 400, seed: int = 0) -> str:
    """A folder of .jsonl files (one per topic), each line {"text": ...}: a few sentences per document."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for topic, templates in TEMPLATES.items():
        with open(os.path.join(folder, f"{topic}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(n_docs // len(TEMPLATES)):
                sentences = []
                for _ in range(rng.integers(2, 6)):
                    t = templates[rng.integers(len(templates))]
                    values = {k: str(rng.choice(v)) for k, v in FILL.items()}
                    values.update(city2=str(rng.choice(FILL["city"])), animal2=str(rng.choice(FILL["animal"])),
                                  n=str(rng.integers(1, 100)), n2=str(rng.integers(10, 99)),
                                  year=str(rng.integers(1900, 2030)))
                    sentences.append(t.format(**values))
                f.write(json.dumps({"text": " ".join(sentences), "topic": topic}) + "\n")
    return folder


def quote(h, row, width: int = 8) -> str:
    """A top-k row as text: the context around the activating token, which is in [[ ]]."""
    from npgpt2.tokenizer import Tokenizer

    tok = Tokenizer()
    t = h.context_tokens(row["context"])
    p = int(row["position"])
    left = "".join(tok.token_str(i) for i in t[max(0, p - width) : p])
    return (left + "[[" + tok.token_str(t[p]) + "]]" + "".join(tok.token_str(i) for i in t[p + 1 : p + 4])).replace("\n", "\\n")


def main(out_dir: str = "dashboards-output", workers: int | None = None, tokens: int = 20_000, pages: int = 12,
         model=None) -> dict:
    pd.set_option("display.width", 160)
    model = model or pretrained_or_synthetic("gpt2", n_layer=2, n_embd=64, n_ctx=128)
    layer = 8 if model.cfg.n_layer > 8 else model.cfg.n_layer - 1
    hook = f"blocks.{layer}.mlp.hook_post"
    corpus = synthetic_corpus(os.path.join(out_dir, "corpus"))
    print(f"harvesting the {model.cfg.d_mlp} neurons of {hook} over ~{tokens:,} tokens of {corpus} ...")
    source = model if workers is None else (model.source or model.name)  # Dask workers load it themselves
    h = harvest(corpus, source, hook, ctx=64, tokens=tokens, top_k=10, per_band=4, out=os.path.join(out_dir, "harvest"),
                overwrite=True, workers=workers, progress=False)
    m = h.manifest
    print(f"{m['tokens_seen']:,} tokens in {m['n_contexts']} contexts ({m['runner']}, {m['seconds']:.1f} s); "
          f"corpus fingerprint {m['corpus']['fingerprint'][:12]}")

    print("\nthe neurons with the largest activations:")
    strongest = h.features.sort_values("max", ascending=False).head(5)
    print(strongest[["feature", "density", "mean_firing", "max"]].round(4).to_string(index=False))
    neuron = int(strongest["feature"].iloc[0])
    print(f"\nneuron {neuron}: its top contexts (the activating token in [[ ]])")
    for _, row in h.top[h.top["feature"] == neuron].head(5).iterrows():
        print(f"  {row['value']:.3f}  {quote(h, row)!r}")

    site = os.path.join(out_dir, "site")
    fired = h.features[h.features["fire_count"] > 0].sort_values("max", ascending=False)["feature"]
    chosen = sorted(int(f) for f in fired.head(pages))
    written = build_dashboard(h, site, features=chosen, model=model, progress=False)
    print(f"\n{len(written)} feature pages and an index in {site}: open {os.path.join(os.path.abspath(site), 'index.html')}")
    return {"harvest": h, "pages": written, "site": site, "neuron": neuron}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="dashboards-output")
    ap.add_argument("--workers", type=int, help="harvest on a local Dask cluster of this many processes")
    ap.add_argument("--tokens", type=int, default=20_000)
    args = ap.parse_args()
    main(args.out_dir, args.workers, args.tokens)
