"""Corpus harvests in this process: packing, the statistics against brute force, exact merging,
resume, Parquet output, and the command line's errors.

The brute-force references keep every activation (taken with ``run_with_cache``, the whole forward
pass) and sort them in plain Python; the histogram is counted against the bin edges by comparison."""

import json
import math
import re
import os
import sys
import types

import numpy as np
import pandas as pd
import pytest

import npgpt2
from npgpt2 import cli
from npgpt2.harvest import FeatureStats, harvest, histogram_bins, iter_contexts, iter_shards, open_corpus
from npgpt2.harvest.corpus import CorpusError
from npgpt2.harvest.run import TABLES, HarvestError, Harvester, harvest_shard, prepare
from npgpt2.harvest.stats import N_BANDS, HIST_LO, example_hash, merge_all
from npgpt2.sae import SAE

pytest.importorskip("pyarrow", reason="the harvest writes Parquet (pip install -e '.[test]')")

HOOK = "blocks.1.mlp.hook_post"
WORDS = ("the cat sat on a mat while dogs ran over green hills and red rivers under seven bright "
         "stars , . ; Paris London 1969 2024 code def return").split()


def synthetic_texts(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 50))) for _ in range(n)]


TEXTS = synthetic_texts()
KW = dict(ctx=24, batch_size=4, top_k=6, per_band=3, progress=False)


def tables(h):
    return {name: getattr(h, name) for name in TABLES}


def assert_same_tables(a, b):
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True, obj=name)


# ---------------------------------------------------------------------------------- corpus
def expected_contexts(docs, tok, ctx):
    """By hand: documents joined by <|endoftext|>, cut into ctx - 1 tokens, <|endoftext|> first."""
    stream = [t for d in docs for t in tok.encode(d) + [tok.eot_token]]
    body = ctx - 1
    return [[tok.eot_token] + stream[i * body : (i + 1) * body] for i in range(len(stream) // body)]


def test_text_file_folder_and_iterable_pack_as_by_hand(tmp_path, model):
    tok = model.tokenizer
    docs = TEXTS[:9]
    (tmp_path / "one.txt").write_text(docs[0])
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0])
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[1:5])) + "\n")
    (folder / "sub" / "c.txt").write_text(docs[5])
    (folder / "ignored.csv").write_text("not,a,document")

    def packed(source, ctx=16):
        return [c.tolist() for c in iter_contexts(open_corpus(source), tok, ctx)]

    assert packed(tmp_path / "one.txt") == expected_contexts(docs[:1], tok, 16)
    assert packed(str(folder)) == expected_contexts(docs[:6], tok, 16)
    assert packed(iter(docs[:6])) == expected_contexts(docs[:6], tok, 16)  # a one-shot iterator too
    shards = list(iter_shards(open_corpus(docs), tok, 16, shard_contexts=5))
    assert [s.start for s in shards] == [5 * i for i in range(len(shards))]
    assert np.concatenate([s.tokens for s in shards]).tolist() == expected_contexts(docs, tok, 16)


def test_token_files_are_read_as_stored(tmp_path, model):
    ids = np.random.default_rng(0).integers(0, 50257, 200).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", ids)
    eot = model.tokenizer.eot_token
    want = [[eot] + ids[i * 19 : (i + 1) * 19].tolist() for i in range(200 // 19)]
    for name in ("t.bin", "t.npy"):
        assert [c.tolist() for c in iter_contexts(open_corpus(tmp_path / name), model.tokenizer, 20)] == want
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(CorpusError, match="odd number"):
        open_corpus(tmp_path / "odd.bin")


def test_hugging_face_dataset_is_streamed(monkeypatch, model):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        calls.append((name, config, split, streaming, kwargs))
        return iter([{"text": d} for d in TEXTS[:4]])

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = open_corpus("hf:someone/pile-sample:en", split="validation", revision="abc")
    got = [c.tolist() for c in iter_contexts(corpus, model.tokenizer, 16)]
    assert got == expected_contexts(TEXTS[:4], model.tokenizer, 16)
    assert calls == [("someone/pile-sample", "en", "validation", True, {"revision": "abc"})]


# ---------------------------------------------------------------------------------- statistics
def brute_force(acts, first_context, first_position, k, m, threshold=0.0):
    """Every (value, context, position) of acts [n_ctx, n_pos, F] kept, then sorted in Python."""
    n_ctx, n_pos, F = acts.shape
    top, examples, hist = {}, {}, np.zeros((F, len(histogram_bins())), np.int64)
    side = (len(histogram_bins()) - 1) // 2
    edges = 2.0 ** (HIST_LO + np.arange(side + 1) / 4)  # |x| edges, a quarter octave apart

    def bin_of(x):  # by comparison with the edges: |x| in [edges[j], edges[j + 1])
        j = min(int(np.searchsorted(edges, abs(x), side="right")) - 1, side - 1)
        return side if j < 0 else (side + 1 + j if x > 0 else side - 1 - j)
    for f in range(F):
        entries = [(float(acts[c, p, f]), first_context + c, first_position + p)
                   for c in range(n_ctx) for p in range(n_pos)]
        firing = [e for e in entries if e[0] > threshold]
        top[f] = sorted(firing, key=lambda e: (-e[0], e[1], e[2]))[:k]
        for band in range(N_BANDS):
            def band_of(v):  # floor(log2 v) from frexp, in the band range
                return min(max(math.frexp(v)[1] - 1 - HIST_LO, 0), N_BANDS - 1)
            inside = [e for e in firing if band_of(e[0]) == band]
            keyed = sorted(inside, key=lambda e: (splitmix_hash(f, e[1], e[2]), e[1], e[2]))[:m]
            if keyed:
                examples[(f, band)] = keyed
        hist[f] = np.bincount([bin_of(e[0]) for e in entries], minlength=hist.shape[1])
    return top, examples, hist


def splitmix_hash(feature, context, position):
    """The reservoir's hash written out with Python integers."""
    M64, M32 = (1 << 64) - 1, (1 << 32) - 1

    def splitmix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & M32
        return h ^ (h >> 16)

    row = splitmix((context << 20) ^ position) >> 32
    col = splitmix((feature + 0x9E3779B97F4A7C15) & M64) >> 32
    return fmix32(row ^ col)


def stats_of(acts, first_context=0, k=4, m=2, shard=0):
    s = FeatureStats.empty(acts.shape[-1], k, m)
    s.add(acts, first_context, 1)
    s.shards = (shard,)
    return s


def test_hash_is_splitmix64():
    f, c, p = np.array([0, 3, 77]), np.array([0, 12345, 9]), np.array([1, 5, 63])
    assert example_hash(f, c, p).tolist() == [splitmix_hash(*t) for t in zip(f.tolist(), c.tolist(), p.tolist())]


def test_statistics_equal_brute_force_with_ties():
    rng = np.random.default_rng(3)
    # values on a coarse grid, so that many tokens tie and the tie-breaking decides
    acts = (rng.integers(-2, 9, (10, 7, 5)) / 4).astype(np.float32)  # [context, pos, feature]
    acts[:, :, 4] = 0.0  # a feature that never fires
    s = FeatureStats.empty(5, 4, 2)
    for c in range(0, 10, 3):  # batches of 3 contexts
        s.add(acts[c : c + 3], c, 1)
    top, examples, hist = brute_force(acts, 0, 1, 4, 2)
    for f in range(5):
        got = s.top_table().query("feature == @f")
        assert list(zip(got["value"], got["context"], got["position"])) == top[f]
    ex = s.examples_table()
    for (f, band), want in examples.items():
        got = ex[(ex["feature"] == f) & (ex["band"] == band)].sort_values("rank")
        assert list(zip(got["value"], got["context"], got["position"])) == want
    assert len(ex) == sum(len(v) for v in examples.values())
    np.testing.assert_array_equal(s.hist, hist)
    t = s.features_table()
    flat = acts.reshape(-1, 5).astype(np.float64)
    np.testing.assert_array_equal(t["fire_count"], (flat > 0).sum(0))
    np.testing.assert_allclose(t["mean"], flat.mean(0), atol=1e-6)
    np.testing.assert_array_equal(t["max"], flat.max(0))
    assert t["density"].iloc[4] == 0 and np.isnan(t["mean_firing"].iloc[4])


def test_reservoir_cut_off_on_a_large_batch_is_exact():
    # one batch with far more firing tokens than slots: the reservoir pre-selects by a cut-off
    rng = np.random.default_rng(6)
    acts = rng.lognormal(-1, 0.5, (30, 40, 2)).astype(np.float32)
    s = FeatureStats.empty(2, 3, 2)
    s.add(acts, 0, 1)
    top, examples, _ = brute_force(acts, 0, 1, 3, 2)
    ex = s.examples_table()
    assert len(ex) == sum(len(v) for v in examples.values())
    for (f, band), want in examples.items():
        got = ex[(ex["feature"] == f) & (ex["band"] == band)].sort_values("rank")
        assert list(zip(got["value"], got["context"], got["position"])) == want


def test_mostly_zero_activations_counted_sparsely_equal_dense_and_brute_force(monkeypatch):
    import npgpt2.harvest.stats as stats_module

    rng = np.random.default_rng(8)
    acts = np.where(rng.random((12, 9, 7)) < 0.04, rng.exponential(2, (12, 9, 7)), 0).astype(np.float32)
    acts[:, :, 6] = 0  # a dead latent
    counted = {}
    for mode, below in (("sparse", 1.0), ("dense", 0.0)):
        monkeypatch.setattr(stats_module, "SPARSE_BELOW", below)
        s = FeatureStats.empty(7, 3, 2)
        for c in range(0, 12, 4):
            s.add(acts[c : c + 4], c, 1)
        counted[mode] = s
    for name in FeatureStats.ARRAYS:
        np.testing.assert_array_equal(getattr(counted["sparse"], name), getattr(counted["dense"], name), err_msg=name)
    top, examples, hist = brute_force(acts, 0, 1, 3, 2)
    s = counted["sparse"]
    for f in range(7):
        got = s.top_table().query("feature == @f")
        assert list(zip(got["value"], got["context"], got["position"])) == top[f]
    assert len(s.examples_table()) == sum(len(v) for v in examples.values())
    np.testing.assert_array_equal(s.hist, hist)
    flat = acts.reshape(-1, 7).astype(np.float64)
    np.testing.assert_array_equal(s.max, flat.max(0))
    np.testing.assert_array_equal(s.min, flat.min(0))
    np.testing.assert_allclose(s.features_table()["mean"], flat.mean(0), atol=1e-6)


def test_merging_is_exact_for_any_split_and_order():
    rng = np.random.default_rng(4)
    acts = np.where(rng.random((12, 9, 6)) < 0.4, rng.lognormal(0, 2, (12, 9, 6)), -rng.random((12, 9, 6)))
    acts = acts.astype(np.float32)
    whole = stats_of(acts, k=5, m=3)
    parts = [stats_of(acts[a:b], a, 5, 3, shard=i) for i, (a, b) in enumerate([(0, 2), (2, 7), (7, 8), (8, 12)])]
    left = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    right = parts[3].merge(parts[2].merge(parts[0].merge(parts[1])))
    tree = merge_all([parts[2], parts[0], parts[3], parts[1]])
    for other in (left, right, tree):
        for name in FeatureStats.ARRAYS:
            np.testing.assert_array_equal(getattr(other, name), getattr(whole, name), err_msg=name)
        assert other.n_tokens == whole.n_tokens
    with pytest.raises(ValueError, match="counted in both"):
        parts[0].merge(parts[0])


# ---------------------------------------------------------------------------------- harvest
@pytest.fixture(scope="module")
def reference(model):
    return harvest(TEXTS, model, HOOK, shard_contexts=8, **KW)


def test_top_k_and_histogram_equal_a_brute_force_scan(reference, model):
    tokens = np.stack(list(iter_contexts(open_corpus(TEXTS), model.tokenizer, KW["ctx"])))
    acts = []
    for b in range(0, len(tokens), KW["batch_size"]):  # the whole forward pass, every activation kept
        _, cache = model.run_with_cache(tokens[b : b + KW["batch_size"]].astype(np.int64), names_filter=HOOK)
        acts.append(cache[HOOK][:, 1:])  # position 0, the <|endoftext|>, is not counted
    acts = np.concatenate(acts)  # [contexts, pos, d_mlp]
    top, examples, hist = brute_force(acts[:, :, :12], 0, 1, KW["top_k"], KW["per_band"])
    for f in range(12):
        got = reference.top.query("feature == @f")
        assert list(zip(got["value"], got["context"], got["position"])) == top[f]
        got_h = reference.histogram.query("feature == @f")
        np.testing.assert_array_equal(got_h["count"], hist[f][hist[f] > 0])
    ex = reference.examples.query("feature < 12")
    assert len(ex) == sum(len(v) for v in examples.values())
    assert reference.manifest["tokens_seen"] == acts.shape[0] * acts.shape[1]
    # the quoted contexts' tokens are the packed corpus's
    for c, t in zip(reference.contexts["context"], reference.contexts["tokens"]):
        assert list(t) == tokens[c].tolist()


def test_any_shard_size_and_shard_order_give_the_same_tables(reference, model):
    assert_same_tables(harvest(TEXTS, model, HOOK, shard_contexts=4, **KW), reference)
    assert_same_tables(harvest(TEXTS, model, HOOK, shard_contexts=12, **KW), reference)
    # three shards, harvested on their own and merged in another order
    _, _, harvester, spec = prepare(model, HOOK, None, None, KW["ctx"], KW["top_k"], KW["per_band"], 0.0, False,
                                    KW["batch_size"], 28)
    shards = list(iter_shards(open_corpus(TEXTS), model.tokenizer, KW["ctx"], 28))
    assert len(shards) == 3
    parts = [harvest_shard(harvester, s, spec) for s in (shards[2], shards[0], shards[1])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    pd.testing.assert_frame_equal(merged.top_table(), reference.top, check_exact=True)
    pd.testing.assert_frame_equal(merged.features_table(), reference.features, check_exact=True)
    pd.testing.assert_frame_equal(merged.examples_table(), reference.examples, check_exact=True)


def test_one_thread_counts_on_that_thread_with_the_same_tables(reference, model, monkeypatch):
    # with npgpt2 on one thread (a Dask worker's setting) the statistics are counted after each
    # batch on the calling thread, not on a second thread: the tables do not change. (Only the
    # counting's thread count is set to one here: with fewer than fast.MIN_ROWS rows, the model's
    # own products on one BLAS thread may differ from two in the last bits.)
    import threading

    from npgpt2.harvest import run

    counted_on = []
    real_add = FeatureStats.add
    monkeypatch.setattr(FeatureStats, "add", lambda self, *a: counted_on.append(threading.current_thread().name)
                        or real_add(self, *a))
    monkeypatch.setattr(run, "get_num_threads", lambda: 1)
    one = harvest(TEXTS, model, HOOK, shard_contexts=8, **KW)
    assert set(counted_on) == {threading.current_thread().name}
    assert_same_tables(one, reference)
    counted_on.clear()
    monkeypatch.setattr(run, "get_num_threads", lambda: 2)
    harvest(TEXTS, model, HOOK, shard_contexts=8, **KW)
    assert counted_on and all(name.startswith("npgpt2-stats") for name in counted_on)


def test_parquet_and_manifest_round_trip(reference, model, tmp_path):
    out = tmp_path / "h"
    h = harvest(TEXTS, model, HOOK, shard_contexts=8, out=str(out), **KW)
    assert sorted(os.listdir(out)) == sorted([f"{t}.parquet" for t in TABLES] + ["manifest.json"])
    loaded = npgpt2.harvest.Harvest.load(str(out))
    assert_same_tables(loaded, reference)
    man = loaded.manifest
    assert man["complete"] and man["hook"] == HOOK and man["feature_kind"] == "neuron"
    assert man["model"] == model.source and man["n_features"] == model.cfg.d_mlp
    assert man["tokens_seen"] == h.manifest["tokens_seen"] == reference.manifest["tokens_seen"]
    assert man["corpus"]["fingerprint"] == reference.manifest["corpus"]["fingerprint"]
    other = harvest(TEXTS[:-1] + ["something else entirely"], model, HOOK, shard_contexts=8, **KW)
    assert other.manifest["corpus"]["fingerprint"] != man["corpus"]["fingerprint"]


def test_interrupted_then_resumed_equals_uninterrupted(reference, model, tmp_path):
    out = str(tmp_path / "h")

    def interrupt(shard, stats):
        if shard == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(TEXTS, model, HOOK, shard_contexts=8, out=out, on_shard=interrupt, checkpoint_seconds=0, **KW)
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # not taken for a finished harvest
    with pytest.raises(HarvestError, match="unfinished"):
        npgpt2.harvest.Harvest.load(out)
    with pytest.raises(HarvestError, match="interrupted harvest"):
        harvest(TEXTS, model, HOOK, shard_contexts=8, out=out, **KW)
    seen = []
    resumed = harvest(TEXTS, model, HOOK, shard_contexts=8, out=out, resume=True,
                      on_shard=lambda shard, stats: seen.append(shard), **KW)
    assert seen[0] == 3  # shards 0..2 came from the checkpoint
    assert_same_tables(resumed, reference)
    assert_same_tables(npgpt2.harvest.Harvest.load(out), reference)
    out2 = str(tmp_path / "h2")
    with pytest.raises(KeyboardInterrupt):
        harvest(TEXTS, model, HOOK, shard_contexts=8, out=out2, on_shard=interrupt, checkpoint_seconds=0, **KW)
    with pytest.raises(HarvestError, match="other settings"):
        harvest(TEXTS, model, HOOK, shard_contexts=8, out=out2, resume=True, **{**KW, "top_k": 3})

def test_sae_latents_equal_brute_force(model, tmp_path):
    rng = np.random.default_rng(5)
    d, n = model.cfg.d_model, 16
    sae = SAE(rng.normal(0, 0.3, (d, n)).astype(np.float32), rng.normal(-0.5, 0.2, n).astype(np.float32),
              rng.normal(0, 0.3, (n, d)).astype(np.float32), np.zeros(d, np.float32), hook_name="blocks.1.hook_resid_pre")
    sae.save(str(tmp_path / "sae" / "blocks.1.hook_resid_pre"))
    h = harvest(TEXTS[:30], model, sae=f"{tmp_path / 'sae'}:blocks.1.hook_resid_pre", features=[1, 4, 9], **KW)
    assert h.manifest["feature_kind"] == "latent" and h.manifest["hook"] == "blocks.1.hook_resid_pre"
    tokens = np.stack(list(iter_contexts(open_corpus(TEXTS[:30]), model.tokenizer, KW["ctx"]))).astype(np.int64)
    acts = []
    for b in range(0, len(tokens), KW["batch_size"]):
        _, cache = model.run_with_cache(tokens[b : b + KW["batch_size"]], names_filter="blocks.1.hook_resid_pre")
        acts.append(sae.encode(cache["blocks.1.hook_resid_pre"])[:, 1:, [1, 4, 9]])
    top, _, _ = brute_force(np.concatenate(acts), 0, 1, KW["top_k"], KW["per_band"])
    for i, f in enumerate([1, 4, 9]):
        got = h.top.query("feature == @f")
        assert len(got) > 0
        assert [(c, p) for c, p in zip(got["context"], got["position"])] == [(c, p) for _, c, p in top[i]]
        np.testing.assert_allclose(got["value"], [v for v, _, _ in top[i]], rtol=1e-5)
    assert sorted(h.features["feature"]) == [1, 4, 9]


# ---------------------------------------------------------------------------------- bad input
def one_line_error(capsys, argv, *fragments):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("case", ["missing", "empty", "hook", "sae", "ctx", "scheduler"])
def test_bad_input_is_one_line_exit_2_and_leaves_no_output(case, tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(TEXTS))
    out = tmp_path / "out"
    args = ["harvest", str(corpus), "-m", str(tiny_dir), "--hook", HOOK, "--ctx", "24", "--out", str(out), "-q"]
    if case == "missing":
        args[1], want = str(tmp_path / "nope.txt"), ("does not exist",)
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args[1], want = str(tmp_path / "empty.txt"), ("fewer than 24 tokens",)
    elif case == "hook":
        args[5], want = "blocks.1.mlp.hook_psot", ("unknown hook point", "blocks.1.mlp.hook_post")
    elif case == "sae":
        d = npgpt2.from_pretrained(str(tiny_dir)).cfg.d_model
        SAE(np.zeros((d, 4), np.float32), np.zeros(4, np.float32), np.zeros((4, d), np.float32), np.zeros(d, np.float32),
            hook_name="blocks.0.hook_resid_pre").save(str(tmp_path / "sae" / "blocks.0.hook_resid_pre"))
        args += ["--sae", f"{tmp_path / 'sae'}:blocks.0.hook_resid_pre"]
        want = ("blocks.0.hook_resid_pre", HOOK)
    elif case == "ctx":
        args[7], want = "65", ("ctx=65", "2..64")
    else:
        args += ["--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", "1"]
        want = ("could not reach the Dask scheduler", "tcp://127.0.0.1:9")
    one_line_error(capsys, args, *want)
    assert not out.exists()


def test_harvest_and_dashboard_commands(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i, chunk in enumerate([TEXTS[:30], TEXTS[30:]]):
        (corpus / f"part{i}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in chunk))
    out = tmp_path / "h"
    argv = ["harvest", str(corpus), "-m", str(tiny_dir), "--hook", HOOK, "--ctx", "24", "--top-k", "6",
            "--per-band", "3", "--batch-size", "4", "--shard-contexts", "8", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    assert "harvested 256 neurons of blocks.1.mlp.hook_post" in capsys.readouterr().out
    one_line_error(capsys, argv, "already holds a finished harvest")
    site = tmp_path / "site"
    assert cli.main(["dashboard", str(out), "--out", str(site), "--features", "0-2,7", "-q"]) == 0
    assert sorted(os.listdir(site)) == ["feature-0.html", "feature-1.html", "feature-2.html", "feature-7.html", "index.html"]
    one_line_error(capsys, ["dashboard", str(out), "--out", str(tmp_path / "s2"), "--features", "300"],
                   "feature 300 is not in the harvest")
    one_line_error(capsys, ["dashboard", str(tmp_path), "--out", str(tmp_path / "s3")], "no manifest.json")


def test_one_batch_of_activations_at_a_time(model, monkeypatch):
    """Streaming: the model only ever sees batch_size contexts, and the forward pass stops at the hook."""
    from npgpt2.harvest import run

    seen, reached = [], set()
    original = run.Harvester.__call__

    def recording(self, tokens):
        seen.append(tokens.shape)
        return original(self, tokens)

    monkeypatch.setattr(run.Harvester, "__call__", recording)
    hooks = [(name, lambda act, hook: reached.add(hook.name)) for name in ("blocks.1.hook_mlp_out", "ln_final.hook_scale")]
    with model.hooks(hooks):
        h = harvest(TEXTS, model, HOOK, shard_contexts=8, **KW)
    assert max(s[0] for s in seen) == KW["batch_size"] and sum(s[0] for s in seen) == h.manifest["n_contexts"]
    assert reached == set()  # nothing after blocks.1.mlp.hook_post was computed


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -0.5])
def test_a_threshold_nothing_could_fire_above_is_refused(threshold):
    """NaN compares false with everything: a harvest at threshold NaN would count no firing at all."""
    from npgpt2.harvest.stats import StatsError

    with pytest.raises(StatsError, match=f"threshold={threshold}: expected a finite number >= 0"):
        FeatureStats.empty(3, threshold=threshold)


@pytest.mark.parametrize("missing,kwargs,message", [
    ("pyarrow", {}, "writing a harvest needs pyarrow: pip install 'npgpt2[harvest]'"),
    ("distributed", {"workers": 2}, "harvesting on Dask needs distributed: pip install 'npgpt2[dask]'"),
])
def test_a_missing_optional_library_is_named_before_any_work(monkeypatch, tmp_path, missing, kwargs, message):
    import builtins

    import npgpt2.harvest.run as run

    real_import = builtins.__import__

    def without(name, *args, **kw):
        if name == missing or name.startswith(missing + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", without)
    monkeypatch.setattr(run, "prepare", lambda *a, **k: pytest.fail("started the work first"))
    with pytest.raises(HarvestError, match=re.escape(message)):
        harvest(TEXTS, "gpt2", HOOK, out=str(tmp_path / "h"), **kwargs, **KW)
