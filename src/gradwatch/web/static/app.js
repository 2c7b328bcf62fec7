// The playground page: controls -> one server session per tab; poll its state every ~150 ms and draw it.
// Settings are dotted spec fields; the query string carries them under short keys, so a link reproduces a setup.
"use strict";

// short URL key -> dotted spec field, and how the control reads it
const FIELDS = [
  { key: "dataset", field: "data.name", label: "Data set", kind: "select" },
  { key: "noise", field: "data.noise", label: "Noise", kind: "number", step: 0.01, min: 0, max: 1 },
  { key: "depth", field: "model.depth", label: "Depth (layers)", kind: "range" },
  { key: "width", field: "model.width", label: "Width (units)", kind: "range" },
  { key: "act", field: "model.activation", label: "Activation", kind: "select" },
  { key: "init", field: "model.init", label: "Init", kind: "select" },
  { key: "gain", field: "model.init_gain", label: "Init gain", kind: "number", step: 0.1, min: 0.1, max: 10 },
  { key: "norm", field: "model.norm", label: "Normalisation", kind: "select" },
  { key: "res", field: "model.residual", label: "Residual", kind: "checkbox" },
  { key: "opt", field: "train.optimizer", label: "Optimizer", kind: "select" },
  { key: "lr", field: "train.learning_rate", label: "Learning rate", kind: "number", step: 0.0001, min: 0.00001 },
  { key: "bs", field: "train.batch_size", label: "Batch size", kind: "number", step: 1, min: 1 },
  { key: "clip", field: "train.clip_norm", label: "Clip norm", kind: "number", step: 0.1, min: 0, optional: true },
  { key: "epochs", field: "train.epochs", label: "Epochs", kind: "number", step: 1, min: 1 },
];

const SEED = {
  "data.name": "moons", "data.noise": 0.05, "model.depth": 10, "model.width": 10, "model.activation": "sigmoid",
  "model.init": "glorot_uniform", "model.init_gain": 1, "model.norm": "none", "model.residual": false,
  "train.optimizer": "adam", "train.learning_rate": 0.001, "train.batch_size": 32, "train.clip_norm": null,
  "train.epochs": 100,
};
const PRESETS = {
  failing: { label: "the seed's failing net", settings: SEED },
  relu: { label: "ReLU fixes it", settings: { ...SEED, "model.activation": "relu", "model.init": "he_normal" } },
  he: { label: "He init (20 ReLU layers)", settings: { ...SEED, "model.activation": "relu", "model.init": "he_normal",
    "model.depth": 20, "model.width": 16 } },
  batchnorm: { label: "batch norm", settings: { ...SEED, "model.norm": "batch" } },
  residual: { label: "residual", settings: { ...SEED, "model.residual": true } },
  clipping: { label: "exploding + clipping", settings: { ...SEED, "model.activation": "relu", "model.init": "he_normal",
    "model.init_gain": 1.3, "model.depth": 20, "model.width": 16, "train.optimizer": "sgd",
    "train.learning_rate": 0.05, "train.clip_norm": 1 } },
};

const POLL_MS = 120;
const $ = (id) => document.getElementById(id);
const PLOT = { displayModeBar: false, responsive: true };
const BASE = { margin: { l: 52, r: 12, t: 24, b: 34 }, font: { size: 11 }, paper_bgcolor: "#fff", plot_bgcolor: "#fff",
  legend: { orientation: "h", x: 0, y: 1, yanchor: "bottom" } };

const app = {
  options: null, session: null, state: null, since: 0, boundaryVersion: -1, history: null, weights: {},
  layers: {}, boundary: null, pinned: null, lastUpdates: -1, ticks: [], busy: false, again: false, generation: 0,
};
window.playground = app; // for the browser tests and the curious

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(typeof data.detail === "string" ? data.detail : `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function showError(message) { $("error").textContent = message || ""; }

// ---- controls ----

function buildControls() {
  const form = $("fields");
  const { choices, limits } = app.options;
  for (const f of FIELDS) {
    const label = document.createElement("label");
    label.textContent = f.label;
    let input;
    if (f.kind === "select") {
      input = document.createElement("select");
      for (const value of choices[f.field]) input.add(new Option(value, value));
    } else {
      input = document.createElement("input");
      input.type = f.kind;
      const [lo, hi] = limits[f.field] || [f.min, f.max];
      if (lo !== undefined) input.min = lo;
      if (hi !== undefined) input.max = hi;
      if (f.step) input.step = f.step;
      if (f.optional) input.placeholder = "off";
    }
    input.id = `f-${f.key}`;
    input.name = f.key;
    label.appendChild(input);
    if (f.kind === "range") {
      const out = document.createElement("span");
      out.className = "range-value";
      out.id = `v-${f.key}`;
      label.appendChild(out);
      input.addEventListener("input", () => { out.textContent = input.value; });
    }
    input.addEventListener("change", () => { $("preset").value = ""; settingsChanged(); });
    form.appendChild(label);
  }
  for (const [key, p] of Object.entries(PRESETS)) $("preset").add(new Option(p.label, key));
}

function writeControls(settings) {
  for (const f of FIELDS) {
    const input = $(`f-${f.key}`);
    const value = settings[f.field];
    if (f.kind === "checkbox") input.checked = Boolean(value);
    else input.value = value === null || value === undefined ? "" : value;
    if (f.kind === "range") $(`v-${f.key}`).textContent = input.value;
  }
}

function readControls() {
  const out = {};
  for (const f of FIELDS) {
    const input = $(`f-${f.key}`);
    if (f.kind === "checkbox") out[f.field] = input.checked;
    else if (f.kind === "select") out[f.field] = input.value;
    else if (input.value === "" || (f.optional && Number(input.value) === 0)) out[f.field] = f.optional ? null : input.value;
    else out[f.field] = Number(input.value);
  }
  return out;
}

function settingsToQuery(settings, preset) {
  const q = new URLSearchParams();
  if (preset) q.set("preset", preset);
  for (const f of FIELDS) {
    const v = settings[f.field];
    q.set(f.key, v === null || v === undefined ? "" : String(v));
  }
  return q.toString();
}

function settingsFromQuery() {
  const q = new URLSearchParams(location.search);
  const preset = q.get("preset");
  const settings = { ...(PRESETS[preset] ? PRESETS[preset].settings : SEED) };
  for (const f of FIELDS) {
    if (!q.has(f.key)) continue;
    const raw = q.get(f.key);
    if (f.kind === "checkbox") settings[f.field] = raw === "true" || raw === "1";
    else if (f.kind === "select") settings[f.field] = raw;
    else settings[f.field] = raw === "" ? null : Number(raw);
  }
  return { settings, preset: PRESETS[preset] ? preset : "" };
}

async function settingsChanged() {
  const settings = readControls();
  history.replaceState(null, "", `?${settingsToQuery(settings, $("preset").value)}`);
  await resetRun(settings);
}

function choosePreset(key) {
  if (!PRESETS[key]) return;
  writeControls(PRESETS[key].settings);
  history.replaceState(null, "", `?${settingsToQuery(PRESETS[key].settings, key)}`);
  return resetRun(PRESETS[key].settings);
}

// ---- session ----

function clearRun() {
  app.generation += 1;
  app.since = 0;
  app.boundaryVersion = -1;
  app.history = { epoch: [], loss: [], accuracy: [], test_loss: [], test_accuracy: [] };
  app.weights = {};
  app.layers = {};
  app.boundary = null;
  app.lastUpdates = -1;
  app.state = null;
  $("saved").textContent = "";
}

async function openSession(settings) {
  clearRun();
  const data = await api("POST", "/api/sessions", settings);
  app.session = data.id;
}

async function resetRun(settings) {
  showError("");
  try {
    if (!app.session) await openSession(settings);
    else {
      await api("POST", `/api/sessions/${app.session}/reset`, settings);
      clearRun();
    }
    await poll(true);
  } catch (err) {
    if (err.status === 404) { app.session = null; return resetRun(settings); }
    showError(err.message);
  }
}

async function command(name) {
  showError("");
  if (!app.session) return;
  try {
    const data = await api("POST", `/api/sessions/${app.session}/${name}`);
    if (name === "save") $("saved").textContent = `saved as run ${data.run}: gradwatch show ${data.run}`;
    await poll(true);
  } catch (err) { showError(err.message); }
}

function merge(s) {
  for (const [k, v] of Object.entries(s.history)) app.history[k].push(...v);
  for (const [k, v] of Object.entries(s.weights)) (app.weights[k] = app.weights[k] || []).push(...v);
  app.since = s.since + s.history.epoch.length;
  app.layers = s.layers;
  if (s.boundary !== undefined) { app.boundary = s.boundary; app.boundaryVersion = s.boundary_version; }
  app.state = s;
}

// One poll at a time: a forced poll (after a button) that finds one in flight runs right after it.
// A reply from before a reset (another generation) is dropped, never merged into the new run.
async function poll(force) {
  if (!app.session) return;
  if (app.busy) { app.again = app.again || force; return; }
  app.busy = true;
  const generation = app.generation;
  try {
    const s = await api("GET", `/api/sessions/${app.session}/state?since=${app.since}&boundary=${app.boundaryVersion}`);
    if (generation !== app.generation || s.since !== app.since) return;
    merge(s);
    if (s.updates !== app.lastUpdates || force) {
      if (s.updates !== app.lastUpdates) app.ticks.push(performance.now());
      app.lastUpdates = s.updates;
      const t0 = performance.now();
      render();
      app.renderMs = performance.now() - t0;
    }
    renderStatus();
  } catch (err) {
    if (err.status === 404) { app.session = null; app.busy = false; await resetRun(readControls()); } else showError(err.message);
  } finally {
    app.busy = false;
    if (app.again) { app.again = false; poll(true); }
  }
}

function loop() {
  const started = performance.now(); // a steady cadence: the wait shrinks by the time the poll and drawing took
  poll(false).finally(() => setTimeout(loop, Math.max(10, POLL_MS - (performance.now() - started))));
}

// ---- drawing ----

const fmt = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toPrecision(d));

function renderStatus() {
  const s = app.state;
  if (!s) return;
  $("status").textContent = s.status;
  if (s.status === "error") showError(`training stopped: ${s.error} (reset to start over)`);
  renderTreat(s.treat);
  $("epoch").textContent = s.epoch;
  $("epochs").textContent = s.epochs;
  const h = app.history;
  $("loss-value").textContent = fmt(h.loss[h.loss.length - 1]);
  $("acc-value").textContent = fmt(h.accuracy[h.accuracy.length - 1]);
  const now = performance.now();
  app.ticks = app.ticks.filter((t) => now - t < 2000);
  const span = app.ticks.length > 1 ? (app.ticks[app.ticks.length - 1] - app.ticks[0]) / 1000 : 0;
  $("rate").textContent = s.status === "running" && span > 0.5 ? ((app.ticks.length - 1) / span).toFixed(1) : "0";
  const running = s.status === "running";
  const over = ["finished", "diverged", "saved", "error"].includes(s.status);
  $("train").disabled = running || over;
  $("pause").disabled = !running;
  $("step").disabled = over;
  $("save").disabled = running || s.status === "idle" || s.status === "saved";
  $("pin").disabled = !over && s.status !== "paused";
}

function layerBars(stat, name, color, extra = {}) {
  const values = app.layers[stat] || {}; // a fresh object from each poll, so Plotly.react sees new arrays
  return { type: "bar", name, x: Object.keys(values), y: Object.values(values), marker: { color }, ...extra };
}

// mean field's prediction for the net on screen (dashed), pinned to the measured last hidden layer's bar
function theoryLine() {
  const ratios = app.state && app.state.theory, measured = app.layers.grad_norm || {};
  const names = ratios ? Object.keys(ratios) : [];
  const anchor = measured[names[names.length - 1]];
  if (!names.length || !anchor) return null;
  return { type: "scatter", mode: "lines+markers", name: "theory (mean field)", x: names,
    y: names.map((n) => (ratios[n] === null ? null : ratios[n] * anchor)),
    line: { dash: "dash", color: "#d9480f" }, marker: { size: 5 } };
}

// every update redraws the gradient bars and the curves; the slower panels follow at most every SLOW_MS
const SLOW_MS = 700;

function render() {
  const pin = app.pinned;
  // the heart of the page: one bar per layer, on a log axis
  const grad = [layerBars("grad_norm", "this run", "#2f6fde")];
  if (pin) grad.push({ type: "bar", name: `pinned: ${pin.label}`, x: Object.keys(pin.grad), y: Object.values(pin.grad),
    marker: { color: "#b8bec9" } });
  const theory = theoryLine();
  if (theory) grad.push(theory);
  Plotly.react("grad", grad, { ...BASE, barmode: "group", showlegend: Boolean(pin || theory),
    yaxis: { type: "log", title: { text: "||gradient||" }, exponentformat: "power", dtick: 1 }, xaxis: { title: { text: "layer (input → output)" } } },
  PLOT);

  const h = Object.fromEntries(Object.entries(app.history).map(([k, v]) => [k, v.slice()])); // new arrays: react redraws
  const curves = [
    { x: h.epoch, y: h.loss, name: "loss", line: { color: "#c2412d" } },
    { x: h.epoch, y: h.test_loss, name: "test loss", line: { color: "#c2412d", dash: "dot" } },
    { x: h.epoch, y: h.accuracy, name: "accuracy", yaxis: "y2", line: { color: "#2c8a4b" } },
  ];
  if (pin) {
    curves.push({ x: pin.history.epoch, y: pin.history.loss, name: "pinned loss", line: { color: "#b8bec9", dash: "dash" } });
    curves.push({ x: pin.history.epoch, y: pin.history.accuracy, name: "pinned accuracy", yaxis: "y2",
      line: { color: "#9aa3b2", dash: "dot" } });
  }
  Plotly.react("curves", curves, { ...BASE, xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: "loss" }, rangemode: "tozero" },
    yaxis2: { title: { text: "accuracy" }, overlaying: "y", side: "right", range: [0, 1.02], autorange: false,
      tickmode: "linear", tick0: 0, dtick: 0.25, tickformat: ".0%", showgrid: false }, margin: { ...BASE.margin, r: 52 } },
  PLOT);

  const now = performance.now();
  const running = app.state && app.state.status === "running";
  if (running && now - (app.slowDrawn || 0) < SLOW_MS) return;
  app.slowDrawn = now;
  renderDiagnosis();
  Plotly.react("backprop", [layerBars("backprop_norm", "|dL/d output|", "#7a5cd6")], { ...BASE,
    yaxis: { type: "log", exponentformat: "power" } }, PLOT);

  const units = [layerBars("saturated_frac", "saturated (sigmoid/tanh)", "#e08a1e"),
    layerBars("dead_frac", "dead (ReLU family)", "#555c6b")];
  Plotly.react("units", units, { ...BASE, barmode: "group", yaxis: { range: [0, 1], tickformat: ".0%" } }, PLOT);

  const weights = Object.entries(app.weights).map(([name, ys]) => ({ x: h.epoch.slice(0, ys.length), y: ys.slice(), name,
    mode: "lines" }));
  Plotly.react("weights", weights, { ...BASE, xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: "weight_trace" } } }, PLOT);

  const b = app.boundary;
  if (b && b !== app.boundaryDrawn) {
    app.boundaryDrawn = b;
    const pts = b.points;
    const cls = (c) => pts.y.map((y, i) => (y === c ? i : -1)).filter((i) => i >= 0);
    const scatter = (c, color) => ({ type: "scatter", mode: "markers", name: `class ${c}`, x: cls(c).map((i) => pts.x1[i]),
      y: cls(c).map((i) => pts.x2[i]), marker: { color, size: 5, line: { color: "#fff", width: 0.5 } } });
    Plotly.react("boundary", [
      { type: "heatmap", x: b.x, y: b.y, z: b.p, zmin: 0, zmax: 1, colorscale: [[0, "#f3b4a6"], [0.5, "#f6f7f9"],
        [1, "#a9c3f3"]], showscale: false, hoverinfo: "skip" },
      scatter(0, "#c2412d"), scatter(1, "#2f6fde"),
    ], { ...BASE, showlegend: false, xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" } }, PLOT);
  }
}

function renderDiagnosis() {
  const list = $("diagnosis");
  const s = app.state;
  list.replaceChildren();
  const add = (text, cls) => { const li = document.createElement("li"); li.textContent = text; li.className = cls;
    list.appendChild(li); };
  if (!s || s.epoch === 0) add("train to see a diagnosis", "none");
  else if (!s.findings.length) add("no findings: the gradients look healthy", "healthy");
  for (const f of (s ? s.findings : [])) add(f.text, f.severity);
}

function pin() {
  const s = app.state;
  if (!s) return;
  const settings = readControls();
  app.pinned = { label: `${settings["model.depth"]}x${settings["model.width"]} ${settings["model.activation"]}, `
    + `${settings["model.init"]}, loss ${fmt(app.history.loss[app.history.loss.length - 1])}`,
  history: JSON.parse(JSON.stringify(app.history)), grad: { ...(app.layers.grad_norm || {}) } };
  $("pinned-label").textContent = `pinned: ${app.pinned.label}`;
  $("unpin").disabled = false;
  render();
}

function unpin() {
  app.pinned = null;
  $("pinned-label").textContent = "";
  $("unpin").disabled = true;
  render();
}

async function start() {
  try {
    app.options = await api("GET", "/api/options");
  } catch (err) { showError(`cannot reach the server: ${err.message}`); return; }
  buildControls();
  const { settings, preset } = settingsFromQuery();
  writeControls(settings);
  $("preset").value = preset;
  $("preset").addEventListener("change", (e) => choosePreset(e.target.value));
  for (const name of ["train", "pause", "step", "save"]) $(name).addEventListener("click", () => command(name));
  $("reset").addEventListener("click", () => resetRun(readControls()));
  $("pin").addEventListener("click", pin);
  $("treat").addEventListener("click", () => command("treat"));
  $("unpin").addEventListener("click", unpin);
  $("fields").addEventListener("submit", (e) => e.preventDefault());
  window.addEventListener("pagehide", () => {
    if (app.session) fetch(`/api/sessions/${app.session}`, { method: "DELETE", keepalive: true });
  });
  await resetRun(settings);
  loop();
}

start();
