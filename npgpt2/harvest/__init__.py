"""Corpus-scale inspection: harvest a hook point's neurons (or an SAE's latents) over a corpus, and
build feature dashboards from the result.

    from npgpt2.harvest import harvest
    h = harvest("corpus/", model="gpt2", hook="blocks.8.mlp.hook_post", ctx=128, tokens=2_000_000,
                out="harvest/")                    # workers=4 or scheduler="tcp://host:8786" for Dask
    h.features.sort_values("max")                  # one row per feature
    h.top[h.top.feature == 42]                     # its top activating (context, position, value)

corpus.py packs documents into contexts, stats.py holds the mergeable statistics, run.py the harvest
itself, cluster.py its Dask runner, dashboard.py the static HTML.
"""

from .corpus import Corpus, CorpusError, iter_contexts, iter_shards, open_corpus
from .run import Harvest, HarvestError, Harvester, HarvestSpec, harvest, hook_activations
from .stats import FeatureStats, StatsError, histogram_bins

__all__ = ["Corpus", "CorpusError", "FeatureStats", "Harvest", "HarvestError", "HarvestSpec", "Harvester",
           "StatsError", "harvest", "histogram_bins", "hook_activations", "iter_contexts", "iter_shards",
           "open_corpus"]
