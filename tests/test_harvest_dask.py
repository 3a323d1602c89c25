"""Harvests on a local Dask cluster (worker processes) give the same Parquet tables as in this
process: with one worker, two workers, and after a worker is killed mid-run.

One two-worker cluster serves the module (the kill comes last); ``workers=1`` starts its own."""

import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import npgpt2
from npgpt2.harvest import harvest
from npgpt2.harvest.run import TABLES

distributed = pytest.importorskip("distributed", reason="the Dask tests need distributed (pip install -e '.[test]')")
pytest.importorskip("pyarrow", reason="the harvest writes Parquet (pip install -e '.[test]')")

from test_harvest import HOOK, KW, TEXTS  # noqa: E402

ARGS = dict(shard_contexts=4, **KW)  # 77 contexts -> 20 shards -> waves of 4 on two workers


@pytest.fixture(scope="module")
def client2():
    # BLAS starts with more threads than cores: harvests through the scheduler must bring it down
    many = str((os.cpu_count() or 1) + 1)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=logging.ERROR, env={"OPENBLAS_NUM_THREADS": many, "OMP_NUM_THREADS": many})
    client = distributed.Client(cluster)
    # the workers import this copy of npgpt2, not another install
    assert set(client.run(lambda: __import__("npgpt2").__file__).values()) == {npgpt2.__file__}
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def in_process(tiny_dir, tmp_path_factory):
    """The in-process harvest, npgpt2 on one thread as each worker here (threads_per_worker=1,
    two workers on two cores): with batches of fewer than fast.MIN_ROWS rows (4 x 24 here), the
    model's products run whole, with BLAS at npgpt2's thread count, and OpenBLAS's multi-threaded
    products may sum in another order than its single-threaded ones (its Haswell kernels do), which
    moves activations in the last bit and can move a count at the threshold by one. Same
    arithmetic, same bits."""
    out = str(tmp_path_factory.mktemp("in-process") / "h")
    before = npgpt2.get_num_threads()
    npgpt2.set_num_threads(1)
    try:
        harvest(TEXTS, str(tiny_dir), HOOK, out=out, **ARGS)
    finally:
        npgpt2.set_num_threads(before)
    return out


def assert_same_parquet(a, b):
    for name in TABLES:
        x, y = (pd.read_parquet(os.path.join(d, f"{name}.parquet")) for d in (a, b))
        assert len(x) > 0, name
        pd.testing.assert_frame_equal(x, y, check_exact=True, obj=name)


def test_one_worker_and_an_existing_two_worker_cluster_match_in_process(in_process, tiny_dir, client2, tmp_path, hf_home):
    # one worker: `npgpt2 harvest --workers 1`, as a user runs it, on the same texts as files
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"{i:03d}.txt").write_text(text)
    argv = [sys.executable, "-m", "npgpt2", "harvest", str(corpus), "-m", str(tiny_dir), "--hook", HOOK,
            "--ctx", str(KW["ctx"]), "--top-k", str(KW["top_k"]), "--per-band", str(KW["per_band"]),
            "--batch-size", str(KW["batch_size"]), "--shard-contexts", "4", "--out", str(tmp_path / "one"),
            "--workers", "1", "-q"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "dask (1 workers)" in proc.stdout
    assert_same_parquet(str(tmp_path / "one"), in_process)
    two = harvest(TEXTS, str(tiny_dir), HOOK, out=str(tmp_path / "two"), scheduler=client2.scheduler.address, **ARGS)
    assert two.manifest["runner"] == "dask (2 workers)"
    assert_same_parquet(str(tmp_path / "two"), in_process)
    # each worker loaded the model once, and its BLAS was limited to cores // workers threads
    loaded = client2.run(lambda: len(__import__("npgpt2.harvest.cluster", fromlist=["_HARVESTERS"])._HARVESTERS))
    assert set(loaded.values()) == {1}
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pools = client2.run(lambda: [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"])
    assert set(sum(pools.values(), [])) == {max(1, (os.cpu_count() or 1) // 2)}


def test_three_shards_in_another_order_on_the_cluster(in_process, tiny_dir, client2):
    from npgpt2.harvest import iter_shards, open_corpus
    from npgpt2.harvest.cluster import harvest_on_cluster
    from npgpt2.harvest.run import build_harvester, harvest_shard, prepare
    from npgpt2.harvest.stats import FeatureStats

    model, _, harvester, spec = prepare(str(tiny_dir), HOOK, None, None, KW["ctx"], KW["top_k"], KW["per_band"],
                                        0.0, False, KW["batch_size"], 28)
    shards = list(iter_shards(open_corpus(TEXTS), model.tokenizer, KW["ctx"], 28))
    assert len(shards) == 3
    state = [FeatureStats.empty(harvester.n_features, KW["top_k"], KW["per_band"])]
    harvest_on_cluster(client2, spec, None, [shards[2], shards[0], shards[1]],
                       lambda stats, n, last: state.append(state.pop().merge(stats)), build_harvester, harvest_shard)
    merged = state[0]
    assert merged.shards == (0, 1, 2)
    for name, table in (("features", merged.features_table()), ("top", merged.top_table()),
                        ("examples", merged.examples_table()), ("histogram", merged.histogram_table())):
        pd.testing.assert_frame_equal(table, pd.read_parquet(os.path.join(in_process, f"{name}.parquet")),
                                      check_exact=True, obj=name)


def test_an_interrupted_cluster_harvest_resumes_to_the_same_tables(tiny_dir, client2, tmp_path):
    """The cluster reads shards ahead of those counted: the checkpoint names shards read but not yet
    counted, and the resumed run must do those again, not skip them."""
    out, seen = str(tmp_path / "resumed"), []

    def interrupt(shard, stats):
        seen.append(shard)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(TEXTS, str(tiny_dir), HOOK, out=out, client=client2, on_shard=interrupt, checkpoint_seconds=0, **ARGS)
    import json

    saved = json.load(open(os.path.join(out, "checkpoint", "state.json")))["digests"]
    assert seen == [3] and len(saved) > 4  # shards 0-3 counted, more read ahead
    harvest(TEXTS, str(tiny_dir), HOOK, out=out, client=client2, resume=True, **ARGS)
    whole = str(tmp_path / "whole")
    harvest(TEXTS, str(tiny_dir), HOOK, out=whole, client=client2, **ARGS)
    assert_same_parquet(out, whole)


def test_a_worker_killed_mid_run_changes_nothing(in_process, tiny_dir, client2, tmp_path):
    before = client2.run(os.getpid)
    killed, held, victims = [], [], []

    def kill_once(shard, stats):  # as a shard comes in, the first worker then holding harvest work dies
        if killed:
            return
        processing, has_what = client2.processing(), client2.has_what()
        for address, pid in sorted(before.items()):
            work = list(processing.get(address, ())) + list(has_what.get(address, ()))
            if any("harvest_task" in str(k) or "merge_task" in str(k) for k in work):
                held.extend(work)
                victims.append(pid)
                os.kill(pid, signal.SIGKILL)
                killed.append(shard)
                return

    out = str(tmp_path / "killed")
    harvest(TEXTS, str(tiny_dir), HOOK, out=out, client=client2, on_shard=kill_once, **ARGS)
    assert killed and killed[0] < 19  # the kill came before the last shard was counted
    assert any("harvest_task" in str(k) or "merge_task" in str(k) for k in held)  # work was lost with it
    assert victims[0] not in client2.run(os.getpid).values()  # that process is gone (its nanny started another)
    assert_same_parquet(out, in_process)


def test_local_workers_keep_glibcs_memory_defaults():
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_, which turns off glibc's growing mmap threshold: each
    # large array of a forward pass is then mapped and page-faulted afresh (a third slower)
    from npgpt2.harvest.cluster import connect

    with connect(workers=1) as client:
        seen = client.run(lambda: (__import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"),
                                   __import__("os").environ.get("OPENBLAS_NUM_THREADS")))
    assert list(seen.values()) == [(None, str(os.cpu_count() or 1))]
