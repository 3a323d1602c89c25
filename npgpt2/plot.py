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

        if matplotlib.get_backend().lower() not in ("agg",) and not _has_display():
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
