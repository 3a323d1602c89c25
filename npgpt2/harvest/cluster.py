"""Harvesting on a Dask cluster (``distributed``, the ``dask`` extra).

The driver packs the corpus and sends shards (their token ids) to the workers in waves of twice the
number of workers; each wave's statistics are merged on the cluster as a balanced tree of ``merge``
tasks, and the driver folds the wave's single result into its state (and checkpoint). Each worker
process loads the model once (memory-mapped) and keeps it for every shard it is given. A worker lost
mid-run is replaced by its nanny and the scheduler runs its tasks again (``retries`` covers errors
raised inside a task); since the statistics merge exactly, the result does not change.

BLAS threads: a local cluster of N workers gets ``cores // N`` BLAS threads per worker (set in the
environment before the worker imports numpy); on an existing cluster the same is set with
threadpoolctl, when the workers have it, from the number of workers on each host.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from itertools import islice

from .corpus import HarvestError

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_HARVESTERS: dict = {}  # in a worker process: the model + SAE of each spec, loaded once


def _distributed():
    try:
        import distributed
    except ImportError:
        raise HarvestError("harvesting on Dask needs distributed: pip install 'npgpt2[dask]'") from None
    return distributed


def blas_threads(workers: int, cores: int | None = None) -> int:
    """BLAS threads per worker so that workers x threads = cores (at least 1)."""
    return max(1, (cores or os.cpu_count() or 1) // max(workers, 1))


@contextlib.contextmanager
def connect(workers: int | None = None, scheduler: str | None = None, client=None, timeout: float = 10.0):
    """A ``distributed.Client``: the one given, a new local cluster of ``workers`` processes, or the
    scheduler at ``scheduler``. Fails at once, with one line, when it cannot be reached."""
    if client is not None:
        yield client
        return
    if workers is not None and scheduler is not None:
        raise HarvestError("give either workers (a local cluster) or scheduler (an existing one), not both")
    distributed = _distributed()
    import logging

    if scheduler is not None:
        try:
            c = distributed.Client(scheduler, timeout=f"{timeout}s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HarvestError(f"could not reach the Dask scheduler at {scheduler!r} within {timeout:g} s ({reason[:120]})") from None
        try:
            _limit_blas_on_workers(c)
            yield c
        finally:
            c.close()
        return
    if workers is None or workers < 1:
        raise HarvestError(f"workers={workers}: expected at least 1")
    threads = blas_threads(workers)
    import dask

    # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's
    # growing mmap threshold: every large array a forward pass makes is then mapped afresh and
    # page-faulted in, and a worker runs a third slower than the same harvest in a plain process
    # (8.5 s against 11.4 s for 32 contexts of gpt2-small on one thread). Workers started here
    # keep glibc's defaults. (A nanny also leaves the variable in its parent's environment, where
    # the next workers would inherit it: it is kept out of that too while they start.)
    left = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.ERROR,
                                               env={v: str(threads) for v in _THREAD_VARS})
    finally:
        if left is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = left
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _limit_blas_on_workers(client) -> None:
    info = client.scheduler_info()["workers"]
    per_host: dict = {}
    for w in info.values():
        per_host[w["host"]] = per_host.get(w["host"], 0) + 1
    for addr, w in info.items():
        client.run(_set_blas_threads, blas_threads(per_host[w["host"]], None), workers=[addr])


def _set_blas_threads(n: int) -> int:
    """On a worker: limit its BLAS pools to n threads (threadpoolctl, when installed)."""
    for v in _THREAD_VARS:
        os.environ[v] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return 0
    threadpool_limits(n)
    return n


# ---------------------------------------------------------------------------------- tasks
def _harvester(spec, sae, build):
    """On a worker: the harvester of ``spec`` (``build(spec, sae)``), made once and kept."""
    key = (spec.model, spec.revision, spec.dtype, spec.processing, spec.hook, spec.sae, spec.features,
           spec.include_bos, None if sae is None else id(sae))
    if key not in _HARVESTERS:
        _HARVESTERS.clear()  # one model at a time per worker
        _HARVESTERS[key] = build(spec, sae)
    return _HARVESTERS[key]


def harvest_task(spec, sae, shard, build, run_shard):
    """On a worker: one shard -> its ``FeatureStats``, by ``run_shard(harvester, shard, spec)`` with
    the worker's harvester from ``build(spec, sae)`` (run.py's, handed over with the task)."""
    return run_shard(_harvester(spec, sae, build), shard, spec)


def merge_task(a, b):
    return a.merge(b)


def harvest_on_cluster(client, spec, sae, shards, counted, build, run_shard, waves_ahead: int = 2) -> None:
    """Harvest ``shards`` on the cluster; ``counted(stats, n_contexts, last_shard_index)`` receives
    each wave's merged statistics on the driver. ``build(spec, sae)`` makes a worker's harvester and
    ``run_shard(harvester, shard, spec)`` harvests a shard (run.py's ``build_harvester`` and
    ``harvest_shard``: passed in, as this module sits below run.py)."""
    n_workers = max(1, len(client.scheduler_info()["workers"]))
    wave_size = 2 * n_workers
    sae_data = client.scatter(sae, broadcast=True) if sae is not None else None
    shards = iter(shards)
    pending: deque = deque()

    def submit_wave() -> bool:
        futures, sizes = [], []
        for shard in islice(shards, wave_size):
            futures.append(client.submit(harvest_task, spec, sae_data, shard, build, run_shard, pure=False, retries=3))
            sizes.append((shard.index, len(shard.tokens)))
        if not futures:
            return False
        while len(futures) > 1:  # a balanced tree of merges, run on the cluster
            futures = [client.submit(merge_task, futures[i], futures[i + 1], pure=False, retries=3)
                       if i + 1 < len(futures) else futures[i] for i in range(0, len(futures), 2)]
        pending.append((futures[0], sizes))
        return True

    for _ in range(waves_ahead):
        submit_wave()
    while pending:
        future, sizes = pending.popleft()
        stats = future.result()
        future.release()
        submit_wave()
        counted(stats, sum(n for _, n in sizes), sizes[-1][0])
