"""Synthetic GPT-2 checkpoints in the Hugging Face hub's exact layout, for tests and benchmarks.

Real GPT-2 weights are not needed to exercise the real loading path: ``write_checkpoint`` writes a
folder as the hub repository ``openai-community/gpt2`` holds it (``config.json``, a ``model.safetensors``
with keys ``wte.weight``, ``h.0.attn.c_attn.weight``, ... and the ``h.{i}.attn.bias`` mask buffers,
``vocab.json``, ``merges.txt``), and ``add_to_hub_cache`` files it into a huggingface_hub cache
(``models--org--name/{blobs,snapshots,refs}``) so that ``from_pretrained`` finds it offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from .config import GPT2Config
from .tokenizer import bundled_files


def random_state_dict(config: GPT2Config, seed: int = 0, layout: str = "hub",
                      logit_scale: float = 4.0) -> dict[str, np.ndarray]:
    """Random float32 GPT-2 weights, keyed as Hugging Face stores them.

    Scaled so the model is far from uniform (logits spread over tens of units), unlike a 0.02 init:
    parity tests then compare numbers that matter. ``logit_scale`` is about the standard deviation
    of the logits.

    layout: "hub" (no prefix, with the ``h.{i}.attn.bias`` causal-mask buffers, as in
    openai-community/gpt2) or "transformers" (``transformer.`` prefix, no buffers, as newer
    transformers saves).
    """
    rng = np.random.default_rng(seed)
    d, d_mlp, n_ctx = config.d_model, config.d_mlp, config.n_ctx

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gain(n):
        return (1.0 + normal((n,), 0.2)).astype(np.float32)

    state = {
        "wte.weight": normal((config.d_vocab, d), logit_scale / np.sqrt(d)),
        "wpe.weight": normal((n_ctx, d), 0.5),
    }
    for l in range(config.n_layer):
        p = f"h.{l}."
        state.update({
            p + "ln_1.weight": gain(d), p + "ln_1.bias": normal((d,), 0.1),
            # q and k a little larger than 1/sqrt(d) so attention patterns are not flat
            p + "attn.c_attn.weight": normal((d, 3 * d), 1.5 / np.sqrt(d)),
            p + "attn.c_attn.bias": normal((3 * d,), 0.1),
            p + "attn.c_proj.weight": normal((d, d), 0.6 / np.sqrt(d)),
            p + "attn.c_proj.bias": normal((d,), 0.05),
            p + "ln_2.weight": gain(d), p + "ln_2.bias": normal((d,), 0.1),
            p + "mlp.c_fc.weight": normal((d, d_mlp), 1.0 / np.sqrt(d)),
            p + "mlp.c_fc.bias": normal((d_mlp,), 0.1),
            p + "mlp.c_proj.weight": normal((d_mlp, d), 0.6 / np.sqrt(d_mlp)),
            p + "mlp.c_proj.bias": normal((d,), 0.05),
        })
        if layout == "hub":
            state[p + "attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
    state["ln_f.weight"] = gain(d)
    state["ln_f.bias"] = normal((d,), 0.1)
    if layout == "transformers":
        state = {"transformer." + k: v for k, v in state.items()}
    elif layout != "hub":
        raise ValueError(f"layout={layout!r}: expected 'hub' or 'transformers'")
    return state


def write_checkpoint(folder: str | os.PathLike, config: GPT2Config, state: dict[str, np.ndarray],
                     shards: int = 1, tokenizer_files: bool = True) -> str:
    """Write config.json, the weights (``model.safetensors``, or ``shards`` files plus
    ``model.safetensors.index.json``) and the BPE files into ``folder``. Returns the folder."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    keys = sorted(state)
    if shards == 1:
        save_file({k: np.ascontiguousarray(state[k]) for k in keys},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: np.ascontiguousarray(state[k]) for k in part}, os.path.join(folder, fname),
                      metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    if tokenizer_files:
        vocab, merges = bundled_files()
        shutil.copyfile(vocab, os.path.join(folder, "vocab.json"))
        shutil.copyfile(merges, os.path.join(folder, "merges.txt"))
    return folder


def add_to_hub_cache(hub_cache: str | os.PathLike, repo_id: str, folder: str | os.PathLike,
                     revision: str = "main") -> str:
    """File every file of ``folder`` (sub-folders included) into a huggingface_hub cache as repo ``repo_id``.

    Lays out ``models--{org}--{name}/blobs/<sha256>``, ``snapshots/<commit>/<file>`` (symlinks to
    the blobs, as huggingface_hub makes them) and ``refs/<revision>``. Returns the snapshot folder.
    """
    folder = os.fspath(folder)
    repo_dir = os.path.join(os.fspath(hub_cache), "models--" + repo_id.replace("/", "--"))
    files = sorted(os.path.relpath(os.path.join(root, name), folder)
                   for root, _, names in os.walk(folder) for name in names)  # sub-folders too
    digest = hashlib.sha1()
    for name in files:
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    commit = digest.hexdigest()  # a 40-hex-digit id, as a git commit hash is
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            blob = os.path.join(repo_dir, "blobs", hashlib.sha256(f.read()).hexdigest())
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(folder, name), blob)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(repo_dir, "refs", revision), "w") as f:
        f.write(commit)
    return snapshot


def synthetic_model(n_layer: int = 4, n_head: int = 4, n_embd: int = 64, n_ctx: int = 128, seed: int = 0,
                    **kwargs):
    """A small random GPT-2 (GPT-2's real vocabulary, so text works), written to a temporary folder
    in the hub's layout and loaded from there. ``kwargs`` go to ``from_pretrained``."""
    import tempfile

    from .loading import from_pretrained

    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=n_ctx)
    folder = write_checkpoint(tempfile.mkdtemp(prefix="npgpt2-synthetic-"), cfg, random_state_dict(cfg, seed))
    return from_pretrained(folder, **kwargs)


def pretrained_or_synthetic(name: str = "gpt2", dtype: str = "float32", **shape):
    """``from_pretrained(name)`` if its files are already cached (or ``name`` is a folder;
    "zoo:induction" is ``npgpt2.zoo.induction()``), else ``synthetic_model(**shape)``, with a note saying so. For examples that should run anywhere and
    show real results where they can. A model given as ``name`` is returned as it is (so a
    walkthrough's ``MODEL`` parameter may be a loaded model)."""
    from .hub import OfflineError
    from .loading import from_pretrained
    from .model import GPT2

    if isinstance(name, GPT2):
        return name
    if name == "zoo:induction":  # trained here (npgpt2.zoo), built into the cache on first use
        from . import zoo

        return zoo.induction(dtype=dtype)

    try:
        return from_pretrained(name, local_files_only=True, dtype=dtype)
    except OfflineError:
        print(f"({name} is not cached: using a small random model, whose tables have the real shape "
              f"and meaning but noise in them; `npgpt2 download {name}` fetches the real one)\n")
    return synthetic_model(dtype=dtype, **shape)


# Real GPT-2 small's residual stream at position 0 has a norm near 3,000; the realistic checkpoint
# scales it with sqrt(n_embd / 768), as the norm of a vector of fixed per-dimension size scales.
GPT2_SMALL_POS0_NORM = 3000.0
FLOAT32_EXP_OVERFLOW = float(np.log(np.finfo(np.float32).max))  # 88.72: exp() above it is inf


def realistic_state_dict(config: GPT2Config, seed: int = 0, layout: str = "hub",
                         mean_logit: float = -100.0, strong_sink_score: float = 120.0) -> dict[str, np.ndarray]:
    """Random float32 GPT-2 weights with real GPT-2's numerical extremes, keyed as ``random_state_dict``.

    Parity at unit magnitudes says little about real GPT-2, whose forward pass handles numbers far
    from 1. These weights have its extremes by construction; ``realistic_statistics`` measures them
    on the loaded model (tests/test_realistic_checkpoint.py), with these results at gpt2-small's
    width (and at width 64):

    * **Outlier dimensions.** Three residual dimensions (``outlier_dims(config, seed)``) carry a
      component ``m1`` at every position, of norm 20 after the embedding growing to 40 after the
      last block (12, 36 and -12 per dimension), where the other dimensions are of order 1: their
      mean |value| is about 25 times the others' median. Every layer norm's gain is 0.5 on them.
    * **A huge residual at position 0.** ``wpe[0]`` marks position 0 with a zero-mean direction
      ``m0`` in the outlier dimensions (no other weight writes along ``m0``), and four neurons of
      layer 0's MLP fire only there and write along ``m0``: leaving every block, the residual
      stream at position 0 has a norm of about 3,000 * sqrt(n_embd / 768), 3,030 at gpt2-small's
      width (60 times the other positions') and 950 at 64 (24 times).
    * **Attention sinks.** Three heads in four (at least one per layer) read ``m0`` in their keys
      and have a query bias along it: queries after the first put 0.7 of their attention on
      position 0 on average over all heads, and in every layer after the first (as in real GPT-2)
      three heads in four put more than half of theirs there (``sink_heads_after_layer_0``: 0.75). The strongest sink head of each layer scores position
      0 at about ``strong_sink_score`` (120; measured 120 to 140): above 88.7, where exp()
      overflows float32, so a softmax without its max shift turns the logits into NaN.
    * **Logits near -100.** Every row of the (tied) embedding shares a component -5 along a
      direction ``e`` (cancelled in ``wpe``, so the residual stream does not carry it), on which
      the final layer norm's bias is ``-mean_logit / 5`` (20): the mean logit is ``mean_logit``
      (measured -99 to -101), and every position's logits spread over more than 10.

    Needs n_embd >= 16 (room for the three outlier dimensions beside the rest). ``layout`` as in
    ``random_state_dict``.
    """
    if layout not in ("hub", "transformers"):
        raise ValueError(f"layout={layout!r}: expected 'hub' or 'transformers'")
    d, d_mlp, n_head = config.d_model, config.d_mlp, config.n_head
    d_head, n_layer = config.d_head, config.n_layer
    if d < 16:
        raise ValueError(f"realistic_state_dict needs n_embd >= 16; got {d}")
    state = random_state_dict(config, seed=seed, layout="hub")
    rng = np.random.default_rng([seed, 1])
    out_dims = outlier_dims(config, seed)
    m0 = np.zeros(d)  # position 0's direction: zero mean, so layer norm's centring keeps it
    m0[out_dims] = np.array([2.0, -1.0, -1.0]) / np.sqrt(6.0)
    m1 = np.zeros(d)  # the always-present outlier component, orthogonal to m0
    m1[out_dims] = np.array([1.0, 3.0, -1.0]) / np.sqrt(11.0)
    e = np.zeros(d)  # the unembedding's shared direction, away from the outlier dimensions
    rest = np.setdiff1d(np.arange(d), out_dims)
    e[rest] = rng.standard_normal(rest.size)
    e[rest] -= e[rest].mean()
    e /= np.linalg.norm(e)

    def without(x, *dirs):  # remove components along unit directions (on the last axis)
        x = x.astype(np.float64)
        for u in dirs:
            x = x - (x @ u)[..., None] * u
        return x

    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    outlier_gain = 0.5
    m1_size = 40.0
    shared, ln_f_offset = 5.0, -mean_logit / 5.0
    # The tied embedding: no m0 (position 0 alone has it), a shared -5 along e.
    state["wte.weight"] = f32(without(state["wte.weight"], m0, e) - shared * e)
    # wpe cancels the shared component, so the residual stream does not carry it into ln_f
    wpe = without(state["wpe.weight"], m0, e) + 0.5 * m1_size * m1 + shared * e
    typical = np.sqrt(0.25 * d + 16.0 + (0.5 * m1_size) ** 2)  # norm at layer 0, positions > 0
    wpe[0] += 4.0 * typical * m0
    state["wpe.weight"] = f32(wpe)
    pos0_norm = GPT2_SMALL_POS0_NORM * np.sqrt(d / 768.0)
    # how much of layer 0's normalized position-0 vector lies along m0 (the rest: wte, wpe, attention)
    frac0 = 4.0 / np.sqrt(17.0)
    n_sink = max(1, round(0.75 * n_head))
    for l in range(n_layer):
        p = f"h.{l}."
        for ln in ("ln_1", "ln_2"):
            g = state[p + ln + ".weight"]
            g[out_dims] = outlier_gain
            state[p + ln + ".bias"] = f32(without(state[p + ln + ".bias"], m0))
        # attention sinks: key component K0 along s_h at position 0, query bias alpha * s_h
        W = state[p + "attn.c_attn.weight"].astype(np.float64)
        b = state[p + "attn.c_attn.bias"].astype(np.float64)
        frac = frac0 if l == 0 else 1.0
        ln_m0 = outlier_gain * np.sqrt(d) * frac  # m0 . (layer norm output) at position 0
        K0 = 30.0
        heads = rng.permutation(n_head)[:n_sink]
        for i, h in enumerate(heads):
            score = strong_sink_score if i == 0 else rng.uniform(6.0, 20.0)
            s = rng.standard_normal(d_head)
            s /= np.linalg.norm(s)
            q_cols = slice(h * d_head, (h + 1) * d_head)
            k_cols = slice(d + h * d_head, d + (h + 1) * d_head)
            W[:, k_cols] += np.outer(m0, s) * (K0 / ln_m0)
            b[q_cols] += s * (score * np.sqrt(d_head) / K0)
        state[p + "attn.c_attn.weight"], state[p + "attn.c_attn.bias"] = f32(W), f32(b)
        # writes into the residual stream stay off m0; the biases grow m1 to m1_size by the last layer
        for name in ("attn.c_proj", "mlp.c_proj"):
            state[p + name + ".weight"] = f32(without(state[p + name + ".weight"], m0))
            state[p + name + ".bias"] = f32(without(state[p + name + ".bias"], m0))
        state[p + "mlp.c_proj.bias"] += f32(0.5 * m1_size / n_layer * m1)
        if l == 0:  # the neurons that make position 0's residual huge
            n_fire, pre = 4, 8.0
            W_in = state[p + "mlp.c_fc.weight"]
            b_in = state[p + "mlp.c_fc.bias"]
            W_out = state[p + "mlp.c_proj.weight"]
            neurons = rng.permutation(d_mlp)[:n_fire]
            for j in neurons:
                W_in[:, j] = f32(m0 * (2 * pre / ln_m0))
                b_in[j] = -pre
                W_out[j] = f32(m0 * (pos0_norm / (n_fire * pre)))
    state["ln_f.weight"][out_dims] = outlier_gain
    state["ln_f.bias"] = f32(without(state["ln_f.bias"], m0, e) * 5.0 + ln_f_offset * e)
    if layout == "transformers":
        state = {"transformer." + k: v for k, v in state.items() if not k.endswith(".attn.bias")}
    return state


def outlier_dims(config: GPT2Config, seed: int = 0) -> np.ndarray:
    """The three residual dimensions ``realistic_state_dict(config, seed)`` makes outliers (sorted)."""
    return np.sort(np.random.default_rng([seed, 0]).choice(config.d_model, 3, replace=False))


def realistic_statistics(model, tokens) -> dict:
    """Measure, on a loaded model, the extremes ``realistic_state_dict`` builds in (and real GPT-2 has).

    tokens: [batch, pos] ids, pos >= 2. Returns a dict:
      pos0_resid_norm     the smallest norm of the residual stream at position 0 leaving any block
      other_resid_norm    the median norm at the other positions, leaving the last block
      outlier_dims        the three dimensions of largest mean |residual| at positions > 0 (last block)
      outlier_ratio       their mean |residual| over the median |residual| of the other dimensions
      attention_to_first  mean attention on position 0: over layers, heads, sequences, queries >= 1
      sink_head_fraction  fraction of (layer, head) whose mean attention on position 0 is above 0.5
      sink_heads_after_layer_0  the same fraction over the layers after the first (nan with one layer)
      max_score_to_first  the largest attention score (q.k / sqrt(d_head)) of a query on position 0
      mean_logit          the mean logit
      min_logit_spread    the smallest (max - min) of a position's logits
      max_abs_logit       the largest |logit|
    """
    tokens = np.asarray(tokens)
    logits, cache = model.run_with_cache(tokens)
    n_layer = model.cfg.n_layer
    post = [cache["resid_post", l] for l in range(n_layer)]
    last = post[-1][:, 1:]  # [batch, pos - 1, d_model]
    mean_abs = np.abs(last).mean(axis=(0, 1))
    dims = np.sort(np.argsort(mean_abs)[-3:])
    patterns = [cache["pattern", l][:, :, 1:, 0] for l in range(n_layer)]  # [batch, head, query >= 1]
    per_head = np.stack([p.mean(axis=(0, 2)) for p in patterns])  # [layer, head]
    scores = [cache[f"blocks.{l}.attn.hook_attn_scores"][:, :, 1:, 0] for l in range(n_layer)]
    return {
        "pos0_resid_norm": float(min(np.linalg.norm(p[:, 0], axis=-1).min() for p in post)),
        "other_resid_norm": float(np.median(np.linalg.norm(last, axis=-1))),
        "outlier_dims": [int(i) for i in dims],
        "outlier_ratio": float(mean_abs[dims].mean() / np.median(np.delete(np.abs(last), dims, axis=-1))),
        "attention_to_first": float(np.mean([p.mean() for p in patterns])),
        "sink_head_fraction": float((per_head > 0.5).mean()),
        "sink_heads_after_layer_0": float((per_head[1:] > 0.5).mean()) if n_layer > 1 else float("nan"),
        "max_score_to_first": float(max(s.max() for s in scores)),
        "mean_logit": float(logits.mean()),
        "min_logit_spread": float((logits.max(-1) - logits.min(-1)).min()),
        "max_abs_logit": float(np.abs(logits).max()),
    }


def assert_close(actual, expected, rel: float, what: str = "arrays") -> None:
    """Assert max |actual - expected| <= rel * max |expected|: agreement judged at the arrays' own
    magnitude (float32 rounding grows with it), the way the parity checks judge logits."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shapes {actual.shape} and {expected.shape} differ")
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    err = float(np.abs(actual.astype(np.float64) - expected).max()) if expected.size else 0.0
    if not err <= rel * scale:
        raise AssertionError(f"{what}: max difference {err:.3g} exceeds {rel:g} x the largest magnitude "
                             f"{scale:.3g} (= {rel * scale:.3g})")


# ------------------------------------------------------------------------------- walkthroughs
PARAMETERS_CELL = '# %% tags=["parameters"]'


def _parameters_cell(lines: list[str], path) -> tuple[int, int]:
    """(first line after the marker, the line where the next cell starts) of the parameters cell."""
    starts = [i for i, line in enumerate(lines) if line.strip() == PARAMETERS_CELL]
    if len(starts) != 1:
        raise ValueError(f"{path}: expected one parameters cell ({PARAMETERS_CELL!r}); found {len(starts)}")
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("# %%")), len(lines))
    return starts[0] + 1, end


def walkthrough_parameters(path) -> dict[str, str]:
    """The parameters a walkthrough in ``examples/`` takes: {name: its default, as written}."""
    import ast

    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start, end = _parameters_cell(lines, path)
    tree = ast.parse("\n".join(lines[start:end]))
    return {t.id: ast.get_source_segment("\n".join(lines[start:end]), node.value)
            for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def run_walkthrough(path, **parameters) -> dict:
    """Run a walkthrough (a jupytext percent-format file in ``examples/``) top to bottom in this
    process, with ``parameters`` in place of its parameters cell's defaults (as papermill injects
    them into a notebook), and return its variables. Values may be any objects (a loaded model as
    ``MODEL``). Unknown parameter names raise ValueError."""
    known = walkthrough_parameters(path)
    unknown = set(parameters) - set(known)
    if unknown:
        raise ValueError(f"{path} has no parameter(s) {sorted(unknown)}; it takes {sorted(known)}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    _, end = _parameters_cell(lines, path)
    injected = ["# %% injected parameters"] + [f"{k} = __parameters__[{k!r}]" for k in parameters]
    source = "\n".join(lines[:end] + injected + lines[end:]) + "\n"
    namespace = {"__name__": "__main__", "__file__": str(path), "__parameters__": parameters}
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 (the project's own examples)
    return namespace


def walkthrough_notebook(path, parameters: dict | None = None):
    """A walkthrough as a Jupyter notebook (an ``nbformat`` object): jupytext turns the
    percent-format script into one, and ``parameters`` go into a cell after its parameters cell,
    values written with ``repr`` (as papermill injects them). Needs the ``notebooks`` extra."""
    import jupytext
    import nbformat

    nb = jupytext.read(path)
    marker = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if parameters and marker is None:
        raise ValueError(f"{path} has no parameters cell ({PARAMETERS_CELL!r}) to inject {sorted(parameters)} after")
    if parameters:
        source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells.insert(marker + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def run_walkthrough_notebook(path, parameters: dict | None = None, workdir=None, timeout: int = 600):
    """Run a walkthrough as a notebook (``walkthrough_notebook``) with nbclient, in an ipykernel
    kernel started in ``workdir`` (default: the current folder); returns the executed notebook.
    Raises on the first failing cell."""
    import nbclient

    nb = walkthrough_notebook(path, parameters)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir or os.getcwd())}})
    client.execute()
    return nb
