"""How npgpt2's objects show themselves in Jupyter: ``_repr_html_`` tables, and the attention view.

Jupyter calls an object's ``_repr_html_()`` when it is the last expression of a cell; the model,
``ActivationCache``, ``FactoredMatrix``, ``SAE`` and ``Harvest`` return the HTML made here. Their plain
``repr`` stays one line. Everything is self-contained: no scripts, styles or fonts from a network,
so a notebook saved with its outputs shows the same offline.

``AttentionView`` (made by ``npgpt2.plot.attention_view``) is the interactive one: the prompt's
tokens in a row, and beside each other one panel per head. Hovering a token makes it the query:
in every head's panel the tokens it attends to are shaded by the attention weight, and the head's
grid marks that row. It renders inline (``_repr_html_``) and saves to a standalone page
(``save(path)``).
"""

from __future__ import annotations

import html
import os
import uuid

import numpy as np

_STYLE = ("font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; "
          "border-collapse: collapse")
_CELL = "padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top"


def nbytes_str(n: int) -> str:
    """A byte count for people: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"  # not reached


def table_html(rows, header=None, caption: str | None = None) -> str:
    """An HTML table of ``rows`` (sequences of cells; a cell is text, escaped here)."""
    out = [f'<table style="{_STYLE}">']
    if caption:
        out.append(f'<caption style="text-align: left; font-weight: bold; padding: 4px 0">'
                   f"{html.escape(caption)}</caption>")
    if header:
        out.append("<tr>" + "".join(f'<th style="{_CELL}">{html.escape(str(h))}</th>' for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td style="{_CELL}">{html.escape(str(c))}</td>' for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# ----------------------------------------------------------------------------------- the model
def model_html(model) -> str:
    """The model as a table: name, sizes, parameters, dtype, weight processing, where the files are."""
    c = model.cfg
    processing = [k for k, on in model.processing.items() if on]
    rows = [("name", model.name),
            ("layers x heads", f"{c.n_layer} x {c.n_head}"),
            ("d_model, d_head, d_mlp", f"{c.d_model}, {c.d_head}, {c.d_mlp}"),
            ("d_vocab, n_ctx", f"{c.d_vocab}, {c.n_ctx}"),
            ("parameters", f"{model.n_params():,}"),
            ("dtype", str(model.dtype)),
            ("attention", model.attn_implementation),
            ("weight processing", ", ".join(processing) or "none (the logits equal Hugging Face's)"),
            ("hook points", f"{len(model.hook_names())}")]
    if model.source:
        rows.append(("source", model.source))
    if model.files is not None:
        rows.append(("files in", os.path.dirname(os.path.realpath(model.files.config))))
        for path in model.files.weights:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            rows.append(("weights", f"{os.path.basename(path)} ({nbytes_str(size)})"))
    return table_html(rows, caption=f"GPT2 {model.name}")


# ------------------------------------------------------------------------------- the cache
def cache_groups(cache) -> list[tuple[str, list[tuple[str, tuple, str, int]]]]:
    """The cache's activations grouped by where they are: ``[(group, [(name, shape, dtype, nbytes)])]``,
    groups "embed", "block 0", "block 1", ..., "final" in the forward pass's order."""
    groups: dict[str, list] = {}
    for name, value in cache.items():
        if name.startswith("blocks."):
            group = f"block {name.split('.')[1]}"
        elif name.startswith("ln_final."):
            group = "final"
        else:
            group = "embed"
        a = np.asarray(value)
        groups.setdefault(group, []).append((name, a.shape, str(a.dtype), int(a.nbytes)))
    return list(groups.items())


def cache_html(cache) -> str:
    """The cache as one collapsible section per layer: each hook point's shape, dtype and size, and
    the total memory at the top."""
    groups = cache_groups(cache)
    total = sum(size for _, items in groups for *_, size in items)
    out = [f'<div style="font-family: sans-serif; font-size: 13px"><b>ActivationCache</b>: '
           f"{len(cache)} activations, {nbytes_str(total)}"]
    for group, items in groups:
        size = sum(item[3] for item in items)
        rows = [(name, _shape(shape), dtype, nbytes_str(n)) for name, shape, dtype, n in items]
        out.append(f"<details><summary>{html.escape(group)}: {len(items)} activations, "
                   f"{nbytes_str(size)}</summary>{table_html(rows, header=('name', 'shape', 'dtype', 'size'))}"
                   f"</details>")
    out.append("</div>")
    return "".join(out)


# ----------------------------------------------------------------------- factored matrices, SAEs
def factored_html(fm) -> str:
    """A ``FactoredMatrix``: its shape, the factors' shapes and the inner (rank-limiting) size."""
    m, n = fm.shape[-2:]
    rows = [("shape", _shape(fm.shape)), ("A", _shape(fm.A.shape)), ("B", _shape(fm.B.shape)),
            ("inner size (rank at most)", str(fm.A.shape[-1])),
            ("stored", f"{fm.A.size + fm.B.size:,} numbers, instead of {int(np.prod(fm.shape)):,} for A @ B")]
    return table_html(rows, caption=f"FactoredMatrix {m} x {n}")


def sae_html(sae) -> str:
    """An ``SAE``: where it reads, its sizes and the rest of its configuration."""
    rows = [("hook", sae.hook_name or "(not set)"), ("d_in", str(sae.d_in)), ("d_sae", str(sae.d_sae)),
            ("expansion", f"{sae.d_sae / sae.d_in:g}x"), ("dtype", str(sae.W_enc.dtype)),
            ("parameters", f"{sum(a.size for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)):,}")]
    rows += [(k, str(v)) for k, v in sae.cfg.items() if k not in ("d_in", "d_sae", "hook_name")]
    return table_html(rows, caption="SAE")


# ----------------------------------------------------------------------------------- harvests
def harvest_summary(h) -> str:
    """A harvest in one line: hook (and SAE), features, tokens seen, where it is stored."""
    m = h.manifest
    what = f"{m['n_features']:,} {m['feature_kind']}s of {m['hook']}"
    return (f"Harvest({what}; {m['tokens_seen']:,} tokens; "
            f"{'in ' + str(h.folder) if h.folder else 'not saved'})")


def harvest_html(h, n_top: int = 5) -> str:
    """A ``Harvest``: its model, hook point (and SAE), corpus, tokens seen and features, where it is
    stored; then the ``n_top`` features with the largest activations (max, density, mean when firing)."""
    m = h.manifest
    sae = m.get("sae")
    sae_text = "none (the hook's neurons)" if not sae else \
        f"{sae.get('release') or '(given)'}:{sae.get('sae_id') or sae['hook']} (d_sae {sae['d_sae']:,})"
    fired = int((h.features["fire_count"] > 0).sum())
    rows = [("model", m["model_name"] if m["model_name"] == m["model"] else f"{m['model_name']} ({m['model']})"),
            ("hook", m["hook"]), ("SAE", sae_text),
            ("features", f"{m['n_features']:,} {m['feature_kind']}s, {fired:,} fired (activation > {m['threshold']:g})"),
            ("tokens seen", f"{m['tokens_seen']:,} in {m['n_contexts']:,} contexts of {m['ctx']} tokens"),
            ("corpus", f"{m['corpus']['description']} (fingerprint {m['corpus']['fingerprint'][:12]})"),
            ("run", f"{m['runner']}, {m['seconds']:g} s"),
            ("stored in", str(h.folder) if h.folder else "not saved (harvest(..., out=FOLDER) writes it)")]
    strongest = h.features.sort_values(["max", "feature"], ascending=[False, True]).head(n_top)
    top_rows = [(int(r.feature), f"{r.max:.4g}", f"{r.density:.4g}",
                 "-" if r.mean_firing != r.mean_firing else f"{r.mean_firing:.4g}", f"{int(r.fire_count):,}")
                for r in strongest.itertuples()]
    return (table_html(rows, caption=f"Harvest of {m['hook']}")
            + table_html(top_rows, header=(m["feature_kind"], "max", "density", "mean when firing", "fire count"),
                         caption=f"the {len(top_rows)} {m['feature_kind']}s with the largest activations"))


# --------------------------------------------------------------------------- the attention view
_VIEW_CSS = """
.npgpt2-attn { font-family: sans-serif; font-size: 13px; color: #222; }
.npgpt2-attn .tokens { margin: 0.3em 0 0.6em; line-height: 2; }
.npgpt2-attn .tok { display: inline-block; padding: 1px 3px; margin: 1px; border: 1px solid #ccc; border-radius: 3px;
  white-space: pre; cursor: pointer; font-family: ui-monospace, Menlo, monospace; }
.npgpt2-attn .tok.query { border-color: #d62728; box-shadow: 0 0 0 1px #d62728; }
.npgpt2-attn .heads { display: flex; flex-wrap: wrap; gap: 1.2em; }
.npgpt2-attn .head { max-width: 24em; }
.npgpt2-attn .head h4 { margin: 0.2em 0; font-size: 1em; }
.npgpt2-attn .strip { line-height: 1.9; margin-bottom: 0.4em; }
.npgpt2-attn table.grid { border-collapse: collapse; }
.npgpt2-attn table.grid td { width: 8px; height: 8px; padding: 0; border: 1px solid #f4f4f4; }
.npgpt2-attn table.grid tr.query td { border-top: 1px solid #d62728; border-bottom: 1px solid #d62728; }
.npgpt2-attn .info { min-height: 1.4em; font-family: ui-monospace, Menlo, monospace; }
"""

# Runs once per view, on the element whose id it is given. Colours: white (0) to blue (1).
_VIEW_JS = """
(function () {
  const root = document.getElementById(ROOT_ID);
  const D = JSON.parse(document.getElementById(ROOT_ID + "-data").textContent);
  const n = D.tokens.length;
  const shade = w => { const c = Math.round(255 * (1 - w)); return `rgb(${c}, ${c}, 255)`; };
  const info = root.querySelector(".info");
  const tokens = root.querySelector(".tokens");
  const heads = root.querySelector(".heads");
  const strips = [], grids = [];
  function tokenSpan(i) {
    const s = document.createElement("span");
    s.className = "tok"; s.textContent = D.tokens[i]; s.dataset.pos = i;
    s.title = "position " + i; return s;
  }
  D.heads.forEach((label, h) => {
    const d = document.createElement("div"); d.className = "head"; d.dataset.head = label;
    const title = document.createElement("h4"); title.textContent = label; d.appendChild(title);
    const strip = document.createElement("div"); strip.className = "strip";
    for (let j = 0; j < n; j++) strip.appendChild(tokenSpan(j));
    d.appendChild(strip); strips.push(strip);
    const t = document.createElement("table"); t.className = "grid";
    for (let i = 0; i < n; i++) {
      const r = t.insertRow();
      for (let j = 0; j < n; j++) {
        const c = r.insertCell(), w = D.patterns[h][i][j];
        c.style.background = j > i ? "#fafafa" : shade(w);
        c.title = `${label}: ${i} -> ${j}: ${w.toFixed(4)}`;
        c.onmouseover = () => show(i);
      }
    }
    d.appendChild(t); grids.push(t); heads.appendChild(d);
  });
  function show(q) {
    tokens.querySelectorAll(".tok").forEach((s, j) => s.classList.toggle("query", j === q));
    strips.forEach((strip, h) => strip.querySelectorAll(".tok").forEach((s, j) => {
      s.style.background = j <= q ? shade(D.patterns[h][q][j]) : "transparent";
      s.classList.toggle("query", j === q);
    }));
    grids.forEach(t => Array.from(t.rows).forEach((r, i) => r.classList.toggle("query", i === q)));
    const best = D.heads.map((label, h) => {
      let k = 0; for (let j = 1; j <= q; j++) if (D.patterns[h][q][j] > D.patterns[h][q][k]) k = j;
      return `${label} -> ${k} ${JSON.stringify(D.tokens[k])} (${D.patterns[h][q][k].toFixed(2)})`;
    });
    info.textContent = `query ${q} ${JSON.stringify(D.tokens[q])}: ` + best.join("; ");
  }
  for (let i = 0; i < n; i++) {
    const s = tokenSpan(i); s.onmouseover = () => show(i); tokens.appendChild(s);
  }
  show(n - 1);
})();
"""


class AttentionView:
    """Attention patterns to look at in a notebook or a browser: hover a token to see where it
    attends, in every head at once. Made by ``npgpt2.plot.attention_view``.

    patterns: [head, query_pos, key_pos] (one prompt); head_labels: one per head ("L1H3");
    str_tokens: one string per position.
    """

    def __init__(self, patterns: np.ndarray, str_tokens, head_labels, title: str = ""):
        patterns = np.asarray(patterns, dtype=float)
        n = len(str_tokens)
        if patterns.ndim != 3 or patterns.shape[1:] != (n, n):
            raise ValueError(f"patterns must be [head, {n}, {n}] for {n} tokens; got {list(patterns.shape)}")
        if len(head_labels) != patterns.shape[0]:
            raise ValueError(f"{len(head_labels)} head labels for {patterns.shape[0]} heads")
        self.patterns = patterns
        self.str_tokens = [str(t) for t in str_tokens]
        self.head_labels = [str(h) for h in head_labels]
        self.title = title

    def __repr__(self):
        return (f"AttentionView({len(self.head_labels)} heads: {', '.join(self.head_labels[:6])}"
                f"{', ...' if len(self.head_labels) > 6 else ''}; {len(self.str_tokens)} tokens)")

    def _fragment(self) -> str:
        from .plot import _script_json

        root = "npgpt2-attn-" + uuid.uuid4().hex[:12]
        data = _script_json({"tokens": self.str_tokens, "heads": self.head_labels,
                             "patterns": np.round(self.patterns, 4).tolist()})
        title = f"<b>{html.escape(self.title)}</b><br>" if self.title else ""
        return (f'<div class="npgpt2-attn" id="{root}"><style>{_VIEW_CSS}</style>{title}'
                f"<span>Hover a token: each head shades the tokens it attends to from there.</span>"
                f'<div class="tokens"></div><div class="info"></div><div class="heads"></div></div>'
                f'<script type="application/json" id="{root}-data">{data}</script>'
                f"<script>{_VIEW_JS.replace('ROOT_ID', repr(root))}</script>")

    def _repr_html_(self) -> str:
        return self._fragment()

    def to_html(self) -> str:
        """A standalone HTML page (no network needed to open it)."""
        title = html.escape(self.title or "Attention patterns")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
                f"<body>{self._fragment()}</body></html>\n")

    def save(self, path) -> str:
        """Write ``to_html()`` to ``path``; returns the path."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
        return str(path)


# ------------------------------------------------------------------------------ notebooks or not
def in_notebook() -> bool:
    """True inside a Jupyter kernel (where rich output is shown), False in a terminal or script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def as_text(obj) -> str:
    """What ``show`` prints outside a notebook: tables in full, numbers rounded."""
    import pandas as pd

    if hasattr(obj, "data") and type(obj).__name__ == "Styler":
        obj = obj.data
    if isinstance(obj, pd.DataFrame):
        return obj.round(4).to_string()
    if isinstance(obj, pd.Series):
        return obj.round(4).to_string()
    return str(obj)


def show(*objs) -> None:
    """Show each object: in a notebook with its rich display (tables, Stylers, the attention view,
    the model's and cache's HTML), in a terminal as text. Lets one walkthrough be both a notebook
    and a script. Strings are printed as they are."""
    notebook = in_notebook()
    for obj in objs:
        if notebook and not isinstance(obj, str):
            from IPython.display import display

            display(obj)
        else:
            print(as_text(obj))
