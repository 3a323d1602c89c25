"""Corpus harvest throughput at gpt2-small's scale (random weights of its shape), in tokens/s.

The same contexts (random token ids, ctx 128, batches of 8) are run five ways, in this one run:

1. the plain forward pass, all 12 blocks and the logits (``model(tokens)``);
2. the forward pass stopped at the hook point, nothing kept: what a harvest cannot avoid;
3. ``harvest`` in this process (the statistics of all 3072 neurons of blocks.8.mlp.hook_post:
   top-k, histogram, reservoir, sums), BLAS on every core;
4. the same with npgpt2 on one thread (``npgpt2.set_num_threads(1)``);
5. ``harvest`` on a local Dask cluster of N worker processes, N the machine's cores, each with one
   BLAS thread (cluster start-up and model loading done before the clock starts).

Targets: (3) >= 0.9x (1), the statistics costing almost nothing, and reported against (2) too, the
stricter comparison; per-core efficiency (5) / (N x (4)) >= 0.85 in tokens/s: N single-threaded
workers on N cores give at least 0.85 N times one single-threaded in-process harvest. (On one
thread, (4) counts its statistics on that thread after each batch, as each Dask worker does: with
more threads they are counted on a second thread while the model runs the next batch.)

    python benchmarks/bench_harvest.py [--contexts 32] [--repeats 3] [--hook blocks.8.mlp.hook_post]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine, gpt2_small_folder  # noqa: E402

import npgpt2  # noqa: E402
from npgpt2.harvest import harvest, hook_activations  # noqa: E402


def timed(fn, repeats):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hook", default="blocks.8.mlp.hook_post")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
    ap.add_argument("--no-dask", action="store_true")
    args = ap.parse_args(argv)
    print(describe_machine())
    folder = gpt2_small_folder()
    model = npgpt2.from_pretrained(folder)
    ctx, bs = args.ctx, args.batch_size
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 50256, args.contexts * (ctx - 1)).astype(np.uint16)
    contexts = np.stack(list(npgpt2.harvest.iter_contexts(npgpt2.harvest.open_corpus(stream), model.tokenizer, ctx)))
    n_tokens = contexts.size
    cores = os.cpu_count() or 1
    shard = max(bs, args.contexts // cores)  # one shard per core (2 cores: shards of 16 contexts)
    print(f"{args.contexts} contexts x {ctx} tokens = {n_tokens:,} tokens, batches of {bs}, hook {args.hook}")

    def full_forward():
        for b in range(0, len(contexts), bs):
            model(contexts[b : b + bs].astype(np.int64))

    def to_hook():
        for b in range(0, len(contexts), bs):
            hook_activations(model, args.hook, contexts[b : b + bs].astype(np.int64))

    kw = dict(ctx=ctx, batch_size=bs, shard_contexts=shard, progress=False)

    def in_process():
        return harvest(stream, model, args.hook, **kw)

    to_hook()  # warm-up (tokenizer tables, page-ins of the mapped weights)
    def in_process_one_thread():
        threads = npgpt2.get_num_threads()
        npgpt2.set_num_threads(1)
        try:
            return in_process()
        finally:
            npgpt2.set_num_threads(threads)

    runs = {"forward, all layers + logits": full_forward, "forward to the hook": to_hook,
            "harvest, in-process": in_process, "harvest, in-process, 1 thread": in_process_one_thread}
    dask_run = f"harvest, Dask {cores} x 1 thread"
    stack = contextlib.ExitStack()
    if not args.no_dask:
        from npgpt2.harvest.cluster import blas_threads, connect

        client = stack.enter_context(connect(workers=cores))
        # a shard for each worker, so that every one loads the model before the clock starts
        harvest(stream[: cores * bs * (ctx - 1)], folder, args.hook, client=client, **{**kw, "shard_contexts": bs})
        runs[dask_run] = lambda: harvest(stream, folder, args.hook, client=client, **kw)
        print(f"(Dask workers: {cores} processes x {blas_threads(cores)} BLAS thread(s) on {cores} cores)")
    # the statistics alone, on one batch's real activations counted again and again (as later batches)
    acts = hook_activations(model, args.hook, contexts[:bs].astype(np.int64))[:, 1:].astype(np.float32)
    acts = acts.reshape(bs, ctx - 1, -1)
    stats = npgpt2.harvest.FeatureStats.empty(acts.shape[-1], 20, 5)
    stats.add(acts, 0, 1)
    n_batches = len(contexts) // bs
    counter = iter(range(1, 10**6))
    runs["statistics alone (FeatureStats.add)"] = lambda: [stats.add(acts, next(counter) * bs, 1) for _ in range(n_batches)]
    # the runs take turns, round after round, and each keeps its best: other work on the machine
    # then weighs on all of them alike
    results = {name: np.inf for name in runs}
    with stack:
        for r in range(args.repeats):
            for name, fn in runs.items():
                results[name] = min(results[name], timed(fn, 1))
            print(f"round {r + 1}: " + ", ".join(f"{n} {t:.1f} s" for n, t in results.items()), flush=True)

    print(f"\n{'run':<32} {'seconds':>8} {'tokens/s':>10}")
    for name, t in results.items():
        print(f"{name:<32} {t:>8.2f} {n_tokens / t:>10,.0f}")
    share = results["statistics alone (FeatureStats.add)"] / results["forward to the hook"]
    print(f"\nstatistics alone / forward to the hook: {share:.1%} of its time "
          f"(so harvest / forward to the hook <= {1 / (1 + share):.2f}x from them)")
    r1 = results["forward to the hook"] / results["harvest, in-process"]
    r0 = results["forward, all layers + logits"] / results["harvest, in-process"]
    print(f"harvest in-process / plain forward:       {r0:.2f}x (target >= 0.9x the plain forward pass's tokens/s)")
    print(f"harvest in-process / forward to the hook: {r1:.2f}x (the stricter comparison: against all a harvest "
          "must run, what the statistics cost)")
    if dask_run in results:
        single = results["harvest, in-process, 1 thread"]
        efficiency = single / (cores * results[dask_run])
        print(f"per-core efficiency, {cores} single-threaded Dask workers / ({cores} x one single-threaded in-process "
              f"harvest): {efficiency:.2f} (target >= 0.85)")
        print(f"Dask {cores} workers / in-process harvest on every core: "
              f"{results['harvest, in-process'] / results[dask_run]:.2f}x")
    print(f"load average now: {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
