"""``harvest``: a model, a hook point (and optionally an SAE), a corpus -> per-feature statistics.

The corpus is packed into contexts (corpus.py) and cut into shards of ``shard_contexts`` contexts;
each shard is run through the model ``batch_size`` contexts at a time, the forward pass stopping at
the hook point (nothing after it is computed), and counted into ``FeatureStats`` (stats.py). Only one
batch's activations exist at a time: memory is set by the statistics, not by the corpus.

Shards are harvested in this process, or on a Dask cluster (cluster.py); their statistics merge
exactly, so both give the same bits when the forward passes do: with the same number of BLAS threads
(OpenBLAS's multi-threaded products may round differently from its single-threaded ones, which can
move a count at the threshold by one). With ``out=``, the merged statistics of the shards done so far are
checkpointed, ``resume=True`` carries on from there, and the finished harvest is written as Parquet
tables plus ``manifest.json`` (written last: a folder without it is not a finished harvest).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .corpus import Corpus, CorpusError, HarvestError, Shard, fingerprint, iter_shards, open_corpus, read_contexts
from ..threads import get_num_threads
from .stats import HIST_HI, HIST_LO, PER_OCTAVE, FeatureStats

FORMAT = "npgpt2-harvest/1"
TABLES = ("features", "top", "examples", "histogram", "contexts")
_NOT_PER_TOKEN = ("attn.hook_attn_scores", "attn.hook_pattern")


@dataclass(frozen=True)
class HarvestSpec:
    """Everything that decides a harvest's numbers (a worker rebuilds its model from it)."""

    model: str  # a name, hub id or local folder
    revision: str | None
    dtype: str
    processing: tuple  # ((flag, bool), ...) as model.processing
    hook: str
    sae: tuple | None  # (release, sae_id) when loaded by name
    features: tuple | None  # the features kept (None: all)
    ctx: int
    batch_size: int
    shard_contexts: int
    top_k: int
    per_band: int
    threshold: float
    include_bos: bool

    def to_json(self) -> dict:
        d = asdict(self)
        d["processing"] = dict(self.processing)
        d["sae"] = list(self.sae) if self.sae else None
        d["features"] = list(self.features) if self.features is not None else None
        return d


# ---------------------------------------------------------------------------------- features
class _Stop(Exception):
    """Raised by the harvest's hook: the forward pass need not go past it."""


def hook_activations(model, hook: str, tokens: np.ndarray) -> np.ndarray:
    """The activation at ``hook`` for tokens [batch, pos], the forward pass stopped right there.
    -> [batch, pos, ...] as the hook point gives it"""
    got = []

    def grab(act, point):
        got.append(act)
        raise _Stop

    try:
        model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], return_type=None)
    except _Stop:
        pass
    return got[0]


class Harvester:
    """A model (and SAE) reading one hook point: tokens -> the chosen features' activations."""

    def __init__(self, model, hook: str, sae=None, features=None, include_bos: bool = False):
        self.model, self.hook, self.sae, self.include_bos = model, hook, sae, include_bos
        probe = hook_activations(model, hook, np.full((1, 2), model.tokenizer.eot_token))
        width = int(np.prod(probe.shape[2:]))
        self.n_available = sae.d_sae if sae is not None else width
        self.features = None if features is None else np.asarray(features, dtype=np.int64)
        if self.features is not None:
            bad = self.features[(self.features < 0) | (self.features >= self.n_available)]
            if len(bad):
                what = "latents" if sae is not None else f"neurons at {hook}"
                raise HarvestError(f"feature {int(bad[0])} is out of range: there are {self.n_available} {what} "
                                   f"(0..{self.n_available - 1})")
        if sae is not None:
            W_enc, b_enc = sae.W_enc, sae.b_enc
            if self.features is not None:
                W_enc, b_enc = W_enc[:, self.features], b_enc[self.features]
            self._enc = (np.ascontiguousarray(W_enc), b_enc, sae.b_dec)

    @property
    def n_features(self) -> int:
        return self.n_available if self.features is None else len(self.features)

    @property
    def feature_ids(self) -> np.ndarray:
        return np.arange(self.n_available) if self.features is None else self.features

    @property
    def first_position(self) -> int:
        """Position 0 holds the <|endoftext|> every context starts with; skipped unless include_bos."""
        return 0 if self.include_bos else 1

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [batch, ctx] -> activations [batch, pos, F] float32 (pos from ``first_position``)."""
        act = hook_activations(self.model, self.hook, tokens.astype(np.int64))
        act = act.reshape(act.shape[0], act.shape[1], -1)[:, self.first_position :]  # [batch, pos, width]
        if self.sae is not None:
            from .. import ops

            W_enc, b_enc, b_dec = self._enc
            return np.maximum(ops.linear(act - b_dec, W_enc, b_enc), 0).astype(np.float32)  # [batch, pos, F]
        if self.features is not None:
            act = act[..., self.features]
        return act.astype(np.float32, copy=False)


def harvest_shard(harvester: Harvester, shard: Shard, spec: HarvestSpec, into: FeatureStats | None = None) -> FeatureStats:
    """One shard's statistics, ``spec.batch_size`` contexts at a time; counted ``into`` running
    statistics when given (the same numbers as merging them afterwards, without the copy)."""
    if into is not None and shard.index in into.shards:
        raise ValueError(f"shard {shard.index} is already counted")
    stats = into if into is not None else FeatureStats.empty(harvester.n_features, spec.top_k, spec.per_band,
                                                             spec.threshold)
    # a batch's statistics are counted on a second thread while the model runs the next batch (the
    # forward pass leaves a core idle in its one-threaded steps); one at a time, in order. With
    # npgpt2 on one thread (``set_num_threads(1)``, a Dask worker with a core of its own) they are
    # counted on this thread, after each batch: one thread means one core.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npgpt2-stats") as counter:
        counting = None
        for b in range(0, len(shard.tokens), spec.batch_size):
            acts = harvester(shard.tokens[b : b + spec.batch_size])  # [batch, pos, F]
            if counting is not None:
                counting.result()  # (re-raises its error here)
            if get_num_threads() == 1:
                stats.add(acts, shard.start + b, harvester.first_position)
            else:
                counting = counter.submit(stats.add, acts, shard.start + b, harvester.first_position)
        if counting is not None:
            counting.result()
    stats.shards = tuple(sorted(stats.shards + (shard.index,)))
    return stats


# ---------------------------------------------------------------------------------- the result
@dataclass
class Harvest:
    """A finished harvest: ``manifest`` (dict) and DataFrames ``features`` (one row per feature),
    ``top`` (top-k contexts), ``examples`` (the reservoir, per octave band), ``histogram`` (non-empty
    bins), ``contexts`` (context id -> its tokens, for every context quoted)."""

    manifest: dict
    features: pd.DataFrame
    top: pd.DataFrame
    examples: pd.DataFrame
    histogram: pd.DataFrame
    contexts: pd.DataFrame
    folder: str | None = None
    _tokens: dict = field(default_factory=dict, repr=False)

    def __repr__(self):
        from ..display import harvest_summary

        return harvest_summary(self)

    def _repr_html_(self) -> str:
        from ..display import harvest_html

        return harvest_html(self)

    def context_tokens(self, context: int) -> np.ndarray:
        """[ctx] token ids of one quoted context."""
        if not self._tokens:
            self._tokens = {int(c): np.asarray(t, dtype=np.int64)
                            for c, t in zip(self.contexts["context"], self.contexts["tokens"])}
        return self._tokens[int(context)]

    def feature(self, feature: int) -> dict:
        """One feature's row of ``features`` as a dict, its top contexts and its examples."""
        rows = self.features[self.features["feature"] == feature]
        if rows.empty:
            raise HarvestError(f"feature {feature} was not harvested")
        return {"stats": rows.iloc[0].to_dict(), "top": self.top[self.top["feature"] == feature],
                "examples": self.examples[self.examples["feature"] == feature],
                "histogram": self.histogram[self.histogram["feature"] == feature]}

    def save(self, folder: str) -> str:
        """Parquet tables, then ``manifest.json`` (last)."""
        os.makedirs(folder, exist_ok=True)
        for name in TABLES:
            _write_parquet(getattr(self, name), os.path.join(folder, f"{name}.parquet"))
        tmp = os.path.join(folder, "manifest.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=2)
        os.replace(tmp, os.path.join(folder, "manifest.json"))
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str) -> "Harvest":
        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            what = "an unfinished harvest (resume it)" if os.path.isdir(os.path.join(folder, "checkpoint")) else \
                "no harvest"
            raise HarvestError(f"{folder!r} holds {what}: it has no manifest.json")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise HarvestError(f"{path} has format {manifest.get('format')!r}; expected {FORMAT!r}")
        tables = {name: pd.read_parquet(os.path.join(folder, f"{name}.parquet")) for name in TABLES}
        tables["contexts"]["tokens"] = tables["contexts"]["tokens"].map(lambda t: [int(x) for x in t])
        return cls(manifest, **tables, folder=folder)


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise HarvestError("writing a harvest needs pyarrow: pip install 'npgpt2[harvest]'") from None


def _write_parquet(df: pd.DataFrame, path: str) -> None:
    _require_pyarrow()
    tmp = path + ".tmp"
    df.to_parquet(tmp, index=False, engine="pyarrow")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- the run
def build_harvester(spec: HarvestSpec, sae=None) -> Harvester:
    """The harvester ``spec`` describes, its model (and SAE, unless given) loaded here: what a Dask
    worker runs (cluster.py)."""
    model = _load_model(spec.model, spec.revision, spec.dtype, spec.processing)
    if spec.sae is not None:
        sae, _ = _load_sae(spec.sae)
    return Harvester(model, spec.hook, sae, spec.features, spec.include_bos)


def _load_model(model, revision, dtype, processing):
    from ..loading import from_pretrained

    return from_pretrained(model, revision=revision, dtype=dtype, **dict(processing))


def _load_sae(sae):
    """"release:sae_id", (release, sae_id) or an SAE -> (SAE, (release, sae_id) or None)."""
    from ..sae import SAE, SAEError

    if sae is None or isinstance(sae, SAE):
        return sae, None
    if isinstance(sae, str):
        release, sep, sae_id = sae.rpartition(":")
        if not sep or not release or not sae_id:
            raise SAEError(f"SAE {sae!r}: expected RELEASE:SAE_ID, e.g. gpt2-small-res-jb:blocks.8.hook_resid_pre")
        sae = (release, sae_id)
    release, sae_id = sae
    return SAE.from_pretrained(release, sae_id, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"), (release, sae_id)


def prepare(model, hook, sae, features, ctx, top_k, per_band, threshold, include_bos, batch_size,
            shard_contexts, revision=None, dtype="float32"):
    """Check the arguments and load what they name -> (model, sae, harvester, spec)."""
    from ..hooks import HookError
    from ..sae import SAEError, _check_fits

    sae_obj, sae_key = _load_sae(sae)
    if isinstance(model, str):
        processing = {k: bool(v) for k, v in (sae_obj.cfg.get("model_processing", {}) if sae_obj else {}).items()}
        model = _load_model(model, revision, dtype, tuple(sorted(processing.items())))
    # what a worker loads: the local folder, or the hub name at the commit this model came from
    source = model.source if model.source and os.path.isdir(model.source) else model.name
    if revision is None and model.source and "@" in model.source and not os.path.isdir(model.source):
        revision = model.source.rsplit("@", 1)[1]
    if hook is None:
        if sae_obj is None:
            raise HarvestError("no hook point: pass hook= (e.g. blocks.8.mlp.hook_post) or an SAE")
        hook = sae_obj.hook_name
    model.resolve_hook_names(hook)  # an unknown name raises HookError with the closest names
    if hook.endswith(_NOT_PER_TOKEN):
        raise HookError(f"hook {hook!r} is [batch, head, query_pos, key_pos]; a harvest reads one vector per "
                        "token: choose e.g. blocks.L.attn.hook_z or blocks.L.mlp.hook_post")
    if sae_obj is not None:
        if sae_obj.hook_name != hook:
            raise SAEError(f"the SAE reads {sae_obj.hook_name!r}, not the hook {hook!r}")
        _check_fits(model, sae_obj)
    if not isinstance(ctx, (int, np.integer)) or not 2 <= ctx <= model.cfg.n_ctx:
        raise HarvestError(f"ctx={ctx}: expected 2..{model.cfg.n_ctx} (the model's n_ctx)")
    if batch_size < 1 or shard_contexts < 1 or shard_contexts % batch_size:
        raise HarvestError(f"shard_contexts={shard_contexts} must be a positive multiple of batch_size={batch_size} "
                           "(so that every split of the corpus runs the same batches)")
    harvester = Harvester(model, hook, sae_obj, features, include_bos)
    FeatureStats.empty(1, top_k, per_band, threshold)  # checks them
    spec = HarvestSpec(source, revision, str(model.dtype),
                       tuple(sorted(model.processing.items())), hook, sae_key,
                       None if features is None else tuple(int(f) for f in features), int(ctx), int(batch_size),
                       int(shard_contexts), int(top_k), int(per_band), float(threshold), bool(include_bos))
    return model, sae_obj, harvester, spec


def harvest(corpus, model="gpt2", hook: str | None = None, sae=None, *, features=None, ctx: int = 128,
            tokens: int | None = None, top_k: int = 20, per_band: int = 5, threshold: float = 0.0,
            include_bos: bool = False, batch_size: int = 8, shard_contexts: int = 64, out: str | None = None,
            resume: bool = False, overwrite: bool = False, workers: int | None = None,
            scheduler: str | None = None, client=None, scheduler_timeout: float = 10.0, revision: str | None = None, dtype: str = "float32",
            text_field: str = "text", split: str = "train", progress: bool = True, on_shard=None,
            checkpoint_seconds: float = 30.0) -> Harvest:
    """Harvest per-feature statistics of a hook point (or an SAE's latents) over a corpus.

    corpus: a path, ``hf:NAME``, token ids or texts (see ``open_corpus``); packed into contexts of
        ``ctx`` tokens, each starting with <|endoftext|>; ``tokens`` caps how many are read.
    model: a name, hub id, folder or a loaded ``GPT2``. hook: e.g. ``blocks.8.mlp.hook_post`` (the
        neurons), ``blocks.8.hook_resid_pre``; features are the hook's last dimensions flattened.
    sae: ``"release:sae_id"``, (release, sae_id) or an ``SAE``: its latents are the features.
    features: only these feature ids (default: all).
    top_k, per_band, threshold: top contexts kept, examples per octave band, the firing threshold.
    include_bos: count position 0 (the <|endoftext|> every context starts with; off by default).
    out: a folder for Parquet tables + manifest.json, and the checkpoint that ``resume`` reads.
    workers: start a local Dask cluster of that many worker processes; scheduler: use an existing
        one ("tcp://host:8786"), waiting ``scheduler_timeout`` s for it; client: an existing
        ``distributed.Client``.
    on_shard(shard_index, stats_so_far): called after each shard (in-process) or wave (Dask) is counted.
    checkpoint_seconds: with ``out``, the statistics so far are saved when this long has passed since
        the last save, after a shard (or wave); ``resume`` starts from the last save.
    -> ``Harvest``
    """
    t0 = time.time()
    if out is not None:  # the optional libraries the run will need, before any work
        _require_pyarrow()
    if workers is not None or scheduler is not None:
        from .cluster import _distributed

        _distributed()
    model, sae_obj, harvester, spec = prepare(model, hook, sae, features, ctx, top_k, per_band, threshold,
                                              include_bos, batch_size, shard_contexts, revision, dtype)
    corpus = open_corpus(corpus, text_field=text_field, split=split)
    max_contexts = None if tokens is None else max(1, math.ceil(tokens / spec.ctx))
    shards = iter_shards(corpus, model.tokenizer, spec.ctx, spec.shard_contexts, max_contexts)
    first = next(shards, None)
    if first is None:
        raise CorpusError(f"corpus {corpus.description} holds fewer than {spec.ctx} tokens: not one context of ctx={spec.ctx}")

    state, done_digests = None, {}
    if out is not None:
        state, done_digests = _open_output(out, spec, resume, overwrite)
        if state is None and done_digests is None:  # already finished
            done = Harvest.load(out)
            if done.manifest["spec"] != spec.to_json():
                raise HarvestError(f"{out!r} holds a finished harvest made with other settings; choose another folder")
            return done

    from contextlib import ExitStack

    stack = ExitStack()
    client_ = None
    if client is not None or workers is not None or scheduler is not None:
        from .cluster import connect

        # reachable, or an error now, before anything is written
        client_ = stack.enter_context(connect(workers=workers, scheduler=scheduler, client=client,
                                              timeout=scheduler_timeout))

    if out is not None:
        os.makedirs(os.path.join(out, "checkpoint"), exist_ok=True)
    state = state or FeatureStats.empty(harvester.n_features, spec.top_k, spec.per_band, spec.threshold)
    digests: list[str] = []

    def all_shards():
        yield first
        yield from shards

    def todo():
        for shard in all_shards():
            digests.append(shard.digest)
            if shard.index in done_digests:
                if done_digests[shard.index] != digests[-1]:
                    raise CorpusError(f"shard {shard.index} of the corpus differs from the interrupted run's: "
                                      "the corpus (or ctx) changed; start again without resume")
                continue
            yield shard

    from tqdm.auto import tqdm

    bar = tqdm(total=max_contexts * spec.ctx if max_contexts else None, unit="tok", unit_scale=True,
               disable=not progress, desc=f"harvest {spec.hook}")
    bar.update(len(done_digests) * spec.shard_contexts * spec.ctx)
    last_save = [time.time()]

    def counted(new: FeatureStats, n_contexts: int, shard_index: int, final: bool = False):
        nonlocal state
        if new is not state:
            state = state.merge(new)
        bar.update(n_contexts * spec.ctx)
        if out is not None and (final or time.time() - last_save[0] >= checkpoint_seconds):
            _save_checkpoint(out, spec, state, digests)
            last_save[0] = time.time()
        if on_shard is not None:
            on_shard(shard_index, state)

    with stack:
        if client_ is None:
            for shard in todo():
                counted(harvest_shard(harvester, shard, spec, into=state), len(shard.tokens), shard.index)
            mode = "in-process"
        else:
            from .cluster import harvest_on_cluster

            harvest_on_cluster(client_, spec, sae_obj if spec.sae is None else None, todo(), counted,
                               build_harvester, harvest_shard)
            mode = f"dask ({len(client_.scheduler_info()['workers'])} workers)"
    bar.close()
    if out is not None:
        _save_checkpoint(out, spec, state, digests)

    result = _finish(state, harvester, spec, corpus, model, sae_obj, digests, mode, time.time() - t0)
    if out is not None:
        result.save(out)
        shutil.rmtree(os.path.join(out, "checkpoint"), ignore_errors=True)
    return result


def _finish(state, harvester, spec, corpus, model, sae_obj, digests, mode, seconds) -> Harvest:
    ids = harvester.feature_ids
    top, examples = state.top_table(ids), state.examples_table(ids)
    quoted = sorted(set(top["context"]) | set(examples["context"]))
    contexts = read_contexts(corpus, model.tokenizer, spec.ctx, quoted)
    contexts_df = pd.DataFrame({"context": np.asarray(quoted, dtype=np.int64),
                                "tokens": [contexts[c].astype(np.int64).tolist() for c in quoted]})
    manifest = {
        "format": FORMAT, "complete": True,
        "model": spec.model, "model_name": model.name, "revision": spec.revision,
        "model_source": getattr(getattr(model, "files", None), "source", None),
        "dtype": spec.dtype, "processing": dict(spec.processing), "n_ctx": model.cfg.n_ctx,
        "hook": spec.hook, "feature_kind": "latent" if sae_obj is not None else "neuron",
        "sae": None if sae_obj is None else {"release": spec.sae[0] if spec.sae else sae_obj.cfg.get("release"),
                                             "sae_id": spec.sae[1] if spec.sae else None,
                                             "hook": sae_obj.hook_name, "d_sae": sae_obj.d_sae},
        "n_features": harvester.n_features, "features": spec.to_json()["features"],
        "ctx": spec.ctx, "include_bos": spec.include_bos, "threshold": spec.threshold, "top_k": spec.top_k,
        "per_band": spec.per_band, "batch_size": spec.batch_size, "shard_contexts": spec.shard_contexts,
        "corpus": {"description": corpus.description, "fingerprint": fingerprint(spec.ctx, digests),
                   "n_shards": len(digests)},
        "n_contexts": int(state.n_tokens // max(spec.ctx - harvester.first_position, 1)),
        "tokens_seen": int(state.n_tokens), "tokens_read": None,
        "histogram": {"lo_exponent": HIST_LO, "hi_exponent": HIST_HI, "bins_per_octave": PER_OCTAVE},
        "runner": mode, "seconds": round(seconds, 2), "spec": spec.to_json(),
    }
    manifest["tokens_read"] = manifest["n_contexts"] * spec.ctx
    return Harvest(manifest, state.features_table(ids), top, examples, state.histogram_table(ids), contexts_df)


# ---------------------------------------------------------------------------------- checkpoints
def _open_output(out, spec, resume, overwrite):
    """-> (state, {shard: digest}) to start from; (None, {}) for a fresh start; (None, None) when
    ``out`` already holds this finished harvest and ``resume`` was asked."""
    manifest = os.path.join(out, "manifest.json")
    checkpoint = os.path.join(out, "checkpoint", "state.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise HarvestError(f"--out {out!r} is a file; expected a folder")
    if overwrite:
        for name in [f"{t}.parquet" for t in TABLES] + ["manifest.json"]:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, "checkpoint"), ignore_errors=True)
        return None, {}
    if os.path.exists(manifest):
        if resume:
            return None, None
        raise HarvestError(f"{out!r} already holds a finished harvest; choose another folder or overwrite it")
    if os.path.exists(checkpoint):
        if not resume:
            raise HarvestError(f"{out!r} holds an interrupted harvest: resume it, or overwrite it")
        with open(checkpoint, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["spec"] != spec.to_json():
            changed = sorted(k for k in saved["spec"] if saved["spec"][k] != spec.to_json().get(k))
            raise HarvestError(f"cannot resume {out!r}: it was started with other settings ({', '.join(changed)})")
        state = FeatureStats.load(os.path.join(out, "checkpoint", "state.npz"))
        return state, {int(i): d for i, d in saved["digests"].items() if int(i) in state.shards}
    if os.path.isdir(out) and os.listdir(out):
        raise HarvestError(f"--out {out!r} exists and is not empty; expected a new or empty folder")
    return None, {}


def _save_checkpoint(out, spec, state: FeatureStats, digests: list[str]) -> None:
    """The digests first (of every shard read so far), then the state: a crash between the two
    leaves a consistent pair, the state naming the shards it holds."""
    folder = os.path.join(out, "checkpoint")
    tmp = os.path.join(folder, "state.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"spec": spec.to_json(), "digests": {str(i): d for i, d in enumerate(digests)}}, f)
    os.replace(tmp, os.path.join(folder, "state.json"))
    state.save(os.path.join(folder, "state.npz"))
