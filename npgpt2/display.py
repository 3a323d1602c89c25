"""How npgpt2's objects show themselves in Jupyter: ``_repr_html_`` tables, and the attention view.

Jupyter calls an object's ``_repr_html_()`` when it is the last expression of a cell; the model,
``ActivationCache``, ``FactoredMatrix``, ``SAE`` and ``Harvest`` return the HTML made here. Their plain
``repr`` stays one line. Everything is self-contained: no scripts, styles or fonts from a network,
so a notebook saved with its outputs shows the same offline.

``AttentionView`` (made by ``npgpt2.plot.attention_view`` and ``attention_html``) is the interactive
one: the prompt once, head thumbnails to pick from, the picked head's pattern large with the tokens
on both axes; hovering reads a cell. It renders inline (``_repr_html_``) and saves to a standalone
page (``save(path)``). Colours and token labels come from ``npgpt2.style``.
"""

from __future__ import annotations

import html
import json
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
.npgpt2-attn { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; font-size: 13px; color: #222; }
.npgpt2-attn .title { font-size: 15px; font-weight: 600; margin: 0.2em 0; }
.npgpt2-attn .summary { margin: 0.2em 0 0.5em; color: #444; }
.npgpt2-attn .prompt { margin: 0.3em 0 0.8em; line-height: 2.1; }
.npgpt2-attn .tok, .npgpt2-attn th { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre; }
.npgpt2-attn .tok { display: inline-block; padding: 0 3px; margin: 1px; border: 1px solid #ccc; border-radius: 3px; cursor: pointer; }
.npgpt2-attn .tok.dest { outline: 2px solid #222; }
.npgpt2-attn .tok.src { outline: 2px dashed #222; }
.npgpt2-attn .layout { display: flex; gap: 20px; align-items: flex-start; flex-wrap: wrap; }
.npgpt2-attn .thumbs { display: flex; flex-wrap: wrap; gap: 6px; max-width: 460px; align-content: flex-start; }
.npgpt2-attn button.head { display: flex; flex-direction: column; align-items: center; gap: 2px; padding: 3px;
  border: 2px solid transparent; border-radius: 4px; background: none; cursor: pointer; font: inherit; color: inherit; }
.npgpt2-attn button.head:hover { border-color: #9ecae1; }
.npgpt2-attn button.head.selected { border-color: #08519c; background: #eef4fb; }
.npgpt2-attn button.head .name { font-size: 12px; font-weight: 600; }
.npgpt2-attn .selected-name { font-size: 14px; font-weight: 600; margin: 0 0 4px; }
.npgpt2-attn table.pattern { border-collapse: collapse; }
.npgpt2-attn table.pattern td { padding: 0; border: 1px solid #fff; }
.npgpt2-attn table.pattern th { font-weight: normal; font-size: 12px; padding: 0 5px; text-align: right; }
.npgpt2-attn table.pattern th.key { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; padding: 5px 0; }
.npgpt2-attn table.pattern th.on { background: #fde9a6; }
.npgpt2-attn .axis { color: #555; font-size: 12px; margin: 2px 0; }
.npgpt2-attn .info { min-height: 1.5em; margin: 0.5em 0; }
.npgpt2-attn .info b { font-family: ui-monospace, Menlo, monospace; white-space: pre; font-weight: 600; }
.npgpt2-attn .legend { color: #555; font-size: 12px; display: flex; align-items: center; gap: 6px; margin-top: 4px; }
.npgpt2-attn .legend .bar { display: inline-block; width: 140px; height: 10px; border: 1px solid #ccc; }
"""

# Runs once per view, on the element whose id it is given; colours from npgpt2.style (seq: 0..1).
_VIEW_JS = """
(function () {
  const root = document.getElementById(ROOT_ID);
  const D = JSON.parse(document.getElementById(ROOT_ID + "-data").textContent);
  const n = D.labels.length, P = D.patterns;
  const info = root.querySelector(".info"), prompt = root.querySelector(".tokens");
  const thumbs = root.querySelector(".thumbs"), table = root.querySelector("table.pattern");
  const nameEl = root.querySelector(".selected-name");
  let selected = 0, dest = n - 1;
  const ink = w => (w > 0.55 ? "white" : "");
  function describe(i) { return `position ${i}: ${JSON.stringify(D.tokens[i])}`; }
  // the prompt, once: hover a token to make it the destination
  const promptToks = [];
  for (let i = 0; i < n; i++) {
    const s = document.createElement("span"); s.className = "tok"; s.textContent = D.labels[i];
    s.title = describe(i); s.dataset.pos = i;
    s.onmouseover = () => { dest = i; shadePrompt(); read(i, null); };
    prompt.appendChild(s); promptToks.push(s);
  }
  // one thumbnail per head: a button titled with the head's name
  const px = Math.max(1, Math.floor(84 / n)), buttons = [];
  D.heads.forEach((label, h) => {
    const b = document.createElement("button"); b.type = "button"; b.className = "head";
    b.dataset.head = label; b.title = label;
    const t = document.createElement("span"); t.className = "name"; t.textContent = label; b.appendChild(t);
    const c = document.createElement("canvas"); c.width = c.height = px * n;
    const g = c.getContext("2d");
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      g.fillStyle = j > i ? D.masked : seq(P[h][i][j]); g.fillRect(j * px, i * px, px, px);
    }
    b.appendChild(c); b.onclick = () => select(h); thumbs.appendChild(b); buttons.push(b);
  });
  // the large pattern: destinations (queries) down, sources (keys) across
  const cell = n > 48 ? 12 : n > 24 ? 18 : 24, keyHeads = [], queryHeads = [], cells = [];
  const head = table.insertRow(); head.appendChild(document.createElement("th"));
  for (let j = 0; j < n; j++) {
    const th = document.createElement("th"); th.className = "key"; th.textContent = D.labels[j];
    th.title = describe(j); head.appendChild(th); keyHeads.push(th);
  }
  for (let i = 0; i < n; i++) {
    const r = table.insertRow(); const th = document.createElement("th"); th.className = "query";
    th.textContent = D.labels[i]; th.title = describe(i); r.appendChild(th); queryHeads.push(th);
    const row = [];
    for (let j = 0; j < n; j++) {
      const c = r.insertCell(); c.style.width = c.style.height = cell + "px";
      c.onmouseover = () => { dest = i; shadePrompt(); read(i, j); }; row.push(c);
    }
    cells.push(row);
  }
  function read(i, j) {
    keyHeads.forEach((th, k) => th.classList.toggle("on", k === j));
    queryHeads.forEach((th, k) => th.classList.toggle("on", k === i));
    promptToks.forEach((s, k) => s.classList.toggle("src", k === j));
    info.textContent = "";
    const part = (text, bold) => { const e = document.createElement(bold ? "b" : "span"); e.textContent = text; info.appendChild(e); };
    part(D.heads[selected] + ": destination " + i + " ");
    part(D.labels[i], true);
    if (j === null) { part(" (the prompt is shaded by its attention to each source)"); return; }
    part(" \\u2190 source " + j + " "); part(D.labels[j], true);
    part(j > i ? ": cannot attend to a later position" : ": attention weight " + P[selected][i][j].toFixed(4));
  }
  function shadePrompt() {
    promptToks.forEach((s, j) => {
      const w = j <= dest ? P[selected][dest][j] : null;
      s.style.background = w === null ? "transparent" : seq(w); s.style.color = w === null ? "" : ink(w);
      s.classList.toggle("dest", j === dest);
    });
  }
  function select(h) {
    selected = h;
    buttons.forEach((b, k) => { b.classList.toggle("selected", k === h); b.setAttribute("aria-pressed", String(k === h)); });
    nameEl.textContent = D.heads[h];
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      const c = cells[i][j], w = P[h][i][j];
      c.style.background = j > i ? D.masked : seq(w);
      c.title = j > i ? `${D.heads[h]}: ${i} cannot attend to ${j}` : `${D.heads[h]}: ${i} \\u2190 ${j}: ${w.toFixed(4)}`;
    }
    shadePrompt();
  }
  select(0);
})();
"""


def _script_json(obj) -> str:
    """JSON to put inside a ``<script>`` element. Script content is raw text: the browser never
    unescapes entities in it, so the JSON is not HTML-escaped (``&lt;`` would stay ``&lt;``). Only
    what could end the element or change how it is parsed is escaped, in JSON's own syntax, which
    ``JSON.parse`` reads back unchanged: ``</`` (as in ``</script>``) becomes ``<\\/`` and ``<!--``
    becomes ``\\u003c!--``."""
    return json.dumps(obj, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "\\u003c!--")


class AttentionView:
    """Attention patterns to look at in a notebook or a browser, in the spirit of CircuitsVis: the
    prompt once, a grid of head thumbnails to pick from (the picked one marked), and the picked
    head's pattern large, with the tokens on both axes (destinations down, sources across).
    Hovering a cell reads its destination, source and weight; hovering a prompt token shades the
    prompt by where it attends. Colours: the 0..1 map of ``npgpt2.style``. Made by
    ``npgpt2.plot.attention_view`` and ``npgpt2.plot.attention_html``.

    patterns: [head, query_pos, key_pos] (one prompt); head_labels: one per head ("L1H3");
    str_tokens: one string per position (shown with visible whitespace, ``style.token_label``).
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

    def _fragment(self, root: str | None = None) -> str:
        """The view as an HTML fragment; ``root``, its element id (default: a fresh one, so that
        views shown in one notebook never share an id)."""
        from . import style
        root = root or "npgpt2-attn-" + uuid.uuid4().hex[:12]
        data = _script_json({"tokens": self.str_tokens, "labels": [style.token_label(t) for t in self.str_tokens],
                             "heads": self.head_labels, "masked": style.MASKED,
                             "patterns": np.round(self.patterns, 4).tolist()})
        title = f'<div class="title">{html.escape(self.title)}</div>' if self.title else ""
        n_head, n = len(self.head_labels), len(self.str_tokens)
        gradient = ", ".join(style.SEQUENTIAL_STOPS)
        return (f'<div class="npgpt2-attn" id="{root}"><style>{_VIEW_CSS}</style>{title}'
                f'<p class="summary">{n_head} head{"s" if n_head != 1 else ""}, {n} tokens. Pick a head; hover a '
                f"cell to read it, or a token of the prompt to see where it attends.</p>"
                f'<div class="prompt">Prompt: <span class="tokens"></span></div>'
                f'<div class="layout"><div class="thumbs"></div><div class="main"><div class="selected-name"></div>'
                f'<div class="axis">rows: destination (query) \u00b7 columns: source (key)</div>'
                f'<table class="pattern"></table>'
                f'<div class="legend">0 <span class="bar" style="background: linear-gradient(to right, {gradient})">'
                f"</span> 1 attention weight</div></div></div>"
                f'<div class="info"></div></div>'
                f'<script type="application/json" id="{root}-data">{data}</script>'
                f"<script>(function () {{\n{style.JS_COLOURS}{_VIEW_JS.replace('ROOT_ID', repr(root))}}})();</script>")

    def _repr_html_(self) -> str:
        return self._fragment()

    def to_html(self) -> str:
        """A standalone HTML page (no network needed to open it); the same page for the same view."""
        title = html.escape(self.title or "Attention patterns")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
                f'<body style="margin: 20px">{self._fragment("npgpt2-attn")}</body></html>\n')

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
