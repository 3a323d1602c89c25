"""Static, offline HTML dashboards of a harvest: ``index.html`` and one ``feature-N.html`` per feature.

The index lists every harvested feature (density, firing count, mean when firing, max), sortable by
clicking a column and searchable by feature id (``index.html?sort=max&q=12`` opens it sorted and
filtered). A feature's page shows its statistics, its histogram (firing values, quarter-octave bins,
as an inline SVG), its direct effect on the logits (top promoted / suppressed tokens), its top
contexts and a sample of contexts from each activation band, with the quantiles of the firing
distribution each band covers. In a context the activating token is outlined and every token is
shaded by the feature's activation on it (the diverging map of ``npgpt2.style``: blue positive, on
the scale of the feature's max), and the contexts are aligned on the activating token, as in
SAE-Vis and Neuronpedia: those neighbouring activations are computed again here with the harvest's
model (the harvest keeps one value per example). Every activation on a page is written with the
same number of decimals.

Everything (CSS, JS, SVG) is inside the pages: they open from disk with no network.
"""

from __future__ import annotations

import html
import os

import numpy as np
import pandas as pd

from .. import style
from .run import Harvest, HarvestError, Harvester, _load_model, _load_sae
from .stats import N_BANDS, band_range

MAX_PAGES = 200  # feature pages made when no feature list is given


def parse_features(text: str) -> list[int]:
    """"0-99,4031" -> [0, 1, ..., 99, 4031]."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise HarvestError(f"features {text!r}: expected ids and ranges like 0-99,4031") from None
        if a < 0 or b < a:
            raise HarvestError(f"features {text!r}: {part!r} is not an id or a range lo-hi with 0 <= lo <= hi")
        out.extend(range(a, b + 1))
    if not out:
        raise HarvestError(f"features {text!r}: no feature ids in it")
    return sorted(set(out))


def direct_logit_effect(model, hook: str, feature: int) -> np.ndarray | None:
    """A neuron's (or coordinate's) direct effect on the logits [d_vocab], or None where it writes
    nowhere directly. MLP neuron (``mlp.hook_post`` / ``hook_pre``): W_out[neuron] (x the final layer
    norm's gain) @ W_U; a residual-stream coordinate (``hook_resid_*``, ``hook_*_out``): the unit
    vector's; ``attn.hook_z`` (head, d_head): W_O[head][d] @ W_U. (For SAE latents see
    ``npgpt2.sae.latent_logit_effect``.) The final layer norm's scale is ignored, as there."""
    parts = hook.split(".")
    layer = int(parts[1]) if parts[0] == "blocks" else None
    if hook.endswith(("mlp.hook_post", "mlp.hook_pre")):
        direction = model.weights.blocks[layer].W_out[feature]
    elif hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")):
        direction = np.zeros(model.cfg.d_model, dtype=model.dtype)
        direction[feature] = 1
    elif hook.endswith("attn.hook_z"):
        direction = model.weights.blocks[layer].W_O[feature]  # rows are (head, d_head)
    else:
        return None
    if model.weights.ln_final_w is not None:
        direction = direction * model.weights.ln_final_w
    return np.asarray(direction @ model.W_U, dtype=np.float64)


def logit_effect_table(model, hook: str, feature: int, sae=None, k: int = 10) -> pd.DataFrame | None:
    """direction ("promoted" / "suppressed"), rank, token, logit_effect: ``latent_logit_effect`` for
    an SAE latent, ``direct_logit_effect``'s top and bottom k for a neuron (None where it has none)."""
    if sae is not None:
        from ..sae import latent_logit_effect

        return latent_logit_effect(model, sae, feature, k)
    effect = direct_logit_effect(model, hook, feature)
    if effect is None:
        return None
    order = np.argsort(-effect)
    rows = [{"direction": d, "rank": r, "token": model.tokenizer.token_str(int(t)), "logit_effect": float(effect[t])}
            for d, ids in (("promoted", order[:k]), ("suppressed", order[::-1][:k])) for r, t in enumerate(ids)]
    return pd.DataFrame(rows)


def build_dashboard(source, out: str, features=None, model=None, sae=None, context_before: int = 12,
                    context_after: int = 4, n_logits: int = 10, max_pages: int = MAX_PAGES,
                    progress: bool = True) -> pd.DataFrame:
    """Write the dashboard of a harvest (a ``Harvest`` or its folder) into ``out``.

    features: ids, or a string like "0-99,4031" (default: the first ``max_pages`` features that fired).
    model, sae: the harvest's own, loaded from its manifest when not given.
    -> a table of the pages written: feature, page, n_top, n_examples, max_recomputed_error.
    """
    h = source if isinstance(source, Harvest) else Harvest.load(source)
    man = h.manifest
    harvested = h.features["feature"].to_numpy()
    if features is None:
        fired = h.features[h.features["fire_count"] > 0]["feature"].to_numpy()
        page_ids = [int(f) for f in fired[:max_pages]]
    else:
        page_ids = parse_features(features) if isinstance(features, str) else sorted({int(f) for f in features})
        missing = sorted(set(page_ids) - set(harvested.tolist()))
        if missing:
            raise HarvestError(f"feature {missing[0]} is not in the harvest (it has {len(harvested)} features, "
                               f"ids {int(harvested.min())}..{int(harvested.max())})")
    spec = man["spec"]
    if model is None:
        model = _load_model(spec["model"], spec["revision"], spec["dtype"], tuple(sorted(spec["processing"].items())))
    if man["feature_kind"] == "latent" and sae is None:
        if not spec["sae"]:
            raise HarvestError("this harvest read an SAE given as an object: pass it with sae=")
        sae, _ = _load_sae(tuple(spec["sae"]))
    os.makedirs(out, exist_ok=True)

    values = _recompute(h, model, sae, page_ids, man) if page_ids else {}
    by_feature = {name: dict(tuple(getattr(h, name).groupby("feature"))) for name in ("top", "examples", "histogram")}
    stats = h.features.set_index("feature")
    rows = []
    from tqdm.auto import tqdm

    for fid in tqdm(page_ids, disable=not progress, desc="dashboard"):
        top = by_feature["top"].get(fid, h.top.iloc[:0])
        examples = by_feature["examples"].get(fid, h.examples.iloc[:0])
        hist = by_feature["histogram"].get(fid, h.histogram.iloc[:0])
        effect = logit_effect_table(model, man["hook"], fid, sae, n_logits)
        page, err = _feature_page(h, model, fid, stats.loc[fid], top, examples, hist, effect, values.get(fid, {}),
                                  context_before, context_after)
        with open(os.path.join(out, f"feature-{fid}.html"), "w", encoding="utf-8") as f:
            f.write(page)
        rows.append({"feature": fid, "page": f"feature-{fid}.html", "n_top": len(top), "n_examples": len(examples),
                     "max_recomputed_error": err})
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write(_index_page(h, set(page_ids)))
    return pd.DataFrame(rows, columns=["feature", "page", "n_top", "n_examples", "max_recomputed_error"])


def _recompute(h: Harvest, model, sae, page_ids, man, batch: int = 8) -> dict:
    """{feature: {context: [ctx] activations}} for every context a page quotes."""
    quoted = pd.concat([h.top[h.top["feature"].isin(page_ids)], h.examples[h.examples["feature"].isin(page_ids)]])
    wanted = quoted.groupby("context")["feature"].apply(lambda s: sorted(set(s))).to_dict()
    harvester = Harvester(model, man["hook"], sae, page_ids, include_bos=True)
    column = {f: i for i, f in enumerate(page_ids)}
    out: dict = {f: {} for f in page_ids}
    contexts = sorted(wanted)
    for start in range(0, len(contexts), batch):
        ids = contexts[start : start + batch]
        acts = harvester(np.stack([h.context_tokens(c) for c in ids]))  # [batch, ctx, F_pages]
        for c, a in zip(ids, acts):
            for f in wanted[c]:
                out[f][c] = a[:, column[f]]
    return out


# ---------------------------------------------------------------------------------- pages
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{cursor:pointer;background:#f4f4f4;user-select:none} td.l,th.l{text-align:left}
table.contexts td{border:none;padding:1px 0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;
  white-space:pre;line-height:1.7}
table.contexts td.left{text-align:right} table.contexts td.right{text-align:left}
table.contexts td.at{text-align:center;padding:1px 1px}
table.contexts td.val{color:#555;padding-right:14px;font-family:system-ui,sans-serif;font-size:12px}
table.contexts td.where{color:#777;font-size:11px;padding-left:14px;font-family:system-ui,sans-serif}
.tok{border-radius:2px;padding:1px 0} .hot{outline:2px solid #222;font-weight:bold}
.muted{color:#777;font-size:12px}
.grid{display:flex;gap:40px;flex-wrap:wrap} input{font-size:14px;padding:4px 8px;margin:8px 0}
a{color:#1756a9}
"""


def _decimals(vmax: float) -> int:
    """Decimals that give a page's largest activation three significant digits (0 to 4)."""
    if not vmax > 0 or not np.isfinite(vmax):
        return 3
    return int(np.clip(2 - np.floor(np.log10(vmax)), 0, 4))


def _shade(v: float, vmax: float) -> str:
    """A token's background: its activation on the diverging map, scaled to the feature's max."""
    if not np.isfinite(v) or v == 0:
        return "background:transparent"
    colour = style.diverging_rgb(v, vmax)
    return f"background:{colour};color:{style.text_colour_on(colour)}"


def _tok_text(model, t: int) -> str:
    return html.escape(style.token_label(model.tokenizer.token_str(int(t))))


def _context_cells(model, tokens, acts, position, vmax, before, after, fmt) -> str:
    """Three cells: the tokens before the activating one (right-aligned), it, and those after, so
    that a table of contexts lines up on the activating token."""
    lo, hi = max(0, position - before), min(len(tokens), position + after + 1)
    spans = []
    for p in range(lo, hi):
        v = float(acts[p]) if acts is not None else np.nan
        cls = "tok hot" if p == position else "tok"
        title = html.escape(f"{model.tokenizer.token_str(int(tokens[p]))!r} pos {p}: {fmt(v)}")
        spans.append(f'<span class="{cls}" style="{_shade(v, vmax)}" title="{title}">{_tok_text(model, tokens[p])}</span>')
    at = position - lo
    return (f'<td class="left">{"".join(spans[:at])}</td><td class="at">{spans[at]}</td>'
            f'<td class="right">{"".join(spans[at + 1:])}</td>')


def _histogram_svg(hist: pd.DataFrame, threshold: float, fmt) -> str:
    """The firing activations' histogram: bars on a log-scaled activation axis (quarter-octave bins,
    a labelled tick every octave) against a count axis with ticks."""
    firing = hist[hist["lo"] >= 0].sort_values("bin")
    if firing.empty:
        return '<p class="muted">no positive activations</p>'
    W, H, left, right, top_pad, bottom = 640, 210, 56, 16, 14, 46
    counts = firing["count"].to_numpy()
    n = len(counts)
    bw = (W - left - right) / n
    top = counts.max()
    plot_h = H - top_pad - bottom
    parts = [f'<line x1="{left}" y1="{H - bottom}" x2="{W - right}" y2="{H - bottom}" stroke="#555"/>',
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{H - bottom}" stroke="#555"/>']
    for i, (c, lo, hi) in enumerate(zip(counts, firing["lo"], firing["hi"])):
        bh = plot_h * c / top
        parts.append(f'<rect class="bar" x="{left + i * bw:.1f}" y="{H - bottom - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{bh:.1f}" fill="{style.POSITIVE}"><title>[{fmt(lo)}, {fmt(hi)}): {int(c):,} tokens</title></rect>')
    step = max(1, int(np.ceil(n / 8)))  # at most ~8 labelled ticks on the activation axis
    for i in list(range(0, n, step)) + [n]:
        x = left + i * bw
        value = firing["lo"].iloc[i] if i < n else firing["hi"].iloc[-1]
        parts.append(f'<line x1="{x:.1f}" y1="{H - bottom}" x2="{x:.1f}" y2="{H - bottom + 4}" stroke="#555"/>'
                     f'<text class="xtick" x="{x:.1f}" y="{H - bottom + 16}" font-size="11" text-anchor="middle">'
                     f"{fmt(value)}</text>")
    for frac in (0, 0.5, 1):
        y = H - bottom - plot_h * frac
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#555"/>'
                     f'<text class="ytick" x="{left - 7}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                     f"{int(round(top * frac)):,}</text>")
    parts.append(f'<text x="{(left + W - right) / 2:.0f}" y="{H - 8}" font-size="12" text-anchor="middle">'
                 "activation (log scale, quarter-octave bins)</text>"
                 f'<text x="14" y="{top_pad + plot_h / 2:.0f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top_pad + plot_h / 2:.0f})">tokens</text>')
    return f'<svg id="histogram" width="{W}" height="{H}">{"".join(parts)}</svg>'


def _band_quantiles(hist: pd.DataFrame, threshold: float) -> dict:
    """Octave band -> (fraction of firing tokens in it, quantile where it starts, where it ends)."""
    firing = hist[hist["lo"] >= 0]
    lows = np.array([band_range(b)[0] for b in range(N_BANDS)])
    band_of = np.clip(np.searchsorted(lows, firing["lo"].to_numpy() * (1 + 1e-9), side="right") - 1, 0, N_BANDS - 1)
    per_band = np.bincount(band_of, weights=firing["count"].to_numpy(), minlength=N_BANDS)
    total = per_band.sum()
    if total == 0:
        return {}
    cum = np.concatenate([[0], np.cumsum(per_band)]) / total
    return {b: (per_band[b] / total, cum[b], cum[b + 1]) for b in range(N_BANDS)}


def _feature_page(h, model, fid, st, top, examples, hist, effect, acts, before, after):
    man = h.manifest
    vmax = float(st["max"])
    decimals = _decimals(vmax)

    def fmt(v):
        return "-" if v != v else f"{v:.{decimals}f}"

    worst = 0.0

    def ctx_row(row, cls):
        nonlocal worst
        c, p, v = int(row["context"]), int(row["position"]), float(row["value"])
        a = acts.get(c)
        if a is not None:
            worst = max(worst, abs(float(a[p]) - v))
        return (f'<tr class="{cls}" data-context="{c}" data-position="{p}"><td class="val">{fmt(v)}</td>'
                f"{_context_cells(model, h.context_tokens(c), a, p, vmax, before, after, fmt)}"
                f'<td class="where">ctx {c} pos {p}</td></tr>')

    kind = "latent" if man["feature_kind"] == "latent" else "neuron"
    parts = [f"<h1>{html.escape(man['hook'])} {kind} {fid}</h1>",
             f'<p><a href="index.html">all features</a> · model {html.escape(str(man["model_name"]))} · '
             f'{man["tokens_seen"]:,} tokens (ctx {man["ctx"]})</p>',
             '<table id="stats">' + "".join(
                 f'<tr><td class="l">{k}</td><td>{v}</td></tr>' for k, v in [
                     ("density", f"{st['density']:.4%}"), ("firing tokens", f"{int(st['fire_count']):,}"),
                     ("mean when firing", fmt(st['mean_firing'])), ("mean", fmt(st['mean'])),
                     ("max", fmt(st['max'])), ("min", fmt(st['min']))]) + "</table>",
             "<h2>Histogram of firing activations</h2>", _histogram_svg(hist, man["threshold"], fmt)]
    if effect is not None:
        cells = []
        for title, rows in effect.groupby("direction", sort=False):
            body = "".join(f'<tr class="logit-{title}"><td class="l">{html.escape(repr(r.token))}</td>'
                           f"<td>{r.logit_effect:+.3f}</td></tr>" for r in rows.sort_values("rank").itertuples())
            cells.append(f'<div><b>{title}</b><table>{body}</table></div>')
        parts += ["<h2>Direct logit effect</h2>", f'<div class="grid">{"".join(cells)}</div>']
    parts.append(f"<h2>Top {len(top)} activations</h2>")
    rows = [ctx_row(r, "top-row") for _, r in top.sort_values("rank").iterrows()]
    parts.append(f'<table class="contexts">{"".join(rows)}</table>' if rows else '<p class="muted">never fired</p>')
    quantiles = _band_quantiles(hist, man["threshold"])
    if len(examples):
        parts.append("<h2>Activation bands</h2><p class=\"muted\">Each band is an octave of activation values; the "
                     "examples are a uniform sample of the band's tokens (the same on every run).</p>")
        for band, group in sorted(examples.groupby("band"), key=lambda kv: -kv[0]):
            lo, hi = band_range(int(band))
            share, q0, q1 = quantiles.get(int(band), (np.nan, np.nan, np.nan))
            parts.append(f'<h3 class="band">[{fmt(lo)}, {fmt(hi)}): {share:.1%} of firing tokens, '
                         f'quantiles {q0:.2f}–{q1:.2f}</h3>')
            rows = [ctx_row(r, "band-row") for _, r in group.sort_values("rank").iterrows()]
            parts.append(f'<table class="contexts">{"".join(rows)}</table>')
    page = _page(f"{man['hook']} {kind} {fid}", "".join(parts), "")
    return page, worst


def _index_page(h: Harvest, with_pages: set) -> str:
    man = h.manifest
    rows = []
    d = _decimals(float(h.features["max"].max()) if len(h.features) else 1.0)  # one precision for the table
    for r in h.features.itertuples(index=False):
        fid = int(r.feature)
        name = f'<a href="feature-{fid}.html">{fid}</a>' if fid in with_pages else str(fid)
        rows.append(f'<tr class="feature-row" data-feature="{fid}" data-density="{r.density:.9g}" '
                    f'data-fire="{int(r.fire_count)}" data-mean="{0 if np.isnan(r.mean_firing) else r.mean_firing:.9g}" '
                    f'data-max="{r.max:.9g}"><td class="l">{name}</td><td>{r.density:.4%}</td><td>{int(r.fire_count):,}</td>'
                    f'<td>{"" if np.isnan(r.mean_firing) else f"{r.mean_firing:.{d}f}"}</td><td>{r.max:.{d}f}</td></tr>')
    info = (f"{html.escape(str(man['model_name']))} · {html.escape(man['hook'])}"
            + (f" · SAE {html.escape(str(man['sae']['release']))}" if man.get("sae") else "")
            + f" · {man['n_features']} {man['feature_kind']}s · {man['tokens_seen']:,} tokens · "
            f"corpus {html.escape(man['corpus']['description'])}")
    body = (f"<h1>Features of {html.escape(man['hook'])}</h1><p>{info}</p>"
            '<input id="search" type="search" placeholder="feature id, e.g. 12 or 3-9" autocomplete="off"> '
            '<span id="shown" class="muted"></span>'
            '<table id="features"><thead><tr><th class="l" data-key="feature">feature</th>'
            '<th data-key="density">density</th><th data-key="fire">firing tokens</th>'
            '<th data-key="mean">mean when firing</th><th data-key="max">max</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')
    return _page(f"Features of {man['hook']}", body, _INDEX_JS)


_INDEX_JS = """
const tbody = document.querySelector('#features tbody');
const rows = Array.from(tbody.rows);
let sortKey = null, descending = true;
function sortBy(key, desc) {
  sortKey = key; descending = desc;
  const sorted = rows.slice().sort((a, b) => {
    const x = parseFloat(a.dataset[key]), y = parseFloat(b.dataset[key]);
    if (x !== y) return desc ? y - x : x - y;
    return parseInt(a.dataset.feature) - parseInt(b.dataset.feature);
  });
  sorted.forEach(r => tbody.appendChild(r));
}
function matches(row, q) {
  if (!q) return true;
  const f = parseInt(row.dataset.feature);
  const m = q.match(/^(\\d+)\\s*-\\s*(\\d+)$/);
  if (m) return f >= parseInt(m[1]) && f <= parseInt(m[2]);
  return row.dataset.feature.startsWith(q.trim());
}
function filter(q) {
  let n = 0;
  rows.forEach(r => { const ok = matches(r, q); r.style.display = ok ? '' : 'none'; if (ok) n++; });
  document.getElementById('shown').textContent = n + ' of ' + rows.length + ' features';
}
document.querySelectorAll('#features th').forEach(th => th.addEventListener('click', () => {
  const key = th.dataset.key;
  sortBy(key, key === sortKey ? !descending : key !== 'feature');
}));
const search = document.getElementById('search');
search.addEventListener('input', () => filter(search.value));
const params = new URLSearchParams(location.search);
if (params.get('sort')) sortBy(params.get('sort'), params.get('order') !== 'asc');
if (params.get('q')) { search.value = params.get('q'); }
filter(search.value);
"""


def _page(title: str, body: str, script: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}" + (f"<script>{script}</script>" if script else "")
            + "</body></html>\n")

