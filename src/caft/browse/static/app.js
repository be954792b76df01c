// caft browse: review candidate directions, select the ones to ablate, save the selection file.
// Plain JavaScript, no dependencies; all data comes from this server's /api.
"use strict";

const state = {
  run: null,
  candidates: [],
  byId: new Map(),
  selected: new Set(),
  notes: {},
  saved: { selected: new Set(), notes: {} },
  visible: [], // ids, in display order
  focus: null,
  sort: "layer",
  savedMessage: "",
};

const $ = (selector) => document.querySelector(selector);
const SVG_NS = "http://www.w3.org/2000/svg";

// ---- DOM helpers: text always goes through textContent, never innerHTML ------------------------
function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key === "className" ? "class" : key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function setStatus(text, kind = "") {
  const status = $("#status");
  status.textContent = text;
  status.className = kind;
}

// ---- scores -------------------------------------------------------------------------------------
const SCORE_NAMES = { discovery: "discovery", contrast: "contrast", autointerp: "relevance" };

function scoreName(label) {
  if (label === "discovery" && state.run.method === "pca") return "var";
  return SCORE_NAMES[label] || label;
}

function formatScore(label, value) {
  if (value === null || value === undefined) return "–";
  if (label === "discovery" && state.run.method === "pca") return `${(100 * value).toFixed(1)}%`;
  if (label === "autointerp") return value.toFixed(0);
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
}

function badges(candidate) {
  return Object.keys(state.run.scores).map((label) => {
    const value = candidate.scores[label];
    const passes = label === "contrast" && value > 1;
    const missing = value === null || value === undefined;
    return el(
      "span",
      { className: `badge${passes ? " pass" : ""}${missing ? " missing" : ""}`, title: state.run.scores[label] },
      `${scoreName(label)} `,
      el("b", { text: formatScore(label, value) }),
    );
  });
}

// ---- filtering and sorting ----------------------------------------------------------------------
function visibleCandidates() {
  const terms = $("#filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const layer = $("#layer").value;
  const selectedOnly = $("#selected-only").checked;
  const found = state.candidates.filter((c) => {
    if (layer !== "" && String(c.layer) !== layer) return false;
    if (selectedOnly && !state.selected.has(c.id)) return false;
    const text = `${c.search}\n${(state.notes[c.id] || "").toLowerCase()}`;
    return terms.every((term) => text.includes(term));
  });
  if (state.sort !== "layer") {
    const key = (c) => c.scores[state.sort];
    found.sort((a, b) => {
      const x = key(a);
      const y = key(b);
      if (x === y) return a.order - b.order;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return y - x;
    });
  }
  return found;
}

// ---- the list -----------------------------------------------------------------------------------
function renderList() {
  const list = $("#list");
  const visible = visibleCandidates();
  state.visible = visible.map((c) => c.id);
  const fragment = document.createDocumentFragment();
  let layer = null;
  for (const candidate of visible) {
    if (state.sort === "layer" && candidate.layer !== layer) {
      layer = candidate.layer;
      fragment.append(el("div", { className: "layer-head", "data-layer": layer }));
    }
    fragment.append(renderRow(candidate));
  }
  if (!visible.length) fragment.append(el("p", { className: "empty muted", text: "No candidate matches." }));
  list.replaceChildren(fragment);
  refreshMarks();
  if (!state.visible.includes(state.focus)) setFocus(state.visible[0] ?? null);
  else markFocus();
}

function renderRow(candidate) {
  const checkbox = el("input", { type: "checkbox", tabindex: "-1", "aria-label": `select ${candidate.id}` });
  checkbox.addEventListener("click", (event) => {
    event.stopPropagation();
    checkbox.blur(); // keys go back to the list: space must not toggle this box again
    toggle(candidate.id);
    setFocus(candidate.id);
  });
  return el(
    "div",
    { className: "row", "data-id": candidate.id, onclick: () => setFocus(candidate.id) },
    checkbox,
    el(
      "div",
      { className: "row-main" },
      el("div", { className: "row-head" }, el("span", { className: "cid", text: candidate.id }), badges(candidate), el("span", { className: "note-mark", text: "note" })),
      candidate.explanation ? el("div", { className: "expl", text: candidate.explanation }) : null,
      peakTokens(candidate),
    ),
  );
}

function peakTokens(candidate) {
  const line = el("div", { className: "peaks" });
  for (const [side, sign, cls] of [["top", "+", "p"], ["bottom", "−", "n"]]) {
    const windows = candidate.windows[side];
    if (!windows.length) continue;
    const strongest = Math.abs(windows[0].peak_value) || 1;
    const seen = new Set();
    line.append(el("span", { className: "sign", text: sign }));
    for (const w of windows) {
      const token = w.tokens[w.peak].trim() || "␣";
      if (seen.has(token)) continue;
      seen.add(token);
      const span = el("span", { className: `tok ${cls}`, text: token, title: w.peak_value.toFixed(2) });
      span.style.setProperty("--a", (0.25 + 0.6 * Math.abs(w.peak_value) / strongest).toFixed(2));
      line.append(span);
      if (seen.size === 4) break;
    }
  }
  return line;
}

// Selection marks, notes marks and per-layer counts, without rebuilding the list.
function refreshMarks() {
  for (const row of document.querySelectorAll("#list .row")) {
    const id = row.dataset.id;
    const on = state.selected.has(id);
    row.classList.toggle("selected", on);
    row.querySelector("input").checked = on;
    row.classList.toggle("has-note", Boolean((state.notes[id] || "").trim()));
  }
  for (const head of document.querySelectorAll("#list .layer-head")) {
    const layer = Number(head.dataset.layer);
    const all = state.candidates.filter((c) => c.layer === layer);
    const chosen = all.filter((c) => state.selected.has(c.id)).length;
    const count = chosen ? `${chosen} of ${all.length} selected` : `${all.length} candidates`;
    head.replaceChildren(el("span", { text: `Layer ${layer}` }), el("span", { className: chosen ? "chosen" : "muted", text: count }));
  }
  const shown = state.visible.length;
  $("#count").textContent = `${state.selected.size} selected · ${shown} of ${state.candidates.length} shown`;
  const dirty = isDirty();
  $("#save").classList.toggle("dirty", dirty);
  document.title = `${dirty ? "● " : ""}caft browse`;
  const status = $("#status");
  if (dirty && !status.classList.contains("error")) setStatus("unsaved changes", "warn");
  else if (!dirty && status.textContent === "unsaved changes") setStatus(state.savedMessage);
}

function isDirty() {
  const a = state.selected;
  const b = state.saved.selected;
  if (a.size !== b.size || [...a].some((id) => !b.has(id))) return true;
  const clean = (notes) => Object.entries(notes).filter(([, text]) => text.trim()).sort();
  return JSON.stringify(clean(state.notes)) !== JSON.stringify(clean(state.saved.notes));
}

// ---- focus and selection ------------------------------------------------------------------------
function setFocus(id) {
  state.focus = id;
  markFocus();
  renderDetail();
}

function markFocus() {
  for (const row of document.querySelectorAll("#list .row.focused")) row.classList.remove("focused");
  const row = state.focus && document.querySelector(`#list .row[data-id="${state.focus}"]`);
  if (row) {
    row.classList.add("focused");
    row.scrollIntoView({ block: "nearest" });
  }
}

function move(step) {
  if (!state.visible.length) return;
  const at = state.visible.indexOf(state.focus);
  const next = at < 0 ? 0 : Math.min(state.visible.length - 1, Math.max(0, at + step));
  setFocus(state.visible[next]);
}

function toggle(id) {
  if (!id) return;
  if (state.selected.has(id)) state.selected.delete(id);
  else state.selected.add(id);
  refreshMarks();
  if (id === state.focus) updateToggleButton();
}

// ---- the detail pane ----------------------------------------------------------------------------
function renderDetail() {
  const detail = $("#detail");
  const candidate = state.byId.get(state.focus);
  if (!candidate) {
    detail.replaceChildren(el("p", { className: "muted", text: "No candidate matches the filter." }));
    return;
  }
  const note = el("textarea", { id: "note", rows: "4", placeholder: "Why keep or drop this one? (saved with the selection)" });
  note.value = state.notes[candidate.id] || "";
  note.addEventListener("input", () => {
    state.notes[candidate.id] = note.value;
    refreshMarks();
  });
  const details = Object.entries(candidate.details || {}).filter(([, v]) => v !== null && v !== "");
  const parts = [
    el(
      "div",
      { className: "detail-head" },
      el("h2", { text: candidate.id }),
      el("span", { className: "muted", text: `layer ${candidate.layer} · candidate ${candidate.index}` }),
      el("button", { id: "toggle", type: "button", onclick: () => toggle(candidate.id) }),
    ),
    el("div", { className: "badges" }, badges(candidate)),
    candidate.explanation ? el("p", { className: "explanation", text: candidate.explanation }) : null,
    details.length ? el("p", { className: "details muted", text: details.map(([k, v]) => `${k}: ${v}`).join(" · ") }) : null,
    el(
      "div",
      { className: "panels" },
      el("figure", { className: "hist" }, histogram(candidate), el("figcaption", { className: "muted", text: histogramCaption() })),
      el("label", { className: "note" }, el("span", { text: "Note" }), note),
    ),
    windowList("Most positive", candidate.windows.top),
    windowList("Most negative", candidate.windows.bottom),
  ];
  detail.replaceChildren(...parts.filter(Boolean));
  updateToggleButton();
}

function updateToggleButton() {
  const button = $("#toggle");
  if (!button) return;
  const on = state.selected.has(state.focus);
  button.textContent = on ? "✓ Selected" : "Select";
  button.title = "space or x";
  button.classList.toggle("on", on);
}

function histogramCaption() {
  const { n_tokens: tokens, n_documents: documents } = state.run;
  return `projection at ${tokens} tokens of ${documents} corpus documents (log count); dashed: the weakest window shown per side`;
}

function histogram(candidate) {
  const h = candidate.histogram;
  const width = 360;
  const height = 90;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 16}`, className: "hist-svg", role: "img", "aria-label": `histogram of ${candidate.id}` });
  if (!h || h.high <= h.low) return chart;
  const n = h.counts.length;
  const max = Math.max(...h.counts, 1);
  const x = (value) => ((value - h.low) / (h.high - h.low)) * width;
  const bar = width / n;
  h.counts.forEach((count, i) => {
    if (!count) return;
    const tall = Math.max(1, (Math.log1p(count) / Math.log1p(max)) * height);
    const from = h.low + (i * (h.high - h.low)) / n;
    const to = from + (h.high - h.low) / n;
    chart.append(
      svg("rect", { x: i * bar + 0.5, y: height - tall, width: Math.max(1, bar - 1), height: tall, className: (from + to) / 2 >= 0 ? "bar p" : "bar n" },
        svg("title", { text: `${count} tokens in [${from.toFixed(2)}, ${to.toFixed(2)})` })),
    );
  });
  chart.append(svg("line", { x1: 0, x2: width, y1: height, y2: height, className: "axis" }));
  const marks = [[candidate.windows.top, "p", Math.min], [candidate.windows.bottom, "n", Math.max]];
  for (const [windows, cls, pick] of marks) {
    if (!windows.length) continue;
    const at = x(pick(...windows.map((w) => w.peak_value)));
    chart.append(svg("line", { x1: at, x2: at, y1: 0, y2: height, className: `mark ${cls}` }));
  }
  const label = (value, anchor, at) => svg("text", { x: at, y: height + 13, "text-anchor": anchor, text: value });
  chart.append(label(h.low.toFixed(1), "start", 0), label(h.high.toFixed(1), "end", width));
  if (h.low < 0 && h.high > 0) {
    chart.append(svg("line", { x1: x(0), x2: x(0), y1: 0, y2: height, className: "zero" }), label("0", "middle", x(0)));
  }
  return chart;
}

function windowList(title, windows) {
  const list = el("ol", { className: "windows" });
  for (const w of windows) {
    list.append(el("li", {}, renderWindow(w), el("span", { className: "val", text: (w.peak_value > 0 ? "+" : "") + w.peak_value.toFixed(2) })));
  }
  return el("section", { className: "side" }, el("h3", { text: `${title} (${windows.length})` }), windows.length ? list : el("p", { className: "muted", text: "none" }));
}

function renderWindow(w) {
  const scale = Math.max(...w.values.map(Math.abs), 1e-9);
  const line = el("span", { className: "win" });
  w.tokens.forEach((token, i) => {
    const value = w.values[i];
    const span = el("span", { className: (value > 0 ? "p" : "n") + (i === w.peak ? " peak" : ""), title: value.toFixed(2), text: token.replace(/\n/g, "⏎") });
    span.style.setProperty("--a", Math.min(1, Math.abs(value) / scale).toFixed(2));
    line.append(span);
  });
  return line;
}

// ---- saving -------------------------------------------------------------------------------------
function applySaved(saved) {
  state.saved = { selected: new Set(saved.selected), notes: { ...saved.notes } };
  state.selected = new Set(saved.selected);
  state.notes = { ...saved.notes };
}

function fileName(path) {
  return path.split(/[\\/]/).pop();
}

function describeSaved(saved) {
  $("#status").title = saved.file;
  const warnings = saved.warnings.length ? ` — ${saved.warnings.join(" ")}` : "";
  if (!saved.rule) return `no ${fileName(saved.file)} yet: Save writes it${warnings}`;
  return `${fileName(saved.file)}: ${saved.selected.length} selected by “${saved.rule}”, ${saved.saved_at}${warnings}`;
}

async function save() {
  const selected = state.candidates.filter((c) => state.selected.has(c.id)).map((c) => c.id);
  const notes = Object.fromEntries(Object.entries(state.notes).filter(([, text]) => text.trim()));
  setStatus("Saving…");
  try {
    const saved = await api("api/selection", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ selected, notes }),
    });
    applySaved(saved);
    state.savedMessage = `Saved ${saved.selected.length} selected → ${fileName(saved.file)}`;
    $("#status").title = saved.file;
    setStatus(state.savedMessage, "ok");
    refreshMarks();
  } catch (error) {
    setStatus(`Not saved: ${error.message}`, "error");
  }
}

// ---- keyboard -----------------------------------------------------------------------------------
function onKey(event) {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
    event.preventDefault();
    save();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.closest("input:not([type=checkbox]), textarea, select")) {
    if (event.key === "Escape" || (event.key === "Enter" && event.target.id === "filter")) {
      event.target.blur();
      event.preventDefault();
    }
    return;
  }
  const actions = {
    j: () => move(1),
    ArrowDown: () => move(1),
    k: () => move(-1),
    ArrowUp: () => move(-1),
    " ": () => toggle(state.focus),
    x: () => toggle(state.focus),
    "/": () => $("#filter").focus(),
    n: () => $("#note")?.focus(),
  };
  if (actions[event.key]) {
    event.preventDefault();
    actions[event.key]();
  }
}

// ---- start --------------------------------------------------------------------------------------
async function start() {
  try {
    const [data, saved] = await Promise.all([api("api/candidates"), api("api/state")]);
    state.run = data.run;
    state.candidates = data.candidates.map((c, order) => ({
      ...c,
      order,
      search: [c.id, c.explanation, ...[...c.windows.top, ...c.windows.bottom].map((w) => w.tokens.join(""))].join("\n").toLowerCase(),
    }));
    state.byId = new Map(state.candidates.map((c) => [c.id, c]));
    applySaved(saved);
    setupControls();
    renderList();
    state.savedMessage = describeSaved(saved);
    setStatus(state.savedMessage, saved.warnings.length ? "warn" : "");
  } catch (error) {
    setStatus(`Could not load the run: ${error.message}`, "error");
  }
}

function setupControls() {
  const run = state.run;
  const info = $("#run-info");
  info.textContent = `${state.candidates.length} ${run.method} candidates · ${run.model}`;
  info.title = `run: ${run.dir}\ncandidates: ${run.candidates}\ndata: ${run.data}\ncorpus: ${run.corpus}`;
  for (const layer of run.layers) $("#layer").append(el("option", { value: layer, text: `layer ${layer}` }));
  for (const label of Object.keys(run.scores)) {
    $("#sort").append(el("option", { value: label, text: `sort: ${scoreName(label)} ↓` }));
  }
  $("#filter").addEventListener("input", renderList);
  // After a choice with the mouse, give the keys back to the list (j/k, space).
  for (const id of ["#layer", "#selected-only", "#sort"]) {
    $(id).addEventListener("change", (event) => {
      state.sort = $("#sort").value;
      renderList();
      event.target.blur();
    });
  }
  $("#save").addEventListener("click", save);
  document.addEventListener("keydown", onKey);
  window.addEventListener("beforeunload", (event) => {
    if (isDirty()) event.preventDefault();
  });
}

start();
