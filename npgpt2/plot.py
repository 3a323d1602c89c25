"""Pictures of the analyses: heatmaps with string-token axis labels.

matplotlib is optional (``pip install "npgpt2[plot]"``) and imported only when a plot is drawn.
Each function returns the matplotlib Figure and, given ``path``, also writes it there (PNG, SVG,
PDF ... by the file's extension).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import style


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
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --------------------------------------------------------------------------- shared pieces
# Font sizes in points: figures grow with the number of tokens and heads, the text does not shrink.
TICK_SIZE, LABEL_SIZE, TITLE_SIZE, NOTE_SIZE = 9, 10, 11, 8


def _colourbar(fig, mappable, ax, label: str, **kw):
    """A colourbar beside ``ax`` (an Axes or a list), labelled with the quantity and its unit."""
    bar = fig.colorbar(mappable, ax=ax, **kw)
    bar.set_label(label, fontsize=LABEL_SIZE)
    bar.ax.tick_params(labelsize=TICK_SIZE)
    return bar


def _set_title(ax, text: str):
    """A title wrapped to the width of its figure, so that a long one (a model, a metric) is not cut."""
    import textwrap

    width = max(20, int(ax.figure.get_figwidth() * 72 / (0.62 * TITLE_SIZE)))
    ax.set_title("\n".join(textwrap.wrap(text, width)) if text else "", fontsize=TITLE_SIZE)


def _signed_scale(values, midpoint: float = 0.0) -> dict:
    """imshow arguments for a signed array: the diverging map, symmetric around ``midpoint``."""
    bound = float(np.nanmax(np.abs(np.asarray(values, dtype=float) - midpoint))) if np.size(values) else 0.0
    bound = bound if bound > 0 and np.isfinite(bound) else 1.0
    return {"cmap": style.diverging_cmap(), "vmin": midpoint - bound, "vmax": midpoint + bound}


def _unit_scale() -> dict:
    """imshow arguments for values on 0..1 (probabilities, attention): the sequential map on 0..1."""
    return {"cmap": style.sequential_cmap(), "vmin": 0.0, "vmax": 1.0}


def _token_ticks(ax, axis: str, tokens, rotation: int = 90):
    """Tokens as the tick labels of ``axis`` ("x" or "y"), one per cell, whitespace visible."""
    labels = [style.tick_label(t) for t in tokens]
    if axis == "x":
        ax.set_xticks(range(len(labels)), labels, rotation=rotation, fontsize=TICK_SIZE,
                      ha="center" if rotation in (0, 90) else "right")
    else:
        ax.set_yticks(range(len(labels)), labels, fontsize=TICK_SIZE)


def heatmap(values, row_labels, col_labels, title: str = "", xlabel: str = "", ylabel: str = "",
            cmap=None, center: bool = False, annotations=None, path=None, vmin=None, vmax=None,
            clabel: str = ""):
    """A labelled heatmap of a 2-D array [rows, cols].

    ``center=True``: a signed quantity, drawn with the diverging map symmetric around 0 (positive
    blue, negative red: ``npgpt2.style``). Otherwise the sequential map, on ``vmin``..``vmax``
    (default: the data's range; pass 0 and 1 for probabilities). ``clabel`` labels the colourbar
    (the quantity and its unit; default: the title). Labels that are tokens show their whitespace
    (``tick_label``). ``annotations`` [rows, cols] of short strings are written in the cells, in
    black or white by the cell's shade. NaN cells are light grey."""
    plt = _pyplot()
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values of shape {values.shape} do not match {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    cols = [style.tick_label(c) for c in col_labels]
    # a column wide enough for a short annotation; long column labels are turned 45 degrees instead
    width = min(2.8 + (0.62 if annotations is not None else 0.5) * len(cols), 40)
    height = min(max(3.4, 1.8 + 0.38 * len(row_labels) + 0.06 * max(map(len, cols), default=1)), 30)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    scale = _signed_scale(values) if center else {"cmap": style.sequential_cmap(), "vmin": vmin, "vmax": vmax}
    if cmap is not None:
        scale["cmap"] = cmap
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", **scale)
    ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols), default=0) > 3 else 0,
                  ha="right" if max(map(len, cols), default=0) > 3 else "center", fontsize=TICK_SIZE)
    ax.set_yticks(range(len(row_labels)), [style.tick_label(r) for r in row_labels], fontsize=TICK_SIZE)
    _set_title(ax, title)
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    if annotations is not None:
        for (i, j), text in np.ndenumerate(np.asarray(annotations, dtype=object)):
            rgba = im.cmap(im.norm(values[i, j])) if np.isfinite(values[i, j]) else (1, 1, 1, 1)
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.55
            ax.text(j, i, style.drawable(text), ha="center", va="center", fontsize=NOTE_SIZE,
                    color="white" if dark else "black")
    _colourbar(fig, im, ax, clabel or title)
    return _finish(fig, path)


def logit_lens_heatmap(lens: pd.DataFrame, value: str = "next_prob", batch: int = 0, path=None,
                       model: str = ""):
    """The logit lens (``npgpt2.analysis.logit_lens``) as layer x position: colour = ``value``
    ("next_prob" or "top_prob") on the 0..1 map, each cell annotated with the top predicted token.
    The last position has no actual next token, so its "next_prob" cells are grey (the top token
    is still written in them). ``model``: its name, for the title."""
    df = lens[lens["batch"] == batch]
    layers = list(df["layer"].cat.categories) if hasattr(df["layer"], "cat") else sorted(df["layer"].unique())
    table = df.pivot(index="layer", columns="position", values=value).reindex(layers)
    tops = df.pivot(index="layer", columns="position", values="top_token").reindex(layers)
    tokens = df[df["layer_index"] == 0].sort_values("position")["token"].tolist()
    label = {"next_prob": "P(actual next token)", "top_prob": "P(top token)"}.get(value, value)
    cells = np.vectorize(lambda t: style.short_label(t, 8), otypes=[object])(tops.to_numpy())
    note = "; grey: no next token to score" if value == "next_prob" and table.isna().any().any() else ""
    return heatmap(table.to_numpy(), layers, tokens, title=style.title(model, "logit lens", f"colour: {label}",
                                                                          "cells: top token"),
                   xlabel=f"position (its token){note}", ylabel="residual stream at", annotations=cells,
                   path=path, vmin=0, vmax=1, clabel=f"{label} (probability, 0..1)")


def attribution_heatmap(dla: pd.DataFrame, column: str = "attribution", path=None, model: str = ""):
    """Direct logit attribution by head (``by="head"``) as layer x head, on the diverging map
    (positive blue: the head pushes the answer's logit up)."""
    heads = dla[dla["type"] == "head"]
    if heads.empty:
        raise ValueError('the table has no heads: use direct_logit_attribution(..., by="head")')
    table = heads.pivot(index="layer", columns="head", values=column).sort_index().sort_index(axis=1)
    return heatmap(table.to_numpy(), [f"L{l}" for l in table.index], [f"H{h}" for h in table.columns],
                   title=style.title(model, "direct logit attribution by head", column), xlabel="head",
                   ylabel="layer", center=True, path=path, clabel=f"{column} (logits)")


def attribution_bars(dla: pd.DataFrame, column: str = "attribution", top: int = 20, path=None, model: str = ""):
    """The ``top`` components by absolute attribution, as horizontal bars (positive blue, negative red)."""
    plt = _pyplot()
    rows = dla.reindex(dla[column].abs().sort_values(ascending=False).index).head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.3 * len(rows)))
    ax.barh(rows["component"], rows[column], color=np.where(rows[column] >= 0, style.POSITIVE, style.NEGATIVE))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.set_xlabel(f"direct logit attribution, {column} (logits)", fontsize=LABEL_SIZE)
    ax.set_ylabel("component", fontsize=LABEL_SIZE)
    _set_title(ax, style.title(model, f"the {len(rows)} largest attributions"))
    return _finish(fig, path)


def saliency_plot(saliency: pd.DataFrame, path=None, metric: str = "", model: str = ""):
    """A ``token_saliency`` table as one bar per prompt token, in order (positive blue, negative red).
    ``metric``: what was differentiated (e.g. "log P(' Paris')"), named in the title with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(saliency) + 1.5), 3.8))
    ax.bar(range(len(saliency)), saliency["score"],
           color=np.where(saliency["score"] >= 0, style.POSITIVE, style.NEGATIVE))
    _token_ticks(ax, "x", saliency["token"], rotation=60)
    ax.axhline(0, color="black", linewidth=0.8)
    a = saliency.attrs
    method = a.get("method", "score").replace("_", " ")
    ax.set_ylabel(f"{method} (metric units)", fontsize=LABEL_SIZE)
    ax.set_xlabel("prompt token", fontsize=LABEL_SIZE)
    what = f"{metric or 'metric'} = {a['metric']:.3f}" if "metric" in a else (metric or "metric")
    base = f", baseline {a['baseline_metric']:.3f}" if "baseline_metric" in a else ""
    _set_title(ax, style.title(model, f"saliency ({method}) of {what}{base}"))
    return _finish(fig, path)


def _circuit_layout(edges: pd.DataFrame, n_head, n_layer):
    import re

    names = set(edges["upstream"]) | set(edges["downstream"])
    layers = [int(m.group(1)) for n in names if (m := re.match(r"(?:L|mlp)(\d+)", n))]
    n_layer = n_layer or max(layers, default=0) + 1
    heads = [int(m.group(1)) for n in names if (m := re.match(r"L\d+H(\d+)", n))]
    n_head = n_head or max(heads, default=0) + 1

    def where(name):
        if name == "embed":
            return (n_head - 1) / 2, -1
        if name == "logits":
            return (n_head - 1) / 2, n_layer
        if name.startswith("mlp"):
            return n_head + 0.5, int(name[3:])
        layer, head = (int(x) for x in re.match(r"L(\d+)H(\d+)", name).groups())
        return head, layer

    return names, n_head, n_layer, where


_PORTS = {"q": -0.32, "k": 0.0, "v": 0.32}  # where a head's inputs sit, across from its centre (one head: 1)
_PORT_DROP = 0.3  # and how far below it (one layer: 1)


def circuit(edges: pd.DataFrame, path=None, n_head: int | None = None, title: str = "",
            n_layer: int | None = None, model: str = ""):
    """Draw a circuit the way the EAP and ACDC papers do: every layer a row (embeddings at the
    bottom, logits at the top), each head and the layer's MLP a node in it (grey dots: not in the
    circuit), one line per edge, blue for a positive score and red for a negative one, its width
    by |score|; an edge into a head ends at the input it feeds, one of three ports below the head
    marked q, k and v.

    edges: columns upstream, downstream, input and score (``edge_attribution`` / ``greedy_circuit``).
    n_head, n_layer: the model's (default: the largest the edges name, which may miss layers).
    Writes PNG or SVG when ``path`` is given."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    names, n_head, n_layer, where = _circuit_layout(edges, n_head, n_layer)
    fig, ax = plt.subplots(figsize=(2.5 + 0.62 * (n_head + 2), 1.6 + 0.62 * (n_layer + 2)), layout="constrained")
    grid = [(h, l) for l in range(n_layer) for h in range(n_head)] + [(n_head + 0.5, l) for l in range(n_layer)]
    ax.scatter(*zip(*grid), s=14, color=style.NEUTRAL, alpha=0.45, zorder=1, linewidths=0)
    biggest = max(float(edges["score"].abs().max()), 1e-12) if len(edges) else 1.0
    ports = set()  # (head, input): a head's q, k and v each have a port below it, where their edges end
    for row in edges.reindex(edges["score"].abs().sort_values().index).itertuples():  # strongest on top
        (x0, y0), (x1, y1) = where(row.upstream), where(row.downstream)
        if row.input in _PORTS:
            x1, y1 = x1 + _PORTS[row.input], y1 - _PORT_DROP
            ports.add((row.downstream, row.input))
        colour = style.POSITIVE if row.score >= 0 else style.NEGATIVE
        ax.plot([x0, x1], [y0, y1], color=colour, alpha=0.8, solid_capstyle="round", zorder=2,
                linewidth=0.8 + 4.2 * abs(row.score) / biggest)
    for head, part in sorted(ports):  # each port labelled once, joined to its head
        x, y = where(head)
        ax.plot([x + _PORTS[part], x], [y - _PORT_DROP, y], color="black", linewidth=0.6, zorder=2)
        ax.text(x + _PORTS[part], y - _PORT_DROP, part, fontsize=NOTE_SIZE, ha="center", va="center", zorder=4,
                bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "black", "lw": 0.6})
    for name in sorted(names):  # a fixed order: the same drawing every run
        x, y = where(name)
        ax.scatter([x], [y], s=150, color="white", edgecolor="black", zorder=3, linewidths=1.2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=NOTE_SIZE,
                    zorder=5, bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    legend = []
    if (edges["score"] >= 0).any():
        legend.append(Line2D([], [], color=style.POSITIVE, lw=3, label="edge, positive score"))
    if (edges["score"] < 0).any():
        legend.append(Line2D([], [], color=style.NEGATIVE, lw=3, label="edge, negative score"))
    if len(edges):
        legend.append(Line2D([], [], color="none", label=f"width: |score|, widest {biggest:.3g}"))
    legend.append(Line2D([], [], marker="o", color="none", markerfacecolor="white", markeredgecolor="black",
                         markersize=9, label="component in the circuit"))
    legend.append(Line2D([], [], marker="o", color="none", markerfacecolor=style.NEUTRAL, markeredgecolor="none",
                         markersize=5, label="component not in it"))
    if edges["input"].isin(["q", "k", "v"]).any():
        legend.append(Line2D([], [], color="none", label="q / k / v: a head's inputs, where its edges end"))
    ax.legend(handles=legend, fontsize=NOTE_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_yticks(range(-1, n_layer + 1), ["embed"] + [f"layer {l}" for l in range(n_layer)] + ["logits"],
                  fontsize=TICK_SIZE)
    ax.set_xticks(list(range(n_head)) + [n_head + 0.5], [f"H{h}" for h in range(n_head)] + ["MLP"], fontsize=TICK_SIZE)
    ax.set_xlim(-0.8, n_head + 1.3)
    ax.set_ylim(-1.6, n_layer + 0.7)
    ax.set_xlabel("head (the layer's MLP on the right)", fontsize=LABEL_SIZE)
    ax.set_ylabel("", fontsize=LABEL_SIZE)  # the tick labels name the rows
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    _set_title(ax, title or style.title(model, f"circuit: {len(edges)} edges"))
    return _finish(fig, path)


def circuit_html(edges: pd.DataFrame, path=None, n_head: int | None = None, title: str = "",
                 n_layer: int | None = None, model: str = "", prompts: dict | None = None,
                 metric: str = "", faithfulness: float | None = None) -> str:
    """A self-contained HTML page of a circuit (no scripts, styles or fonts from the network: open it
    offline): what it was found on (the model, ``prompts`` such as {"clean": ..., "corrupted": ...},
    the ``metric``), the number of edges and the ``faithfulness``; the picture ``circuit`` draws,
    inline as SVG; and the table of its edges, largest |score| first, each score shaded on the
    diverging map. Returns the HTML (and writes it to ``path``)."""
    import html as _html
    import io

    plt = _pyplot()
    fig = circuit(edges, n_head=n_head, title=title, n_layer=n_layer, model=model)
    svg = io.StringIO()
    plt = _pyplot()
    with plt.rc_context({"svg.hashsalt": "npgpt2"}):  # the same ids, and no date, for the same figure: a page that does not change unless its content does
        fig.savefig(svg, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg_text = svg.getvalue()
    svg_text = svg_text[svg_text.index("<svg"):]  # the element alone, without the XML prologue
    order = edges.reindex(edges["score"].abs().sort_values(ascending=False).index)
    bound = float(order["score"].abs().max()) if len(order) else 1.0
    rows = []
    for r in order.itertuples():
        bg = style.diverging_rgb(r.score, bound)
        rows.append(f'<tr><td>{_html.escape(r.upstream)}</td><td>{_html.escape(r.downstream)}</td>'
                    f'<td>{_html.escape(r.input)}</td><td class="num" style="background:{bg};'
                    f'color:{style.text_colour_on(bg)}">{r.score:+.4f}</td></tr>')
    facts = [("model", model)] + [(f"{k} prompt", v) for k, v in (prompts or {}).items()]
    facts += [("metric", metric), ("edges", f"{len(edges):,}"),
              ("faithfulness", "" if faithfulness is None else
               f"{faithfulness:.3f} (1 = the circuit alone restores the clean metric, 0 = no better than corrupted)")]
    facts_html = "".join(f"<dt>{_html.escape(k)}</dt><dd>{_html.escape(str(v))}</dd>" for k, v in facts if v != "")
    heading = _html.escape(title or style.title(model, f"circuit: {len(edges)} edges"))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{heading}</title><style>'
            "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}"
            "h1{font-size:20px} dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;font-size:14px}"
            "dt{color:#555} dd{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}"
            ".circuit svg{max-width:100%;height:auto} table{border-collapse:collapse;font-size:13px}"
            "td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left} td.num{text-align:right;"
            "font-family:ui-monospace,Menlo,monospace}</style></head>\n"
            f'<body>\n<h1>{heading}</h1>\n<dl class="facts">{facts_html}</dl>\n'
            f'<div class="circuit">{svg_text}</div>\n<h2 style="font-size:16px">Edges, largest |score| first '
            f"(blue: positive, red: negative)</h2>\n"
            f'<table class="edges"><tr><th>upstream</th><th>downstream</th><th>input</th><th>score</th></tr>'
            f'{"".join(rows)}</table>\n</body></html>\n')
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


def attention_patterns(patterns, str_tokens, heads, path=None, batch: int = 0, model: str = ""):
    """Attention pattern heatmaps, one panel per head, titled ``L5H3``, with the tokens on both axes
    and one colourbar (attention weight on 0..1, the sequential map). Cells a query cannot attend
    to (later positions) are grey. Panels stay a readable size at any number of heads and tokens:
    the figure grows, the text does not shrink.

    patterns: an ActivationCache holding the patterns, or {layer: [batch, head, q, k]} arrays.
    heads: [(layer, head), ...], or flat head indices layer * n_head + head (as TransformerLens's
    demos index ``stack_head_results``), or a mix. Destinations (queries) run down, sources (keys)
    across. str_tokens: one prompt's tokens, or one list per batch row (then row ``batch`` is used).
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
    cols = min(len(heads), max(1, int(np.ceil(np.sqrt(len(heads))))))
    rows = -(-len(heads) // cols)
    longest = max((len(style.tick_label(t)) for t in str_tokens), default=1)
    size = max(2.6, 0.2 * n + 0.075 * longest + 1.2)  # inches per panel: ~0.2 in per token at 9 pt
    # constrained layout makes room for each panel's tick labels and axis labels, so a panel's
    # labels never run into the panel to its left
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.4, size * rows + 0.5), squeeze=False,
                             layout="constrained")
    future = np.triu(np.ones((n, n), dtype=bool), 1)
    for ax, (layer, head) in zip(axes.ravel(), heads):
        pattern = patterns["pattern", layer] if hasattr(patterns, "cache_dict") else patterns[layer]
        im = ax.imshow(np.ma.masked_array(np.asarray(pattern[batch, head], dtype=float), future), **_unit_scale())
        ax.set_title(style.head_name(layer, head), fontsize=TITLE_SIZE)
        _token_ticks(ax, "x", str_tokens)
        _token_ticks(ax, "y", str_tokens)
        ax.set_xlabel("source (key)", fontsize=LABEL_SIZE)
        ax.set_ylabel("destination (query)", fontsize=LABEL_SIZE)
    for ax in axes.ravel()[len(heads):]:
        fig.delaxes(ax)  # no empty frames in the last row
    used = list(axes.ravel()[: len(heads)])
    _colourbar(fig, im, used, "attention weight (0..1)", shrink=min(1.0, 0.9 if rows == 1 else 0.6), aspect=30)
    fig.suptitle(style.title(model, "attention patterns", f"prompt {batch}" if batch else ""), fontsize=TITLE_SIZE)
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


def attention_html(pattern: np.ndarray, str_tokens, layer: int, path=None, title: str | None = None,
                   batch: int | None = None, model: str = "") -> str:
    """A self-contained page of every head of one layer: the ``AttentionView`` (head thumbnails to
    pick from, the picked head's pattern large with the tokens on both axes, hover to read a
    cell), as a standalone HTML file that opens offline. pattern: [head, q, k] (one prompt), or
    [batch, head, q, k] with ``batch`` saying which prompt (str_tokens may then be one list per
    prompt). Returns the HTML (and writes it to ``path``)."""
    from .display import AttentionView

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
    view = AttentionView(pattern, str_tokens, [style.head_name(layer, h) for h in range(pattern.shape[0])],
                         title=title or style.title(model, f"attention patterns, layer {layer}"))
    page = view.to_html()
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


def toy_model_geometry(toy, path=None):
    """Toy models of superposition: for each instance, the features' directions in the hidden space
    (when it is 2-D: arrows, coloured by importance) above W^T W, the features' overlaps, on the
    diverging map (blue: two features' directions agree, red: they oppose) with its colourbar."""
    plt = _pyplot()
    n_inst = toy.W.shape[0]
    two_d = toy.n_hidden == 2
    fig, axes = plt.subplots(2 if two_d else 1, n_inst, figsize=(3.3 * n_inst + 1.2, 6.8 if two_d else 3.6),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.12)  # room for the square panels' axis labels
    spread = np.ptp(toy.importance) or 1.0
    colours = plt.cm.viridis(0.9 * (toy.importance - toy.importance.min()) / spread)  # yellow: most important
    grams = toy.W.transpose(0, 2, 1) @ toy.W  # [instance, feature, feature]
    scale = _signed_scale(grams)
    ticks = range(0, toy.n_features, max(1, toy.n_features // 5))
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
            ax.set_title(f"sparsity {toy.sparsity[i]:.2f}: directions", fontsize=TITLE_SIZE)
            ax.set_xlabel("hidden dimension 0", fontsize=LABEL_SIZE)
            ax.set_ylabel("hidden dimension 1", fontsize=LABEL_SIZE)
            ax.tick_params(labelsize=TICK_SIZE)
            row = 1
        ax = axes[row, i]
        im = ax.imshow(grams[i], **scale)
        ax.set_title(f"sparsity {toy.sparsity[i]:.2f}: W\u1d40W", fontsize=TITLE_SIZE)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=TICK_SIZE)
        ax.set_xlabel("feature", fontsize=LABEL_SIZE)
        ax.set_ylabel("feature", fontsize=LABEL_SIZE)
    _colourbar(fig, im, list(axes[-1]), "overlap W\u1d62\u00b7W\u2c7c (blue: aligned, red: opposed)", shrink=0.9)
    return _finish(fig, path)


def sae_training_curves(log: pd.DataFrame, path=None, model: str = ""):
    """SAE training against the step: the loss and the reconstruction error (MSE, log scale), L0,
    and the dead latents (resampling steps, when there were any, as dotted lines)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    axes[0].plot(log["step"], log["loss"], label="loss", color=style.POSITIVE)
    axes[0].plot(log["step"], log["mse"], label="reconstruction (MSE)", color=style.NEGATIVE)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=NOTE_SIZE)
    axes[0].set_title("loss and reconstruction error", fontsize=TITLE_SIZE)
    axes[0].set_ylabel("loss (log scale)", fontsize=LABEL_SIZE)
    axes[1].plot(log["step"], log["l0"], color=style.POSITIVE)
    axes[1].set_title("L0", fontsize=TITLE_SIZE)
    axes[1].set_ylabel("active latents per input", fontsize=LABEL_SIZE)
    axes[2].plot(log["step"], log["dead_latents"], color=style.POSITIVE)
    resampled = log.loc[log["resampled"] > 0, "step"] if "resampled" in log else []
    for s in resampled:
        axes[2].axvline(s, color=style.NEUTRAL, linestyle=":", linewidth=1.2)
    axes[2].set_title("dead latents" + (" (dotted: resampling)" if len(resampled) else ""), fontsize=TITLE_SIZE)
    axes[2].set_ylabel("latents that never fired", fontsize=LABEL_SIZE)
    for ax in axes:
        ax.set_xlabel("step", fontsize=LABEL_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
    if model:
        fig.suptitle(style.title(model, "SAE training"), fontsize=TITLE_SIZE)
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
    labels = [style.tick_label(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} {axis} labels for {n} {'columns' if axis == 'x' else 'rows'}")
    if axis == "x":
        ax.set_xticks(range(n), labels, rotation=90 if max(map(len, labels), default=0) > 2 else 0, fontsize=TICK_SIZE)
    else:
        ax.set_yticks(range(n), labels, fontsize=TICK_SIZE)


def imshow(tensor, x=None, y=None, xaxis: str = "", yaxis: str = "", title: str = "", labels=None,
           color_continuous_midpoint=0.0, cmap=None, facet_col=None, facet_labels=None,
           batch: int | None = None, path=None, zmin=None, zmax=None, **_plotly_only):
    """A heatmap of a 2-D array [rows, cols] (TransformerLens demos' ``imshow``).

    x / y: tick labels for the columns / rows (numbers or string tokens); xaxis / yaxis (or
    ``labels={"x": ..., "y": ..., "color": ...}``) the axis titles; ``labels["color"]`` the
    colourbar's (default "value"). ``color_continuous_midpoint=0`` (the demos' default) centres the
    diverging map on 0 (positive blue, as in the demos); an array with no negative values (an
    attention pattern, probabilities) gets the sequential map from 0 instead, on 0..1 when it lies
    within it; None gives the sequential map over the data's range.
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
    if cmap is None and zmin is None and zmax is None:
        if color_continuous_midpoint is not None and np.nanmin(values) < 0:
            scale = _signed_scale(values, color_continuous_midpoint)
        elif color_continuous_midpoint is not None and np.nanmax(values) <= 1:
            scale = _unit_scale()
        else:
            scale = {"cmap": style.sequential_cmap(), "vmin": 0.0 if color_continuous_midpoint is not None else None,
                     "vmax": None}
    else:
        scale = {"cmap": cmap or (style.diverging_cmap() if color_continuous_midpoint is not None
                                  else style.sequential_cmap()), "vmin": zmin, "vmax": zmax}
    width = min(2.5 + 0.35 * cols, 14)
    height = min(2 + 0.3 * rows, 14)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1, height + 0.04 * max(
        (len(style.tick_label(t)) for t in (x or [])), default=0)), squeeze=False, layout="constrained")
    for ax, panel, panel_title in zip(axes[0], panels, titles):
        im = ax.imshow(panel, aspect="auto", **scale)
        _ticks(ax, "x", x, cols)
        _ticks(ax, "y", y, rows)
        ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
        ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
        ax.set_title(panel_title, fontsize=TITLE_SIZE)
    if facet_col is not None and title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    _colourbar(fig, im, axes[0].tolist(), clabel or "value")
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
    scale = {}
    if color is not None:  # one scale for every panel: diverging when signed, else the sequential map
        signed = np.nanmin(np.ravel(color).astype(float)) < 0
        scale = _signed_scale(np.ravel(color)) if signed else {
            "cmap": style.sequential_cmap(), "vmin": float(np.nanmin(color)), "vmax": float(np.nanmax(color))}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False, layout="constrained")
    for ax, (px, py, c, panel_title) in zip(axes[0], panels):
        points = ax.scatter(px, py, s=18, **({"color": style.POSITIVE} if c is None else {"c": c, **scale}))
        if c is not None:
            _colourbar(fig, points, ax, clabel or "colour")
        if names is not None:
            for xi, yi, name in zip(px, py, names):
                ax.annotate(style.drawable(str(name)), (xi, yi), textcoords="offset points", xytext=(3, 3),
                            fontsize=NOTE_SIZE)
        ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
        ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
        ax.set_title(panel_title, fontsize=TITLE_SIZE)
    if facet_col is not None and title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    return _finish(fig, path)
