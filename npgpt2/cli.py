"""The ``npgpt2`` command (also ``python -m npgpt2``).

    npgpt2 generate "Alan Turing theorized that computers would one day become"
    npgpt2 tokens "Hello, my dog is cute"
    npgpt2 trace "The dog" --layer 0
    npgpt2 step "The cat sat"
    npgpt2 saliency "The Eiffel Tower is in the city of" --target " Paris"
    npgpt2 lens "The Eiffel Tower is in the city of" --png lens.png
    npgpt2 inspect -m zoo:induction
    npgpt2 info
    npgpt2 download gpt2-medium
    npgpt2 parity --model gpt2
    npgpt2 finetune notes.txt -m gpt2 --steps 200 --out my-gpt2
    npgpt2 eval notes.txt -m my-gpt2 --stride 512
    npgpt2 zoo build induction --out induction-model

Every command that takes --model accepts an alias, a hub repository id, a local folder, or
``zoo:induction`` (a small model npgpt2 trains itself, see zoo.py).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import fnmatch
import os
import sys

import numpy as np

from .config import ALIASES


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _load(args, **kwargs):
    from .loading import from_pretrained

    if args.model.startswith(ZOO_PREFIX):  # a model npgpt2 trains itself (npgpt2.zoo), built on first use
        return _zoo_model(args.model[len(ZOO_PREFIX):], dtype=getattr(args, "dtype", "float32"), **kwargs)
    return from_pretrained(args.model, revision=getattr(args, "revision", None),
                           dtype=getattr(args, "dtype", "float32"), **kwargs)


# ---------------------------------------------------------------------------------- zoo
ZOO_PREFIX = "zoo:"
ZOO_MODELS = ("induction",)


def _zoo_model(name: str, **kwargs):
    from . import zoo

    if name not in ZOO_MODELS:
        raise CLIError(f"unknown zoo model {name!r}: expected one of {', '.join(ZOO_MODELS)}")
    return zoo.induction(**kwargs)


def cmd_zoo(args):
    from . import zoo

    recipe = zoo.InductionRecipe()
    if args.max_steps is not None:
        recipe = dataclasses.replace(recipe, max_steps=args.max_steps)
    folder = zoo.build_induction(args.out, seed=args.seed, recipe=recipe, progress=not args.quiet and None,
                                 log=lambda line: print(line, file=sys.stderr))
    print(folder)


# ----------------------------------------------------------------------- checks before the work
def _check_prompt(text: str, prepend_bos: bool) -> None:
    if text == "" and not prepend_bos:
        raise CLIError("the text is empty: give some text, or --prepend-bos to start from <|endoftext|> alone")


def _check_output_file(path, flag: str) -> None:
    """Refuse, before any work, a file that could not be written at the end."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; expected a file name, e.g. {os.path.join(path, 'out.png')}")
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path!r}: the folder {folder!r} does not exist; create it first")


def _check_output_folder(path, flag: str) -> None:
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a file; expected a folder (new, or one to write into)")


# ---------------------------------------------------------------------------------- generate
def cmd_generate(args):
    _check_prompt(args.prompt, args.prepend_bos)
    model = _load(args)
    tokens = model.validate_tokens(model.to_tokens(args.prompt, prepend_bos=args.prepend_bos))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    import warnings

    from .generate import ContextLimitWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextLimitWarning)
        for token in model.generate_stream(tokens[0], max_new_tokens=args.n, temperature=args.temperature,
                                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                           stop_at_eos=not args.no_stop):
            # a token may end inside a multi-byte character: decode bytes incrementally
            out.write(decoder.decode(model.tokenizer.token_bytes(token)))
            out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    for w in caught:
        print(f"npgpt2: {w.message}", file=sys.stderr)


# ------------------------------------------------------------------------------------ tokens
def cmd_tokens(args):
    _check_prompt(args.text, args.prepend_bos)
    model = _load(args)
    tokens = model.to_tokens(args.text, prepend_bos=args.prepend_bos)[0]
    print(f"{len(tokens)} tokens")
    print(f"{'pos':>4}  {'id':>6}  token")
    for i, t in enumerate(tokens):
        print(f"{i:>4}  {int(t):>6}  {model.tokenizer.token_str(t)!r}")


# -------------------------------------------------------------------------------------- step
def cmd_step(args):
    from .debug import breakpoint_for, step_through

    for name in args.breaks:
        breakpoint_for(name)  # a bad name fails before the model loads
    model = _load(args)
    where = f"at --break {', '.join(args.breaks)}" if args.breaks else "at the first line of the forward pass"
    print(f"npgpt2 step: the debugger stops {where}; `n` runs a line, `s` steps into a call, `r` runs to "
          "the return, `p NAME` prints a value, `c` runs on, `q` quits (the README's \"Step through the "
          "forward pass\" shows a walk)", file=sys.stderr)
    logits = step_through(model, args.text, break_at=args.breaks)
    if logits is None:
        print("npgpt2 step: the debugger was quit before the forward pass finished")
        return 0
    top = model.tokenizer.token_str(int(logits[0, -1].argmax()))
    print(f"npgpt2 step: the forward pass ran to the end: logits of shape {list(logits.shape)} "
          f"[batch, pos, d_vocab]; the most likely next token is {top!r}")


# ----------------------------------------------------------------------------------- inspect
def cmd_inspect(args):
    try:  # before the model loads: the extra may be missing
        import tornado  # noqa: F401
    except ImportError:
        raise CLIError("npgpt2 inspect needs the web server tornado: pip install 'npgpt2[inspect]'") from None
    harvest = None
    if args.harvest is not None:
        from .harvest import Harvest

        if not os.path.isdir(args.harvest):
            raise CLIError(f"--harvest {args.harvest!r} is not a folder; expected one written by npgpt2 harvest")
        harvest = Harvest.load(args.harvest)
    sae = None
    if args.sae is not None:
        from .harvest.run import _load_sae

        sae, _ = _load_sae(args.sae)
    from .inspect.server import Server

    try:
        server = Server(_load(args), port=args.port, ip=args.ip, sae=sae, harvest=harvest)
    except OSError as e:
        raise CLIError(f"cannot listen on {args.ip or '127.0.0.1'}:{args.port}: {e.strerror or e} "
                       "(another program may use that port: try --port 0 for a free one)") from None
    print(f"npgpt2 inspect: {server.inspector.model.name} at\n    {server.url}\n"
          "(Ctrl-C stops it; the token in the URL is what lets a browser in)", flush=True)
    if not args.no_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve()
    except KeyboardInterrupt:
        print("npgpt2 inspect: stopped", file=sys.stderr)


# ------------------------------------------------------------------------------------- trace
def cmd_trace(args):
    _check_prompt(args.text, args.prepend_bos)
    model = _load(args)
    tokens = model.to_tokens(args.text, prepend_bos=args.prepend_bos)
    str_tokens = model.to_str_tokens(tokens)

    def selected(name):
        if args.layer is not None:
            if not name.startswith(f"blocks.{args.layer}."):
                return False
        if args.names:
            return fnmatch.fnmatch(name, args.names)
        return not name.endswith("attn.hook_result")  # computed only when asked for by --names

    if args.layer is not None and not 0 <= args.layer < model.cfg.n_layer:
        raise CLIError(f"--layer {args.layer} is out of range: the model has layers 0..{model.cfg.n_layer - 1}")
    names = [n for n in model.hook_names() if selected(n)]
    if not names:
        raise CLIError(f"no hook point matches --names {args.names!r}"
                       + (f" in layer {args.layer}" if args.layer is not None else ""))
    if args.grad:
        metric, what = _target_metric(model, tokens, args.target)
        value, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, metric=metric)
        logits = model(tokens)
    elif args.target:
        raise CLIError("--target is for --grad: the gradient of that token's log-probability")
    else:
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    print(f"{model.name}: {len(str_tokens)} tokens {str_tokens}")
    if args.grad:
        print(f"gradients of {what} = {value:.4f}; grad norm = the gradient's norm over the whole activation")
    grad_header = f" {'grad norm':>10}" if args.grad else ""
    print(f"{'hook point':<34} {'shape':<20} {'mean':>9} {'std':>9} {'min':>9} {'max':>9}{grad_header}")
    for name in names:
        a = cache[name]
        finite = a[np.isfinite(a)]  # attention scores hold -inf for the masked future
        grad = f" {np.linalg.norm(cache[name + '_grad']):>10.3e}" if args.grad else ""
        print(f"{name:<34} {str(list(a.shape)):<20} {finite.mean():>9.4f} {finite.std():>9.4f} "
              f"{finite.min():>9.4f} {finite.max():>9.4f}{grad}")
        if name.endswith("hook_pattern"):
            last = a[0, :, -1, :]  # [head, key]: where the last position looks
            tops = ", ".join(f"H{h}->{str_tokens[int(k)]!r} {last[h, k]:.2f}"
                             for h, k in enumerate(last.argmax(-1)))
            print(f"{'':<4}last query attends most to: {tops}")
    top = logits[0, -1].argsort()[::-1][:5]
    print("next-token prediction: " + ", ".join(f"{model.tokenizer.token_str(t)!r}" for t in top))


def _target_metric(model, tokens, target):
    """--target TOKEN -> (its log-probability at the last position as a metric, a description);
    no target: the mean next-token loss."""
    from . import metrics

    if target is None:
        if tokens.shape[1] < 2:
            raise CLIError("the loss needs at least 2 tokens; give --target TOKEN for a one-token text")
        return metrics.loss(tokens), "the mean next-token loss"
    return metrics.logprob(model.to_single_token(target)), f"log P({target!r}) at the last position"


# ---------------------------------------------------------------------------------- saliency
def cmd_saliency(args):
    from .analysis import token_saliency
    from . import metrics

    _check_output_file(args.png, "--png")
    _check_prompt(args.prompt, args.prepend_bos)
    model = _load(args)
    tokens = model.validate_tokens(model.to_tokens(args.prompt, prepend_bos=args.prepend_bos))
    if args.target is None:
        target = int(model(tokens)[0, -1].argmax())
        print(f"target: the model's top prediction, {model.tokenizer.token_str(target)!r}")
    else:
        target = model.to_single_token(args.target)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = token_saliency(model, tokens[0], metrics.logprob(target), method=args.method, steps=args.steps,
                            baseline=args.baseline)
    for w in caught:  # a note for the reader, not a Python warning with its file and line
        print(f"npgpt2 saliency: note: {w.message} (--steps, now {args.steps})", file=sys.stderr)
    a = df.attrs
    print(f"{args.method} of log P({model.tokenizer.token_str(target)!r}) = {a['metric']:.4f} over the "
          f"token embeddings")
    if args.method == "integrated_gradients":
        print(f"baseline {a['baseline']}: {a['baseline_metric']:.4f}; the scores add up to "
              f"{a['sum_of_scores']:.4f} (completeness error {a['completeness_error']:.2%}, {a['steps']} steps)")
    print(f"{'pos':>4}  {'token':<16} {'score':>9} {'share':>7}")
    for row in df.itertuples():
        print(f"{row.position:>4}  {row.token!r:<16} {row.score:>9.4f} {row.share:>7.1%}")
    if args.png:
        from .plot import saliency_plot

        saliency_plot(df, path=args.png, metric=f"log P({model.tokenizer.token_str(target)!r})", model=model.name)
        print(f"wrote {args.png}")


# ----------------------------------------------------------------------------------- circuit
def cmd_circuit(args):
    from . import metrics
    from .analysis.edges import circuit_faithfulness, edge_attribution, greedy_circuit

    _check_output_file(args.png, "--png")
    _check_output_file(args.html, "--html")
    model = _load(args)
    clean, corrupted = (model.validate_tokens(model.to_tokens(t, prepend_bos=args.prepend_bos))
                        for t in (args.clean, args.corrupted))
    if clean.shape != corrupted.shape:
        raise CLIError(f"the clean prompt has {clean.shape[1]} tokens and the corrupted one {corrupted.shape[1]}: "
                       "they must have the same number of tokens")
    if np.array_equal(clean, corrupted):
        raise CLIError("the clean and corrupted prompts are the same tokens: there is no difference for a circuit "
                       "to explain; change the corrupted prompt (e.g. other names)")
    metric = metrics.logit_diff(model.to_single_token(args.answer), model.to_single_token(args.wrong))
    scores = edge_attribution(model, clean, corrupted, metric, method=args.method, ig_steps=args.ig_steps)
    kept = greedy_circuit(scores, args.top)
    clean_value, corrupted_value = metric(model(clean)), metric(model(corrupted))
    print(f"logit difference {args.answer!r} - {args.wrong!r}: clean {clean_value:.4f}, corrupted {corrupted_value:.4f}")
    print(f"{args.method} scores for {len(scores):,} edges; the top {args.top}, pruned to {len(kept)} that reach the logits:")
    print(f"{'upstream':<10} {'downstream':<10} {'input':<7} {'score':>10}")
    for row in kept.itertuples():
        print(f"{row.upstream:<10} {row.downstream:<10} {row.input:<7} {row.score:>10.4f}")
    faithfulness = round(circuit_faithfulness(model, clean, corrupted, kept, metric), 3) + 0.0  # no "-0.000"
    print(f"faithfulness of this circuit (1 = restores the clean logit difference): {faithfulness:.3f}")
    picture = dict(n_head=model.cfg.n_head, n_layer=model.cfg.n_layer, model=model.name,
                   title=f"{model.name} \u00b7 {args.method}: top {len(kept)} edges")
    if args.png:
        from .plot import circuit

        circuit(kept, path=args.png, **picture)
        print(f"wrote {args.png}")
    if args.html:
        from .plot import circuit_html

        circuit_html(kept, path=args.html, prompts={"clean": args.clean, "corrupted": args.corrupted},
                     metric=f"logit difference {args.answer!r} - {args.wrong!r}: clean {clean_value:.4f}, "
                            f"corrupted {corrupted_value:.4f}",
                     faithfulness=faithfulness, **picture)
        print(f"wrote {args.html} (opens offline)")


# -------------------------------------------------------------------------------------- info
def cmd_info(args):
    model = _load(args)
    c = model.cfg
    print(f"model      {model.name}")
    print(f"source     {model.source}")
    if model.files is not None:
        print(f"files in   {os.path.dirname(os.path.realpath(model.files.config))}")
        for path in model.files.weights:
            print(f"weights    {path} ({os.path.getsize(path):,} bytes)")
    print(f"config     n_layer={c.n_layer} n_head={c.n_head} d_model={c.d_model} d_head={c.d_head} "
          f"d_mlp={c.d_mlp} n_ctx={c.n_ctx} d_vocab={c.d_vocab} eps={c.eps}")
    print(f"parameters {model.n_params():,} ({model.dtype})")
    print("hook points (per block: blocks.{l}.<name>, l = 0.." + f"{c.n_layer - 1}):")
    for n in model.hook_names():
        if n.startswith("blocks.0."):
            print(f"  blocks.{{l}}.{n[len('blocks.0.'):]}")
        elif not n.startswith("blocks."):
            print(f"  {n}")


# ---------------------------------------------------------------------------------- download
def cmd_download(args):
    from .hub import resolve

    files = resolve(args.model, revision=args.revision)
    print(f"{args.model}: {files.source}")
    for path in [files.config, *files.weights, files.vocab, files.merges]:
        if path:
            print(f"  {path}  ({os.path.getsize(path):,} bytes)")


# ------------------------------------------------------------------------------------ parity
def cmd_parity(args):
    """Exit 0 when every quantity is within the parity bounds, 1 when one is not, 2 when the check
    cannot run (torch or transformers missing, an empty prompt, a model that cannot be loaded)."""
    import json

    from . import parity

    if args.text is not None and not args.text.strip():
        raise CLIError(f"TEXT is {args.text!r}: expected a prompt (at least one token), or no TEXT for the "
                       f"{len(parity.DEFAULT_TEXTS)} example sentences")
    try:
        parity.require_torch()
    except parity.ReferenceUnavailable as e:
        print(f"npgpt2 parity: cannot run: {e}", file=sys.stderr)
        return 2
    model = _load(args)
    texts = [args.text] if args.text is not None else list(parity.DEFAULT_TEXTS)
    verdicts = parity.check(model, texts, grad=args.grad, prepend_bos=args.prepend_bos)
    failed = sum(not v.passed for v in verdicts)
    if args.json:
        print(json.dumps({"model": model.name, "source": model.source, "dtype": args.dtype, "texts": texts,
                          "grad": args.grad, "passed": not failed,
                          "rule": _parity_rule(args.dtype), "quantities": [v.as_dict() for v in verdicts]}, indent=1))
        return 1 if failed else 0
    print(f"{model.name} ({model.source}), npgpt2 in {args.dtype}, {len(texts)} prompt(s)"
          + (", with the loss's gradients" if args.grad else "")
          + "; errors are the largest |difference| from the float64 reference (transformers; torch autograd for gradients)")
    print("pass: " + _parity_rule(args.dtype))
    print(parity.Verdict.header())
    for v in verdicts:
        print(v.line())
    print(f"parity checks: {len(verdicts) - failed} of {len(verdicts)} within bounds"
          + (f", {failed} outside" if failed else ""))
    return 1 if failed else 0


def _parity_rule(dtype: str) -> str:
    from . import parity

    if dtype == "float32":
        return (f"per row (one position's values), npgpt2's error over the float32 reference's (or over "
                f"{parity.FLOOR_ULPS:g} float32 steps of the row's scale, if larger) is at most "
                f"{parity.TYPICAL_LIMIT:g} at the {parity.PERCENTILE:g}th percentile of rows (p{parity.PERCENTILE:g}) "
                f"and {parity.WORST_LIMIT:g} at the worst row (worst)")
    return (f"in every row (one position's values) error <= {parity.FLOAT64_ROW_LIMIT:g} x the row's largest "
            "|value| (or 1, for gradients the quantity's largest |value|, if larger)")


# -------------------------------------------------------------------------------------- lens
def cmd_lens(args):
    from .analysis import logit_lens

    _check_output_file(args.png, "--png")
    _check_prompt(args.prompt, args.prepend_bos)
    model = _load(args)
    tokens = model.validate_tokens(model.to_tokens(args.prompt, prepend_bos=args.prepend_bos))
    df = logit_lens(model, tokens, incl_mid=args.incl_mid)
    layers = list(df["layer"].cat.categories)
    tokens_str = df[df["layer_index"] == 0].sort_values("position")["token"].tolist()
    from .style import short_label

    cell = df.assign(cell=[f"{short_label(t, 9)} {p:.2f}" if not np.isnan(p) else short_label(t, 9)
                           for t, p in zip(df["top_token"], df["next_prob"])])
    table = cell.pivot(index="layer", columns="position", values="cell").reindex(layers)
    table.columns = [f"{p}:{short_label(t, 8)}" for p, t in enumerate(tokens_str)]
    print(f"logit lens of {model.name}: cells are the top predicted token and P(actual next token); "
          "\u2423 is a space")
    import shutil

    width = shutil.get_terminal_size().columns  # (COLUMNS, else the terminal's, else 80)
    print(table.to_string(line_width=width))  # the positions in blocks that fit the width
    if args.png:
        from .plot import logit_lens_heatmap

        logit_lens_heatmap(df, path=args.png, model=model.name)
        print(f"heatmap written to {args.png}")


# ----------------------------------------------------------------------------------- harvest
def cmd_harvest(args):
    from .harvest import harvest

    if args.workers is not None and args.scheduler is not None:
        raise CLIError("--workers starts a local Dask cluster and --scheduler uses an existing one: give one")
    features = None
    if args.features:
        from .harvest.dashboard import parse_features

        features = parse_features(args.features)
    h = harvest(args.corpus, args.model, args.hook, args.sae, features=features, ctx=args.ctx, tokens=args.tokens,
                top_k=args.top_k, per_band=args.per_band, threshold=args.threshold, include_bos=args.include_bos,
                batch_size=args.batch_size, shard_contexts=args.shard_contexts, out=args.out, resume=args.resume,
                overwrite=args.overwrite, workers=args.workers, scheduler=args.scheduler,
                scheduler_timeout=args.scheduler_timeout, revision=args.revision,
                dtype=args.dtype, text_field=args.text_field, split=args.split, progress=not args.quiet)
    m = h.manifest
    fired = int((h.features["fire_count"] > 0).sum())
    print(f"harvested {m['n_features']} {m['feature_kind']}s of {m['hook']} over {m['tokens_seen']:,} tokens "
          f"({m['n_contexts']} contexts of {m['ctx']}, {m['runner']}, {m['seconds']:.1f} s); {fired} fired")
    print(f"written to {args.out}: {', '.join(t + '.parquet' for t in ('features', 'top', 'examples', 'histogram', 'contexts'))}"
          ", manifest.json")
    print(f"next: npgpt2 dashboard {args.out} --out SITE/")


# --------------------------------------------------------------------------------- dashboard
def cmd_dashboard(args):
    from .harvest.dashboard import build_dashboard

    _check_output_folder(args.out, "--out")
    if os.path.isdir(args.out) and os.path.exists(os.path.join(args.out, "index.html")) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} already holds a dashboard; pass --overwrite to replace it")
    pages = build_dashboard(args.harvest, args.out, features=args.features, context_before=args.before,
                            context_after=args.after, progress=not args.quiet)
    print(f"{len(pages)} feature pages and index.html written to {args.out}; open "
          f"{os.path.join(os.path.abspath(args.out), 'index.html')} in a browser (works offline)")


# ---------------------------------------------------------------------------------- finetune
def cmd_finetune(args):
    import signal

    from .training import TokenDataset
    from .training.loop import FinetuneConfig, RunOptions, finetune, load_checkpoint

    _check_output_folder(args.out, "--out")
    if args.resume:
        model, config, resume = load_checkpoint(args.out)
        config.steps = args.steps if args.steps is not None else config.steps
    else:
        model = _load(args)
        resume = None
        config = FinetuneConfig(
            steps=args.steps if args.steps is not None else 200, batch_size=args.batch,
            seq_len=args.seq_len if args.seq_len is not None else min(256, model.cfg.n_ctx),
            grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
            schedule=args.schedule, weight_decay=args.weight_decay, betas=tuple(args.betas), eps=1e-8,
            grad_clip=args.grad_clip, seed=args.seed, val_fraction=args.val_fraction)
        config.check(model.cfg.n_ctx)  # before the data is read
    data = TokenDataset.from_paths(args.data, model.tokenizer)

    stop = {"asked": False}

    def on_interrupt(signum, frame):  # the first Ctrl-C finishes the step, saves and stops
        stop["asked"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one stops at once

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        options = RunOptions(out=args.out, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                             checkpoint_every=args.checkpoint_every, progress=args.progress,
                             should_stop=lambda: stop["asked"],
                             log=lambda line: print(line, file=sys.stderr))
        result = finetune(model, data, config, options, resume=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.interrupted:
        print(f"npgpt2 finetune: interrupted after step {result.step} of {config.steps}: checkpoint saved in "
              f"{result.checkpoint}; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    losses = [h["loss"] for h in result.history]
    val = f"; held-out loss {result.evals[-1]['val_loss']:.4f}" if result.evals else ""
    print(f"trained {result.step} steps on {len(data):,} tokens: training loss (each step's batches, nats/token) "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}{val}; "
          f"model saved in {args.out} (npgpt2 generate \"...\" -m {args.out})")


# -------------------------------------------------------------------------------------- eval
def cmd_eval(args):
    from .training import TokenDataset, perplexity

    model = _load(args)
    data = TokenDataset.from_paths(args.data, model.tokenizer)
    result = perplexity(model, data, window=args.window, stride=args.stride)
    print(f"{model.name} on {data.source}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f} "
          f"({result.n_tokens:,} tokens scored in {result.n_windows} windows of {result.window}, "
          f"stride {result.stride})")


# ------------------------------------------------------------------------------------ parser
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _finite(text) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _non_negative(text) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _positive(text) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (the full usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


BOS_HELP = "put <|endoftext|> before the text (TransformerLens's default; GPT-2's is without)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="npgpt2", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GPT-2 in NumPy: generate text and look inside the forward pass.",
        epilog="examples:\n"
               "  npgpt2 generate \"Alan Turing theorized that computers would one day become\"\n"
               "  npgpt2 trace \"The dog\" --layer 0 --names '*pattern'\n"
               "  npgpt2 info --model gpt2-medium\n\n"
               f"models: {', '.join(ALIASES)}, any hub repo id, or a local folder.\n"
               "Files are cached by huggingface_hub (HF_HOME); HF_HUB_OFFLINE=1 never downloads.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, help, example, **kw):
        p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        p.set_defaults(func=func)
        return p

    def model_args(p, dtype=False):
        p.add_argument("--model", "-m", default="gpt2",
                       help="alias (gpt2, gpt2-medium, ...), hub repo id, local folder, or zoo:induction "
                            "(default: gpt2)")
        p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
        if dtype:
            p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                           help="the arrays' precision (default: float32; float64 for exact checks)")

    p = add("generate", cmd_generate, "continue a prompt, streaming the new text as it is produced",
            'npgpt2 generate "Alan Turing theorized that computers would one day become" -n 40')
    p.add_argument("prompt", help="the text to continue")
    model_args(p)
    p.add_argument("-n", "--max-new-tokens", dest="n", type=_positive_int, default=40,
                   help="how many tokens to add (default: 40)")
    p.add_argument("--temperature", "-t", type=_non_negative, default=0.0,
                   help="0 = greedy, the default; higher = more random")
    p.add_argument("--top-k", type=_positive_int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=_positive, help="sample only from the smallest set with probability p")
    p.add_argument("--seed", type=_non_negative_int, help="random seed, for reproducible sampling")
    p.add_argument("--prepend-bos", action="store_true", help="put <|endoftext|> before the prompt")
    p.add_argument("--no-stop", action="store_true", help="keep going after <|endoftext|>")

    p = add("tokens", cmd_tokens, "show how a text is split into tokens: ids and strings side by side",
            'npgpt2 tokens "Hello, my dog is cute"')
    p.add_argument("text", help="the text to tokenize")
    model_args(p)
    p.add_argument("--prepend-bos", action="store_true", help=BOS_HELP)

    p = add("trace", cmd_trace,
            "walk the forward pass: every hook point in order with its shape and statistics",
            "npgpt2 trace \"The dog\" --layer 0 --names '*attn*'")
    p.add_argument("text", help="the prompt to run")
    model_args(p, dtype=True)
    p.add_argument("--layer", "-l", type=int, help="only this block's hook points")
    p.add_argument("--names", help="only hook points matching this glob, e.g. '*hook_pattern'")
    p.add_argument("--prepend-bos", action="store_true", help=BOS_HELP)
    p.add_argument("--grad", action="store_true",
                   help="also the gradient's norm at each hook point (of the loss, or of --target)")
    p.add_argument("--target", help="with --grad: a token whose log-probability at the last position "
                                    "is differentiated, e.g. ' Paris'")

    p = add("saliency", cmd_saliency, "which prompt tokens a prediction leans on: gradient x input or "
            "integrated gradients over the token embeddings",
            "npgpt2 saliency \"The Eiffel Tower is in the city of\" --target \" Paris\"")
    p.add_argument("prompt", help="the prompt whose next-token prediction is explained")
    model_args(p, dtype=True)
    p.add_argument("--target", help="the token explained (default: the model's top prediction)")
    p.add_argument("--method", choices=["grad_x_input", "integrated_gradients"], default="integrated_gradients",
                   help="gradient x input, or integrated gradients from --baseline (default)")
    p.add_argument("--steps", type=_positive_int, default=64, help="integrated gradients' steps (default: 64)")
    p.add_argument("--baseline", choices=["zero", "eot"], default="zero",
                   help="integrated gradients start from zero embeddings or <|endoftext|>'s (default: zero)")
    p.add_argument("--png", help="also draw the scores to this file (needs matplotlib)")
    p.add_argument("--prepend-bos", action="store_true", help=BOS_HELP)

    p = add("step", cmd_step,
            "step through the forward pass in the Python debugger, the maths only (hooks, checks, "
            "NumPy skipped)", 'npgpt2 step "The cat sat" --model gpt2 --break attention')
    p.add_argument("text", nargs="?", default="The cat sat", help="the prompt to run (default: The cat sat)")
    p.add_argument("--break", "-b", dest="breaks", action="append", default=[], metavar="PART",
                   help="start at a part of the forward pass: embed, block, layer_norm, attention, mlp, "
                        "unembed, or one layer's, '3 attention' (repeatable; `c` goes on to the next)")
    model_args(p, dtype=True)

    p = add("circuit", cmd_circuit, "find the edges behind a logit difference with edge attribution "
            "(EAP / EAP-IG), keep the top ones and check how much of the behaviour they carry",
            'npgpt2 circuit "When Mary and John went to the store, John gave a drink to" '
            '"When Alice and Bob went to the store, Carl gave a drink to" --answer " Mary" --wrong " John"')
    p.add_argument("clean", help="the prompt whose behaviour the circuit should carry")
    p.add_argument("corrupted", help="a prompt with the same number of tokens")
    model_args(p, dtype=True)
    p.add_argument("--answer", required=True, help="the token the clean prompt should predict, e.g. ' Mary'")
    p.add_argument("--wrong", required=True, help="the token it should not, e.g. ' John'")
    p.add_argument("--method", choices=["eap", "eap-ig"], default="eap-ig",
                   help="edge attribution patching, or with integrated gradients (default: eap-ig)")
    p.add_argument("--ig-steps", type=_positive_int, default=5, help="eap-ig's interpolation steps (default: 5)")
    p.add_argument("--top", type=_positive_int, default=30, help="edges to keep (default: 30)")
    p.add_argument("--png", help="also draw the circuit to this file (PNG or SVG; needs matplotlib)")
    p.add_argument("--html", help="also write a self-contained HTML page: the picture and the edges' table")
    p.add_argument("--prepend-bos", action="store_true", help=BOS_HELP)

    p = add("inspect", cmd_inspect, "look inside the model in the browser: a local, offline page (prompt and "
            "metric, logit lens by layer, attention, components ranked, interventions, EAP-IG circuit; needs "
            "the inspect extra)", "npgpt2 inspect -m zoo:induction --port 8765")
    model_args(p, dtype=True)
    p.add_argument("--port", type=_non_negative_int, default=8765, help="port to listen on; 0: a free one (default: 8765)")
    p.add_argument("--ip", help="address to listen on (default: 127.0.0.1, loopback only; another address also "
                                "accepts any Host header: the token is then the only guard)")
    p.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    p.add_argument("--harvest", help="a folder written by npgpt2 harvest: its neuron or latent dashboards in the page")
    p.add_argument("--sae", help="RELEASE:SAE_ID: its latents as components to rank and intervene on")

    p = add("lens", cmd_lens, "the logit lens: the prediction read off the residual stream after each layer",
            'npgpt2 lens "The Eiffel Tower is in the city of" --png lens.png')
    p.add_argument("prompt", help="the prompt to read the residual stream of")
    model_args(p, dtype=True)
    p.add_argument("--png", help="also draw the layer x position heatmap to this file (needs matplotlib)")
    p.add_argument("--incl-mid", action="store_true", help="also read between attention and MLP")
    p.add_argument("--prepend-bos", action="store_true", help=BOS_HELP)

    p = add("zoo", cmd_zoo, "train a small GPT-2 with a known circuit, here and now: `induction` is a 2-layer "
            "model of 300 words that learns induction heads (900 steps for seed 0); load it with "
            "--model zoo:induction or npgpt2.zoo.induction()", "npgpt2 zoo build induction --out induction-model")
    p.add_argument("action", choices=["build"], help="build: train the model and save it in the hub's layout")
    p.add_argument("name", choices=list(ZOO_MODELS), help="which model")
    p.add_argument("--out", "-o", help="folder to write it into (default: the cache that --model zoo:NAME reads)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="initialisation and data seed (default: 0)")
    p.add_argument("--max-steps", type=_positive_int,
                   help="stop after this many steps even if the loss has not reached its target (default: 4000)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = add("info", cmd_info, "config, parameter count, where the files are, the hook point names",
            "npgpt2 info --model distilgpt2")
    model_args(p)

    p = add("download", cmd_download, "fetch a model's files into the Hugging Face cache for offline use",
            "npgpt2 download gpt2-medium")
    p.add_argument("model", help="alias, hub repo id")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")

    p = add("parity", cmd_parity,
            "compare npgpt2 with Hugging Face transformers on the same weights, transformers in float64 "
            "being the reference (needs the reference extra)",
            "npgpt2 parity --model gpt2 --dtype float64 --grad")
    p.add_argument("text", nargs="?", help="prompt to compare on (default: three example sentences)")
    model_args(p, dtype=True)
    p.add_argument("--prepend-bos", action="store_true", help=BOS_HELP)
    p.add_argument("--grad", action="store_true",
                   help="also every parameter gradient (value_and_grad) and activation gradient "
                        "(run_with_cache(incl_bwd=True)) of the loss, against torch autograd")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document: a verdict object per quantity (exit 0 pass, 1 fail, 2 cannot run)")
    p = add("harvest", cmd_harvest, "run a corpus through the model and keep, for every neuron of a hook point "
            "(or SAE latent), its top contexts, histogram, density and a sample per activation band",
            "npgpt2 harvest corpus/ -m gpt2 --hook blocks.8.mlp.hook_post --ctx 128 --tokens 2000000 --out harvest/")
    p.add_argument("corpus", help="a text file, a folder of .txt/.jsonl files, a uint16 token file "
                                  "(.bin/.u16/.npy), or hf:DATASET[:CONFIG] (needs the datasets extra)")
    model_args(p, dtype=True)
    p.add_argument("--hook", help="the hook point read, e.g. blocks.8.mlp.hook_post (default: the SAE's)")
    p.add_argument("--sae", help="RELEASE:SAE_ID, e.g. gpt2-small-res-jb:blocks.8.hook_resid_pre: harvest its latents")
    p.add_argument("--features", help="only these feature ids, e.g. 0-99,4031 (default: all)")
    p.add_argument("--ctx", type=_positive_int, default=128, help="tokens per context, <|endoftext|> first (default: 128)")
    p.add_argument("--tokens", type=_positive_int, help="read about this many tokens (default: the whole corpus)")
    p.add_argument("--top-k", type=_positive_int, default=20, help="top activations kept per feature (default: 20)")
    p.add_argument("--per-band", type=_positive_int, default=5,
                   help="examples kept per feature and octave band of activation (default: 5)")
    p.add_argument("--threshold", type=_non_negative, default=0.0, help="a feature fires above this (default: 0)")
    p.add_argument("--include-bos", action="store_true", help="also count position 0, the <|endoftext|> "
                                                               "every context starts with")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="contexts per forward pass (default: 8)")
    p.add_argument("--shard-contexts", type=_positive_int, default=64,
                   help="contexts per shard, a multiple of --batch-size (default: 64)")
    p.add_argument("--out", "-o", required=True, help="output folder (Parquet tables + manifest.json)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--workers", type=_positive_int, help="run on a local Dask cluster of this many processes")
    p.add_argument("--scheduler", help="run on an existing Dask cluster, e.g. tcp://host:8786")
    p.add_argument("--scheduler-timeout", type=_positive, default=10.0,
                   help="seconds to wait for --scheduler to answer (default: 10)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl rows and datasets (default: text)")
    p.add_argument("--split", default="train", help="the dataset split, for hf: corpora (default: train)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = add("dashboard", cmd_dashboard, "static HTML pages of a harvest: an index of features and a page per "
            "feature (top contexts, bands, histogram, logit effect); opens offline",
            "npgpt2 dashboard harvest/ --out site/ --features 0-99,4031")
    p.add_argument("harvest", help="a folder written by npgpt2 harvest")
    p.add_argument("--out", "-o", required=True, help="folder for index.html and feature-N.html")
    p.add_argument("--features", help="pages for these ids, e.g. 0-99,4031 (default: the first 200 that fired)")
    p.add_argument("--before", type=_non_negative_int, default=12, help="tokens shown before the activating one (default: 12)")
    p.add_argument("--after", type=_non_negative_int, default=4, help="tokens shown after it (default: 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a dashboard already in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


    p = add("finetune", cmd_finetune,
            "train the model further on text files, a folder of them, or a .bin token file: AdamW, "
            "warm-up + cosine learning rate, clipping, held-out evaluation, resumable checkpoints",
            "npgpt2 finetune notes.txt -m gpt2 --steps 200 --batch 4 --seq-len 256 --lr 3e-4 --out my-gpt2")
    p.add_argument("data", nargs="+", help="text files (one document each), a folder of .txt/.md, or a "
                                           "uint16 .bin token file")
    model_args(p, dtype=True)
    p.add_argument("--out", "-o", required=True, help="folder for the trained model (and OUT/checkpoint)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (default: 200)")
    p.add_argument("--batch", type=_positive_int, default=4, help="sequences per micro-batch (default: 4)")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (default: 256, at most n_ctx)")
    p.add_argument("--grad-accum", type=_positive_int, default=1,
                   help="micro-batches accumulated into each step (default: 1)")
    p.add_argument("--lr", type=_positive, default=3e-4, help="peak learning rate (default: 3e-4)")
    p.add_argument("--min-lr", type=_non_negative, default=0.0, help="where the cosine ends (default: 0)")
    p.add_argument("--warmup", type=_non_negative_int, default=0, help="linear warm-up steps (default: 0)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after the warm-up: cosine decay to --min-lr, or constant (default: cosine)")
    p.add_argument("--weight-decay", type=_non_negative, default=0.1, help="on 2-D weight matrices (default: 0.1)")
    p.add_argument("--betas", type=_non_negative, nargs=2, default=[0.9, 0.95], metavar=("BETA1", "BETA2"),
                   help="AdamW's moment decay rates (default: 0.9 0.95)")
    p.add_argument("--grad-clip", type=_non_negative, default=1.0, help="global gradient norm limit; 0: none (default: 1)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="which random windows make the batches (default: 0)")
    p.add_argument("--val-fraction", type=_non_negative, default=0.1,
                   help="the last part of the tokens held out for evaluation; 0: none (default: 0.1)")
    p.add_argument("--eval-every", type=_non_negative_int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--eval-tokens", type=_positive_int, default=32768,
                   help="held-out tokens per evaluation, at most (default: 32768)")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="save OUT/checkpoint every N steps (default: at the end, and on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint, exactly")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")

    p = add("eval", cmd_eval, "loss and perplexity on a text, in windows of n_ctx tokens moved by --stride "
            "(the method of transformers' perplexity guide)", "npgpt2 eval notes.txt -m my-gpt2 --stride 512")
    p.add_argument("data", nargs="+", help="text files, a folder of .txt/.md, or a uint16 .bin token file")
    model_args(p, dtype=True)
    p.add_argument("--window", type=_positive_int, help="tokens per window (default: the model's n_ctx)")
    p.add_argument("--stride", type=_positive_int, help="tokens between window starts (default: the window)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .config import ConfigError
    from .hub import ModelNotFoundError
    from . import HookError, InputError
    from .weights import WeightsError

    try:
        return args.func(args) or 0
    except (CLIError, ModelNotFoundError, ConfigError, WeightsError, InputError, HookError, ValueError,
            ImportError) as e:
        print(f"npgpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
