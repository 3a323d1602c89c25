// npgpt2 inspect: the page. Plain JavaScript module, no build step, no network but this server.
// Colours come from colours.js, which the server makes from npgpt2.style (one colour language:
// probabilities on the 0..1 Blues map, signed values on RdBu, positive blue, negative red).
import { seq, div } from "/static/colours.js";

const $ = id => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token") || "";
const state = { info: null, request: null, analysis: null, interventions: [], components: null,
                sort: { key: "total", desc: true }, head: null, circuit: null, job: null };
const DIGITS = 4;  // every metric on the page is printed with this many decimals
const fmt = v => (v === null || v === undefined) ? "" : Number(v).toFixed(DIGITS);
const label = t => t.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(e.style, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
const textOn = rgb => { const [r, g, b] = rgb.slice(4, -1).split(",").map(Number);
                        return 0.299 * r + 0.587 * g + 0.114 * b < 140 ? "white" : "black"; };
const shade = (e, rgb) => { e.style.background = rgb; e.style.color = textOn(rgb); return e; };

// ------------------------------------------------------------------------------ the API
async function api(path, body, method) {
  const opts = { method: method || (body === undefined ? "GET" : "POST"),
                 headers: { "Authorization": "token " + token } };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}
function showError(e) { const box = $("error"); box.textContent = e ? String(e.message || e) : ""; box.hidden = !e; }
async function guarded(fn) {
  try { showError(null); document.body.classList.add("busy"); await fn(); }
  catch (e) { showError(e); }
  finally { document.body.classList.remove("busy"); }
}
function readRequest() {
  return { prompt: $("prompt").value, target: $("target").value, distractor: $("distractor").value,
           corrupted: $("corrupted").value, prepend_bos: $("prepend-bos").checked };
}

// ------------------------------------------------------------------------------ tabs
function showView(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === name);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === "view-" + name);
  state.view = name;
  if (state.request) guarded(() => refresh(name));
}
async function refresh(name) {
  if (name === "layers") await loadLayer();
  if (name === "attention") await loadAttention();
  if (name === "components" && !state.components) await loadComponents();
  if (name === "interventions") await runInterventions();
}

// ------------------------------------------------------------------------------ prompt
async function analyse() {
  const request = readRequest();
  const analysis = await api("/api/analyse", request);
  state.request = request; state.analysis = analysis; state.components = null; state.circuit = null;
  renderPrompt(analysis);
  $("circuit-graph").replaceChildren(); $("circuit-edges").replaceChildren(); $("circuit-state").textContent = "";
  await refresh(state.view || "prompt");
}
function nextTokenTable(table, rows) {
  const before = rows.length && rows[0].prob_before !== undefined;
  table.replaceChildren(el("tr", {}, el("th", { text: "token" }), el("th", { text: "probability" }),
    ...(before ? [el("th", { text: "without them" })] : []), el("th", { text: "logit" })));
  for (const r of rows) {
    table.append(el("tr", {}, el("td", { class: "tok", text: label(r.token) }),
                    shade(el("td", { class: "num", text: r.prob.toFixed(DIGITS) }), seq(r.prob)),
                    ...(before ? [shade(el("td", { class: "num", text: r.prob_before.toFixed(DIGITS) }), seq(r.prob_before))] : []),
                    el("td", { class: "num", text: r.logit.toFixed(2) })));
  }
}
function renderPrompt(a) {
  const line = [`metric ${a.metric_name} = `, el("b", { id: "metric-value", text: fmt(a.metric) })];
  if (a.corrupted_metric !== null) line.push(`; on the corrupted prompt ${fmt(a.corrupted_metric)}`);
  $("metric-line").replaceChildren(...line);
  const box = $("tokens");
  box.replaceChildren(...a.tokens.map((t, i) => {
    const loss = a.loss[i];
    const chip = el("span", { class: "token", title: loss === null ? `${i}: no prediction (first token)` :
                              `${i}: loss ${loss.toFixed(DIGITS)} nats, P = ${Math.exp(-loss).toFixed(DIGITS)}`,
                              text: label(t) });
    return loss === null ? chip : shade(chip, seq(Math.exp(-loss)));
  }));
  $("corrupted-tokens").replaceChildren(...(a.corrupted_tokens ? [el("span", { class: "hint", text: "corrupted: " }),
    ...a.corrupted_tokens.map(t => el("span", { class: "token plain", text: label(t) }))] : []));
  nextTokenTable($("next-tokens"), a.next_tokens);
  $("depth").max = state.info.n_layer;
}

// ------------------------------------------------------------------------------ layers
async function loadLayer() {
  const depth = Number($("depth").value);
  const d = await api("/api/layer", { ...state.request, depth });
  $("depth-label").textContent = `depth ${d.depth} of ${d.n_layer}: ${d.label}`;
  const tokens = state.analysis.tokens, lens = $("lens");
  const head = el("tr", {}, el("th", { text: "" }), ...tokens.map((t, i) => el("th", { class: "tok", text: `${i} ${label(t)}` })));
  const rows = [head];
  for (let k = 0; k < d.positions[0].top.length; k++) {
    rows.push(el("tr", {}, el("th", { text: `top ${k + 1}` }), ...d.positions.map(p =>
      shade(el("td", { class: "tok", title: `P = ${p.top[k].prob.toFixed(DIGITS)}`, text: label(p.top[k].token) }), seq(p.top[k].prob)))));
  }
  rows.push(el("tr", {}, el("th", { text: "P(next)" }), ...d.positions.map(p =>
    p.next_prob === undefined ? el("td", { text: "" }) : shade(el("td", { class: "num", text: p.next_prob.toFixed(3) }), seq(p.next_prob)))));
  rows.push(el("tr", {}, el("th", { text: "\u2016x\u2016" }), ...d.positions.map(p => el("td", { class: "num", text: p.norm.toFixed(1) }))));
  lens.replaceChildren(...rows);
  const hooks = $("hooks");
  hooks.replaceChildren(el("tr", {}, ...["hook point", "shape", "mean", "std", "min", "max"].map(h => el("th", { text: h }))));
  for (const h of d.hooks) {
    const doc = el("tr", { class: "doc", hidden: "" }, el("td", { colspan: 6, text: h.doc }));
    hooks.append(el("tr", { class: "clickable", onclick: () => { doc.hidden = !doc.hidden; } },
      el("td", { class: "mono", text: h.name }), el("td", { class: "mono", text: `[${h.shape.join(", ")}]` }),
      ...["mean", "std", "min", "max"].map(k => el("td", { class: "num", text: h[k].toFixed(4).replace(/^-(0\.0+)$/, "$1") }))), doc);
  }
}

// ------------------------------------------------------------------------------ attention
async function loadAttention(head) {
  const layer = Number($("attn-layer").value);
  if (head === undefined) head = state.head !== null && state.head < state.info.n_head ? state.head : 0;
  const d = await api("/api/attention", { ...state.request, layer, head });
  state.attention = d; state.head = d.head;
  const grid = $("head-grid");
  grid.replaceChildren(...d.thumbs.map((p, h) => {
    const canvas = el("canvas", { width: 72, height: 72, class: "thumb", title: `L${layer}H${h}` });
    drawPattern(canvas, p);
    return el("button", { type: "button", class: "head" + (d.head === h ? " chosen" : ""), "data-head": h,
                          onclick: () => guarded(() => loadAttention(h)) }, canvas, el("span", { text: `L${layer}H${h}` }));
  }));
  showPattern();
}
function drawPattern(canvas, p) {
  const ctx = canvas.getContext("2d"), n = p.length, s = canvas.width / n;
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
    ctx.fillStyle = k > q ? "#ececec" : seq(p[q][k]);
    ctx.fillRect(k * s, q * s, Math.ceil(s), Math.ceil(s));
  }
}
const GRID_LIMIT = 48;  // longer prompts: the large pattern is drawn on a canvas, without token labels
function showPattern() {
  const d = state.attention, h = d.head, name = `L${d.layer}H${h}`, tokens = d.tokens, p = d.pattern, n = tokens.length;
  $("head-title").textContent = `${name}: each row a query position, each column the key it attends to`;
  const ablate = $("ablate-head"); ablate.hidden = false; ablate.textContent = `Zero-ablate ${name}`;
  ablate.onclick = () => addIntervention(name, "zero");
  const box = $("pattern");
  const readout = (q, k) => {
    $("attn-readout").textContent = k > q ? `query ${q} ${label(tokens[q])} cannot see key ${k} (the future)` :
      `query ${q} ${label(tokens[q])} \u2192 key ${k} ${label(tokens[k])}: ${p[q][k].toFixed(DIGITS)}`;
  };
  if (n > GRID_LIMIT) {
    const size = Math.min(Math.max(8 * n, 512), 1024), canvas = el("canvas", { width: size, height: size, class: "large" });
    drawPattern(canvas, p);
    canvas.onmousemove = e => readout(Math.floor(e.offsetY / size * n), Math.floor(e.offsetX / size * n));
    box.style.gridTemplateColumns = "";
    box.replaceChildren(canvas);
    return;
  }
  box.style.gridTemplateColumns = `max-content repeat(${n}, 1.6em)`;
  const cells = [el("div", { class: "corner" })];
  for (let k = 0; k < n; k++) cells.push(el("div", { class: "key tok", text: label(tokens[k]) }));
  for (let q = 0; q < n; q++) {
    cells.push(el("div", { class: "query tok", text: `${label(tokens[q])} ${q}` }));
    for (let k = 0; k < n; k++) {
      const cell = el("div", { class: "cell" + (k > q ? " masked" : ""), "data-q": q, "data-k": k });
      if (k <= q) cell.style.background = seq(p[q][k]);
      cells.push(cell);
    }
  }
  box.replaceChildren(...cells);
  box.onmouseover = e => { const c = e.target.closest(".cell"); if (c) readout(Number(c.dataset.q), Number(c.dataset.k)); };
}

// ------------------------------------------------------------------------------ components
async function loadComponents() {
  const chosen = $("estimate-method").value;
  const body = { ...state.request, neurons: $("with-neurons").checked };
  if (chosen !== "auto") body.method = chosen;
  state.components = await api("/api/components", body);
  renderComponents();
}
function renderComponents() {
  const c = state.components, { key, desc } = state.sort;
  $("components-note").textContent = `direct: the component's direct write onto ${c.direct_onto}; ` +
    `total: attribution patching's estimate of the change of ${c.metric_name} when it is ` +
    (c.method === "patch" ? "patched from the corrupted prompt" : `${c.method}-ablated`) + ". Click a column to sort.";
  const rows = [...c.rows].sort((a, b) => {
    const x = a[key], y = b[key];
    if (typeof x === "string") return desc ? y.localeCompare(x) : x.localeCompare(y);
    const ax = x === null ? -Infinity : (key === "layer" ? x : Math.abs(x)), ay = y === null ? -Infinity : (key === "layer" ? y : Math.abs(y));
    return desc ? ay - ax : ax - ay;
  }).slice(0, 300);
  const bound = Math.max(1e-12, ...c.rows.map(r => Math.max(Math.abs(r.direct || 0), Math.abs(r.total))));
  const cols = [["component", "component"], ["type", "type"], ["layer", "layer"], ["direct", "direct effect"], ["total", "estimated total effect"]];
  const table = $("components");
  table.replaceChildren(el("tr", {}, ...cols.map(([k, name]) => el("th", { class: "sort" + (k === key ? (desc ? " desc" : " asc") : ""), "data-key": k,
    onclick: () => { state.sort = { key: k, desc: k === key ? !desc : true }; renderComponents(); }, text: name })),
    el("th", { text: "intervene" })));
  for (const r of rows) {
    const num = v => v === null ? el("td", { text: "" }) : shade(el("td", { class: "num", text: fmt(v) }), div(v, bound));
    table.append(el("tr", { "data-component": r.component }, el("td", { class: "mono", text: r.component }), el("td", { text: r.type }),
      el("td", { class: "num", text: r.layer }), num(r.direct), num(r.total),
      el("td", {}, ...["zero", "mean", "patch"].map(m => el("button", { type: "button", class: "small", "data-method": m,
        onclick: () => addIntervention(r.component, m), text: m })))));
  }
}

// ------------------------------------------------------------------------------ interventions
function addIntervention(component, method) {
  if (!state.interventions.some(i => i.component === component && i.method === method))
    state.interventions = state.interventions.filter(i => i.component !== component).concat([{ component, method }]);
  showView("interventions");
}
async function runInterventions() {
  const list = $("active-interventions");
  $("n-interventions").textContent = state.interventions.length ? `(${state.interventions.length})` : "";
  list.replaceChildren(...state.interventions.map((iv, k) => el("li", { class: "chip" },
    `${iv.method} ${iv.component} `, el("button", { type: "button", class: "remove", title: "remove", text: "\u00d7",
      onclick: () => { state.interventions.splice(k, 1); guarded(runInterventions); } }))));
  // the last result is taken away at once, and an answer that a newer request has overtaken is dropped
  const asked = state.interventionRequests = (state.interventionRequests || 0) + 1;
  $("intervention-result").replaceChildren("computing\u2026");
  const d = await api("/api/intervene", { ...state.request, interventions: state.interventions });
  if (asked !== state.interventionRequests) return;
  $("intervention-result").replaceChildren(`${d.metric_name}: `, el("span", { id: "int-before", text: fmt(d.before) }),
    " \u2192 ", el("span", { id: "int-after", text: fmt(d.after) }), "; change ",
    shade(el("b", { id: "int-change", text: fmt(d.change) }), div(d.change, Math.max(Math.abs(d.change), Math.abs(d.before), 1e-9))));
  nextTokenTable($("int-next-tokens"), d.next_tokens);
}

// ------------------------------------------------------------------------------ circuit
async function runCircuit() {
  const job = await api("/api/jobs", { ...state.request, kind: "circuit", ig_steps: Number($("ig-steps").value) });
  state.job = job.id; $("circuit-cancel").disabled = false; $("circuit-run").disabled = true;
  while (true) {
    const j = await api(`/api/jobs/${job.id}`);
    $("circuit-progress").max = Math.max(j.total, 1); $("circuit-progress").value = j.done;
    $("circuit-state").textContent = j.state === "running" ? `running: ${j.done} of ${j.total || "?"} layer passes` : j.state;
    if (j.state !== "running") {
      $("circuit-cancel").disabled = true; $("circuit-run").disabled = false; state.job = null;
      if (j.state === "failed") throw new Error(j.error);
      if (j.state === "done") { state.circuit = j.result; renderCircuit(); }
      return;
    }
    await new Promise(r => setTimeout(r, 250));
  }
}
function renderCircuit() {
  const c = state.circuit; if (!c || !c.edges.length) return;
  const maxAbs = Math.abs(c.edges[0].score), t = Number($("threshold").value) / 1000 * maxAbs;
  const kept = c.edges.filter(e => Math.abs(e.score) >= t);
  $("threshold-label").textContent = `${t.toFixed(DIGITS)}: ${kept.length} of the top ${c.edges.length} edges (${c.n_edges} in the graph) \u00b7 ${c.metric_name}`;
  // layers as rows, the embeddings at the bottom and the logits at the top; heads then the MLP in each row
  const W = 900, rowH = 70, H = (c.n_layer + 2) * rowH, slots = c.n_head + 1, dx = W / (slots + 1);
  const pos = name => {
    if (name === "embed") return [W / 2, H - rowH / 2];
    if (name === "logits") return [W / 2, rowH / 2];
    let m = /^L(\d+)H(\d+)$/.exec(name);
    if (m) return [dx * (Number(m[2]) + 1), H - rowH * (Number(m[1]) + 1.5)];
    m = /^mlp(\d+)$/.exec(name);
    return [dx * slots, H - rowH * (Number(m[1]) + 1.5) - rowH / 3];
  };
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("width", W); svg.setAttribute("height", H);
  const used = new Set();
  for (const e of kept) {
    const [x1, y1] = pos(e.upstream), [x2, y2] = pos(e.downstream); used.add(e.upstream); used.add(e.downstream);
    const line = document.createElementNS(ns, "line");
    Object.entries({ x1, y1, x2, y2, stroke: div(e.score, maxAbs), "stroke-width": 1 + 5 * Math.abs(e.score) / maxAbs, opacity: 0.85 })
      .forEach(([k, v]) => line.setAttribute(k, v));
    const title = document.createElementNS(ns, "title"); title.textContent = `${e.upstream} \u2192 ${e.downstream} (${e.input}): ${fmt(e.score)}`;
    line.append(title); svg.append(line);
  }
  for (const name of used) {
    const [x, y] = pos(name), g = document.createElementNS(ns, "g");
    const r = document.createElementNS(ns, "rect");
    Object.entries({ x: x - 26, y: y - 11, width: 52, height: 22, rx: 4, fill: "white", stroke: "#555" }).forEach(([k, v]) => r.setAttribute(k, v));
    const text = document.createElementNS(ns, "text");
    Object.entries({ x, y: y + 4, "text-anchor": "middle", "font-size": 12 }).forEach(([k, v]) => text.setAttribute(k, v));
    text.textContent = name; g.append(r, text); svg.append(g);
  }
  $("circuit-graph").replaceChildren(svg);
  const table = $("circuit-edges");
  table.replaceChildren(el("tr", {}, ...["upstream", "downstream", "input", "score"].map(h => el("th", { text: h }))));
  for (const e of kept.slice(0, 200)) table.append(el("tr", {}, el("td", { class: "mono", text: e.upstream }),
    el("td", { class: "mono", text: e.downstream }), el("td", { text: e.input }), shade(el("td", { class: "num", text: fmt(e.score) }), div(e.score, maxAbs))));
}

// ------------------------------------------------------------------------------ start
async function start() {
  state.info = await api("/api/info");
  $("model-name").textContent = `\u00b7 ${state.info.model} (${state.info.n_layer} layers \u00d7 ${state.info.n_head} heads)`;
  $("attn-layer").replaceChildren(...Array.from({ length: state.info.n_layer }, (_, l) => el("option", { value: l, text: l })));
  $("depth").max = state.info.n_layer; $("depth").value = state.info.n_layer;
  if (state.info.harvest) {
    $("tab-dashboards").hidden = false;
    $("dashboards").src = "/harvest/index.html";
  }
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showView(b.dataset.view));
  $("prompt-form").addEventListener("submit", e => { e.preventDefault(); guarded(analyse); });
  $("prompt").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); guarded(analyse); } });
  $("depth").addEventListener("input", () => guarded(loadLayer));
  $("depth-prev").addEventListener("click", () => { $("depth").stepDown(); guarded(loadLayer); });
  $("depth-next").addEventListener("click", () => { $("depth").stepUp(); guarded(loadLayer); });
  $("attn-layer").addEventListener("change", () => guarded(() => loadAttention()));
  $("rank").addEventListener("click", () => guarded(loadComponents));
  $("int-add").addEventListener("click", () => { const c = $("int-component").value.trim(); if (c) addIntervention(c, $("int-method").value); });
  $("int-clear").addEventListener("click", () => { state.interventions = []; guarded(runInterventions); });
  $("circuit-run").addEventListener("click", () => guarded(runCircuit));
  $("circuit-cancel").addEventListener("click", () => { if (state.job) api(`/api/jobs/${state.job}`, undefined, "DELETE").catch(showError); });
  $("threshold").addEventListener("input", renderCircuit);
  document.body.dataset.ready = "1";
}
guarded(start);
