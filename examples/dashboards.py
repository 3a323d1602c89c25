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
# # From one prompt to a corpus: harvests and feature dashboards
#
# The other lessons look at one prompt at a time. A neuron (or an SAE latent) that fires on one
# prompt says little about what it *does*: to read it, you look at where it fires over a whole
# corpus. That is a **harvest**: run the model over many tokens, stop at one hook point, and keep
# for every feature (each neuron of the hook point, or each latent of an SAE reading it)
#
# - its **top contexts**: the k tokens where it fires most, with the text around them;
# - **contexts from each activation band**: a sample of where it fires weakly, moderately and
#   strongly (the top contexts alone make every feature look more specific than it is);
# - its **density**: the fraction of tokens where it fires at all, and its mean when firing;
# - its **histogram** of activations;
# - and, from the weights rather than the corpus, its **logit effect**: the next tokens its output
#   direction promotes and suppresses through the unembedding.
#
# Those are the panels of the feature dashboards of Neuronpedia and SAE-Vis; `npgpt2.harvest`
# computes them in NumPy and writes them as static HTML pages that open offline.
#
# With the real `gpt2` in the local Hugging Face cache this lesson reads the 3,072 neurons of
# `blocks.8.mlp.hook_post`; otherwise a small random model's last layer (its neurons mean nothing,
# but every table and page has its real shape). The corpus is synthetic either way, written here:
# 160 short documents about places, numbers, code and animals, about 6,400 tokens. That is small
# for a harvest (real ones read millions of tokens), so that the lesson runs in about a minute on
# a laptop at GPT-2 small's size; every step below is the same at any size.
#
# *Run time: about 35 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small random model stands in when it is not cached
OUT_DIR = "dashboards-output"  # the corpus, the harvest's tables and the dashboard go here
TOKENS = 6_000  # how many tokens of the corpus to read (it has about 6,400)
CTX = 64  # tokens per context
PAGES = 6  # feature pages in the dashboard
WORKERS = None  # e.g. 2: harvest again on a local Dask cluster of that many processes (the dask extra)
SCHEDULER = None  # or an existing Dask scheduler, "tcp://host:8786"

# %%
import json
import os

import numpy as np
import pandas as pd

from npgpt2.display import show
from npgpt2.harvest import harvest, iter_contexts, open_corpus
from npgpt2.harvest.dashboard import build_dashboard
from npgpt2.testing import pretrained_or_synthetic
from npgpt2.tokenizer import Tokenizer

pd.set_option("display.width", 160)
model = pretrained_or_synthetic(MODEL, n_layer=2, n_embd=64, n_ctx=128)
show(model)
layer = 8 if model.cfg.n_layer > 8 else model.cfg.n_layer - 1
hook = f"blocks.{layer}.mlp.hook_post"
tok = Tokenizer()

# %% [markdown]
# ## A corpus, and how it is packed into contexts
#
# A corpus is a text file, a folder of `.txt` or `.jsonl` files, a list of texts, a file of token
# ids, or a Hugging Face dataset (`hf:NAME`, streamed). Here: one `.jsonl` file per topic, each line
# a document `{"text": ...}`.

# %%
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


def synthetic_corpus(folder: str, n_docs: int = 160, seed: int = 0) -> str:
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


corpus = synthetic_corpus(os.path.join(OUT_DIR, "corpus"))
print(sorted(os.listdir(corpus)))

# %% [markdown]
# The documents, in sorted file order, are tokenized and joined into one stream with
# `<|endoftext|>` between them; the stream is cut into contexts of `CTX - 1` tokens, and each
# context gets an `<|endoftext|>` in front: what GPT-2 saw at the start of its training documents,
# and what the published SAEs on GPT-2 were trained with. A context may start mid-document and run
# into the next one, as in GPT-2's own training. Packing is deterministic, so *context 17* names the
# same tokens on every run and every machine: a harvest stores only (context, position) for each
# example, and a Dask worker can be handed "contexts 64 to 127" and read them itself. Position 0
# (the `<|endoftext|>`) is left out of the statistics, since every neuron's activation there is the
# same in every context.

# %%
first = next(iter_contexts(open_corpus(corpus), tok, CTX))  # [CTX] token ids
print(f"context 0, {len(first)} tokens:")
print(repr(tok.decode(first.tolist())))

# %% [markdown]
# ## The harvest
#
# `harvest` runs the model over the contexts, a batch at a time, stopping the forward pass at the
# hook point (nothing after it is computed), and counts each batch into running statistics. Only
# one batch of activations exists at once: memory is set by the statistics, not by the corpus. With
# `out=` the tables are written as Parquet with a `manifest.json` (model, hook, corpus fingerprint,
# tokens seen); an interrupted run can `resume=True` from its checkpoint. The harvest shows itself
# as a table: what was read, how much, and the features with the largest activations.

# %%
print(f"harvesting the {model.cfg.d_mlp} neurons of {hook} over ~{TOKENS:,} tokens of {corpus} ...")
h = harvest(corpus, model, hook, ctx=CTX, tokens=TOKENS, top_k=10, per_band=4, out=os.path.join(OUT_DIR, "harvest"),
            overwrite=True)
show(h)

# %% [markdown]
# ## Why any split gives the same bits
#
# The corpus is cut into shards (`shard_contexts` contexts each), counted separately and merged.
# For the result not to depend on how it was cut, every statistic merges *exactly*:
#
# - counts and histogram bins are integers, and the histogram's bins are fixed (a quarter octave
#   wide), not fitted to the data;
# - sums are kept in fixed point (integers of 2^-20): integer addition is associative, float
#   addition is not, so a float mean would change in its last bits with the order of the shards;
# - the top k is ordered by value, then context, then position: ties are broken by *where* the
#   tokens are, never by which shard came first;
# - the examples of each band are those with the smallest fixed hash of (feature, context,
#   position): a uniform sample that is the same whichever shards the tokens came in.
#
# So a harvest cut into small shards equals one cut into large ones, table for table, bit for bit:

# %%
part = dict(ctx=CTX, tokens=min(TOKENS, 24 * CTX), top_k=10, per_band=4)
a = harvest(corpus, model, hook, shard_contexts=8, **part)
b = harvest(corpus, model, hook, shard_contexts=24, **part)
same = {t: getattr(a, t).equals(getattr(b, t)) for t in ("features", "top", "examples", "histogram")}
print(f"{a.manifest['corpus']['n_shards']} shards and {b.manifest['corpus']['n_shards']}: equal tables {same}")

# %% [markdown]
# ## Reading the tables
#
# A harvest is five DataFrames. `features` has one row per feature: `n_tokens`, `fire_count`,
# `density` (the fraction of tokens where it is above the threshold, 0), `mean`, `mean_firing`,
# `max` and `min`. Sorting by `max` finds the strongest neurons; by `density`, the ones that fire on
# nearly everything (often positional or "always on") and the rare ones.

# %%
strongest = h.features.sort_values("max", ascending=False).head(5)
show(strongest[["feature", "density", "mean_firing", "max"]])
neuron = int(strongest["feature"].iloc[0])

# %% [markdown]
# `top` holds each feature's top k as (context, position, value); `h.context_tokens(context)`
# gives a quoted context's tokens. Here the strongest neuron's top contexts, the activating token in
# `[[ ]]`:

# %%
def quote(h, row, width: int = 8) -> str:
    """A top-k row as text: the context around the activating token, which is in [[ ]]."""
    t = h.context_tokens(row["context"])
    p = int(row["position"])
    left = "".join(tok.token_str(i) for i in t[max(0, p - width) : p])
    return (left + "[[" + tok.token_str(t[p]) + "]]" + "".join(tok.token_str(i) for i in t[p + 1 : p + 4])).replace("\n", "\\n")


print(f"neuron {neuron}: its top contexts")
for _, row in h.top[h.top["feature"] == neuron].head(5).iterrows():
    print(f"  {row['value']:.3f}  {quote(h, row)!r}")

# %% [markdown]
# `examples` is the sample per octave band of activation ([2^b, 2^(b+1))), `histogram` the
# non-empty bins. The bands show what the neuron does most of the time it fires, which the top
# contexts do not: a neuron whose top contexts are all about one thing may fire weakly on a lot of
# unrelated text.

# %%
bands = h.examples[h.examples["feature"] == neuron]
show(bands.groupby("band").agg(band_lo=("band_lo", "first"), band_hi=("band_hi", "first"), sampled=("value", "size"),
                               smallest=("value", "min"), largest=("value", "max")))
hist = h.histogram[h.histogram["feature"] == neuron]
print(f"histogram: {len(hist)} non-empty bins of {int(hist['count'].sum()):,} tokens")

# %% [markdown]
# ## The dashboard
#
# `build_dashboard` writes `index.html` (every feature, sortable by density or max, searchable by
# id: `index.html?sort=max&q=40`) and one `feature-N.html` per feature: its statistics, histogram,
# logit effect (`W_out[neuron] @ W_U` for a neuron, the decoder row through `W_U` for an SAE latent),
# top contexts and a sample of each band. In a context every token is shaded by the feature's
# activation on it: those neighbouring activations are computed again with the model (the harvest
# keeps one value per example), and each page reports how far its recomputed values are from the
# harvest's (`max_recomputed_error`). Everything is inside the pages: they open from disk, offline.
# (The same from the command line: `npgpt2 harvest` and `npgpt2 dashboard`.)

# %%
site = os.path.join(OUT_DIR, "site")
fired = h.features[h.features["fire_count"] > 0].sort_values("max", ascending=False)["feature"]
chosen = sorted(int(f) for f in fired.head(PAGES))
written = build_dashboard(h, site, features=chosen, model=model)
show(written)
print(f"open {os.path.join(os.path.abspath(site), 'index.html')} in a browser")

# %% [markdown]
# ## Going to a Dask cluster
#
# For millions of tokens, the shards go to Dask workers (the `dask` extra): `workers=4` starts a
# local cluster of four processes, `scheduler="tcp://host:8786"` uses a running one. Each worker
# loads the model itself, once, from its name or folder (so pass the model's source, not the loaded
# model), harvests the shards it is given, and the partial statistics are merged on the cluster.
# Since merging is exact, the tables are the same as in this process: set `WORKERS = 2` above to
# check it here. A lost worker is replaced and its shards redone, with the same result.

# %%
if WORKERS or SCHEDULER:
    on_dask = harvest(corpus, model.source or model.name, hook, ctx=CTX, tokens=TOKENS, top_k=10, per_band=4,
                      workers=WORKERS, scheduler=SCHEDULER, progress=False)
    print(on_dask.manifest["runner"], {t: getattr(on_dask, t).equals(getattr(h, t)) for t in ("features", "top")})
else:
    print("(WORKERS and SCHEDULER are not set: the Dask run is skipped)")
results = {"harvest": h, "pages": written, "site": site, "neuron": neuron, "same_split": same}

# %% [markdown]
# **Takeaways.** A feature is read from its whole activation distribution, not its top examples:
# look at the bands and the density beside the top contexts, and at the logit effect for what it
# writes. Harvest statistics merge exactly, so a harvest can be cut up, resumed or spread over a
# cluster without changing a bit. On the random model the contexts are arbitrary; with `gpt2` and
# a real corpus, the same pages show neurons for years, code indentation or place names.
