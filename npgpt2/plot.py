"""Pictures of the analyses: heatmaps with string-token axis labels.

matplotlib is optional (``pip install "npgpt2[plot]"``) and imported only when a plot is drawn.
Each function returns the matplotlib Figure and, given ``path``, also writes it there (PNG, SVG,
PDF ... by the file's extension).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _pyplot():
    try:
        import matplotlib

        backend = matplotlib.get_backend().lower()
        # Jupyter's inline backend (module://...) draws into the notebook; otherwise, with no
        # display, draw off screen
        if backend != "agg" and not backend.startswith("module://") and not _has_display():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('npgpt2.plot needs matplotlib: pip install "npgpt2[plot]"') from None
    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def heatmap(values, row_labels, col_labels, title: str = "", xlabel: str = "", ylabel: str = "",
            cmap: str = "viridis", center: bool = False, annotations=None, path=None, vmin=None, vmax=None):
    """A labelled heatmap of a 2-D array [rows, cols]. ``center=True`` uses a diverging map
    symmetric around 0 (for attributions); ``annotations`` [rows, cols] of short strings are
    written in the cells."""
    plt = _pyplot()
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values of shape {values.shape} do not match {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    width = min(2 + 0.9 * len(col_labels), 30)
    height = min(1.5 + 0.4 * len(row_labels), 30)
    fig, ax = plt.subplots(figsize=(width, height))
    if center:
        bound = np.nanmax(np.abs(values)) or 1.0
        vmin, vmax, cmap = -bound, bound, "RdBu_r" if cmap == "viridis" else cmap
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotations is not None:
        lo, hi = im.get_clim()
        for (i, j), text in np.ndenumerate(np.asarray(annotations, dtype=object)):
            light = (values[i, j] - lo) / ((hi - lo) or 1) < 0.5
            ax.text(j, i, str(text), ha="center", va="center", fontsize=7,
                    color="white" if light and not center else "black")
    fig.colorbar(im, ax=ax)
    return _finish(fig, path)


def logit_lens_heatmap(lens: pd.DataFrame, value: str = "next_prob", batch: int = 0, path=None):
    """The logit lens (``npgpt2.analysis.logit_lens``) as layer x position: colour = ``value``
    ("next_prob" or "top_prob"), each cell annotated with the top predicted token."""
    df = lens[lens["batch"] == batch]
    layers = list(df["layer"].cat.categories) if hasattr(df["layer"], "cat") else sorted(df["layer"].unique())
    table = df.pivot(index="layer", columns="position", values=value).reindex(layers)
    tops = df.pivot(index="layer", columns="position", values="top_token").reindex(layers)
    tokens = df[df["layer_index"] == 0].sort_values("position")["token"].tolist()
    cols = [f"{p}: {t!r}" for p, t in enumerate(tokens)]
    label = {"next_prob": "P(actual next token)", "top_prob": "P(top token)"}.get(value, value)
    return heatmap(table.to_numpy(), layers, cols, title=f"logit lens: {label}; cells: top token",
                   xlabel="position: token", ylabel="residual stream at", annotations=tops.to_numpy(),
                   path=path, vmin=0, vmax=1)


def attribution_heatmap(dla: pd.DataFrame, column: str = "attribution", path=None):
    """Direct logit attribution by head (``by="head"``) as layer x head, diverging around 0."""
    heads = dla[dla["type"] == "head"]
    if heads.empty:
        raise ValueError('the table has no heads: use direct_logit_attribution(..., by="head")')
    table = heads.pivot(index="layer", columns="head", values=column).sort_index().sort_index(axis=1)
    return heatmap(table.to_numpy(), [f"layer {l}" for l in table.index], [f"H{h}" for h in table.columns],
                   title=f"direct logit attribution by head ({column})", xlabel="head", ylabel="layer",
                   center=True, path=path)


def attribution_bars(dla: pd.DataFrame, column: str = "attribution", top: int = 20, path=None):
    """The ``top`` components by absolute attribution, as horizontal bars."""
    plt = _pyplot()
    rows = dla.reindex(dla[column].abs().sort_values(ascending=False).index).head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.3 * len(rows)))
    ax.barh(rows["component"], rows[column], color=np.where(rows[column] >= 0, "tab:blue", "tab:red"))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"direct logit attribution ({column})")
    return _finish(fig, path)


def saliency_plot(saliency: pd.DataFrame, path=None):
    """A ``token_saliency`` table as one bar per prompt token, in order (positive blue, negative red)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(saliency)), 3))
    labels = [f"{t!r}"[1:-1] for t in saliency["token"]]
    ax.bar(range(len(saliency)), saliency["score"], color=np.where(saliency["score"] >= 0, "tab:blue", "tab:red"))
    ax.set_xticks(range(len(saliency)), labels, rotation=60, ha="right")
    ax.axhline(0, color="black", linewidth=0.8)
    a = saliency.attrs
    ax.set_ylabel(a.get("method", "score").replace("_", " "))
    ax.set_title(f"metric {a['metric']:.3f}" + (f", baseline {a['baseline_metric']:.3f}" if "baseline_metric" in a else ""))
    return _finish(fig, path)


def circuit(edges: pd.DataFrame, path=None, n_head: int | None = None, title: str = ""):
    """Draw a circuit: layers as rows (embeddings at the bottom, logits at the top), heads and the MLP
    of each layer as nodes, one line per edge with width by |score| and colour by the input it feeds
    (q, k, v, mlp, logits). ``edges``: columns upstream, downstream, input and score (from
    ``edge_attribution`` / ``greedy_circuit``). Writes PNG or SVG when ``path`` is given."""
    import re

    plt = _pyplot()
    names = set(edges["upstream"]) | set(edges["downstream"])
    layers = [int(m.group(1)) for n in names if (m := re.match(r"(?:L|mlp)(\d+)", n))]
    n_layer = max(layers, default=0) + 1
    heads = [int(m.group(1)) for n in names if (m := re.match(r"L\d+H(\d+)", n))]
    n_head = n_head or max(heads, default=0) + 1

    def where(name):
        if name == "embed":
            return n_head / 2, -1
        if name == "logits":
            return n_head / 2, n_layer
        if name.startswith("mlp"):
            return n_head + 0.5, int(name[3:]) + 0.5
        layer, head = (int(x) for x in re.match(r"L(\d+)H(\d+)", name).groups())
        return head, layer

    colours = {"q": "tab:blue", "k": "tab:green", "v": "tab:red", "mlp": "tab:purple", "logits": "black"}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * n_head + 2), max(4, 0.7 * n_layer + 2)))
    biggest = max(float(edges["score"].abs().max()), 1e-12) if len(edges) else 1.0
    for row in edges.itertuples():
        (x0, y0), (x1, y1) = where(row.upstream), where(row.downstream)
        ax.plot([x0, x1], [y0, y1], color=colours.get(row.input, "gray"), alpha=0.7,
                linewidth=0.5 + 4 * abs(row.score) / biggest, linestyle="-" if row.score >= 0 else "--")
    for name in names:
        x, y = where(name)
        ax.scatter([x], [y], s=120, color="white", edgecolor="black", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    for kind, colour in colours.items():
        ax.plot([], [], color=colour, label=kind)
    ax.legend(title="input (dashed: negative)", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks(range(-1, n_layer + 1), ["embed"] + [str(l) for l in range(n_layer)] + ["logits"])
    ax.set_ylabel("layer")
    ax.set_xticks([])
    ax.set_title(title or f"{len(edges)} edges")
    return _finish(fig, path)


def circuit_html(edges: pd.DataFrame, path=None, n_head: int | None = None, title: str = "") -> str:
    """A self-contained HTML page of a circuit (no scripts, styles or fonts from the network: open it
    offline): the picture ``circuit`` draws, inline as SVG, and the table of its edges (upstream,
    downstream, input, score), largest |score| first. Returns the HTML (and writes it to ``path``)."""
    import html as _html
    import io

    from .display import table_html

    plt = _pyplot()
    fig = circuit(edges, n_head=n_head, title=title)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    svg_text = svg.getvalue()
    svg_text = svg_text[svg_text.index("<svg"):]  # the element alone, without the XML prologue
    order = edges.reindex(edges["score"].abs().sort_values(ascending=False).index)
    rows = [(r.upstream, r.downstream, r.input, f"{r.score:+.4g}") for r in order.itertuples()]
    heading = _html.escape(title or f"Circuit: {len(edges)} edges")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{heading}</title></head>\n"
            f'<body style="font-family: sans-serif">\n<h1 style="font-size: 18px">{heading}</h1>\n'
            f'<div class="circuit">{svg_text}</div>\n'
            f'<div class="edges">{table_html(rows, header=["upstream", "downstream", "input", "score"])}</div>\n'
            "</body></html>\n")
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


def attention_patterns(patterns, str_tokens, heads, path=None, batch: int = 0):
    """Attention pattern heatmaps, one panel per head, with token labels on both axes.

    patterns: an ActivationCache holding the patterns, or {layer: [batch, head, q, k]} arrays.
    heads: [(layer, head), ...], or flat head indices layer * n_head + head (as TransformerLens's
    demos index ``stack_head_results``), or a mix. Query positions run down, key positions across.
    str_tokens: one prompt's tokens, or one list per batch row (then row ``batch`` is used).
    """
    plt = _pyplot()
    heads = list(np.atleast_1d(heads)) if isinstance(heads, (int, np.integer, np.ndarray)) else list(heads)
    if not heads:
        raise ValueError("no heads to draw: pass heads=[(layer, head), ...] or flat indices")
    if str_tokens and isinstance(str_tokens[0], (list, tuple)):
        str_tokens = str_tokens[batch]
    if any(isinstance(h, (int, np.integer)) for h in heads):
        if hasattr(patterns, "cache_dict"):
            n_head = patterns.model.cfg.n_head
        else:
            n_head = np.shape(next(iter(patterns.values())))[1]
        heads = [divmod(int(h), n_head) if isinstance(h, (int, np.integer)) else tuple(h) for h in heads]
    n = len(str_tokens)
    cols = min(len(heads), 3)
    rows = -(-len(heads) // cols)
    size = max(3.0, 0.35 * n + 1.5)
    # constrained layout makes room for each panel's tick labels and axis labels, so a panel's
    # "query" label and its token labels never run into the panel to its left
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.5, size * rows), squeeze=False,
                             layout="constrained")
    labels = [f"{i}:{t!r}" for i, t in enumerate(str_tokens)]
    for ax, (layer, head) in zip(axes.ravel(), heads):
        pattern = patterns["pattern", layer] if hasattr(patterns, "cache_dict") else patterns[layer]
        im = ax.imshow(pattern[batch, head], vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"L{layer}H{head}")
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
    for ax in axes.ravel()[len(heads):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def attention_view(patterns, str_tokens, heads=None, batch: int = 0, title: str = ""):
    """An interactive view of attention patterns, like CircuitsVis's: the prompt's tokens in a row,
    one panel per head side by side; hovering a token shows where it attends in every head. Shown
    inline in Jupyter (no network needed), or ``.save("page.html")`` for a standalone page.

    patterns: an ActivationCache holding the patterns (``hook_pattern``), {layer: [batch, head, q, k]},
        or one prompt's [head, q, k] array.
    heads: [(layer, head), ...], or a layer (all its heads); for a [head, q, k] array, head indices
        (default: all). Returns an ``npgpt2.display.AttentionView``.
    """
    from .display import AttentionView

    if isinstance(patterns, np.ndarray):
        if patterns.ndim != 3:
            raise ValueError(f"a pattern array must be [head, query_pos, key_pos]; got shape {list(patterns.shape)}")
        index = list(range(patterns.shape[0])) if heads is None else [int(h) for h in heads]
        return AttentionView(patterns[index], str_tokens, [f"H{h}" for h in index], title=title)
    if heads is None:
        raise ValueError("heads is needed with a cache: a layer, or [(layer, head), ...]")
    if isinstance(heads, (int, np.integer)):
        layer = int(heads)
        first = patterns["pattern", layer] if hasattr(patterns, "cache_dict") else patterns[layer]
        heads = [(layer, h) for h in range(first.shape[1])]
    stack, labels = [], []
    for layer, head in heads:
        pattern = patterns["pattern", layer] if hasattr(patterns, "cache_dict") else patterns[layer]
        stack.append(np.asarray(pattern)[batch, head])
        labels.append(f"L{layer}H{head}")
    return AttentionView(np.stack(stack), str_tokens, labels, title=title)


def _script_json(obj) -> str:
    """JSON to put inside a ``<script>`` element. Script content is raw text: the browser never
    unescapes entities in it, so the JSON is not HTML-escaped (``&lt;`` would stay ``&lt;``). Only
    what could end the element or change how it is parsed is escaped, in JSON's own syntax, which
    ``JSON.parse`` reads back unchanged: ``</`` (as in ``</script>``) becomes ``<\\/`` and ``<!--``
    becomes ``\\u003c!--``."""
    import json

    return json.dumps(obj, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "\\u003c!--")


def attention_html(pattern: np.ndarray, str_tokens, layer: int, path=None, title: str | None = None,
                   batch: int | None = None) -> str:
    """A self-contained HTML page showing every head of one layer (no external scripts, styles or
    network: open it offline). pattern: [head, q, k] (one prompt), or [batch, head, q, k] with
    ``batch`` saying which prompt (str_tokens may then be one list per prompt). Each head is a grid
    whose cell (query, key) is shaded by the attention weight; hovering shows the tokens and the
    weight, and the head selector enlarges one head. Returns the HTML (and writes it to ``path``)."""
    import html as _html

    pattern = np.asarray(pattern, dtype=float)
    if batch is not None:
        if pattern.ndim != 4:
            raise ValueError(f"batch={batch} needs a pattern [batch, head, q, k]; got shape {pattern.shape}")
        pattern = pattern[batch]
        if str_tokens and isinstance(str_tokens[0], (list, tuple)):
            str_tokens = str_tokens[batch]
    if pattern.ndim != 3 or pattern.shape[1:] != (len(str_tokens), len(str_tokens)):
        raise ValueError(f"pattern must be [head, {len(str_tokens)}, {len(str_tokens)}] for "
                         f"{len(str_tokens)} tokens; got {pattern.shape}")
    n_head = pattern.shape[0]
    title = title or f"Attention patterns, layer {layer}"
    data = _script_json({"tokens": list(map(str, str_tokens)), "layer": layer,
                         "patterns": np.round(pattern, 4).tolist()})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.heads {{ display: flex; flex-wrap: wrap; gap: 1.2em; }}
.head {{ cursor: pointer; }} .head h3 {{ margin: 0.2em 0; font-size: 0.95em; }}
table.grid {{ border-collapse: collapse; }}
table.grid td {{ width: 9px; height: 9px; padding: 0; border: 1px solid #f4f4f4; }}
.big table.grid td {{ width: 26px; height: 26px; }}
.big th {{ font-weight: normal; font-size: 0.8em; white-space: pre; }}
.big th.key {{ writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }}
#info {{ min-height: 1.4em; font-family: monospace; margin: 0.6em 0; }}
</style></head><body>
<h1>{_html.escape(title)}</h1>
<p>{n_head} heads; rows are queries, columns are the keys they attend to. Click a head to enlarge it;
hover over a cell to read it.</p>
<div id="info"></div><div id="big" class="big"></div><div class="heads" id="heads"></div>
<script id="data" type="application/json">{data}</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
const info = document.getElementById("info");
function shade(w) {{ const c = Math.round(255 * (1 - w)); return `rgb(${{c}},${{c}},255)`; }}
function grid(h, withLabels) {{
  const t = document.createElement("table"); t.className = "grid";
  const n = D.tokens.length;
  if (withLabels) {{
    const r = t.insertRow(); r.appendChild(document.createElement("th"));
    D.tokens.forEach((k, j) => {{ const th = document.createElement("th"); th.className = "key";
      th.textContent = j + ":" + k; r.appendChild(th); }});
  }}
  for (let i = 0; i < n; i++) {{
    const r = t.insertRow();
    if (withLabels) {{ const th = document.createElement("th"); th.textContent = i + ":" + D.tokens[i]; r.appendChild(th); }}
    for (let j = 0; j < n; j++) {{
      const w = D.patterns[h][i][j], c = r.insertCell();
      c.style.background = j > i ? "#fafafa" : shade(w);
      c.onmouseover = () => {{ info.textContent =
        `L${{D.layer}}H${{h}}: query ${{i}} ${{JSON.stringify(D.tokens[i])}} -> key ${{j}} ${{JSON.stringify(D.tokens[j])}}: ${{w.toFixed(4)}}`; }};
    }}
  }}
  return t;
}}
function enlarge(h) {{ const b = document.getElementById("big"); b.innerHTML = "<h2>L" + D.layer + "H" + h + "</h2>";
  b.appendChild(grid(h, true)); }}
const heads = document.getElementById("heads");
D.patterns.forEach((_, h) => {{ const d = document.createElement("div"); d.className = "head";
  d.innerHTML = "<h3>L" + D.layer + "H" + h + "</h3>"; d.appendChild(grid(h, false));
  d.onclick = () => enlarge(h); heads.appendChild(d); }});
enlarge(0);
</script></body></html>
"""
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


def toy_model_geometry(toy, path=None):
    """Toy models of superposition: for each instance, the features' directions in the hidden space
    (when it is 2-D: arrows, coloured by importance) above the W^T W matrix (feature overlaps)."""
    plt = _pyplot()
    n_inst = toy.W.shape[0]
    two_d = toy.n_hidden == 2
    fig, axes = plt.subplots(2 if two_d else 1, n_inst, figsize=(3.2 * n_inst, 6.4 if two_d else 3.4), squeeze=False)
    spread = np.ptp(toy.importance) or 1.0
    colours = plt.cm.viridis(0.9 * (toy.importance - toy.importance.min()) / spread)  # yellow: most important
    for i in range(n_inst):
        W = toy.W[i]
        row = 0
        if two_d:
            ax = axes[0, i]
            for j in range(toy.n_features):
                ax.plot([0, W[0, j]], [0, W[1, j]], color=colours[j], linewidth=2)
                ax.scatter([W[0, j]], [W[1, j]], color=colours[j], s=20)
            lim = max(1.2, np.abs(W).max() * 1.15)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_title(f"sparsity {toy.sparsity[i]:.2f}")
            row = 1
        ax = axes[row, i]
        gram = W.T @ W
        bound = np.abs(gram).max() or 1
        ax.imshow(gram, cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title("W^T W" if two_d else f"W^T W, sparsity {toy.sparsity[i]:.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
    return _finish(fig, path)


def sae_training_curves(log: pd.DataFrame, path=None):
    """SAE training: loss and reconstruction error, L0, and dead latents against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(log["step"], log["loss"], label="loss")
    axes[0].plot(log["step"], log["mse"], label="mse")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(log["step"], log["l0"])
    axes[1].set_title("L0 (active latents per input)")
    axes[2].plot(log["step"], log["dead_latents"])
    if "resampled" in log and log["resampled"].any():
        for s in log.loc[log["resampled"] > 0, "step"]:
            axes[2].axvline(s, color="grey", linestyle=":", linewidth=0.8)
    axes[2].set_title("dead latents (dotted: resampling)")
    for ax in axes:
        ax.set_xlabel("step")
    return _finish(fig, path)


# ----------------------------------------------------------------------------------------------
# TransformerLens demos' helpers (there: plotly; here: matplotlib, offline): imshow, line, scatter.
# Arrays in, axis labels as strings or token lists, ``batch`` picks one prompt when the input has a
# batch axis in front. Each returns the Figure and writes ``path`` when given.
# ----------------------------------------------------------------------------------------------
def _labels_kw(labels, xaxis, yaxis, caxis=""):
    """TransformerLens demos pass axis titles as xaxis/yaxis or labels={"x": .., "y": .., "color": ..}."""
    labels = dict(labels or {})
    return labels.get("x", xaxis), labels.get("y", yaxis), labels.get("color", caxis)


def _pick_batch(values: np.ndarray, batch, wanted_ndim: int, what: str) -> np.ndarray:
    if batch is not None:
        if values.ndim != wanted_ndim + 1:
            raise ValueError(f"{what}: batch={batch} needs a leading batch axis; got shape {values.shape}")
        return values[batch]
    return values


def _ticks(ax, axis: str, labels, n: int):
    if labels is None:
        return
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} {axis} labels for {n} {'columns' if axis == 'x' else 'rows'}")
    if axis == "x":
        ax.set_xticks(range(n), labels, rotation=90 if max(map(len, labels), default=0) > 2 else 0, fontsize=7)
    else:
        ax.set_yticks(range(n), labels, fontsize=7)


def imshow(tensor, x=None, y=None, xaxis: str = "", yaxis: str = "", title: str = "", labels=None,
           color_continuous_midpoint=0.0, cmap=None, facet_col=None, facet_labels=None,
           batch: int | None = None, path=None, zmin=None, zmax=None, **_plotly_only):
    """A heatmap of a 2-D array [rows, cols] (TransformerLens demos' ``imshow``).

    x / y: tick labels for the columns / rows (numbers or string tokens); xaxis / yaxis (or
    ``labels={"x": ..., "y": ..., "color": ...}``) the axis titles. ``color_continuous_midpoint=0``
    (the demos' default) centres a red-blue map on 0; None gives a sequential map.
    facet_col: an axis of a 3-D array to draw as side-by-side panels, titled by ``facet_labels``.
    batch: pick this row of a leading batch axis first. Arguments only plotly understands
    (renderer, ...) are accepted and ignored.
    """
    plt = _pyplot()
    values = np.asarray(tensor, dtype=float)
    values = _pick_batch(values, batch, 2 if facet_col is None else 3, "imshow")
    if facet_col is None:
        if values.ndim != 2:
            raise ValueError(f"imshow draws a 2-D array [rows, cols]; got shape {values.shape} "
                             "(pass batch=i to pick a prompt, or facet_col to draw panels)")
        panels, titles = [values], [title]
    else:
        if values.ndim != 3:
            raise ValueError(f"facet_col needs a 3-D array; got shape {values.shape}")
        panels = list(np.moveaxis(values, facet_col, 0))
        titles = list(facet_labels) if facet_labels is not None else [f"{facet_col}={i}" for i in range(len(panels))]
        if len(titles) != len(panels):
            raise ValueError(f"{len(titles)} facet_labels for {len(panels)} panels")
    rows, cols = panels[0].shape
    xlabel, ylabel, clabel = _labels_kw(labels, xaxis, yaxis)
    if color_continuous_midpoint is not None and zmin is None and zmax is None:
        bound = max(float(np.nanmax(np.abs(values - color_continuous_midpoint))), 1e-12)
        zmin, zmax = color_continuous_midpoint - bound, color_continuous_midpoint + bound
    cmap = cmap or ("RdBu" if color_continuous_midpoint is not None else "viridis")
    width = min(2.5 + 0.35 * cols, 14)
    height = min(2 + 0.3 * rows, 14)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, panel, panel_title in zip(axes[0], panels, titles):
        im = ax.imshow(panel, aspect="auto", cmap=cmap, vmin=zmin, vmax=zmax)
        _ticks(ax, "x", x, cols)
        _ticks(ax, "y", y, rows)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
    if facet_col is not None and title:
        fig.suptitle(title)
    fig.colorbar(im, ax=axes[0].tolist(), label=clabel)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def line(tensor, x=None, xaxis: str = "", yaxis: str = "", title: str = "", labels=None, line_labels=None,
         batch: int | None = None, path=None, **_plotly_only):
    """A line plot (TransformerLens demos' ``line``): a 1-D array as one line, a 2-D array
    [lines, points] as one line per row, named by ``line_labels`` in a legend. x: the points'
    positions, or string labels (e.g. tokens, or component names from ``return_labels=True``).
    batch: pick this row of a leading batch axis first."""
    plt = _pyplot()
    values = np.asarray(tensor, dtype=float)
    if batch is not None:
        values = values[batch]
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise ValueError(f"line draws a 1-D array or a 2-D array [lines, points]; got shape {values.shape}")
    n = values.shape[1]
    xlabel, ylabel, _ = _labels_kw(labels, xaxis, yaxis)
    text_x = x is not None and any(isinstance(v, str) for v in x)
    positions = np.arange(n) if x is None or text_x else np.asarray(x, dtype=float)
    if len(positions) != n:
        raise ValueError(f"{len(positions)} x values for {n} points")
    fig, ax = plt.subplots(figsize=(min(max(6, 0.25 * n), 16), 4))
    names = list(line_labels) if line_labels is not None else [None] * len(values)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} line_labels for {len(values)} lines")
    for row, name in zip(values, names):
        ax.plot(positions, row, marker="." if n <= 60 else None, label=name)
    if text_x:
        _ticks(ax, "x", x, n)
    if line_labels is not None:
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _finish(fig, path)


def scatter(x, y, xaxis: str = "", yaxis: str = "", title: str = "", labels=None, hover=None, text=None,
            color=None, caxis: str = "", batch: int | None = None, facet_col: int | None = None,
            facet_labels=None, path=None, **_plotly_only):
    """A scatter plot of y against x (TransformerLens demos' ``scatter``). ``text`` (or ``hover``,
    plotly's hover names): a label per point, written beside it (e.g. head names "L9H6").
    ``color``: a value per point, with a colour bar titled ``caxis``. batch: pick this row of a
    leading batch axis of x, y (and of color, when it has that axis too) first. facet_col: an axis
    of x and y (and color) to draw as side-by-side panels, titled by ``facet_labels`` (e.g. the
    demos' attribution-vs-activation patching, one panel per activation). A diagonal y = x is not
    drawn; add it yourself."""
    plt = _pyplot()
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if batch is not None:
        if color is not None and np.ndim(color) == xs.ndim:
            color = np.asarray(color)[batch]
        xs, ys = xs[batch], ys[batch]
    if xs.shape != ys.shape:
        raise ValueError(f"x has shape {xs.shape} and y {ys.shape}: expected one y per x")
    if facet_col is None:
        panels = [(xs.ravel(), ys.ravel(), None if color is None else np.ravel(color), title)]
    else:
        if not -xs.ndim <= facet_col < xs.ndim:
            raise ValueError(f"facet_col={facet_col} is not an axis of x and y (shape {xs.shape})")
        n = xs.shape[facet_col]
        titles = list(facet_labels) if facet_labels is not None else [f"{facet_col}={i}" for i in range(n)]
        if len(titles) != n:
            raise ValueError(f"{len(titles)} facet_labels for {n} panels")
        colors = [None] * n if color is None else [np.ravel(c) for c in np.moveaxis(np.asarray(color), facet_col, 0)]
        panels = [(px.ravel(), py.ravel(), c, t) for px, py, c, t in
                  zip(np.moveaxis(xs, facet_col, 0), np.moveaxis(ys, facet_col, 0), colors, titles)]
    names = text if text is not None else hover
    if names is not None and len(names) != panels[0][0].size:
        raise ValueError(f"{len(names)} point labels for {panels[0][0].size} points")
    xlabel, ylabel, clabel = _labels_kw(labels, xaxis, yaxis, caxis)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (px, py, c, panel_title) in zip(axes[0], panels):
        points = ax.scatter(px, py, s=18, **({} if c is None else {"c": c, "cmap": "viridis"}))
        if c is not None:
            fig.colorbar(points, ax=ax, label=clabel)
        if names is not None:
            for xi, yi, name in zip(px, py, names):
                ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
    if facet_col is not None and title:
        fig.suptitle(title)
    return _finish(fig, path)
